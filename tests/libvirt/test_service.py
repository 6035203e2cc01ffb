"""The daemon as a service: sd_notify, the journal protocol, SIGHUP reload, dry-run."""

from __future__ import annotations

import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvirt.test_sync import MAC0, NEW_MAC, host_mac
from tests.support.daemon import RunningDaemon, holds_for, wait_until, write_config
from tests.support.guest import EthernetNic, Resources, prefixed

pytestmark = pytest.mark.libvirt


@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        yield path, sock
    finally:
        sock.close()


def receive(sock: socket.socket, seconds: float) -> list[bytes]:
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(1 << 20))
        except TimeoutError:
            continue
    return got


def test_notify_ready_after_first_reconcile_status_watchdog_stopping(
    stack: Resources, tmp_path: Path, dgram: tuple[Path, socket.socket]
) -> None:
    path, sock = dgram
    mvt = stack.veth_macvtap("sn", mac=MAC0)
    guest = stack.guest(prefixed("sn"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
    guest.set_mac(NEW_MAC)  # before the daemon runs: the first reconcile must apply it
    daemon = RunningDaemon(
        tmp_path, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}
    ).start()
    try:
        ready_at_mac = None
        messages: list[bytes] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ready_at_mac is None:
            for message in receive(sock, 0.2):
                messages.append(message)
                if b"READY=1" in message.split(b"\n"):
                    ready_at_mac = host_mac(mvt.name)
        assert ready_at_mac == NEW_MAC, "READY=1 came before the first reconcile finished"
        messages += receive(sock, 2.5)  # the watchdog period is half of 2 s
        lines = [line for m in messages for line in m.split(b"\n")]
        assert b"WATCHDOG=1" in lines
        statuses = [line for line in lines if line.startswith(b"STATUS=")]
        assert statuses and re.search(rb"^STATUS=connected; [1-9]\d* NICs synced", statuses[-1])
    finally:
        assert daemon.stop() == 0
    assert any(b"STOPPING=1" in m.split(b"\n") for m in receive(sock, 0.5))


def test_journal_native_protocol_carries_the_decision_fields(
    stack: Resources, tmp_path: Path, dgram: tuple[Path, socket.socket]
) -> None:
    path, sock = dgram
    mvt = stack.veth_macvtap("sj", mac=MAC0)
    with RunningDaemon(tmp_path, log_format="journal", env={"RXFILTERD_JOURNAL_SOCKET": str(path)}):
        guest = stack.guest(prefixed("sj"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        receive(sock, 1.0)
        guest.set_mac(NEW_MAC)
        wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 5, "MAC on the host")
        entries = [dict(_fields(m)) for m in receive(sock, 1.0)]
    # The daemon syncs every trusted guest of the shared libvirtd: only ours counts here.
    ours = [e for e in entries if e.get("DOMAIN") == guest.name]
    applied = [e for e in ours if e.get("ACTION") == "applied" and e.get("FIELD") == "mac"]
    assert applied, entries
    entry = applied[-1]
    assert entry["EVENT"] == "applied" and entry["ALIAS"] == "net0"
    assert entry["IFNAME"] == mvt.name and entry["OLD"] == MAC0 and entry["NEW"] == NEW_MAC
    assert entry["SYSLOG_IDENTIFIER"] == "rxfilterd" and entry["PRIORITY"] == "6"
    assert "applied" in entry["MESSAGE"]


def _fields(datagram: bytes) -> Iterator[tuple[str, str]]:
    """Plain KEY=VALUE lines (the daemon's values here have no newlines)."""
    for line in datagram.split(b"\n"):
        if b"=" in line:
            key, _, value = line.partition(b"=")
            yield key.decode(), value.decode(errors="replace")


def test_sighup_rejects_a_bad_file_and_applies_a_good_one(stack: Resources, tmp_path: Path) -> None:
    mvt = stack.veth_macvtap("sh", mac=MAC0)
    with RunningDaemon(tmp_path) as daemon:
        guest = stack.guest(prefixed("sh"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        daemon.wait_for(lambda r: r.get("event") == "syncing" and r.get("domain") == guest.name, 30)
        write_config(
            daemon.config,
            {"log": {"level": "debug", "format": "json"}, "libvirt": {"bogus": 1}},
        )
        daemon.signal(signal.SIGHUP)
        rejected = daemon.wait_for(lambda r: "reload rejected" in str(r.get("event")), 10)
        assert str(daemon.config) in rejected["error"] and "libvirt.bogus" in rejected["error"]
        # The old settings stay: changes still apply.
        guest.set_mac("52:54:00:10:00:77")
        wait_until(lambda: host_mac(mvt.name) == "52:54:00:10:00:77", 5, "MAC after bad reload")
        write_config(
            daemon.config, {"log": {"level": "debug", "format": "json"}, "sync": {"dry_run": True}}
        )
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda r: r.get("event") == "config reloaded", 10)
        guest.set_mac(NEW_MAC)
        would = daemon.wait_for(
            lambda r: r.get("event") == "would-apply" and r.get("new") == NEW_MAC, 10
        )
        assert would["old"] == "52:54:00:10:00:77" and would["field"] == "mac"
        assert holds_for(lambda: host_mac(mvt.name) == "52:54:00:10:00:77", 1.5)
        # And back: a dry_run set by the file (not --dry-run) ends with the file.
        write_config(daemon.config, {"log": {"level": "debug", "format": "json"}})
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(
            lambda r: r.get("event") == "config reloaded" and r.get("dry_run") is False, 10
        )
        guest.set_promisc(True)  # any change makes QEMU emit an event
        wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 5, "MAC after dry_run = false")


def test_dry_run_flag_decides_and_logs_but_changes_nothing(
    stack: Resources, tmp_path: Path
) -> None:
    mvt = stack.veth_macvtap("sd", mac=MAC0)
    with RunningDaemon(tmp_path, None, "--dry-run") as daemon:
        guest = stack.guest(prefixed("sd"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        guest.set_promisc(True)
        guest.set_mac(NEW_MAC)
        daemon.wait_for(lambda r: r.get("event") == "would-apply" and r.get("new") == NEW_MAC, 10)
        assert holds_for(lambda: host_mac(mvt.name) == MAC0, 1.5)
        records = [r for r in daemon.records() if r.get("domain") == guest.name]
    assert not [r for r in records if r.get("event") == "applied"]
    assert any(r.get("field") == "promiscuous" and r.get("new") is True for r in records)
