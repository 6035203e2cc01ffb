"""The machine a benchmark runs on, for the record: load, RCU mode, versions, rivals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import libvirt

from tests.support.guest import current_libvirt

REPO = Path(__file__).resolve().parent.parent
RCU_EXPEDITED = Path("/sys/kernel/rcu_expedited")


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


def run_libvirt_dir(uri: str) -> str:
    """The libvirt's /run/libvirt: its socket's directory (the lab's libvirt 11.3 has
    its own /run), else the host's."""
    socket = parse_qs(urlsplit(uri).query).get("socket")
    return str(Path(socket[0]).parent) if socket else "/run/libvirt"


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
    conn = libvirt.open(current_libvirt().uri)
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
            ["stat", "-f", "-c", "%T", run_libvirt_dir(current_libvirt().uri)],
            capture_output=True,
            text=True,
            check=False,
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
