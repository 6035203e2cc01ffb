"""The packaged unit under a real systemd 252: start, notify, journal, reload, watchdog, stop.

The daemon runs in a container booted with systemd as PID 1 (tests/support/container.py),
on the host's network and macvtaps as on a hypervisor, with a libvirtd of this tier's
own as its /run/libvirt (conftest.py says why). Each hardening grant of the unit
(capability, address family, syscall group) is taken away once to show the daemon
needs it.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.libvirt.test_observability import free_port, scrape, value
from tests.libvirt.test_sync import host_mac
from tests.support.container import CONFIG_PATH, DROPIN_DIR, PACKAGED_UNIT, SystemdContainer
from tests.support.daemon import holds_for, wait_until
from tests.systemd.conftest import Lab, shipped_config

pytestmark = pytest.mark.systemd

UNIT = "rxfilterd.service"
STARTED = "39f53479d3a045ac8e11786248231fbf"  # MESSAGE_ID of systemd's "Started UNIT"
_macs = (f"52:54:00:51:{n >> 8:02x}:{n & 0xFF:02x}" for n in itertools.count(0x100))


def new_mac() -> str:
    return next(_macs)


def state(box: SystemdContainer, *props: str) -> dict[str, str]:
    return box.show(UNIT, *props)


def start(box: SystemdContainer) -> str:
    """Start the unit (returns once systemd has READY=1); its MainPID."""
    box.systemctl("start", "rxfilterd")
    return state(box, "MainPID")["MainPID"]


def dropin(box: SystemdContainer, text: str) -> None:
    box.write(DROPIN_DIR / "test.conf", "[Service]\n" + text)
    box.systemctl("daemon-reload")


def messages(entries: list[dict[str, str]]) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in entries]


def test_enable_now_returns_only_once_ready_after_the_first_sync(
    unit: SystemdContainer, lab: Lab
) -> None:
    mac = new_mac()
    lab.guest.set_mac(mac)  # before the daemon runs: its first sync must apply it
    # libvirt's socket appears only later, so the first sync waits as long as the test likes.
    late = "/run/rxfilterd-late"
    unit.write(
        CONFIG_PATH,
        shipped_config(uri=f"qemu+unix:///system?socket={late}/libvirt-sock", reconnect_max=1.0),
        0o640,
    )
    unit.run("mkdir", "-p", late)
    # The package enabled it at install: start from an operator's `systemctl disable`.
    unit.systemctl("disable", "rxfilterd")
    assert unit.systemctl("is-enabled", "rxfilterd", check=False).stdout.strip() == "disabled"
    cursor = unit.cursor()
    enable = unit.popen("systemctl", "enable", "--now", "rxfilterd")
    try:
        unit.wait_journal("EVENT=libvirt away", after=cursor)
        assert enable.poll() is None, "systemctl enable --now returned before READY=1"
        assert state(unit, "ActiveState")["ActiveState"] == "activating"
        assert host_mac(lab.macvtap.name) != mac
        unit.run("ln", "-s", "/run/libvirt/libvirt-sock", f"{late}/libvirt-sock")
        _, err = enable.communicate(timeout=120)
    finally:
        if enable.poll() is None:
            enable.kill()
            enable.wait()
    assert enable.returncode == 0, err
    assert state(unit, "ActiveState")["ActiveState"] == "active"
    assert host_mac(lab.macvtap.name) == mac
    # The daemon's lines and systemd's "Started" reach journald over the same socket, in
    # the order they were sent: the sync was logged before READY=1 made the unit active.
    entries = unit.journal(after=cursor)
    started = next(i for i, e in enumerate(entries) if e.get("MESSAGE_ID") == STARTED)
    applied = next(
        i
        for i, e in enumerate(entries)
        if e.get("ACTION") == "applied" and e.get("DOMAIN") == lab.guest.name and e["NEW"] == mac
    )
    back = next(i for i, e in enumerate(entries) if e.get("EVENT") == "libvirt back")
    assert back < applied < started, messages(entries)
    assert unit.systemctl("is-enabled", "rxfilterd").stdout.strip() == "enabled"


def test_a_guest_change_is_synced_and_found_by_its_journal_fields(
    unit: SystemdContainer, lab: Lab
) -> None:
    start(unit)
    cursor = unit.cursor()
    mac = new_mac()
    lab.guest.set_mac(mac)
    wait_until(lambda: host_mac(lab.macvtap.name) == mac, 10, "the guest's MAC on the macvtap")
    entry = unit.wait_journal(
        f"DOMAIN={lab.guest.name}", "ACTION=applied", "FIELD=mac", f"NEW={mac}", after=cursor
    )
    assert entry["_SYSTEMD_UNIT"] == UNIT and entry["SYSLOG_IDENTIFIER"] == "rxfilterd"
    assert entry["IFNAME"] == lab.macvtap.name and entry["ALIAS"] == "net0"
    assert entry["PRIORITY"] == "6" and entry["MESSAGE"].startswith("applied ")


def test_reload_refuses_a_bad_file_keeps_the_old_settings_and_applies_a_good_one(
    unit: SystemdContainer, lab: Lab
) -> None:
    pid = start(unit)
    good = unit.path(CONFIG_PATH).read_text()
    unit.write(CONFIG_PATH, good.replace("[sync]\n", "[sync]\nbogus = 1\n", 1), 0o640)
    cursor = unit.cursor()
    reload = unit.systemctl("reload", "rxfilterd", check=False)
    assert reload.returncode != 0, "systemctl reload accepted a bad file"
    # check-config's stderr, through journald's stream: it may land a moment later.
    wait_until(
        lambda: any(
            str(CONFIG_PATH) in m and "sync.bogus" in m
            for m in messages(unit.journal(after=cursor))
        ),
        10,
        "the refused file and key in the journal",
    )
    assert state(unit, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
    # The daemon itself, sent SIGHUP with that file anyway, refuses it too.
    unit.systemctl("kill", "--kill-who=main", "--signal=SIGHUP", "rxfilterd")
    refused = unit.wait_journal("EVENT=config reload rejected, old settings stay", after=cursor)
    assert "sync.bogus" in refused["ERROR"]
    mac = new_mac()
    lab.guest.set_mac(mac)  # the old settings stay: changes still apply
    wait_until(lambda: host_mac(lab.macvtap.name) == mac, 10, "the MAC after a refused reload")

    unit.write(CONFIG_PATH, good.replace("dry_run = false\n", "dry_run = true\n", 1), 0o640)
    cursor = unit.cursor()
    unit.systemctl("reload", "rxfilterd")
    reloaded = unit.wait_journal("EVENT=config reloaded", after=cursor)
    assert reloaded["DRY_RUN"] == "true"
    dry = new_mac()
    lab.guest.set_mac(dry)
    unit.wait_journal(f"DOMAIN={lab.guest.name}", "EVENT=would-apply", f"NEW={dry}", after=cursor)
    assert holds_for(lambda: host_mac(lab.macvtap.name) == mac, 1.5)
    assert state(unit, "MainPID")["MainPID"] == pid


WATCHDOG_SEC = 8  # the unit's 30 s, shortened so that several intervals pass quickly


def test_watchdog_is_fed_while_healthy_and_fires_when_the_daemon_freezes(
    unit: SystemdContainer, lab: Lab
) -> None:
    dropin(unit, f"WatchdogSec={WATCHDOG_SEC}s\n")
    pid = start(unit)
    cursor = unit.cursor()
    pings = set()
    deadline = time.monotonic() + 3 * WATCHDOG_SEC
    while time.monotonic() < deadline:
        now = state(unit, "NRestarts", "MainPID", "WatchdogTimestampMonotonic")
        assert (now["NRestarts"], now["MainPID"]) == ("0", pid), now
        pings.add(now["WatchdogTimestampMonotonic"])
        time.sleep(1)
    assert len(pings) >= 3, f"WATCHDOG=1 arrived only {len(pings)} times in 3 intervals"
    assert not [m for m in messages(unit.journal(after=cursor)) if "atchdog" in m]

    unit.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", "rxfilterd")
    wait_until(lambda: state(unit, "NRestarts")["NRestarts"] == "1", 4 * WATCHDOG_SEC, "a restart")
    wait_until(
        lambda: any("Watchdog timeout" in m for m in messages(unit.journal(after=cursor))),
        10,
        "systemd's watchdog line",
    )
    wait_until(lambda: state(unit, "ActiveState")["ActiveState"] == "active", 60, "active again")
    assert state(unit, "MainPID")["MainPID"] != pid
    # And it works again.
    mac = new_mac()
    lab.guest.set_mac(mac)
    wait_until(lambda: host_mac(lab.macvtap.name) == mac, 10, "the MAC after the restart")


STOP_LIMIT = 10


def test_stop_ends_it_cleanly_within_seconds(unit: SystemdContainer, lab: Lab) -> None:
    # systemd kills what outlives TimeoutStopSec and says so in Result; this bound is ours.
    dropin(unit, f"TimeoutStopSec={STOP_LIMIT}s\n")
    start(unit)
    unit.systemctl("stop", "rxfilterd")
    after = state(
        unit,
        "ActiveState",
        "Result",
        "ExecMainCode",
        "ExecMainStatus",
        "ActiveExitTimestampMonotonic",
        "InactiveEnterTimestampMonotonic",
    )
    took = (
        int(after["InactiveEnterTimestampMonotonic"]) - int(after["ActiveExitTimestampMonotonic"])
    ) / 1e6
    # Result=success: it exited by itself before TimeoutStopSec, not killed; CLD_EXITED 0.
    assert (after["ActiveState"], after["Result"]) == ("inactive", "success"), (after, took)
    assert (after["ExecMainCode"], after["ExecMainStatus"]) == ("1", "0"), after


def test_systemd_runs_the_packaged_unit_and_daemon(unit: SystemdContainer) -> None:
    start(unit)
    now = state(unit, "FragmentPath", "ExecStart", "MainPID")
    assert now["FragmentPath"] == str(PACKAGED_UNIT)
    assert now["ExecStart"].startswith("{ path=/usr/bin/rxfilterd ;"), now
    owner = unit.run("dpkg", "-S", str(PACKAGED_UNIT)).stdout
    assert owner.startswith("rxfilterd: "), owner
    # /usr/bin/rxfilterd is the venv's entry point: the process is the venv's python.
    exe = unit.run("readlink", f"/proc/{now['MainPID']}/exe").stdout.strip()
    assert exe.startswith("/usr/bin/python3"), exe
    args = unit.run("cat", f"/proc/{now['MainPID']}/cmdline").stdout.split("\0")
    assert args[1] == "/usr/bin/rxfilterd", args


def test_status_socket_and_metrics_under_the_unit(unit: SystemdContainer, lab: Lab) -> None:
    port = free_port()  # the container shares the host's network
    unit.write(CONFIG_PATH, shipped_config(listen=f"127.0.0.1:{port}"), 0o640)
    start(unit)
    mac = new_mac()
    lab.guest.set_mac(mac)
    wait_until(lambda: host_mac(lab.macvtap.name) == mac, 10, "the guest's MAC on the macvtap")
    # The RuntimeDirectory and the socket in it are root's alone.
    modes = unit.run("stat", "-c", "%a %U %F", "/run/rxfilterd", "/run/rxfilterd/status.sock")
    assert modes.stdout.splitlines() == ["700 root directory", "600 root socket"]
    rxfilterd = "/usr/bin/rxfilterd"  # the package's
    answer = json.loads(unit.run(rxfilterd, "status", "--json").stdout)
    (nic,) = [n for n in answer["nics"] if n["domain"] == lab.guest.name]
    assert nic["ifname"] == lab.macvtap.name and nic["host"]["mac"] == mac
    samples, _ = scrape(port)
    assert value(samples, "rxfilterd_libvirt_connections_up") == 1
    assert value(samples, "rxfilterd_changes_applied_total", field="mac") >= 1
    unit.systemctl("stop", "rxfilterd")
    gone = unit.run(rxfilterd, "status", check=False)
    assert gone.returncode == 1 and "no rxfilterd is running" in gone.stderr, gone
    assert unit.run("test", "-e", "/run/rxfilterd", check=False).returncode == 1


def test_installed_unit_verifies_and_keeps_its_exposure(unit: SystemdContainer) -> None:
    verify = unit.run("systemd-analyze", "verify", str(PACKAGED_UNIT), check=False)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines() if UNIT in line]
    assert (verify.returncode, problems) == (0, []), verify.stdout + verify.stderr
    security = unit.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security)
    assert match, security
    assert float(match.group(1)) <= 2.0, security


# ------------------------------------------------------------------ every grant is needed


@dataclass(frozen=True)
class Grant:
    """Something the unit allows; DROPIN takes it away, PROOF shows the daemon then fails."""

    name: str
    dropin: str
    proof: Callable[[SystemdContainer, Lab, str], None]
    config: dict[str, str | float] | None = None
    said: str = ""  # text the unit's journal then holds


def _write_refused(box: SystemdContainer, lab: Lab, cursor: str) -> None:
    start(box)
    before = host_mac(lab.macvtap.name)
    mac = new_mac()
    lab.guest.set_mac(mac)
    failed = box.wait_journal(
        f"DOMAIN={lab.guest.name}", "EVENT=failed", "REASON=EPERM", after=cursor
    )
    assert "Operation not permitted" in failed["ERROR"]
    assert host_mac(lab.macvtap.name) == before


def _start_fails(box: SystemdContainer, _lab: Lab, cursor: str) -> None:
    res = box.systemctl("start", "rxfilterd", check=False)
    now = state(box, "ActiveState", "Result")
    assert res.returncode != 0 and now["ActiveState"] != "active", now
    assert now["Result"] in ("exit-code", "signal", "core-dump", "timeout"), now


def _mqtt_unreachable(box: SystemdContainer, _lab: Lab, cursor: str) -> None:
    start(box)
    lost = box.wait_journal("EVENT=mqtt broker unreachable", after=cursor)
    assert NO_FAMILY in lost["ERROR"], lost


def _mqtt_connects(box: SystemdContainer, _lab: Lab, cursor: str) -> None:
    start(box)
    box.wait_journal("EVENT=mqtt connected", after=cursor)


NO_FAMILY = "Address family not supported"
MQTT: dict[str, str | float] = {"mqtt.enabled": "true", "mqtt.host": "127.0.0.1"}
# Too short for a start that never completes (denied clone: no threads) to cost 2 minutes.
SHORT_START = "TimeoutStartSec=10s\nRestart=no\n"
SYSCALL_GROUPS = ["@default", "@basic-io", "@file-system", "@io-event", "@network-io"]
SYSCALL_GROUPS += ["@process", "@signal", "ioctl"]

GRANTS = [
    Grant("CAP_NET_ADMIN", "CapabilityBoundingSet=\n", _write_refused),
    Grant(
        "AF_NETLINK",
        "RestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n"
        + SHORT_START,
        _start_fails,
        said=NO_FAMILY,
    ),
    # libvirt's socket, journald, sd_notify, and the socket the MAC ioctl goes through.
    Grant(
        "AF_UNIX",
        "RestrictAddressFamilies=\nRestrictAddressFamilies=AF_NETLINK AF_INET AF_INET6\n"
        + SHORT_START,
        _start_fails,
        said=NO_FAMILY,
    ),
    Grant("MQTT-with-the-unit-as-is", "", _mqtt_connects, MQTT),
    Grant(
        "AF_INET-AF_INET6",
        "RestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_NETLINK\n",
        _mqtt_unreachable,
        MQTT,
    ),
    *(Grant(g, f"SystemCallFilter=~{g}\n" + SHORT_START, _start_fails) for g in SYSCALL_GROUPS),
]


@pytest.mark.parametrize("grant", GRANTS, ids=[g.name for g in GRANTS])
def test_each_grant_of_the_unit_is_needed(unit: SystemdContainer, lab: Lab, grant: Grant) -> None:
    if grant.config:
        unit.write(CONFIG_PATH, shipped_config(**grant.config), 0o640)
    if grant.dropin:
        dropin(unit, grant.dropin)
    cursor = unit.cursor()
    grant.proof(unit, lab, cursor)
    if grant.said:  # a traceback comes through journald's stream: it may land later
        wait_until(
            lambda: any(grant.said in m for m in messages(unit.journal(after=cursor))),
            10,
            f"{grant.said!r} in the journal",
        )
