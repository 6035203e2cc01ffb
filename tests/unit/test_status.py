"""`rxfilterd status`: the live state, its socket (a real one, in a temporary dir), the text."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from rxfilterd import status
from rxfilterd.cli import main
from rxfilterd.host_state import HostState
from rxfilterd.live import RECENT, LiveState
from rxfilterd.plan import Refusal
from rxfilterd.records import Decision, NicRow, NicState
from rxfilterd.stats import Board, Stats
from rxfilterd.status_server import StatusServer

T0 = 1_800_000_000.0


MAC = "52:54:00:de:ca:fe"
ROW = NicRow(
    "host", "web1", "net0", "macvtap3", MAC, "virtio", "direct", "yes", "port", "sync", "trusted"
)
HOST = HostState("macvtap3", 7, "bridge", MAC, False, False, frozenset(), frozenset(), frozenset())
NET0 = Decision(
    libvirt="host", event="applied", time=T0, domain="web1", alias="net0", ifname="macvtap3"
)


def refused(value: str, at: float = T0) -> Decision:
    refusal = Refusal("mac", value, "not in mac_allow")
    return replace(NET0, event="refused", level="warning", time=at, refusal=refusal)


def live_state() -> LiveState:
    board = Board()
    board.add(Stats(uri="qemu:///system", connected=True, queries=4, libvirt_version=9_000_000))
    live = LiveState(board)
    live.nic_state(
        ("host", "web1", "net0"),
        NicState(ROW, host=HOST, last_sync=T0, cause="event", result="ok"),
    )
    return live


def test_recent_refusals_and_errors_are_bounded_and_brief() -> None:
    live = live_state()
    for n in range(RECENT + 5):
        live.decision(refused(f"02:00:00:00:00:{n:02x}", T0 + n))
    failed = replace(NET0, event="failed", stage="apply", reason="EPERM", error="denied")
    live.decision(replace(failed, retry_in=2.0))
    live.decision(NET0)
    # Read as `status --json` would: the snapshot is plain JSON values only.
    snap = json.loads(json.dumps(live.snapshot()))
    assert len(snap["recent_refusals"]) == RECENT
    assert snap["recent_refusals"][-1]["value"] == f"02:00:00:00:00:{RECENT + 4:02x}"
    assert "level" not in snap["recent_refusals"][-1]
    assert snap["recent_errors"] == [
        {"time": T0, "event": "failed", "libvirt": "host", "domain": "web1", "alias": "net0",
         "ifname": "macvtap3", "stage": "apply", "reason": "EPERM", "error": "denied"}
    ]  # fmt: skip
    assert snap["counters"]["decisions"] == {"applied": 1, "failed": 1, "refused": RECENT + 5}
    assert snap["connections"][0]["libvirt_version"] == "9.0.0"
    (nic,) = snap["nics"]
    assert (nic["action"], nic["cause"], nic["host"]["mac"]) == ("sync", "event", MAC)
    live.nic_state(("host", "web1", "net0"), None)
    assert live.snapshot()["nics"] == []


def test_the_daemon_answers_on_a_root_only_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.sock"
    live = live_state()

    async def scenario() -> tuple[Mapping[str, object], int, int]:
        server = StatusServer(path, live.snapshot)
        assert await server.start()
        # A second daemon on the same socket does not take it over.
        assert not await StatusServer(path, live.snapshot).start()
        modes = path.stat().st_mode, path.parent.stat().st_mode
        answer = await asyncio.to_thread(status.ask, path)
        await server.close()
        return answer, stat.S_IMODE(modes[0]), stat.S_IMODE(modes[1])

    answer, sock_mode, dir_mode = asyncio.run(scenario())
    assert (sock_mode, dir_mode) == (0o600, 0o700)
    assert answer["nics"] == json.loads(json.dumps(live.snapshot()))["nics"]
    assert not path.exists()
    with pytest.raises(status.StatusError, match="no rxfilterd is running"):
        status.ask(path)


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(path))  # as a killed daemon leaves it: bound, nobody listening

    async def scenario() -> Mapping[str, object]:
        server = StatusServer(path, live_state().snapshot)
        assert await server.start()
        try:
            return await asyncio.to_thread(status.ask, path)
        finally:
            await server.close()

    assert asyncio.run(scenario())["version"]


def test_the_text_names_each_nic_and_its_mac() -> None:
    live = live_state()
    live.decision(refused("02:00:00:00:00:01"))
    text = status.render(json.loads(json.dumps(live.snapshot())))
    assert "libvirt host qemu:///system: connected (libvirt 9.0.0); 0 NICs synced" in text
    header, row = [line for line in text.splitlines() if "net0" in line or "DOMAIN" in line][:2]
    assert header.split()[:5] == ["LIBVIRT", "DOMAIN", "ALIAS", "IFNAME", "MAC"]
    assert row.split()[:7] == [
        *("host", "web1", "net0", "macvtap3", "52:54:00:de:ca:fe", "yes", "sync")
    ]
    assert "recent refusals:" in text and "reason=not in mac_allow" in text


def test_without_a_daemon_status_exits_1_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "rxfilterd.toml"
    config.write_text(f"[status]\nsocket = '{tmp_path / 'none.sock'}'\n")
    assert main(["status", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rxfilterd status: no rxfilterd is running")
    assert str(tmp_path / "none.sock") in err
