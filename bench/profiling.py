"""Where a daemon's samples went: py-spy, attached or wrapping, and its raw profiles."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.process import end_process

# Innermost frames of a thread that waits (py-spy --native without --gil samples idle
# threads too): such samples are left out of the summary.
WAITING = (
    "poll (",
    "epoll_wait (",
    "ppoll (",
    "select (",
    "PyThread_acquire_lock_timed (",
    "pthread_cond_wait (",
    "pthread_cond_timedwait (",
)


def profile_summary(raw: Path, top: int = 15) -> dict[str, Any]:
    """Where the samples of a py-spy raw (collapsed stacks) file went.

    ``self``: the innermost frame of each sample; ``inclusive``: every function on the
    stack, counted once per sample. Functions are named "function (file)". Samples of
    a thread waiting (see WAITING) are counted as ``waiting`` and left out.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = waiting = 0
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
        if any(f.startswith(WAITING) for f in frames[-3:]):
            waiting += count
            total -= count
            continue
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count

    def rows(counter: Counter[str]) -> list[tuple[str, int, float]]:
        return [(n, c, round(100 * c / total, 1)) for n, c in counter.most_common(top)]

    return {
        "samples": total,
        "waiting": waiting,
        "self": rows(own),
        "inclusive": rows(inclusive),
    }


def _frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:]) if path else ""
    return f"{name} ({short})" if short else name


def print_profile(title: str, summary: dict[str, Any]) -> None:
    print(f"\n{title}: {summary['samples']} samples ({summary.get('waiting', 0)} waiting left out)")
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


def attach_profiler(
    pid: int, raw: Path, rate: int = 100, *, gil: bool = True, native: bool = False
) -> subprocess.Popen[bytes]:
    """`py-spy record` attached to PID until stop_profiler (raw collapsed stacks).

    GIL: only the thread holding the GIL, i.e. where rxfilterd's Python CPU time goes
    (threads blocked in libvirt or poll() would otherwise show up as busy). NATIVE: C
    frames too (libvirt's RPC client, the interpreter), with every thread's own work.
    """
    spy = py_spy()
    cmd = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    cmd += ["--gil"] if gil else []
    cmd += ["--native"] if native else []
    log = raw.with_suffix(".log").open("wb")
    proc = subprocess.Popen([*cmd, "-o", str(raw)], stdout=log, stderr=log)
    log.close()
    time.sleep(1.0)  # let it attach
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    end_process(proc, signal.SIGINT, timeout=30)
