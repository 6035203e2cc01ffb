"""The configuration file (TOML), validated into typed settings.

Every error names the file and the key, so one message tells an operator what to fix.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from rxfilterd.mac import MacError, parse_mac
from rxfilterd.policy import ALL_FIELDS, Field, SyncPolicy, VlanPolicy
from rxfilterd.policy_rule import PolicyRule, select_policy

DEFAULT_PATH = Path("/etc/rxfilterd/rxfilterd.toml")

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "console", "json", "journal"]


class ConfigError(Exception):
    """A config file that cannot be used; str() is the one-line message to print."""


@dataclass(frozen=True)
class LibvirtSettings:
    uri: str = "qemu:///system"
    # Cap for the reconnect backoff, in seconds.
    reconnect_max: float = 30.0
    # libvirt >= 10.0 changes an interface's trust on a running domain and announces
    # nothing: domains with an untrusted macvtap NIC are re-read this often (seconds;
    # 0 turns it off; a revoked trust needs no polling: every write re-checks it).
    trust_poll: float = 1.0


@dataclass(frozen=True)
class LogSettings:
    level: LogLevel = "info"
    # auto: the journal's native protocol under systemd, console lines otherwise.
    format: LogFormat = "auto"


@dataclass(frozen=True)
class SyncSettings:
    dry_run: bool = False
    fields: list[Field] = field(default_factory=lambda: sorted(ALL_FIELDS))
    vlan: VlanPolicy = "promiscuous"
    mac_allow: list[str] | None = None
    # Seconds between full resyncs that repair drift; 0 turns it off.
    resync_interval: float = 300.0
    # Per NIC: a guest flipping its filter costs at most this many syncs a second.
    max_syncs_per_second: float = 5.0
    # Cap for the per-NIC retry backoff after a failed apply, in seconds.
    retry_max: float = 30.0

    def policy(self) -> SyncPolicy:
        return SyncPolicy(
            fields=frozenset(self.fields),
            vlan=self.vlan,
            mac_allow=tuple(self.mac_allow) if self.mac_allow is not None else None,
        )


@dataclass(frozen=True)
class MqttSettings:
    enabled: bool = False
    host: str = "localhost"
    port: int = 1883
    topic_prefix: str = "rxfilterd"
    client_id: str = field(default_factory=socket.gethostname)
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
    # Read from password_file at load time (not a config key: init=False keeps it out).
    password: str | None = field(default=None, init=False, repr=False, compare=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context when any tls_* key is set; OSError/SSLError on bad files."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


@dataclass(frozen=True)
class PolicyTable:
    """One [[policy]] table as written; becomes a PolicyRule."""

    name: str | None = None
    domain: str | None = None
    network: str | None = None
    portgroup: str | None = None
    fields: list[Field] | None = None
    mac_allow: list[str] | None = None
    vlan: VlanPolicy | None = None


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    libvirt: LibvirtSettings = field(default_factory=LibvirtSettings)
    log: LogSettings = field(default_factory=LogSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    policies: tuple[PolicyRule, ...] = ()

    def policy_for(
        self, domain: str, network: str | None, portgroup: str | None
    ) -> tuple[SyncPolicy, str]:
        """The sync policy of one NIC, and its source: "sync" or a [[policy]] name."""
        return select_policy(self.policies, self.sync.policy(), domain, network, portgroup)

    def with_dry_run(self) -> Config:
        """These settings with dry_run forced on (--dry-run, which outlives a reload)."""
        return dataclasses.replace(self, sync=dataclasses.replace(self.sync, dry_run=True))


_SECTIONS: dict[str, type[Any]] = {
    "libvirt": LibvirtSettings,
    "log": LogSettings,
    "sync": SyncSettings,
    "mqtt": MqttSettings,
}


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


def from_dict(data: dict[str, Any], path: Path | None = None) -> Config:
    where = str(path) if path else "<config>"
    sections: dict[str, Any] = {}
    policies: tuple[PolicyRule, ...] = ()
    for name, value in data.items():
        if name == "policy":
            policies = _policies(value, where)
            continue
        if name not in _SECTIONS:
            raise ConfigError(f"{where}: unknown section [{name}]")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        sections[name] = _build(_SECTIONS[name], value, f"{where}: {name}")
    config = Config(path=path, policies=policies, **sections)
    _check(config, where)
    return config


def _policies(value: Any, where: str) -> tuple[PolicyRule, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{where}: policy must be an array of tables ([[policy]])")
    rules = []
    names = set()
    for index, table in enumerate(value):
        at = f"{where}: policy[{index}]"
        raw: PolicyTable = _build(PolicyTable, table, at)
        name = raw.name or f"policy[{index}]"
        if name in names:
            raise ConfigError(f"{at}.name: {name!r} is used twice")
        names.add(name)
        if raw.fields is None and raw.mac_allow is None and raw.vlan is None:
            raise ConfigError(f"{at}: sets none of fields, mac_allow, vlan")
        if raw.fields is not None and len(set(raw.fields)) != len(raw.fields):
            raise ConfigError(f"{at}.fields: lists a field twice")
        mac_allow = None
        if raw.mac_allow is not None:
            mac_allow = tuple(
                _mac_or_prefix(e, f"{at}.mac_allow[{i}]") for i, e in enumerate(raw.mac_allow)
            )
        rules.append(
            PolicyRule(
                name=name,
                domain=raw.domain,
                network=raw.network,
                portgroup=raw.portgroup,
                fields=frozenset(raw.fields) if raw.fields is not None else None,
                mac_allow=mac_allow,
                vlan=raw.vlan,
            )
        )
    return tuple(rules)


def _build(cls: type[Any], values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key")
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in get_args(hint) if a is not type(None)]
        return _convert(value, options[0], where)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_kind(value)}")
        (item_hint,) = get_args(hint)
        return [_convert(item, item_hint, f"{where}[{i}]") for i, item in enumerate(value)]
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


def _kind(value: Any) -> str:
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
    sync = config.sync
    if sync.mac_allow is not None:
        normalised = []
        for i, entry in enumerate(sync.mac_allow):
            normalised.append(_mac_or_prefix(entry, f"{where}: sync.mac_allow[{i}]"))
        object.__setattr__(sync, "mac_allow", normalised)
    if len(set(sync.fields)) != len(sync.fields):
        raise ConfigError(f"{where}: sync.fields: lists a field twice")
    if sync.max_syncs_per_second <= 0:
        raise ConfigError(f"{where}: sync.max_syncs_per_second: must be above 0")
    mqtt = config.mqtt
    if not 0 < mqtt.port < 65536:
        raise ConfigError(f"{where}: mqtt.port: {mqtt.port} is not a TCP port")
    if mqtt.qos not in (0, 1, 2):
        raise ConfigError(f"{where}: mqtt.qos: must be 0, 1 or 2")
    if mqtt.queue_size < 1:
        raise ConfigError(f"{where}: mqtt.queue_size: must be at least 1")
    _check_mqtt(mqtt, where)


def _check_mqtt(mqtt: MqttSettings, where: str) -> None:
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
    if mqtt.password_file is not None:
        if mqtt.username is None:
            raise ConfigError(f"{where}: mqtt.password_file: needs mqtt.username")
        try:
            text = Path(mqtt.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(
                f"{where}: mqtt.password_file: cannot read {mqtt.password_file}: {reason}"
            ) from None
        # One line; the newline an editor or `echo` adds is not part of the password.
        password = text.rstrip("\r\n")
        if not password:
            raise ConfigError(f"{where}: mqtt.password_file: {mqtt.password_file} is empty")
        object.__setattr__(mqtt, "password", password)
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = getattr(mqtt, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{where}: mqtt.{key}: {value} is not a readable file")
    try:
        mqtt.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: mqtt.tls_*: cannot set up TLS: {exc}") from None


def _mac_or_prefix(entry: str, where: str) -> str:
    """A full MAC or an OUI prefix of one to five octets ("52:54:00")."""
    octets = entry.split(":")
    padded = ":".join(octets + ["00"] * (6 - len(octets)))
    try:
        if not 1 <= len(octets) <= 6:
            raise MacError(entry)
        parse_mac(padded)
    except MacError:
        raise ConfigError(f"{where}: {entry!r} is not a MAC address or prefix") from None
    return entry.lower()
