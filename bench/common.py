"""What the benchmarks share: naming, machine facts, monitors, the daemon runner, stats.

Import this module before anything that reads ``RXFT_PREFIX``: it sets the benchmarks'
own prefix (``rxfb-``) so that their clean-up never touches the tests' ``rxft-`` objects.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

BENCH_PREFIX = "rxfb-"
TEST_PREFIX = "rxft-"
os.environ.setdefault("RXFT_PREFIX", BENCH_PREFIX)

import libvirt  # noqa: E402
import libvirt_qemu  # noqa: E402

from tests.support.daemon import write_config  # noqa: E402
from tests.support.guest import LIBVIRT_URI, prefix, stack_problem  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RCU_EXPEDITED = Path("/sys/kernel/rcu_expedited")
Record = dict[str, Any]


def check_prefix() -> str:
    """The prefix in force; refuses one that would also match the tests' objects."""
    p = prefix()
    if not p or TEST_PREFIX.startswith(p) or p.startswith(TEST_PREFIX):
        raise SystemExit(f"RXFT_PREFIX={p!r} would touch the tests' {TEST_PREFIX!r} objects")
    return p


def require_stack() -> None:
    problem = stack_problem()
    if problem is not None:
        raise SystemExit(f"the real stack is not available: {problem}")


def out_dir(name: str, given: str | None) -> Path:
    path = Path(given) if given else Path("/tmp/rxfb-bench") / f"{name}-{time.strftime('%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- machine


def loadavg() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rcu_expedited() -> int:
    return int(RCU_EXPEDITED.read_text().strip())


def other_rxfilterd(mine: Iterable[int] = ()) -> list[int]:
    """PIDs of rxfilterd processes that are not ours (other engineers' test daemons).

    They sync every trusted NIC on the host, ours included, so they can race our
    measurement: the results say how many samples saw one.
    """
    own = set(mine) | {os.getpid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        daemon = any(a.endswith(b"rxfilterd") for a in argv[:3]) or b"bench.counted_daemon" in argv
        if daemon and b"explain" not in argv and b"check-config" not in argv:
            found.append(int(entry.name))
    return found


def machine() -> dict[str, Any]:
    """Machine, versions and date, for the record."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    conn = libvirt.open(LIBVIRT_URI)
    try:
        lib = conn.getLibVersion()
        qemu = conn.getVersion()
    finally:
        conn.close()

    def version(v: int) -> str:
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "mem_total_gib": round(mem_kib / 1024 / 1024, 1),
        "cpu": cpu,
        "kernel": os.uname().release,
        "libvirt": version(lib),
        "qemu": version(qemu),
        "python": sys.version.split()[0],
        "git": git,
        "rcu_expedited": rcu_expedited(),
        # libvirt fsyncs a status file here on every monitor command: tmpfs or not
        # decides whether a query costs an fsync (see scripts/setup-host).
        "run_libvirt_fs": subprocess.run(
            ["stat", "-f", "-c", "%T", "/run/libvirt"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "loadavg": loadavg(),
    }


class RcuMode:
    """Sets /sys/kernel/rcu_expedited and puts the original value back on close."""

    def __init__(self) -> None:
        self.original = rcu_expedited()

    def set(self, value: int) -> None:
        RCU_EXPEDITED.write_text(f"{value}\n")

    def restore(self) -> None:
        if rcu_expedited() != self.original:
            self.set(self.original)


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """n, p50/p95/p99, min, max and mean, in milliseconds."""
    if not seconds:
        return {"n": 0}
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 2),
        "p95": round(percentile(ms, 95), 2),
        "p99": round(percentile(ms, 99), 2),
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
        "mean": round(sum(ms) / len(ms), 2),
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- netlink


RTMGRP_LINK = 1
RTM_NEWLINK = 16
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
SO_RCVBUFFORCE = 33
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200


@dataclass(frozen=True)
class LinkSample:
    """One RTM_NEWLINK notification, stamped when our reader thread got it."""

    time: float
    ifindex: int
    ifname: str
    address: str
    flags: int


class LinkMonitor:
    """Link notifications (RTNLGRP_LINK) on a raw netlink socket, read by a thread.

    The kernel puts no timestamp on netlink messages (SO_TIMESTAMP gives none), so a
    thread that does nothing but a blocking recv() stamps each one on arrival.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self._sock.bind((0, RTMGRP_LINK))
        self._sock.settimeout(0.5)
        self._watched: set[int] = set()
        self.samples: list[LinkSample] = []
        self.overruns = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bench-netlink", daemon=True)
        self._thread.start()

    def watch(self, ifindex: int) -> None:
        with self._cond:
            self._watched.add(ifindex)

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed:
                    return
                self.overruns += 1  # ENOBUFS: notifications were lost
                if exc.errno is None:
                    time.sleep(0.01)
                continue
            now = time.time()
            found = list(_parse_links(data, now))
            if found:
                with self._cond:
                    self.samples += [s for s in found if s.ifindex in self._watched]
                    self._cond.notify_all()

    def find(self, match: Callable[[LinkSample], bool]) -> LinkSample | None:
        with self._cond:
            return next((s for s in self.samples if match(s)), None)

    def wait(self, match: Callable[[LinkSample], bool], timeout: float) -> LinkSample | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hit = next((s for s in self.samples if match(s)), None)
                left = deadline - time.monotonic()
                if hit is not None or left <= 0:
                    return hit
                self._cond.wait(left)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self._sock.close()


def _parse_links(data: bytes, now: float) -> Iterable[LinkSample]:
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return
        if kind == RTM_NEWLINK and length >= 32:
            _family, _pad, _type, index, flags, _change = struct.unpack_from(
                "=BBHiII", data, offset + 16
            )
            address, name = "", ""
            at = offset + 32
            end = offset + length
            while at + 4 <= end:
                rta_len, rta_type = struct.unpack_from("=HH", data, at)
                if rta_len < 4:
                    break
                payload = data[at + 4 : at + rta_len]
                if rta_type == IFLA_ADDRESS:
                    address = ":".join(f"{b:02x}" for b in payload)
                elif rta_type == IFLA_IFNAME:
                    name = payload.rstrip(b"\0").decode(errors="replace")
                at += (rta_len + 3) & ~3
            yield LinkSample(now, index, name, address, flags)
        offset += (length + 3) & ~3


# --------------------------------------------------------------------------- QEMU events


_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_libvirt_event_loop() -> None:
    """libvirt's default event loop in a thread (before opening connections)."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="bench-libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass(frozen=True)
class QemuEvent:
    """NIC_RX_FILTER_CHANGED: QEMU's timestamp, and when it reached us through libvirt."""

    qemu_time: float
    received: float
    domain: str
    alias: str


class EventMonitor:
    """Our own NIC_RX_FILTER_CHANGED subscription (it never queries, so re-arms nothing)."""

    def __init__(self) -> None:
        start_libvirt_event_loop()
        self._conn: Any = libvirt.open(LIBVIRT_URI)
        self._lock = threading.Lock()
        self.events: list[QemuEvent] = []
        self._id: int | None = None
        self.resume()

    def pause(self) -> None:
        """Stop receiving events (deregister), e.g. while another subscriber is measured."""
        if self._id is not None:
            libvirt_qemu.qemuMonitorEventDeregister(self._conn, self._id)
            self._id = None

    def resume(self) -> None:
        if self._id is None:
            self._id = libvirt_qemu.qemuMonitorEventRegister(
                self._conn, None, "NIC_RX_FILTER_CHANGED", self._event, None, 0
            )

    def _event(
        self, _conn: Any, dom: Any, _ev: str, seconds: int, micros: int, details: Any, _o: Any
    ) -> None:
        now = time.time()
        if isinstance(details, str):
            with contextlib.suppress(ValueError):
                details = json.loads(details)
        alias = details.get("name") if isinstance(details, dict) else None
        with self._lock:
            self.events.append(QemuEvent(seconds + micros / 1e6, now, dom.name(), str(alias)))

    def of(self, domain: str, alias: str | None = None, since: float = 0.0) -> list[QemuEvent]:
        """Events of DOMAIN (and ALIAS) whose QEMU timestamp is at or after SINCE."""
        with self._lock:
            return [
                e
                for e in self.events
                if e.domain == domain
                and (alias is None or e.alias == alias)
                and e.qemu_time >= since
            ]

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.pause()
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()


# --------------------------------------------------------------------------- the daemon


@dataclass
class DaemonStats:
    """rxfilterd's own counters (Stats), as bench.counted_daemon logs them."""

    time: float = 0.0
    queries: int = 0
    writes: int = 0
    syncs: int = 0
    nics_synced: int = 0

    @classmethod
    def of(cls, record: Record) -> DaemonStats:
        return cls(
            time=float(record["t"]),
            queries=int(record["queries"]),
            writes=int(record["writes"]),
            syncs=int(record["syncs"]),
            nics_synced=int(record["nics_synced"]),
        )

    def minus(self, before: DaemonStats) -> dict[str, int]:
        d = asdict(self)
        b = asdict(before)
        return {k: d[k] - b[k] for k in ("queries", "writes", "syncs")}


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


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of PID (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of PID."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


# --------------------------------------------------------------------------- profiles


def profile_summary(raw: Path, top: int = 15) -> dict[str, Any]:
    """Where the samples of a py-spy raw (collapsed stacks) file went.

    ``self``: the innermost frame of each sample; ``inclusive``: every function on the
    stack, counted once per sample. Functions are named "function (file)".
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return {"samples": 0, "self": [], "inclusive": []}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count

    def rows(counter: Counter[str]) -> list[tuple[str, int, float]]:
        return [(n, c, round(100 * c / total, 1)) for n, c in counter.most_common(top)]

    return {"samples": total, "self": rows(own), "inclusive": rows(inclusive)}


def _frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:]) if path else ""
    return f"{name} ({short})" if short else name


def print_profile(title: str, summary: dict[str, Any]) -> None:
    print(f"\n{title}: {summary['samples']} samples of the thread holding the GIL")
    for kind in ("self", "inclusive"):
        print(f"  top by {kind}:")
        for name, count, share in summary[kind]:
            print(f"    {share:5.1f}%  {count:6d}  {name}")


def py_spy() -> str:
    """The venv's py-spy; a clear exit when it is not installed."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise SystemExit(
            f"{spy} not found: install the benchmark extra (.venv/bin/pip install -e '.[bench]')"
            " or run without profiling (--no-profile)"
        )
    return str(spy)


def attach_profiler(pid: int, raw: Path, rate: int = 100) -> subprocess.Popen[bytes]:
    """`py-spy record` attached to PID until stop_profiler (raw collapsed stacks)."""
    spy = py_spy()
    # --gil: only the thread holding the GIL, i.e. where rxfilterd's Python CPU time goes
    # (threads blocked in libvirt or poll() would otherwise show up as busy).
    cmd = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--gil"]
    log = raw.with_suffix(".log").open("wb")
    proc = subprocess.Popen([*cmd, "-o", str(raw)], stdout=log, stderr=log)
    log.close()
    time.sleep(1.0)  # let it attach
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    end_process(proc, signal.SIGINT, timeout=30)


def end_process(proc: subprocess.Popen[Any], sig: int, timeout: float) -> None:
    """Send SIG and wait up to TIMEOUT seconds; then kill."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
