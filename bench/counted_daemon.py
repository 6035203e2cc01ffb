"""rxfilterd exactly as `python -m rxfilterd` runs it, plus counters for the benchmarks.

Three additions, all outside the sync path's logic:
- SIGUSR1 logs a ``bench-stats`` line with the daemon's own Stats (queries, writes,
  syncs, NICs synced), and so does the end of Daemon.run;
- each NIC_RX_FILTER_CHANGED reaching libvirt's callback is stamped in memory with
  QEMU's timestamp and the alias, logged in one ``bench-stamps`` line at exit: the
  latency benchmark takes event times from it, so that no subscriber of its own sits
  ahead of rxfilterd in libvirtd's delivery;
- with RXFB_TRACE=1 in the environment, every query-rx-filter, host read and apply
  (``bench-query``, ``bench-read``, ``bench-apply``, start and end times), the loop's
  dispatch of each event and the libvirt call in the pool thread are kept in memory
  and logged at exit, whatever the log level, so that a benchmark can split a sync
  into its steps without the logging itself landing on the path it measures.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog

from rxfilterd import cli
from rxfilterd.daemon import Daemon
from rxfilterd.host_state import HostState
from rxfilterd.hypervisor import Hypervisor
from rxfilterd.macvtap import HostNetwork
from rxfilterd.plan import Change

log = structlog.get_logger("rxfilterd.bench")

_query = Hypervisor.query_rx_filter
_read = HostNetwork.read
_apply = HostNetwork.apply
_run = Daemon.run
_qemu_event = Hypervisor._qemu_event
_dispatch = Daemon._dispatch
_monitor_command = Hypervisor._monitor_command
# (what, time, detail): appended from several threads; list.append is atomic.
_stamps: list[tuple[str, float, str]] = []
# Trace lines, logged at exit: writing a JSON line costs ~0.15 ms here, which on the
# sync path would be counted as rxfilterd's latency.
_deferred: list[tuple[str, dict[str, Any]]] = []


def _stamped_qemu_event(
    self: Hypervisor,
    conn: Any,
    dom: Any,
    event: str,
    seconds: int,
    micros: int,
    details: Any,
    o: Any,
) -> None:
    t = time.time()
    _qemu_event(self, conn, dom, event, seconds, micros, details, o)
    # After the real callback, so that formatting costs its hand-over nothing.
    text = details if isinstance(details, str) else json.dumps(details)
    _stamps.append(("callback", t, f"{seconds}.{micros:06d} {text}"))


def _stamped_dispatch(self: Daemon, event: Any) -> None:
    _stamps.append(("dispatch", time.time(), str(getattr(event, "alias", ""))))
    _dispatch(self, event)


def _stamped_monitor_command(conn: Any, domains: dict[str, Any], uuid: str, command: str) -> str:
    t0 = time.time()
    try:
        return _monitor_command(conn, domains, uuid, command)
    finally:
        _stamps.append(("call", t0, f"{time.time()} {command}"))


async def _traced_query(self: Hypervisor, uuid: str, alias: str) -> str:
    t0 = time.time()
    try:
        return await _query(self, uuid, alias)
    finally:
        _deferred.append(
            ("bench-query", {"uuid": uuid, "alias": alias, "t0": t0, "t1": time.time()})
        )


async def _traced_read(self: HostNetwork, ifname: str, *, quick: bool = False) -> HostState | None:
    t0 = time.time()
    try:
        return await _read(self, ifname, quick=quick)
    finally:
        t1 = time.time()
        _deferred.append(("bench-read", {"ifname": ifname, "quick": quick, "t0": t0, "t1": t1}))


async def _traced_apply(self: HostNetwork, state: HostState, changes: Sequence[Change]) -> None:
    t0 = time.time()
    try:
        await _apply(self, state, changes)
    finally:
        t1 = time.time()
        fields = [c.field for c in changes]
        _deferred.append(
            ("bench-apply", {"ifname": state.ifname, "fields": fields, "t0": t0, "t1": t1})
        )


def _report(daemon: Daemon) -> None:
    s = daemon.stats
    log.warning(
        "bench-stats",
        t=time.time(),
        queries=s.queries,
        writes=s.writes,
        syncs=s.syncs,
        nics_synced=s.nics_synced,
    )


async def _reporting_run(self: Daemon, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, _report, self)
    try:
        await _run(self, stop)
    finally:
        _report(self)
        for event, fields in _deferred:
            log.warning(event, **fields)
        if _stamps:
            log.warning("bench-stamps", stamps=_stamps)


def main(argv: list[str] | None = None) -> int:
    patches: dict[tuple[Any, str], Any] = {
        (Daemon, "run"): _reporting_run,
        (Hypervisor, "_qemu_event"): _stamped_qemu_event,
    }
    if os.environ.get("RXFB_TRACE") == "1":
        patches[Hypervisor, "query_rx_filter"] = _traced_query
        patches[HostNetwork, "read"] = _traced_read
        patches[HostNetwork, "apply"] = _traced_apply
        patches[Daemon, "_dispatch"] = _stamped_dispatch
        patches[Hypervisor, "_monitor_command"] = staticmethod(_stamped_monitor_command)
    for (owner, name), replacement in patches.items():
        setattr(owner, name, replacement)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
