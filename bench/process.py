"""Another process, seen from outside: its CPU time and memory from /proc, its end."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of PID (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of each of PID's threads: "main" (PID itself), else "tid N".

    Python 3.11 does not give its threads OS names, so the main thread (the event
    loop's) is told from the others by its id only.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = "main" if task.name == str(pid) else f"tid {task.name}"
        fields = raw[raw.rindex(")") + 2 :].split()
        out[name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of PID."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def end_process(proc: subprocess.Popen[Any], sig: int, timeout: float) -> None:
    """Send SIG and wait up to TIMEOUT seconds; then kill."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
