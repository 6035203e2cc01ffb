"""The config file: defaults, and one clear error naming file and key for bad input."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rxfilterd import config
from rxfilterd.cli import main
from rxfilterd.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rxfilterd.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid_and_matches_the_defaults() -> None:
    loaded = config.load(REPO / "etc" / "rxfilterd.toml")
    defaults = config.Config(path=loaded.path)
    assert dataclasses.replace(loaded, mqtt=defaults.mqtt) == defaults
    # client_id defaults to the host name, so it is commented out in the file.
    assert dataclasses.replace(loaded.mqtt, client_id="") == dataclasses.replace(
        defaults.mqtt, client_id=""
    )


def test_values_are_read(tmp_path: Path) -> None:
    loaded = config.load(
        write(
            tmp_path,
            """
[libvirt]
uri = "qemu+ssh://hv/system"
[log]
level = "debug"
[sync]
fields = ["multicast"]
mac_allow = ["52:54:00", "02:AA:BB:CC:DD:EE"]
resync_interval = 0
""",
        )
    )
    assert loaded.libvirt.uri == "qemu+ssh://hv/system"
    assert loaded.log.level == "debug"
    assert loaded.sync.fields == {"multicast"}
    assert loaded.sync.mac_allow == ("52:54:00", "02:aa:bb:cc:dd:ee")
    assert loaded.sync.resync_interval == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[libvirt\nuri=1", "not valid TOML"),
        ("[nope]\n", "unknown section [nope]"),
        ("[libvirt]\nurl = 'x'\n", "libvirt.url: unknown key"),
        ("[libvirt]\nuri = 3\n", "libvirt.uri: expected a string, got an integer"),
        ("[log]\nlevel = 'loud'\n", "log.level: 'loud' is not one of"),
        ("[sync]\ndry_run = 'yes'\n", "sync.dry_run: expected true or false"),
        ("[sync]\nfields = 'mac'\n", "sync.fields: expected a list"),
        ("[sync]\nfields = ['mac', 'ip']\n", "sync.fields[1]: 'ip' is not one of"),
        ("[sync]\nmac_allow = ['52:54']\n", None),
        ("[sync]\nmac_allow = ['52:5g']\n", "sync.mac_allow[0]: '52:5g' is not a MAC"),
        ("[sync]\nresync_interval = -1\n", "sync.resync_interval: must not be negative"),
        ("[sync]\nmax_syncs_per_second = 0\n", "sync.max_syncs_per_second: must be above 0"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[mqtt]\nqos = 3\n", "mqtt.qos"),
        ("libvirt = 1\n", "[libvirt] must be a table"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str | None) -> None:
    path = write(tmp_path, text)
    if message is None:
        config.load(path)
        return
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9474", "127.0.0.1", 9474),
        ("[::1]:9474", "::1", 9474),
        ("[::]:1", "::", 1),
        ("metrics.example:65535", "metrics.example", 65535),
    ],
)
def test_metrics_listen(tmp_path: Path, listen: str, host: str, port: int) -> None:
    loaded = config.load(write(tmp_path, f"[metrics]\nlisten = '{listen}'\n"))
    assert loaded.metrics.listen == listen
    assert config.split_listen(listen) == (host, port)
    assert config.Config().metrics.listen is None  # off by default


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "[log]\nlevel = 'info'\n")
    assert main(["check-config", "--config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[sync]\nvlan = 'trunk'\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "sync.vlan" in err[0]


def test_run_with_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "[libvirt]\nuri = true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rxfilterd", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"rxfilterd: {bad}: libvirt.uri: expected a string, got a boolean"


def test_validation_reads_no_file_and_loading_reads_the_password_after_it(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    data = {"mqtt": {"username": "rx", "password_file": str(secret)}}
    validated = config.validate(data)
    assert validated.mqtt.password is None
    loaded = config.from_dict(data)
    assert loaded.mqtt.password == "s3cret"
    assert validated.mqtt.password is None  # built anew, never changed in place
    secret.unlink()
    assert config.validate(data).mqtt.password_file == str(secret)


def test_a_bad_key_is_reported_before_the_password_file_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nusername = "rx"\npassword_file = "/nonexistent/pw"\nqos = 3\n')
    with pytest.raises(ConfigError, match=r"mqtt\.qos"):
        config.load(path)


def test_an_empty_password_file_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    path = write(tmp_path, f'[mqtt]\nusername = "rx"\npassword_file = "{tmp_path / "pw"}"\n')
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value) == f"{path}: mqtt.password_file: {tmp_path / 'pw'} is empty"


def test_values_are_normalised_into_the_types_the_daemon_uses(tmp_path: Path) -> None:
    loaded = config.load(
        write(
            tmp_path,
            """
[sync]
fields = ["mac", "multicast"]
mac_allow = ["52:54:00", "02:AA:BB:CC:DD:EE"]
[[policy]]
domain = "web*"
mac_allow = ["02:AA"]
fields = ["mac"]
""",
        )
    )
    assert loaded.sync.fields == frozenset({"mac", "multicast"})
    assert loaded.sync.mac_allow == ("52:54:00", "02:aa:bb:cc:dd:ee")
    (rule,) = loaded.policies
    assert (rule.name, rule.mac_allow, rule.fields) == ("policy[0]", ("02:aa",), frozenset({"mac"}))
    policy, source = loaded.policy_for("web1", None, None)
    assert source == "policy[0]" and policy.mac_allowed("02:aa:00:00:00:01")
    assert not policy.mac_allowed("52:54:00:00:00:01")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[policy]]\nname = 3\nvlan = 'ignore'\n", "policy[0].name: expected a string"),
        ("[[policy]]\nfields = ['mac', 'mac']\n", "policy[0].fields: lists 'mac' twice"),
        ("[sync]\nmac_allow = '52:54:00'\n", "sync.mac_allow: expected a list, got a string"),
        ("[sync]\nmac_allow = [52]\n", "sync.mac_allow[0]: expected a string, got an integer"),
        ("[sync]\nmac_allow = ['52:54:00:00:00:00:01']\n", "sync.mac_allow[0]: '52:54:00:00"),
        ("[mqtt]\nusername = 7\n", "mqtt.username: expected a string, got an integer"),
        ("[mqtt]\nqueue_size = 0\n", "mqtt.queue_size: must be at least 1"),
        ("[mqtt]\ntls_cert = '/etc/hostname'\n", "mqtt.tls_cert and mqtt.tls_key go together"),
        ("[metrics]\nlisten = 9474\n", "metrics.listen: expected a string, got an integer"),
        ("[metrics]\nlisten = '9474'\n", "metrics.listen: '9474' is not \"HOST:PORT\""),
        ("[metrics]\nlisten = ':9474'\n", "metrics.listen: ':9474' is not"),
        ("[metrics]\nlisten = 'localhost:0'\n", "metrics.listen: 'localhost:0': '0' is not a TCP"),
        ("[metrics]\nlisten = 'h:99999'\n", "'99999' is not a TCP port"),
        ("[metrics]\nlisten = '::1:9474'\n", "an IPv6 address goes in brackets"),
        ("[metrics]\nlisten = 'a b:1'\n", "'a b' is not a host name or address"),
        ("[metrics]\ndomain_label = 1\n", "metrics.domain_label: expected true or false"),
        ("[metrics]\nport = 1\n", "metrics.port: unknown key"),
        ("[status]\nsocket = 'status.sock'\n", "status.socket: must be an absolute path"),
        ("[pods]\nsockets = ['run/x']\n", "pods.sockets[0]: 'run/x' is not an absolute path"),
        ("[pods]\nsockets = ['/a/../b']\n", "pods.sockets[0]: '/a/../b' is not an absolute"),
        ("[pods]\ndaemons = 'virtqemud'\n", "pods.daemons: expected a list, got a string"),
        ("[pods]\nenabled = true\ndaemons = []\n", "pods: daemons and sockets must each"),
        ("[pods]\nscan_interval = 0\n", "pods.scan_interval: must be above 0"),
        ("[libvirt]\nuri = ''\n", 'libvirt.uri: "" (no host libvirt) needs [pods] enabled'),
    ],
)
def test_more_bad_values_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_the_mqtt_client_id_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A DaemonSet passes the node's name: the pod's host name changes on every restart.
    monkeypatch.setenv("RXFILTERD_CLIENT_ID", "node-7")
    assert config.from_dict({}).mqtt.client_id == "node-7"
    assert config.from_dict({"mqtt": {"client_id": "hv1"}}).mqtt.client_id == "hv1"
    monkeypatch.delenv("RXFILTERD_CLIENT_ID")
    assert config.from_dict({}).mqtt.client_id == socket.gethostname()
