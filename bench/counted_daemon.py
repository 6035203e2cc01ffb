"""rxfilterd exactly as `python -m rxfilterd` runs it, with a Tracer for the benchmarks.

It reaches the daemon only through `cli.main(tracer=...)` (rxfilterd.ports.Tracer):
- SIGUSR1 logs a ``bench-stats`` line with the daemon's own Stats (queries, writes,
  syncs, NICs synced) and the filter events libvirt delivered and the loop dispatched,
  and so does the daemon's end;
- each NIC_RX_FILTER_CHANGED reaching libvirt's callback is stamped in memory with
  QEMU's timestamp and the alias, logged in one ``bench-stamps`` line at exit: the
  latency benchmark takes event times from it, so that no subscriber of its own sits
  ahead of rxfilterd in libvirtd's delivery;
- with RXFB_STAMPS=0 in the environment, events are only counted, not stamped (a
  hostile guest's hundreds of events a second would otherwise pile up in memory);
- with RXFB_TRACEMALLOC=N (frames), Python's allocations are traced from the start and
  each report adds a ``bench-memory`` line: the traced total and the 25 source lines
  holding the most;
- with RXFB_TRACE=1 in the environment, every query-rx-filter, host read and write
  (``bench-query``, ``bench-read``, ``bench-apply``, start and end times), the loop's
  dispatch of each event and the libvirt call in the pool thread are kept in memory
  and logged at exit, whatever the log level, so that a benchmark can split a sync
  into its steps without the logging itself landing on the path it measures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import tracemalloc
from typing import Any

import structlog

from rxfilterd import cli
from rxfilterd.events import HypervisorEvent, RxFilterChanged
from rxfilterd.ports import TraceStep
from rxfilterd.stats import Stats

log = structlog.get_logger("rxfilterd.bench")

# Trace lines by step; the write is named bench-apply, as before the Tracer existed.
_STEP_EVENTS: dict[TraceStep, tuple[str, str]] = {
    "query": ("bench-query", "alias"),
    "read": ("bench-read", "ifname"),
    "write": ("bench-apply", "field"),
}


class BenchTracer:
    """Keeps stamps in memory and logs them at exit (a JSON line costs ~0.15 ms here,
    which on the sync path would be counted as rxfilterd's latency)."""

    def __init__(self, trace: bool, stamps: bool = True) -> None:
        self.trace = trace
        self.stamps = stamps
        self._received_count = 0  # written by libvirt's event thread only
        # (what, time, detail): appended from several threads; list.append is atomic.
        self._stamps: list[tuple[str, float, str]] = []
        # libvirt's callbacks, kept as they came and formatted at exit: per event this
        # costs one append on the path measured (a hostile guest sends hundreds a second).
        self._received: list[tuple[float, RxFilterChanged]] = []
        self._dispatched = 0
        self._deferred: list[tuple[str, dict[str, Any]]] = []

    def started(self, stats: Stats) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._report, stats)

    def stopped(self, stats: Stats) -> None:
        self._report(stats)
        for event, fields in self._deferred:
            log.warning(event, **fields)
        stamps = [
            ("callback", at, f"{e.timestamp:.6f} {e.alias}") for at, e in self._received
        ] + self._stamps
        if stamps:
            log.warning("bench-stamps", stamps=stamps)

    def event_received(self, event: RxFilterChanged, at: float) -> None:
        self._received_count += 1
        if self.stamps:
            self._received.append((at, event))

    def dispatched(self, event: HypervisorEvent, at: float) -> None:
        if isinstance(event, RxFilterChanged):
            self._dispatched += 1
            if self.trace:
                self._stamps.append(("dispatch", at, event.alias))

    def step(self, step: TraceStep, subject: str, started: float, ended: float) -> None:
        if not self.trace:
            return
        if step == "call":  # in a pool thread
            self._stamps.append(("call", started, f"{ended} {subject}"))
            return
        event, key = _STEP_EVENTS[step]
        self._deferred.append((event, {key: subject, "t0": started, "t1": ended}))

    def _report(self, stats: Stats) -> None:
        log.warning(
            "bench-stats",
            t=time.time(),
            queries=stats.queries,
            writes=stats.writes,
            syncs=stats.syncs,
            nics_synced=stats.nics_synced,
            events_received=self._received_count,
            events_dispatched=self._dispatched,
        )
        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot()
            top = snapshot.statistics("lineno")[:25]
            log.warning(
                "bench-memory",
                traced_kib=round(tracemalloc.get_traced_memory()[0] / 1024),
                top=[[str(s.traceback), round(s.size / 1024), s.count] for s in top],
            )


def main(argv: list[str] | None = None) -> int:
    frames = int(os.environ.get("RXFB_TRACEMALLOC", "0") or 0)
    if frames:
        tracemalloc.start(frames)
    tracer = BenchTracer(
        trace=os.environ.get("RXFB_TRACE") == "1",
        stamps=os.environ.get("RXFB_STAMPS", "1") == "1",
    )
    return cli.main(argv, tracer=tracer)


if __name__ == "__main__":
    sys.exit(main())
