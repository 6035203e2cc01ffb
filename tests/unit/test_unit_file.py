"""Static checks of systemd/rxfilterd.service, plus `systemd-analyze verify` when available."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rxfilterd.config import StatusSettings

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "rxfilterd.service"
EXEC_START = "/usr/local/bin/rxfilterd --config /etc/rxfilterd/rxfilterd.toml"
MAX_EXPOSURE = 2.0

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """systemd.syntax(7) subset: sections, repeated keys kept in order, '\\' continuations."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


@pytest.fixture(scope="module")
def unit_section() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Unit"]


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= missing"
    assert len(values) == 1, f"{key}= set {len(values)} times"
    return values[0]


def words(section: dict[str, list[str]], key: str) -> set[str]:
    return {w for value in section.get(key, []) for w in value.split()}


def test_notify_lifecycle(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart") == EXEC_START
    program, _, args = EXEC_START.partition(" ")
    # Check the file first (a bad one fails `systemctl reload`), then SIGHUP with dash's
    # builtin kill: a minimal Debian has no /bin/kill (procps).
    assert service["ExecReload"] == [
        f"{program} check-config {args}",
        "/bin/sh -c 'kill -HUP $MAINPID'",
    ]
    assert one(service, "Restart") == "on-failure"
    assert one(service, "RestartSec")
    assert one(service, "WatchdogSec") == "30s"


def test_libvirt_ordering_is_soft(unit_section: dict[str, list[str]]) -> None:
    daemons = {"libvirtd.service", "virtqemud.service"}
    assert daemons <= words(unit_section, "After")
    assert daemons <= words(unit_section, "Wants")
    for hard in ("Requires", "Requisite", "BindsTo", "PartOf"):
        assert not daemons & words(unit_section, hard), hard


def test_capabilities(service: dict[str, list[str]]) -> None:
    assert one(service, "CapabilityBoundingSet") == "CAP_NET_ADMIN"
    # Runs as root (libvirt's rw socket); ambient caps only matter with User=.
    assert "User" not in service and "DynamicUser" not in service
    assert set(service.get("AmbientCapabilities", ["CAP_NET_ADMIN"])) == {"CAP_NET_ADMIN"}
    assert one(service, "NoNewPrivileges") == "yes"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
    ],
)
def test_hardening(service: dict[str, list[str]], key: str, value: str) -> None:
    assert one(service, key) == value


def test_runtime_directory_holds_the_status_socket(service: dict[str, list[str]]) -> None:
    # config.StatusSettings' default socket lives there; only root may reach it.
    assert one(service, "RuntimeDirectory") == "rxfilterd"
    assert one(service, "RuntimeDirectoryMode") == "0700"
    assert Path(StatusSettings().socket).parent == Path("/run/rxfilterd")


def test_address_families(service: dict[str, list[str]]) -> None:
    # AF_INET and AF_INET6: the MQTT broker and the [metrics] endpoint.
    assert words(service, "RestrictAddressFamilies") == {
        "AF_UNIX",
        "AF_NETLINK",
        "AF_INET",
        "AF_INET6",
    }


def test_syscall_filter(service: dict[str, list[str]]) -> None:
    allowed, denied = service["SystemCallFilter"]
    assert allowed == "@system-service"
    # What tests/systemd shows the daemon runs without, on top of the privileged groups.
    assert set(denied.removeprefix("~").split()) == {
        "@privileged",
        "@resources",
        "@aio",
        "@keyring",
        "@memlock",
        "@setuid",
        "@sync",
        "@timer",
    }


def test_keeps_host_network_and_proc_net(service: dict[str, list[str]]) -> None:
    # Host netns: netlink on the real macvtaps; PrivateUsers would void CAP_NET_ADMIN there.
    assert service.get("PrivateNetwork", ["no"]) == ["no"]
    assert service.get("PrivateUsers", ["no"]) == ["no"]
    # subset=pid hides /proc/net/dev_mcast.
    assert service.get("ProcSubset", ["all"]) == ["all"]


def test_installable() -> None:
    assert one(parse_unit(UNIT.read_text())["Install"], "WantedBy") == "multi-user.target"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze not installed (CI=true: apt-get install systemd)")
        pytest.skip("systemd-analyze not installed")
    return exe


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    # verify errors out on a missing ExecStart program; point it at a stub, keep all else.
    stub = tmp_path / "rxfilterd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert f"ExecStart={EXEC_START}\n" in text
    copy = tmp_path / UNIT.name
    program = EXEC_START.split()[0]
    copy.write_text(text.replace(f"={program} ", f"={stub} "))
    proc = subprocess.run(
        [exe, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    output = proc.stdout + proc.stderr
    # Unknown keys and bad values are only warnings (exit 0), so read the output.
    problems = [line for line in output.splitlines() if UNIT.name in line]
    assert problems == [], output
    assert proc.returncode == 0, output


def _exposure(unit_dir: Path) -> tuple[float, str]:
    """systemd-analyze's offline score of UNIT_DIR/rxfilterd.service, with the drop-ins of
    UNIT_DIR/rxfilterd.service.d (offline mode reads the directory beside the unit)."""
    exe = _systemd_analyze()
    proc = subprocess.run(
        [exe, "security", "--offline=true", "--no-pager", str(unit_dir / UNIT.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1)), proc.stdout


def test_systemd_analyze_security_score(tmp_path: Path) -> None:
    # The unit alone: the repository's copy has the pods drop-in beside it.
    shutil.copy(UNIT, tmp_path / UNIT.name)
    score, out = _exposure(tmp_path)
    assert score <= MAX_EXPOSURE, out


# ------------------------------------------------------------------ the pods drop-in

PODS_DROPIN = UNIT.parent / "rxfilterd.service.d" / "pods.conf"
# docs/service.md: 1.8 -> 2.6, offline and online (tests/systemd).
MAX_PODS_EXPOSURE = 2.6


def test_pods_drop_in_adds_only_what_pods_need() -> None:
    dropin = parse_unit(PODS_DROPIN.read_text())
    assert list(dropin) == ["Service"]
    assert dropin["Service"] == {
        "CapabilityBoundingSet": ["CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_OVERRIDE"],
        "RestrictNamespaces": ["net"],
    }


def test_pods_drop_in_exposure() -> None:
    score, out = _exposure(UNIT.parent)
    assert MAX_EXPOSURE < score <= MAX_PODS_EXPOSURE, out
    for item in ("CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "RestrictNamespaces=~net"):
        assert re.search(rf"✗ \S*{re.escape(item)}", out), (item, out)
