"""The daemon under measurement: rxfilterd through bench.counted_daemon.

Run by the tests' runner (tests.support.daemon.RunningDaemon): JSON logs to a file, READY=1
from a notify socket of our own, its counters on SIGUSR1, optionally under `py-spy record`.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.machine import REPO
from bench.profiling import py_spy
from tests.support.daemon import Record, RunningDaemon


@dataclass
class DaemonStats:
    """rxfilterd's own counters (Stats), as bench.counted_daemon logs them."""

    time: float = 0.0
    queries: int = 0
    writes: int = 0
    syncs: int = 0
    nics_synced: int = 0
    events_received: int = 0
    events_dispatched: int = 0

    @classmethod
    def of(cls, record: Record) -> DaemonStats:
        return cls(
            time=float(record["t"]),
            queries=int(record["queries"]),
            writes=int(record["writes"]),
            syncs=int(record["syncs"]),
            nics_synced=int(record["nics_synced"]),
            events_received=int(record.get("events_received", 0)),
            events_dispatched=int(record.get("events_dispatched", 0)),
        )

    def minus(self, before: DaemonStats) -> dict[str, int]:
        d = asdict(self)
        b = asdict(before)
        keys = ("queries", "writes", "syncs", "events_received", "events_dispatched")
        return {k: d[k] - b[k] for k in keys}


class BenchDaemon(RunningDaemon):
    """rxfilterd through bench.counted_daemon, with a notify socket: the tests' runner set up
    for measuring. Start-up does not wait for any log line: callers time ``wait_ready()``.

    ``profile``: run it under ``py-spy record`` (raw collapsed stacks to that file).
    ``stamps``: stamp each filter event in memory (False: only count them).
    ``nice``: the daemon's niceness (what a unit's Nice= would set).
    ``sections``: more config sections, e.g. {"metrics": {"listen": "127.0.0.1:9474"}}.
    ``tracemalloc``: trace Python allocations (frames kept per allocation; 0: off) and log
    the largest holders with each SIGUSR1 report (it costs memory and time: not for the
    runs whose RSS or timing is reported).
    """

    def __init__(
        self,
        workdir: Path,
        level: str = "info",
        sync: dict[str, Any] | None = None,
        profile: Path | None = None,
        profile_rate: int = 100,
        trace: bool = False,
        stamps: bool = True,
        nice: int = 0,
        sections: dict[str, dict[str, Any]] | None = None,
        tracemalloc: int = 0,
    ) -> None:
        wrap = ["nice", "-n", str(nice)] if nice else []  # nice execs: the pid stays the daemon's
        if profile is not None:
            wrap += [py_spy(), "record", "--rate", str(profile_rate), "--format", "raw", "--gil"]
            wrap += ["-o", str(profile), "--"]
        env = {"PYTHONPATH": str(REPO), "RXFB_STAMPS": "1" if stamps else "0"}
        if trace:
            env["RXFB_TRACE"] = "1"
        if tracemalloc:
            env["RXFB_TRACEMALLOC"] = str(tracemalloc)
        super().__init__(
            workdir,
            sync,
            env=env,
            level=level,
            sections=sections,
            wrap=wrap,
            wrap_forks=profile is not None,
            module="bench.counted_daemon",
            notify=True,
            wait_connected=False,
            stop_timeout=30 if profile is not None else 10,
        )
        self.profile = profile

    def stats(self, timeout: float = 5.0) -> DaemonStats:
        """Its counters right now (SIGUSR1 makes bench.counted_daemon log them)."""
        before = len([r for r in self.records() if r.get("event") == "bench-stats"])
        self.signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records() if r.get("event") == "bench-stats"]
            if len(found) > before:
                return DaemonStats.of(found[-1])
            time.sleep(0.02)
        raise RuntimeError("rxfilterd did not report its counters")
