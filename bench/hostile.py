"""Hostile guests: what rxfilterd's CPU pays per event and per sync under non-stop changes.

GUESTS guests, each with one trusted type='ethernet' NIC on a bridge-mode macvtap of its
own. In each scenario (by default 1, then 20 guests) that many guests run a shell loop
that flips promiscuous mode and adds and removes an IPv6 address (so its solicited-node
group) as fast as the guest can, for --seconds. libvirt 9.0 queries a trusted NIC itself
on each of its events, which re-arms QEMU's event at once: hundreds of events a second
per guest, while rxfilterd's rate limit (max_syncs_per_second) caps its syncs.

Measured over the window, from outside the daemon: its CPU (utime + stime of every
thread, /proc/PID/stat), the filter events libvirt delivered to it and that its loop
dispatched (bench.counted_daemon's tracer), its syncs, queries and writes (its Stats),
its RSS; then ms of CPU per sync and per event and % of one core. With --profile, a
second window of each scenario under `py-spy record --native` (C frames too, every thread) says
where the time went.

    .venv/bin/python -m bench.hostile [--guests 1,20] [--seconds 60] [--no-profile]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon, DaemonStats
from bench.figures import write_json
from bench.machine import loadavg, other_rxfilterd
from bench.process import proc_cpu_seconds, proc_status, thread_cpu_seconds
from bench.profiling import attach_profiler, print_profile, profile_summary, stop_profiler
from bench.session import BenchSession, add_libvirt_argument
from tests.support.guest import EthernetNic, Guest, prefixed

STOP = "/tmp/rxfb-hostile-stop"
COUNT = "/tmp/rxfb-hostile-count"
# Four filter changes a round: promiscuous on and off, an address's group joined and
# left, fed 100 rounds at a time to one `ip -batch` process (an `ip` per change would
# spend the guest's time on fork and exec, not on changes). N counts the changes sent.
LOOP = (
    f"rm -f {STOP} {COUNT}; n=0; while [ ! -e {STOP} ]; do"
    " { k=0; while [ $k -lt 100 ]; do"
    " echo 'link set eth0 promisc on'; echo 'addr add 2001:db8:fb::1/64 dev eth0 nodad';"
    " echo 'link set eth0 promisc off'; echo 'addr del 2001:db8:fb::1/64 dev eth0';"
    " k=$((k+1)); done; } | ip -force -batch -;"
    f" n=$((n+400)); done; echo $n > {COUNT}"
)


def mac(guest: int) -> str:
    return f"52:54:00:fb:{0xA0 + guest // 256:02x}:{guest % 256:02x}"


def start_loops(guests: list[Guest]) -> None:
    for guest in guests:
        guest.run(f"({LOOP}) >/dev/null 2>&1 &")


def stop_loops(guests: list[Guest]) -> list[int]:
    """Stop every loop; the filter changes each guest made."""
    for guest in guests:
        guest.run(f"touch {STOP}")
    counts = []
    for guest in guests:
        out = guest.run(
            f"i=0; while [ ! -e {COUNT} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done;"
            f" cat {COUNT} 2>/dev/null || ps",
            timeout=60,
        )
        last = out.split()[-1] if out.split() else ""
        if not last.isdigit():
            print(f"{guest.name}: its loop did not end:\n{out}")
        counts.append(int(last) if last.isdigit() else -1)
    return counts


def window(daemon: BenchDaemon, seconds: float) -> dict[str, Any]:
    """CPU, counters and RSS of DAEMON over SECONDS."""
    load = loadavg()
    before: DaemonStats = daemon.stats()
    threads0 = thread_cpu_seconds(daemon.pid)
    cpu0, t0 = proc_cpu_seconds(daemon.pid), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = proc_cpu_seconds(daemon.pid), time.monotonic()
    threads1 = thread_cpu_seconds(daemon.pid)
    after = daemon.stats()
    delta = after.minus(before)
    cpu, wall = cpu1 - cpu0, t1 - t0
    syncs, events = delta["syncs"], delta["events_received"]
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 3),
        "core_percent": round(100 * cpu / wall, 2),
        **delta,
        "events_per_s": round(events / wall, 1),
        "syncs_per_s": round(syncs / wall, 2),
        "cpu_ms_per_sync": round(1000 * cpu / syncs, 3) if syncs else None,
        "cpu_ms_per_event": round(1000 * cpu / events, 4) if events else None,
        # Where the CPU went, by thread: the loop (python), libvirt's event thread, the
        # pool threads that make libvirt calls (libvirt_N).
        "cpu_s_by_thread": {
            name: round(t - threads0.get(name, 0.0), 3)
            for name, t in sorted(threads1.items())
            if t - threads0.get(name, 0.0) > 0
        },
        "rss_mib": round(proc_status(daemon.pid)["VmRSS"] / 1024, 1),
        "loadavg": [load, loadavg()],
    }


def scenario(
    guests: list[Guest], count: int, args: argparse.Namespace, workdir: Path, profile: bool
) -> dict[str, Any]:
    hostile = guests[:count]
    sync = {"max_syncs_per_second": args.rate}
    with BenchDaemon(workdir, level=args.level, sync=sync, stamps=False) as daemon:
        daemon.wait_ready(timeout=120)
        idle = window(daemon, args.idle)
        start_loops(hostile)
        try:
            time.sleep(args.warmup)
            busy = window(daemon, args.seconds)
            profiled = None
            if profile:
                raw = workdir / "hostile-profile.txt"
                spy = attach_profiler(daemon.pid, raw, rate=args.profile_rate, gil=args.gil,
                                      native=True)  # fmt: skip
                try:
                    profiled = window(daemon, args.profile_seconds)
                finally:
                    stop_profiler(spy)
                profiled["profile"] = profile_summary(raw, top=25)
        finally:
            changes = stop_loops(hostile)
        others = other_rxfilterd([daemon.pid])
    return {
        "guests": count,
        "idle": idle,
        "busy": busy,
        "guest_changes": changes,
        "profiled": profiled,
        "other_rxfilterd": others,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", default="1,20", help="hostile guests per scenario")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--idle", type=float, default=5.0, help="idle window before the loops")
    parser.add_argument("--rate", type=float, default=5.0, help="max_syncs_per_second")
    parser.add_argument("--level", default="info", help="rxfilterd's log level")
    parser.add_argument("--memory", type=int, default=128, help="MiB per guest")
    parser.add_argument("--parallel", type=int, default=4, help="guests booting at once")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument(
        "--gil",
        action="store_true",
        help="profile only the thread holding the GIL (default: every thread, waits left out)",
    )
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples a second")
    add_libvirt_argument(parser)
    parser.add_argument("--out", help="directory for the JSON results, logs and profile")
    args = parser.parse_args()
    counts = [int(c) for c in args.guests.split(",")]
    results: list[dict[str, Any]] = []
    guests: list[Guest] = []
    with BenchSession("hostile", args.out, profile=args.profile, libvirt=args.libvirt) as s:
        try:
            for g in range(max(counts)):
                mvt = s.stack.veth_macvtap(f"h{g}", mac=mac(g))
                nic = EthernetNic(mvt.name, mac=mac(g), trust=True)
                guests.append(Guest(prefixed(f"hostile{g}"), [nic], memory_mib=args.memory))
            with ThreadPoolExecutor(max_workers=args.parallel) as pool:
                list(pool.map(lambda guest: guest.start(timeout=300), guests))
            print(f"{len(guests)} guests up, load {loadavg()}")
            time.sleep(3)  # let the guests' own NIC set-up events pass
            for count in counts:
                result = scenario(guests, count, args, s.out / f"daemon-{count}", args.profile)
                results.append(result)
                print_result(result)
        finally:
            for guest in guests:
                guest.remove()
        write_json(
            s.out / "hostile.json", {"machine": s.info, "args": vars(args), "results": results}
        )
        print(f"results: {s.out / 'hostile.json'}")


def print_result(result: dict[str, Any]) -> None:
    b, i = result["busy"], result["idle"]
    print(
        f"{result['guests']} hostile guest(s): {b['core_percent']} % of a core,"
        f" {b['cpu_ms_per_sync']} ms CPU/sync, {b['cpu_ms_per_event']} ms CPU/event;"
        f" {b['events_per_s']} events/s ({b['events_dispatched']} of {b['events_received']}"
        f" dispatched), {b['syncs_per_s']} syncs/s, {b['queries']} queries, {b['writes']} writes"
        f" over {b['wall_s']} s; RSS {b['rss_mib']} MiB; idle before: {i['core_percent']} %;"
        f" guests made {sum(result['guest_changes'])} changes; load {b['loadavg']};"
        f" other rxfilterd: {result['other_rxfilterd']}"
    )
    profiled = result.get("profiled")
    if profiled:
        print(f"  profiled window: {profiled['core_percent']} % of a core")
        print_profile("profile (py-spy --native)", profiled["profile"])


if __name__ == "__main__":
    main()
