"""Bursts: a guest changing its filter in a tight loop, and what rxfilterd does about it.

One guest with one trusted type='ethernet' NIC on a macvtap. For each scenario:
the QEMU events seen (our own subscription, which never queries), rxfilterd's queries,
syncs and netlink writes (its own Stats, read through bench.counted_daemon), how long the
guest took, how long after the guest's last event the host was right, and whether the
final host state equals the guest's.

Scenarios: "batch" (one `ip -batch` process flipping promiscuous mode: the events come
within milliseconds, a burst in the sense of the target), "promisc" and "mac" (a shell
loop running `ip` once per change: seconds of steady changes).

    .venv/bin/python -m bench.burst [--flips 201] [--macs 200] [--batch 21] [--no-profile]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.figures import write_json
from bench.machine import loadavg, other_rxfilterd
from bench.monitors import EventMonitor, LinkMonitor
from bench.profiling import attach_profiler, print_profile, profile_summary, stop_profiler
from bench.session import BenchSession
from tests.support.guest import EthernetNic, Guest, prefixed

MAC0 = "52:54:00:fb:10:01"
IFF_PROMISC = 0x100


def guest_state(guest: Guest) -> tuple[str, bool]:
    out = guest.run("cat /sys/class/net/eth0/address /sys/class/net/eth0/flags").split()
    return out[0].strip(), bool(int(out[1], 16) & IFF_PROMISC)


def host_state(links: LinkMonitor, ifindex: int) -> tuple[str, bool] | None:
    last = None
    for s in links.samples:
        if s.ifindex == ifindex:
            last = s
    return None if last is None else (last.address, bool(last.flags & IFF_PROMISC))


def scenario(
    name: str,
    cmd: str,
    guest: Guest,
    daemon: BenchDaemon,
    events: EventMonitor,
    links: LinkMonitor,
    ifindex: int,
    quiet: float,
) -> dict[str, Any]:
    load_before = loadavg()
    others_before = other_rxfilterd([daemon.pid])
    before = daemon.stats()
    started = time.time()
    guest.run(cmd, timeout=300)
    guest_done = time.time()
    expected = guest_state(guest)
    # Settled: no new event for QUIET seconds and the host shows the guest's state.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = events.of(guest.name, "net0", since=started)
        last = max((e.received for e in seen), default=started)
        if time.time() - last >= quiet and host_state(links, ifindex) == expected:
            break
        time.sleep(0.1)
    after = daemon.stats()
    seen = events.of(guest.name, "net0", since=started)
    last_event = max((e.qemu_time for e in seen), default=None)
    final_host = host_state(links, ifindex)
    host_final_at = None
    for s in links.samples:
        if s.ifindex == ifindex and s.time >= started:
            host_final_at = s.time  # the last notification is the one that made it right
    counts = after.minus(before)
    result: dict[str, Any] = {
        "scenario": name,
        "guest_seconds": round(guest_done - started, 3),
        "events_seen": len(seen),
        "event_span_ms": round(
            (max(e.qemu_time for e in seen) - min(e.qemu_time for e in seen)) * 1000, 1
        )
        if seen
        else None,
        "queries": counts["queries"],
        "syncs": counts["syncs"],
        "netlink_writes": counts["writes"],
        "final_guest": {"mac": expected[0], "promiscuous": expected[1]},
        "final_host": None
        if final_host is None
        else {"mac": final_host[0], "promiscuous": final_host[1]},
        "final_state_correct": final_host == expected,
        "host_right_after_last_event_ms": None
        if last_event is None or host_final_at is None
        else round((host_final_at - last_event) * 1000, 1),
        "other_rxfilterd_running": sorted(set(others_before) | set(other_rxfilterd([daemon.pid]))),
        "loadavg": [load_before, loadavg()],
    }
    print(
        f"{name:8s} guest {result['guest_seconds']:6.2f} s | events {len(seen):4d} |"
        f" over {result['event_span_ms']} ms | queries {counts['queries']:4d} |"
        f" syncs {counts['syncs']:4d} |"
        f" writes {counts['writes']:4d} | final state correct: {result['final_state_correct']}"
        f" | host right {result['host_right_after_last_event_ms']} ms after the last event"
        f" | load {loadavg()}"
        + (
            f" | other rxfilterd running: {len(result['other_rxfilterd_running'])}"
            if result["other_rxfilterd_running"]
            else ""
        )
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=201, help="promiscuous flips in a loop")
    parser.add_argument("--macs", type=int, default=200, help="MAC changes in a loop")
    parser.add_argument("--batch", type=int, default=21, help="flips in one `ip -batch`")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of each scenario")
    parser.add_argument("--quiet", type=float, default=1.5, help="seconds without events")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--out", help="directory for the JSON results, logs and profile")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with BenchSession("burst", args.out, events=True, links=True, profile=args.profile) as s:
        out, info, events, links = s.out, s.info, s.events, s.links
        raw = out / "burst-profile.txt"
        mvt = s.stack.veth_macvtap("bu", mac=MAC0)
        links.watch(mvt.ifindex)
        guest = s.stack.guest(prefixed("burst"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        batch = "\\n".join(
            f"link set eth0 promisc {'on' if i % 2 == 0 else 'off'}" for i in range(args.batch)
        )
        scenarios = [
            ("batch", f"printf '{batch}\\n' | ip -batch -"),
            (
                "promisc",
                f"i=0; while [ $i -lt {args.flips} ]; do"
                " if [ $((i % 2)) = 0 ]; then ip link set eth0 promisc on;"
                " else ip link set eth0 promisc off; fi; i=$((i+1)); done",
            ),
            (
                "mac",
                f"i=1; while [ $i -le {args.macs} ]; do"
                " ip link set eth0 address 52:54:00:fb:$(printf '%02x:%02x' $((i/256)) $((i%256)));"
                " i=$((i+1)); done",
            ),
        ]
        with BenchDaemon(out / "daemon", level="debug") as daemon:
            daemon.wait_ready()
            profiler = attach_profiler(daemon.pid, raw) if args.profile else None
            try:
                for rnd in range(args.rounds):
                    # Start each round from a known state: promiscuous off.
                    guest.run("ip link set eth0 promisc off")
                    time.sleep(args.quiet)
                    for name, cmd in scenarios:
                        results.append(
                            scenario(name, cmd, guest, daemon, events, links, mvt.ifindex,
                                     args.quiet) | {"round": rnd}
                        )  # fmt: skip
            finally:
                if profiler is not None:
                    stop_profiler(profiler)
            config = daemon.config.read_text()
    summary = profile_summary(raw) if args.profile else None
    if summary is not None:
        print_profile("profile of rxfilterd during the bursts", summary)
    write_json(
        out / "burst.json",
        {
            "machine": info,
            "args": vars(args),
            "daemon_config": config,
            "results": results,
            "profile": summary,
        },
    )
    print(f"results: {Path(out) / 'burst.json'}")


if __name__ == "__main__":
    main()
