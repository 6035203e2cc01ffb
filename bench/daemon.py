"""The daemon under measurement: rxfilterd through bench.counted_daemon.

JSON logs to a file, READY=1 from a notify socket of our own, its counters on SIGUSR1,
optionally under `py-spy record`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.machine import REPO
from bench.profiling import py_spy
from tests.support.daemon import write_config

Record = dict[str, Any]


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


@dataclass
class BenchDaemon:
    """rxfilterd (through bench.counted_daemon) with JSON logs and a notify socket.

    ``profile``: run it under ``py-spy record`` (raw collapsed stacks to that file).
    """

    workdir: Path
    level: str = "info"
    sync: dict[str, Any] = field(default_factory=dict)
    profile: Path | None = None
    profile_rate: int = 100
    trace: bool = False
    stamps: bool = True  # stamp each filter event in memory (False: only count them)
    nice: int = 0  # the daemon's niceness (what a unit's Nice= would set)
    # More config sections, e.g. {"metrics": {"listen": "127.0.0.1:9474"}}.
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0
    spawned: float = 0.0
    notifications: list[tuple[float, str]] = field(default_factory=list)
    _notify: socket.socket | None = None
    _notify_thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = write_config(
            self.workdir / "rxfilterd.toml",
            {
                "log": {"level": self.level, "format": "json"},
                "sync": self.sync,
                # Its own status socket: not /run/rxfilterd's, which a real daemon may hold.
                "status": {"socket": str(self.workdir / "status.sock")},
                **self.sections,
            },
        )
        self.log_path = self.workdir / "rxfilterd.log"

    def start(self) -> BenchDaemon:
        sock_path = self.workdir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify.bind(str(sock_path))
        self._notify.settimeout(0.5)
        self.notifications = []
        self._notify_thread = threading.Thread(target=self._read_notify, daemon=True)
        self._notify_thread.start()
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_USEC")}
        env["NOTIFY_SOCKET"] = str(sock_path)
        env["PYTHONPATH"] = str(REPO)
        if self.trace:
            env["RXFB_TRACE"] = "1"
        env["RXFB_STAMPS"] = "1" if self.stamps else "0"
        cmd = [sys.executable, "-m", "bench.counted_daemon", "--config", str(self.config)]
        if self.profile is not None:
            spy = py_spy()
            cmd = [spy, "record", "--rate", str(self.profile_rate), "--format", "raw", "--gil"]
            cmd += ["-o", str(self.profile), "--", *cmd_daemon(self.config)]
        log = self.log_path.open("ab")
        self.spawned = time.time()
        if self.nice:
            cmd = ["nice", "-n", str(self.nice), *cmd]  # nice execs: the pid stays ours
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
        log.close()
        self.pid = self.proc.pid if self.profile is None else self._child_pid()
        return self

    def _child_pid(self) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    return int(pid)
            time.sleep(0.005)
        raise RuntimeError("py-spy did not start rxfilterd")

    def _read_notify(self) -> None:
        sock = self._notify
        while sock is not None and sock.fileno() >= 0:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.notifications.append((time.time(), data.decode(errors="replace")))

    def wait_ready(self, timeout: float = 60.0) -> float:
        """When rxfilterd said READY=1: after its first full sync of every NIC."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, text in self.notifications:
                if "READY=1" in text.splitlines():
                    return when
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rxfilterd exited; log tail:\n{self.tail()}")
            time.sleep(0.01)
        raise RuntimeError(f"rxfilterd not ready in {timeout} s; log tail:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def records(self) -> list[Record]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def stats(self, timeout: float = 5.0) -> DaemonStats:
        """Its counters right now (SIGUSR1 makes bench.counted_daemon log them)."""
        before = len([r for r in self.records() if r.get("event") == "bench-stats"])
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records() if r.get("event") == "bench-stats"]
            if len(found) > before:
                return DaemonStats.of(found[-1])
            time.sleep(0.02)
        raise RuntimeError("rxfilterd did not report its counters")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30 if self.profile is not None else 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._notify_thread is not None:
            self._notify_thread.join(timeout=2)

    def __enter__(self) -> BenchDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def cmd_daemon(config: Path) -> list[str]:
    return [sys.executable, "-m", "bench.counted_daemon", "--config", str(config)]
