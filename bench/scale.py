"""Scale: many guests with many trusted NICs; rxfilterd's start-up sync, idle CPU and RSS.

GUESTS guests with NICS trusted type='ethernet' NICs each (default 8 x 25 = 200), every
NIC on a bridge-mode macvtap of its own (one veth per guest as the lower device). With
all guests up, rxfilterd is started three times:
  A. log level info: spawn -> READY=1 (sent after every NIC's first sync), then idle CPU
     (utime+stime from /proc/PID/stat over --idle seconds) and RSS (VmRSS, VmHWM);
  B. log level debug: spawn -> the last of the NICs' first syncs, from its log;
  C. (unless --no-profile) under `py-spy record --gil`: where start-up time goes;
  M. (with --heap) under tracemalloc: which source lines hold the Python heap.

    .venv/bin/python -m bench.scale [--guests 8] [--nics 25] [--idle 30]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.figures import write_json
from bench.machine import loadavg, other_rxfilterd, run_libvirt_dir
from bench.process import proc_cpu_seconds, proc_status
from bench.profiling import print_profile, profile_summary
from bench.session import BenchSession, add_libvirt_argument
from tests.support.guest import EthernetNic, Guest, current_libvirt, prefix, prefixed

SYNC_EVENTS = {"synced", "in sync", "applied", "failed", "rejected"}


def mac(guest: int, nic: int) -> str:
    return f"52:54:00:fb:{0x80 + guest:02x}:{nic:02x}"


def stamp(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["timestamp"])).timestamp()


def run_info(workdir: Path, idle: float, mine: int) -> dict[str, Any]:
    load = loadavg()
    with BenchDaemon(workdir) as daemon:
        ready = daemon.wait_ready(timeout=120)
        connected = next(r for r in daemon.records() if r.get("event") == "connected")
        at_ready = daemon.stats()
        hwm_start = proc_status(daemon.pid)
        time.sleep(2)
        lines_before = len(daemon.records())
        cpu0, t0 = proc_cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(idle)
        cpu1, t1 = proc_cpu_seconds(daemon.pid), time.monotonic()
        status = proc_status(daemon.pid)
        during_idle = [
            r
            for r in daemon.records()[lines_before:]
            if not str(r.get("event", "")).startswith("bench-")
        ]
        others = other_rxfilterd([daemon.pid])
        stats = daemon.stats()
    return {
        "ready_after_spawn_s": round(ready - daemon.spawned, 3),
        "connected_after_spawn_s": round(stamp(connected) - daemon.spawned, 3),
        "ready_after_connected_s": round(ready - stamp(connected), 3),
        "queries_at_ready": at_ready.queries,
        "nics_synced_at_ready": at_ready.nics_synced,
        "nics_ours": mine,
        "idle_seconds": round(t1 - t0, 1),
        "idle_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 3),
        "idle_cpu_seconds": round(cpu1 - cpu0, 3),
        "rss_mib": round(status["VmRSS"] / 1024, 1),
        "rss_peak_mib": round(status["VmHWM"] / 1024, 1),
        "rss_at_ready_mib": round(hwm_start["VmRSS"] / 1024, 1),
        "threads": status["Threads"],
        "log_lines_during_idle": len(during_idle),
        "queries_total": stats.queries,
        "other_rxfilterd_running": others,
        "loadavg": [load, loadavg()],
    }


def run_debug(workdir: Path, mine: int) -> dict[str, Any]:
    load = loadavg()
    with BenchDaemon(workdir, level="debug") as daemon:
        ready = daemon.wait_ready(timeout=120)
        records = daemon.records()
    first: dict[tuple[str, str], float] = {}
    failed = 0
    for r in records:
        domain = str(r.get("domain", ""))
        if r.get("event") in SYNC_EVENTS and domain.startswith(prefix()):
            first.setdefault((domain, str(r.get("alias"))), stamp(r))
            failed += r.get("event") in ("failed", "rejected")
    connected = next(r for r in records if r.get("event") == "connected")
    times = sorted(first.values())
    return {
        "ready_after_spawn_s": round(ready - daemon.spawned, 3),
        "our_nics_first_synced": len(first),
        "nics_ours": mine,
        "failed_or_rejected": failed,
        "all_ours_synced_after_spawn_s": round(times[-1] - daemon.spawned, 3) if times else None,
        "all_ours_synced_after_connected_s": round(times[-1] - stamp(connected), 3)
        if times
        else None,
        "first_sync_after_connected_s": round(times[0] - stamp(connected), 3) if times else None,
        "loadavg": [load, loadavg()],
    }


def run_profiled(workdir: Path) -> dict[str, Any]:
    raw = workdir / "startup-profile.txt"
    workdir.mkdir(parents=True, exist_ok=True)
    with BenchDaemon(workdir, profile=raw, profile_rate=200) as daemon:
        ready = daemon.wait_ready(timeout=180)
        time.sleep(1)
    summary = profile_summary(raw, top=20)
    return {"ready_after_spawn_s_under_py_spy": round(ready - daemon.spawned, 3)} | {
        "profile": summary
    }


def run_memory(workdir: Path) -> dict[str, Any]:
    """Who holds the Python heap once every NIC synced (tracemalloc: not run A's RSS)."""
    with BenchDaemon(workdir, tracemalloc=1) as daemon:
        daemon.wait_ready(timeout=180)
        time.sleep(2)
        daemon.stats()  # the snapshot is logged right after the counters
        memory = daemon.wait_for(lambda r: r.get("event") == "bench-memory", 30, "bench-memory")
        status = proc_status(daemon.pid)
    return {
        "traced_kib": memory["traced_kib"],
        "rss_mib_while_tracing": round(status["VmRSS"] / 1024, 1),
        "top": memory["top"],
    }


def qemu_rss_mib(domain: str) -> float | None:
    pid_file = Path(run_libvirt_dir(current_libvirt().uri)) / "qemu" / f"{domain}.pid"
    if not pid_file.exists():
        return None
    return round(proc_status(int(pid_file.read_text()))["VmRSS"] / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--nics", type=int, default=25, help="per guest")
    parser.add_argument("--memory", type=int, default=128, help="MiB per guest")
    parser.add_argument("--parallel", type=int, default=4, help="guests booting at once")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument(
        "--heap", action="store_true", help="one more start under tracemalloc: who holds memory"
    )
    add_libvirt_argument(parser)
    parser.add_argument("--out", help="directory for the JSON results, logs and profile")
    args = parser.parse_args()
    guests: list[Guest] = []
    started = time.monotonic()
    result: dict[str, Any] = {}
    with BenchSession("scale", args.out, profile=args.profile, libvirt=args.libvirt) as session:
        out, info = session.out, session.info
        try:
            for g in range(args.guests):
                session.stack.veth(prefixed(f"s{g}a"), prefixed(f"s{g}b"))
                nics = []
                for n in range(args.nics):
                    mvt = session.stack.macvtap(
                        prefixed(f"s{g}m{n}"), prefixed(f"s{g}a"), mac=mac(g, n)
                    )
                    nics.append(EthernetNic(mvt.name, mac=mac(g, n), trust=True))
                guests.append(Guest(prefixed(f"sc{g}"), nics, memory_mib=args.memory))
            links_done = time.monotonic()
            print(f"{args.guests * args.nics} macvtaps in {links_done - started:.1f} s")
            with ThreadPoolExecutor(max_workers=args.parallel) as pool:
                booted = list(pool.map(lambda guest: guest.start(timeout=300), guests))
            boots = [round(g.boot_seconds or 0, 1) for g in booted]
            print(f"{len(booted)} guests up in {time.monotonic() - links_done:.1f} s ({boots})")
            time.sleep(3)  # let the guests' own NIC set-up events pass
            mine = args.guests * args.nics
            result["info_run"] = run_info(out / "run-info", args.idle, mine)
            print(f"A (info):  {result['info_run']}")
            result["debug_run"] = run_debug(out / "run-debug", mine)
            print(f"B (debug): {result['debug_run']}")
            if args.profile:
                result["profiled_run"] = run_profiled(out / "run-profile")
                print_profile("profile of rxfilterd's start-up", result["profiled_run"]["profile"])
            if args.heap:
                result["memory_run"] = run_memory(out / "run-memory")
                print(f"M (tracemalloc): traced {result['memory_run']['traced_kib']} KiB")
                for where, kib, count in result["memory_run"]["top"]:
                    print(f"    {kib:7d} KiB {count:7d} blocks  {where}")
            result["guest_boot_seconds"] = boots
            result["qemu_rss_mib"] = [qemu_rss_mib(g.name) for g in guests]
        finally:
            for guest in guests:
                guest.remove()
    result["total_seconds"] = round(time.monotonic() - started, 1)
    print(f"total {result['total_seconds']} s")
    write_json(out / "scale.json", {"machine": info, "args": vars(args), "result": result})
    print(f"results: {Path(out) / 'scale.json'}")


if __name__ == "__main__":
    main()
