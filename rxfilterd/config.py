"""The configuration file (TOML), validated into typed settings.

Two steps: `validate` checks every key against the dataclasses below and builds them
already normalised, reading no file; `from_dict` then reads the files the settings name
(the MQTT password, TLS files). Every error names the file and the key, so one message
tells an operator what to fix. Why no schema library: docs/service.md.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar, get_args, get_origin

from rxfilterd.policy import SyncPolicy
from rxfilterd.policy_rule import PolicyRule, select_policy

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# A section's or a [[policy]] table's dataclass.
Settings = TypeVar("Settings", bound="DataclassInstance")

DEFAULT_PATH = Path("/etc/rxfilterd/rxfilterd.toml")

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "console", "json", "journal"]


class ConfigError(Exception):
    """A config file that cannot be used; str() is the one-line message to print."""


# Field metadata of a setting that is no key of the file (the validator rejects it).
NOT_A_KEY: Mapping[str, bool] = {"key": False}


@dataclass(frozen=True)
class LibvirtSettings:
    # The host's libvirt; "" for none (a node whose libvirts all run in pods).
    uri: str = "qemu:///system"
    # Cap for the reconnect backoff, in seconds.
    reconnect_max: float = 30.0
    # libvirt >= 10.0 changes an interface's trust on a running domain and announces
    # nothing: domains with an untrusted macvtap NIC are re-read this often (seconds;
    # 0 turns it off; a revoked trust needs no polling: every write re-checks it).
    trust_poll: float = 1.0


def _socket_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value or "/../" in f"{value}/":
        raise ValueError(f"{value!r} is not an absolute path without '..'")
    return value


@dataclass(frozen=True)
class PodSettings:
    """[pods]: libvirt daemons in other mount namespaces (KubeVirt's virt-launcher pods)."""

    enabled: bool = False
    # Process names (as /proc/PID/comm has them) of a pod's libvirt daemon.
    daemons: frozenset[str] = frozenset({"virtqemud", "libvirtd"})
    # Where a pod's daemon listens, inside its own root; the first that exists is used.
    sockets: tuple[Annotated[str, _socket_path], ...] = (
        "/run/libvirt/virtqemud-sock",
        "/run/libvirt/libvirt-sock",
        "/var/run/libvirt/virtqemud-sock",
        "/var/run/libvirt/libvirt-sock",
    )
    # Only pods whose name (hostname) matches this glob are served.
    match: str = "*"
    # Seconds between two looks for pods coming and going.
    scan_interval: float = 2.0


@dataclass(frozen=True)
class LogSettings:
    level: LogLevel = "info"
    # auto: the journal's native protocol under systemd, console lines otherwise.
    format: LogFormat = "auto"


@dataclass(frozen=True)
class SyncSettings(SyncPolicy):
    """[sync]: the default sync policy (fields, vlan, mac_allow) and the daemon's pace."""

    dry_run: bool = False
    # Seconds between full resyncs that repair drift; 0 turns it off.
    resync_interval: float = 300.0
    # Per NIC: a guest flipping its filter costs at most this many syncs a second.
    max_syncs_per_second: float = 5.0
    # Cap for the per-NIC retry backoff after a failed apply, in seconds.
    retry_max: float = 30.0


def _default_client_id() -> str:
    """RXFILTERD_CLIENT_ID (a DaemonSet passes the node's name), else the host name."""
    return os.environ.get("RXFILTERD_CLIENT_ID") or socket.gethostname()


@dataclass(frozen=True)
class MqttSettings:
    enabled: bool = False
    host: str = "localhost"
    port: int = 1883
    topic_prefix: str = "rxfilterd"
    client_id: str = field(default_factory=_default_client_id)
    username: str | None = None
    password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    qos: int = 1
    # Events kept for the publisher while the broker is slow or away.
    queue_size: int = 1000
    # Cap for the reconnect backoff, in seconds.
    reconnect_max: float = 30.0
    # Not a config key: read from password_file once the settings are valid.
    password: str | None = field(default=None, repr=False, compare=False, metadata=NOT_A_KEY)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context when any tls_* key is set; OSError/SSLError on bad files."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


def listen_address(value: str) -> str:
    """ "HOST:PORT" ("[V6ADDR]:PORT" for IPv6) checked; ValueError says what is wrong."""
    host, port = split_listen(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_listen(value: str) -> tuple[str, int]:
    """HOST and PORT of a "HOST:PORT" or "[V6ADDR]:PORT" string (ValueError if neither)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f'{value!r} is not "HOST:PORT" (e.g. "127.0.0.1:9474")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'{value!r}: an IPv6 address goes in brackets, e.g. "[::1]:9474"')
    if not host or any(c.isspace() or c in "[]/" for c in host):
        raise ValueError(f"{value!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: {port!r} is not a TCP port (1-65535)")
    return host, int(port)


@dataclass(frozen=True)
class MetricsSettings:
    # "HOST:PORT" of the Prometheus endpoint (/metrics); None: no endpoint.
    listen: Annotated[str, listen_address] | None = None
    # Add a domain label to the per-sync counters and the NIC gauge (one series per
    # domain: fine for tens of domains, not for thousands).
    domain_label: bool = False


@dataclass(frozen=True)
class StatusSettings:
    # The unix socket `rxfilterd status` asks (root only, under the unit's RuntimeDirectory).
    socket: str = "/run/rxfilterd/status.sock"


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    libvirt: LibvirtSettings = field(default_factory=LibvirtSettings)
    log: LogSettings = field(default_factory=LogSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    pods: PodSettings = field(default_factory=PodSettings)
    policies: tuple[PolicyRule, ...] = ()

    def policy_for(
        self, domain: str, network: str | None, portgroup: str | None
    ) -> tuple[SyncPolicy, str]:
        """The sync policy of one NIC, and its source: "sync" or a [[policy]] name."""
        return select_policy(self.policies, self.sync, domain, network, portgroup)

    def with_dry_run(self) -> Config:
        """These settings with dry_run forced on (--dry-run, which outlives a reload)."""
        return dataclasses.replace(self, sync=dataclasses.replace(self.sync, dry_run=True))


def load(path: Path) -> Config:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(data, path)


def from_dict(data: Mapping[str, object], path: Path | None = None) -> Config:
    """Validate DATA, then read the files its settings name (MQTT password, TLS files)."""
    where = str(path) if path else "<config>"
    config = validate(data, path)
    mqtt = config.mqtt
    if mqtt.password_file is not None:
        mqtt = dataclasses.replace(mqtt, password=_read_password(mqtt.password_file, where))
    _check_tls_files(mqtt, where)
    return dataclasses.replace(config, mqtt=mqtt)


def validate(data: Mapping[str, object], path: Path | None = None) -> Config:
    """The settings DATA holds, checked and normalised; reads no file."""
    where = str(path) if path else "<config>"
    for name in data:
        if name not in ("libvirt", "log", "sync", "mqtt", "metrics", "status", "pods", "policy"):
            raise ConfigError(f"{where}: unknown section [{name}]")
    config = Config(
        path=path,
        libvirt=_section(LibvirtSettings, data, "libvirt", where),
        log=_section(LogSettings, data, "log", where),
        sync=_section(SyncSettings, data, "sync", where),
        mqtt=_section(MqttSettings, data, "mqtt", where),
        metrics=_section(MetricsSettings, data, "metrics", where),
        status=_section(StatusSettings, data, "status", where),
        pods=_section(PodSettings, data, "pods", where),
        policies=_policies(data.get("policy", []), where),
    )
    _check(config, where)
    return config


def _section(cls: type[Settings], data: Mapping[str, object], name: str, where: str) -> Settings:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return _build(cls, value, f"{where}: {name}")


def _policies(value: object, where: str) -> tuple[PolicyRule, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{where}: policy must be an array of tables ([[policy]])")
    rules: list[PolicyRule] = []
    for index, table in enumerate(value):
        at = f"{where}: policy[{index}]"
        rule = _build(PolicyRule, {"name": f"policy[{index}]", **table}, at)
        if any(r.name == rule.name for r in rules):
            raise ConfigError(f"{at}.name: {rule.name!r} is used twice")
        if rule.fields is None and rule.mac_allow is None and rule.vlan is None:
            raise ConfigError(f"{at}: sets none of fields, mac_allow, vlan")
        rules.append(rule)
    return tuple(rules)


def _build(cls: type[Settings], values: Mapping[str, object], where: str) -> Settings:
    """CLS from a TOML table: every key known, every value converted to its field's type."""
    hints = typing.get_type_hints(cls, include_extras=True)
    keys = {f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)}
    kwargs = {}
    for key, value in values.items():
        if key not in keys:
            raise ConfigError(f"{where}.{key}: unknown key")
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _convert(value: object, hint: object, where: str) -> object:
    """VALUE as the type HINT says, or ConfigError naming WHERE."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (types.UnionType, typing.Union):
        # TOML has no null: an optional key is absent, never None.
        assert len(args) == 2 and type(None) in args, f"unsupported config type {hint!r}"
        (option,) = (a for a in args if a is not type(None))
        return _convert(value, option, where)
    if origin is Annotated:
        # Annotated[base, normalise]: normalise raises ValueError with the reason.
        base, *normalisers = args
        converted = _convert(value, base, where)
        for normalise in normalisers:
            try:
                converted = normalise(converted)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return converted
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (tuple, frozenset):
        return _collection(value, origin, args, where)
    return _scalar(value, hint, where)


def _collection(
    value: object,
    origin: type[tuple[object, ...]] | type[frozenset[object]],
    args: tuple[object, ...],
    where: str,
) -> object:
    """tuple[X, ...] or frozenset[X] from a TOML array; a set lists nothing twice."""
    assert args[1:] in ((), (Ellipsis,)), f"unsupported config type {origin!r}{args!r}"
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {_kind(value)}")
    items = [_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        return tuple(items)
    for i, item in enumerate(items):
        if item in items[:i]:
            raise ConfigError(f"{where}: lists {item!r} twice")
    return frozenset(items)


def _scalar(value: object, hint: object, where: str) -> object:
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {_kind(value)}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_kind(value)}")
        return value
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            name = "true or false" if hint is bool else "a string"
            raise ConfigError(f"{where}: expected {name}, got {_kind(value)}")
        return value
    raise AssertionError(f"unsupported config type {hint!r}")  # a bug in this module


def _kind(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _check(config: Config, where: str) -> None:
    """Constraints between or within values that types cannot say."""
    if config.sync.max_syncs_per_second <= 0:
        raise ConfigError(f"{where}: sync.max_syncs_per_second: must be above 0")
    mqtt = config.mqtt
    if not 0 < mqtt.port < 65536:
        raise ConfigError(f"{where}: mqtt.port: {mqtt.port} is not a TCP port")
    if mqtt.qos not in (0, 1, 2):
        raise ConfigError(f"{where}: mqtt.qos: must be 0, 1 or 2")
    if mqtt.queue_size < 1:
        raise ConfigError(f"{where}: mqtt.queue_size: must be at least 1")
    prefix = mqtt.topic_prefix
    # Empty levels ("a//b", a trailing "/") and "$" topics (reserved for brokers) are
    # legal MQTT but break the <prefix>/+/... subscriptions the fleet view relies on.
    if not prefix or any(c in prefix for c in "#+\0") or "" in prefix.split("/"):
        raise ConfigError(
            f"{where}: mqtt.topic_prefix: must be non-empty, without #, + or empty levels"
        )
    if prefix.startswith("$"):
        raise ConfigError(f"{where}: mqtt.topic_prefix: must not start with $")
    # client_id is one topic level: <prefix>/<client_id>/...
    if not mqtt.client_id or any(c in mqtt.client_id for c in "/#+\0"):
        raise ConfigError(f"{where}: mqtt.client_id: must be non-empty, without /, # or +")
    if (mqtt.tls_cert is None) != (mqtt.tls_key is None):
        raise ConfigError(f"{where}: mqtt.tls_cert and mqtt.tls_key go together")
    if mqtt.password_file is not None and mqtt.username is None:
        raise ConfigError(f"{where}: mqtt.password_file: needs mqtt.username")
    pods = config.pods
    if pods.enabled and (not pods.daemons or not pods.sockets):
        raise ConfigError(f"{where}: pods: daemons and sockets must each name at least one")
    if pods.scan_interval <= 0:
        raise ConfigError(f"{where}: pods.scan_interval: must be above 0")
    if not config.libvirt.uri and not pods.enabled:
        raise ConfigError(f'{where}: libvirt.uri: "" (no host libvirt) needs [pods] enabled')
    if not config.status.socket.startswith("/"):
        raise ConfigError(f"{where}: status.socket: must be an absolute path")


def _read_password(path: str, where: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{where}: mqtt.password_file: cannot read {path}: {reason}") from None
    # One line; the newline an editor or `echo` adds is not part of the password.
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"{where}: mqtt.password_file: {path} is empty")
    return password


def _check_tls_files(mqtt: MqttSettings, where: str) -> None:
    for key, value in (
        ("tls_ca", mqtt.tls_ca),
        ("tls_cert", mqtt.tls_cert),
        ("tls_key", mqtt.tls_key),
    ):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{where}: mqtt.{key}: {value} is not a readable file")
    try:
        mqtt.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: mqtt.tls_*: cannot set up TLS: {exc}") from None
