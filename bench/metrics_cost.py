"""What [metrics] costs the syncs: the same guest changes with and without it, scraped hard.

One guest with one trusted type='ethernet' NIC on a macvtap. Blocks alternate between
rxfilterd without [metrics] and rxfilterd with [metrics] listen on 127.0.0.1 while a
thread of ours scrapes /metrics every --scrape-every seconds (0.1 s: 150 times what a
15 s Prometheus does). In each block:
- single MAC changes, one at a time: QEMU's event (our own subscription) to the kernel's
  RTM_NEWLINK with the new MAC (our own netlink socket), as bench.latency measures it;
- a burst: one `ip -batch` flipping promiscuous mode --batch times: rxfilterd's queries
  and writes, and how long after the guest's last event the host was right;
- rxfilterd's CPU time over the block.

    .venv/bin/python -m bench.metrics_cost [--changes 20] [--blocks 3] [--batch 21]
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.figures import summary_ms, write_json
from bench.machine import loadavg, other_rxfilterd
from bench.monitors import EventMonitor, LinkMonitor, LinkSample
from bench.process import proc_cpu_seconds
from bench.session import BenchSession
from tests.support.guest import EthernetNic, Guest, prefixed

MAC0 = "52:54:00:fc:00:01"
IFF_PROMISC = 0x100


class Scraper:
    """GETs /metrics in a loop from a thread; counts scrapes and times each."""

    def __init__(self, port: int, every: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.every = every
        self.seconds: list[float] = []
        self.failures = 0
        self.size = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    self.size = len(answer.read())
                self.seconds.append(time.monotonic() - started)
            except OSError:
                self.failures += 1
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def singles(
    guest: Guest, events: EventMonitor, links: LinkMonitor, ifindex: int, macs: list[str]
) -> list[float]:
    """Seconds from each MAC change's first QEMU event to the host showing it."""
    out = []
    for mac in macs:
        started = time.time()
        guest.run(f"ip link set eth0 address {mac}")

        def shows(s: LinkSample, mac: str = mac, t: float = started) -> bool:
            return s.ifindex == ifindex and s.address == mac and s.time >= t

        seen = links.wait(shows, timeout=10)
        firsts = events.of(guest.name, "net0", since=started)
        if seen is not None and firsts:
            out.append(seen.time - min(e.qemu_time for e in firsts))
        time.sleep(0.25)  # past the rate limit's burst: each change is a sync of its own
    return out


def burst(
    guest: Guest,
    daemon: BenchDaemon,
    events: EventMonitor,
    links: LinkMonitor,
    ifindex: int,
    flips: int,
) -> dict[str, Any]:
    guest.run("ip link set eth0 promisc off")
    time.sleep(1.0)
    before = daemon.stats()
    started = time.time()
    batch = "\\n".join(
        f"link set eth0 promisc {'on' if i % 2 == 0 else 'off'}" for i in range(flips)
    )
    guest.run(f"printf '{batch}\\n' | ip -batch -")
    want_promisc = flips % 2 == 1
    deadline = time.monotonic() + 30
    right_at = None
    while time.monotonic() < deadline:
        seen = events.of(guest.name, "net0", since=started)
        last = max((e.received for e in seen), default=started)
        state = [s for s in links.samples if s.ifindex == ifindex and s.time >= started]
        promisc = bool(state[-1].flags & IFF_PROMISC) if state else False
        if time.time() - last >= 1.0 and promisc == want_promisc:
            right_at = state[-1].time if state else None
            break
        time.sleep(0.05)
    counts = daemon.stats().minus(before)
    seen = events.of(guest.name, "net0", since=started)
    last_event = max((e.qemu_time for e in seen), default=None)
    return {
        "events": len(seen),
        "queries": counts["queries"],
        "writes": counts["writes"],
        "right_after_last_event_ms": None
        if right_at is None or last_event is None
        else round((right_at - last_event) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20, help="single MAC changes per block")
    parser.add_argument("--blocks", type=int, default=3, help="alternations of off and on")
    parser.add_argument("--batch", type=int, default=21, help="promiscuous flips in the burst")
    parser.add_argument("--scrape-every", type=float, default=0.1, help="seconds between GETs")
    parser.add_argument("--out", help="directory for the JSON results and logs")
    args = parser.parse_args()
    blocks: list[dict[str, Any]] = []
    serial = iter(range(1, 1 << 16))
    with BenchSession("metrics_cost", args.out, events=True, links=True) as s:
        out, info, events, links = s.out, s.info, s.events, s.links
        mvt = s.stack.veth_macvtap("mc", mac=MAC0)
        links.watch(mvt.ifindex)
        guest = s.stack.guest(prefixed("mcost"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        for block in range(args.blocks):
            for mode in ("off", "on"):
                port = free_port()
                sections = {"metrics": {"listen": f"127.0.0.1:{port}"}} if mode == "on" else {}
                workdir = out / f"{mode}-{block}"
                with BenchDaemon(workdir, level="info", sections=sections) as daemon:
                    daemon.wait_ready()
                    scraper = Scraper(port, args.scrape_every).start() if mode == "on" else None
                    others = other_rxfilterd([daemon.pid])
                    cpu0, t0 = proc_cpu_seconds(daemon.pid), time.monotonic()
                    macs = [
                        f"52:54:00:fc:{(n := next(serial)) >> 8:02x}:{n & 0xFF:02x}"
                        for _ in range(args.changes)
                    ]
                    latencies = singles(guest, events, links, mvt.ifindex, macs)
                    bursted = burst(guest, daemon, events, links, mvt.ifindex, args.batch)
                    cpu = proc_cpu_seconds(daemon.pid) - cpu0
                    wall = time.monotonic() - t0
                    if scraper is not None:
                        scraper.stop()
                lat = summary_ms(latencies)
                scrape_ms = summary_ms(scraper.seconds) if scraper else {}
                result: dict[str, Any] = {
                    "block": block,
                    "metrics": mode,
                    "latency": lat,
                    "latencies_ms": [round(s * 1000, 2) for s in latencies],
                    "burst": bursted,
                    "cpu_seconds": round(cpu, 3),
                    "wall_seconds": round(wall, 1),
                    "scrapes": len(scraper.seconds) if scraper else 0,
                    "scrape_failures": scraper.failures if scraper else 0,
                    "scrape_ms": scrape_ms,
                    "scrape_bytes": scraper.size if scraper else 0,
                    "other_rxfilterd": len(others),
                    "load": loadavg(),
                }
                blocks.append(result)
                print(
                    f"block {block} metrics {mode:3s} | MAC event->host p50 {lat.get('p50')} ms"
                    f" p95 {lat.get('p95')} ms (n={lat['n']}) | burst of {args.batch}:"
                    f" {bursted['queries']} queries {bursted['writes']} writes, host right"
                    f" {bursted['right_after_last_event_ms']} ms after the last event |"
                    f" CPU {cpu:.2f} s over {wall:.0f} s | scrapes {result['scrapes']}"
                    + (
                        f" (p50 {scrape_ms.get('p50')} ms, {scraper.size} bytes)"
                        if scraper and scraper.seconds
                        else ""
                    )
                    + f" | others {len(others)} | load {result['load']}"
                )
    totals: dict[str, dict[str, Any]] = {}
    for mode in ("off", "on"):
        mine = [b for b in blocks if b["metrics"] == mode]
        all_ms = [ms / 1000 for b in mine for ms in b["latencies_ms"]]
        totals[mode] = {
            "latency": summary_ms(all_ms),
            "burst_queries": [b["burst"]["queries"] for b in mine],
            "burst_right_ms": [b["burst"]["right_after_last_event_ms"] for b in mine],
            "cpu_seconds": [b["cpu_seconds"] for b in mine],
            "scrapes": sum(b["scrapes"] for b in mine),
        }
        t = totals[mode]
        print(
            f"metrics {mode:3s}: MAC event->host {t['latency']} | burst queries"
            f" {t['burst_queries']} host right {t['burst_right_ms']} ms | CPU {t['cpu_seconds']} s"
            f" | scrapes {t['scrapes']}"
        )
    write_json(
        out / "metrics_cost.json",
        {"machine": info, "args": vars(args), "blocks": blocks, "totals": totals},
    )
    print(f"results: {Path(out) / 'metrics_cost.json'}")


if __name__ == "__main__":
    main()
