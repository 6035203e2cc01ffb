"""Latency from QEMU's NIC_RX_FILTER_CHANGED to the host macvtap showing the new MAC.

One guest, two trusted NICs: net0 is type='ethernet' on a macvtap we made (only
rxfilterd syncs it), net1 is type='direct' (libvirt's own handler syncs it). The guest
changes one MAC at a time; the start is the QEMU timestamp carried by the event (our own
qemuMonitorEventRegister subscription), the end is the kernel's RTM_NEWLINK notification
with the new address (our own RTNLGRP_LINK socket, stamped on arrival).

rxfilterd runs only while its NIC is measured and is stopped while libvirt's is, so the
libvirt figures are libvirt alone (rxfilterd would race it on the direct NIC). The paths
alternate in blocks, in each /sys/kernel/rcu_expedited mode asked for; the original
mode is restored at the end. With --floor a third path takes rxfilterd's place on net0
in each block: bench.floor_client, the least any client outside libvirtd can do.

    .venv/bin/python -m bench.latency [--changes 50] [--blocks 5] [--modes 0,1] [--floor]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.figures import summary_ms, write_json
from bench.machine import REPO, loadavg, other_rxfilterd
from bench.monitors import EventMonitor, LinkMonitor, LinkSample
from bench.process import end_process
from bench.session import BenchSession, add_libvirt_argument
from tests.support.guest import (
    DirectNic,
    EthernetNic,
    Guest,
    current_libvirt,
    link_show,
    prefixed,
)

# One event as a client saw it: QEMU's timestamp, when its callback ran, then more.
_Row = Sequence[Any]

MAC_ETHERNET = "52:54:00:fb:00:01"
MAC_DIRECT = "52:54:00:fb:00:02"


@dataclass(frozen=True)
class Sample:
    path: str  # "rxfilterd", "libvirt" or "floor"
    rcu_expedited: int
    block: int
    mac: str
    qemu_time: float | None
    event_received: float | None
    host_time: float | None
    others_running: int  # other engineers' rxfilterd processes seen at the change
    started: float = 0.0  # when the bench sent the guest its command
    # NIC_RX_FILTER_CHANGED events from the change's first to the host showing it:
    # more than one means QEMU reported the new MAC only on a later event (the guest
    # was slow to program it), which both paths then pay.
    events_before_host: int = 0
    # rxfilterd's steps (from its trace lines), seconds since the epoch
    callback: float | None = None  # libvirt's callback ran on the event thread
    dispatch: float | None = None  # the asyncio loop dispatched the event
    query_start: float | None = None
    call_start: float | None = None  # qemuMonitorCommand, in the pool thread
    call_end: float | None = None
    query_end: float | None = None
    read_end: float | None = None
    apply_start: float | None = None
    apply_end: float | None = None

    @property
    def latency(self) -> float | None:
        if self.qemu_time is None or self.host_time is None:
            return None
        return self.host_time - self.qemu_time

    @property
    def event_hop(self) -> float | None:
        if self.qemu_time is None or self.event_received is None:
            return None
        return self.event_received - self.qemu_time


def timed(s: Sample, events: Sequence[_Row]) -> tuple[Sample, _Row] | None:
    """S timed by the first event its path's client saw after the command, and that row.

    EVENTS: that client's rows, sorted, each starting with QEMU's timestamp and when
    the client's callback ran. None when there is no such event or no host time.
    """
    mine = [e for e in events if e[0] >= s.started]
    if not mine or s.host_time is None:
        return None
    first = mine[0]
    return replace(
        s,
        qemu_time=first[0],
        event_received=first[1],
        events_before_host=sum(1 for e in mine if e[0] <= s.host_time),
    ), first


def with_steps(samples: list[Sample], records: list[dict[str, Any]]) -> list[Sample]:
    """Attach rxfilterd's steps (trace lines and in-memory stamps) to each of its samples."""
    queries = [r for r in records if r.get("event") == "bench-query" and r.get("alias") == "net0"]
    reads = [r for r in records if r.get("event") == "bench-read"]
    applies = [r for r in records if r.get("event") == "bench-apply" and r.get("field") == "mac"]
    stamps = [tuple(x) for r in records if r.get("event") == "bench-stamps" for x in r["stamps"]]
    # (QEMU's timestamp, when rxfilterd's callback ran) of each event for net0.
    # Stamp details (bench.counted_daemon): callback "QEMU-TIME ALIAS", dispatch
    # "ALIAS", call "END-TIME ALIAS".
    callbacks = sorted(
        (float(d.split()[0]), t)
        for what, t, d in stamps
        if what == "callback" and d.split()[1] == "net0"
    )
    dispatches = sorted(t for what, t, d in stamps if what == "dispatch" and d == "net0")
    calls = sorted(
        (t, float(d.split()[0]))
        for what, t, d in stamps
        if what == "call" and d.split()[1] == "net0"
    )
    out = []
    for sample in samples:
        found = timed(sample, callbacks)
        if found is None:
            out.append(sample)
            continue
        s, (t, callback) = found
        q = next((r for r in queries if r["t0"] >= t), None)
        # The host read starts with the query and runs beside it.
        rd = next(
            (r for r in reads if q is not None and q["t0"] - 0.002 <= r["t0"] <= q["t1"]), None
        )
        a = next(
            (r for r in applies if q is not None and q["t1"] <= r["t0"] <= q["t1"] + 0.5), None
        )
        call = next((c for c in calls if q is not None and q["t0"] <= c[0] <= q["t1"]), None)
        out.append(
            replace(
                s,
                callback=callback,
                dispatch=next((x for x in dispatches if x >= t), None),
                query_start=q["t0"] if q else None,
                call_start=call[0] if call else None,
                call_end=call[1] if call else None,
                query_end=q["t1"] if q else None,
                read_end=rd["t1"] if rd else None,
                apply_start=a["t0"] if a else None,
                apply_end=a["t1"] if a else None,
            )
        )
    return out


def with_floor_stamps(samples: list[Sample], stamps: list[list[Any]]) -> list[Sample]:
    """Attach the floor client's stamps (see bench.floor_client) to each of its samples."""
    rows = sorted(stamps)
    out = []
    for sample in samples:
        found = timed(sample, rows)
        if found is None:
            out.append(sample)
            continue
        s, (_qemu, callback, call_start, call_end, written, _what) = found
        out.append(
            replace(
                s,
                callback=callback,
                call_start=call_start,
                call_end=call_end,
                apply_start=call_end,
                apply_end=written,
            )
        )
    return out


# Consecutive points on rxfilterd's path; each step is the time from one to the next.
STEP_POINTS = (
    ("qemu_time", "callback", "event to libvirt's callback (RPC hop)"),
    ("callback", "dispatch", "callback to loop dispatch (thread hand-over)"),
    ("dispatch", "query_start", "dispatch to query start (worker)"),
    ("query_start", "call_start", "query start to libvirt call (pool thread)"),
    ("call_start", "call_end", "qemuMonitorCommand round trip"),
    ("call_end", "query_end", "call return to the loop"),
    ("query_end", "apply_start", "parse, plan (host read overlapped)"),
    ("apply_start", "host_time", "MAC write to the kernel's notification"),
)


# The floor client's path: everything happens on libvirt's event thread.
FLOOR_POINTS = (
    ("qemu_time", "callback", "event to libvirt's callback (RPC hop)"),
    ("callback", "call_start", "callback to libvirt call (same thread)"),
    ("call_start", "call_end", "qemuMonitorCommand round trip"),
    ("apply_start", "host_time", "ioctl write to the kernel's notification"),
)


def steps(samples: list[Sample], points: tuple[tuple[str, str, str], ...]) -> dict[str, Any]:
    """A path's latency split into its steps (ms summaries), plus the overlapped read."""
    parts: dict[str, list[float]] = {label: [] for _a, _b, label in points}
    parts["host read ended after the query by"] = []
    for s in samples:
        # Another rxfilterd may have written the MAC first: such a sample has no steps.
        if s.others_running:
            continue
        for a, b, label in points:
            start, end = getattr(s, a), getattr(s, b)
            if start is not None and end is not None:
                parts[label].append(end - start)
        if s.read_end is not None and s.query_end is not None:
            parts["host read ended after the query by"].append(max(0.0, s.read_end - s.query_end))
    return {k: summary_ms(v) for k, v in parts.items()}


class FloorClient:
    """bench.floor_client for one NIC, as a process of its own (as rxfilterd is)."""

    def __init__(self, workdir: Path, domain: str, ifname: str, alias: str = "net0") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._stamps_path = workdir / "floor-stamps.json"
        self._cmd = [
            sys.executable, "-m", "bench.floor_client", "--uri", current_libvirt().uri,
            "--domain", domain, "--alias", alias, "--ifname", ifname,
            "--stamps", str(self._stamps_path),
        ]  # fmt: skip
        self._proc: subprocess.Popen[str] | None = None
        self.pid = 0
        self.stamps: list[list[Any]] = []

    def __enter__(self) -> FloorClient:
        proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self._proc, self.pid = proc, proc.pid
        assert proc.stdout is not None
        line = proc.stdout.readline()  # READY once subscribed
        if line.strip() != "READY":
            proc.kill()
            proc.wait()
            raise RuntimeError(f"bench.floor_client did not start: {line!r}")
        return self

    def __exit__(self, *_exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        end_process(proc, signal.SIGTERM, timeout=10)
        with contextlib.suppress(OSError, ValueError):
            self.stamps = json.loads(self._stamps_path.read_text())


class Macs:
    def __init__(self) -> None:
        self._n = itertools.count(0x100)

    def next(self, nic: int) -> str:
        n = next(self._n)
        return f"52:54:00:{0xF0 + nic:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"


def measure(
    guest: Guest,
    dev: str,
    alias: str,
    ifindex: int,
    path: str,
    count: int,
    *,
    rcu: int,
    block: int,
    macs: Macs,
    nic: int,
    events: EventMonitor | None,
    links: LinkMonitor,
    settle: float,
    mine: list[int],
) -> list[Sample]:
    samples = []
    for _ in range(count):
        mac = macs.next(nic)
        others = len(other_rxfilterd(mine))
        started = time.time()
        guest.run(f"ip link set {dev} address {mac}")

        def shows(s: LinkSample, mac: str = mac, t: float = started) -> bool:
            return s.ifindex == ifindex and s.address == mac and s.time >= t

        seen = links.wait(shows, timeout=10)
        # Without our own subscription, the event times come from rxfilterd's stamps.
        firsts = events.of(guest.name, alias, since=started) if events is not None else []
        first = min(firsts, key=lambda e: e.qemu_time) if firsts else None
        samples.append(
            Sample(
                path,
                rcu,
                block,
                mac,
                first.qemu_time if first else None,
                first.received if first else None,
                seen.time if seen else None,
                others,
                started=started,
                events_before_host=sum(
                    1 for e in firsts if seen is None or e.qemu_time <= seen.time
                ),
            )
        )
        time.sleep(settle)  # let follow-up events (multicast) and their syncs finish
    return samples


def query_rtts(guest: Guest, alias: str, count: int) -> list[float]:
    """Round trips of query-rx-filter from a plain blocking client (no asyncio, no pool)."""
    rtts = []
    for _ in range(count):
        t0 = time.perf_counter()
        guest.query_rx_filter(alias)
        rtts.append(time.perf_counter() - t0)
        time.sleep(0.02)
    return rtts


PATH_STEPS = {"rxfilterd": STEP_POINTS, "floor": FLOOR_POINTS}


def paths_of(samples: list[Sample]) -> list[str]:
    return [p for p in ("rxfilterd", "floor", "libvirt") if any(s.path == p for s in samples)]


def difference(mode: dict[str, Any], a: str, b: str) -> dict[str, float]:
    diff = {}
    for key in ("p50", "p95", "p99"):
        x = mode[a]["latency_ms"].get(key)
        y = mode[b]["latency_ms"].get(key)
        if x is not None and y is not None:
            diff[key] = round(x - y, 2)
    return diff


def report(samples: list[Sample], modes: list[int], rtts: dict[int, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    paths = paths_of(samples)
    for rcu in modes:
        mode: dict[str, Any] = {"client_query_rtt_ms": summary_ms(rtts.get(rcu, []))}
        for path in paths:
            mine = [s for s in samples if s.path == path and s.rcu_expedited == rcu]
            lat = [x for s in mine if (x := s.latency) is not None]
            clean = [x for s in mine if (x := s.latency) is not None and s.others_running == 0]
            hop = [x for s in mine if (x := s.event_hop) is not None]
            single = [x for s in mine if (x := s.latency) is not None and s.events_before_host == 1]
            mode[path] = {
                "latency_ms": summary_ms(lat),
                "latency_ms_one_event": summary_ms(single),
                "samples_with_later_events": sum(1 for s in mine if s.events_before_host > 1),
                "latency_ms_no_other_rxfilterd": summary_ms(clean),
                "event_hop_ms": summary_ms(hop),
                "missing": len(mine) - len(lat),
                "samples_with_other_rxfilterd": sum(1 for s in mine if s.others_running),
                "steps_ms": steps(mine, PATH_STEPS[path]) if path in PATH_STEPS else {},
            }
        mode["rxfilterd_minus_libvirt_ms"] = difference(mode, "rxfilterd", "libvirt")
        if "floor" in paths:
            mode["floor_minus_libvirt_ms"] = difference(mode, "floor", "libvirt")
            mode["rxfilterd_minus_floor_ms"] = difference(mode, "rxfilterd", "floor")
        out[f"rcu_expedited={rcu}"] = mode
    return out


def print_report(result: dict[str, Any]) -> None:
    for mode, data in result.items():
        print(f"\n{mode}")
        rtt = data["client_query_rtt_ms"]
        print(
            f"  query-rx-filter round trip, plain client: p50={rtt.get('p50')} p95={rtt.get('p95')}"
        )
        for path in ("rxfilterd", "floor", "libvirt"):
            if path not in data:
                continue
            d = data[path]
            lat = d["latency_ms"]
            hop = d["event_hop_ms"]
            print(
                f"  {path:9s} n={lat.get('n')} p50={lat.get('p50')} p95={lat.get('p95')}"
                f" p99={lat.get('p99')} max={lat.get('max')} ms"
                f" | event hop p50={hop.get('p50')} ms | missing={d['missing']}"
                f" | samples with another rxfilterd running={d['samples_with_other_rxfilterd']}"
            )
            one = d["latency_ms_one_event"]
            print(
                f"  {'':9s} {d['samples_with_later_events']} samples needed a later event;"
                f" the others: n={one.get('n')} p50={one.get('p50')} p95={one.get('p95')}"
                f" p99={one.get('p99')} ms"
            )
            clean = d["latency_ms_no_other_rxfilterd"]
            if clean.get("n"):
                print(
                    f"  {'':9s} without other rxfilterd: n={clean['n']} p50={clean['p50']}"
                    f" p95={clean['p95']} p99={clean['p99']} ms"
                )
        for a, b in (("rxfilterd", "libvirt"), ("floor", "libvirt"), ("rxfilterd", "floor")):
            if f"{a}_minus_{b}_ms" in data:
                print(f"  {a} - {b}: {data[f'{a}_minus_{b}_ms']} ms")
        for path in PATH_STEPS:
            for step, st in data.get(path, {}).get("steps_ms", {}).items():
                if st.get("n"):
                    print(f"    {path:9s} step {step:48s} p50={st['p50']} p95={st['p95']} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=50, help="per path and RCU mode")
    parser.add_argument("--blocks", type=int, default=5, help="alternations per mode")
    parser.add_argument("--modes", default="0,1", help="rcu_expedited values, in order")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds between changes")
    parser.add_argument(
        "--no-trace",
        dest="trace",
        action="store_false",
        help="do not log rxfilterd's steps (query, read, apply) to split its latency",
    )
    parser.add_argument(
        "--daemon-nice",
        type=int,
        default=0,
        help="run rxfilterd at this niceness (e.g. -5, as Nice=-5 in a unit drop-in)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure bench.floor_client on net0: the least any external client pays",
    )
    add_libvirt_argument(parser)
    parser.add_argument("--out", help="directory for the JSON results and logs")
    args = parser.parse_args()
    modes = [int(m) for m in args.modes.split(",")]
    samples: list[Sample] = []
    rtts: dict[int, list[float]] = {}
    phases: list[dict[str, Any]] = []
    with BenchSession(
        "latency", args.out, events=True, links=True, rcu=True, libvirt=args.libvirt
    ) as s:
        out, info, events, links, rcu = s.out, s.info, s.events, s.links, s.rcu
        mvt = s.stack.veth_macvtap("le", mac=MAC_ETHERNET)
        s.stack.veth(prefixed("lda"), prefixed("ldb"))
        guest = s.stack.guest(
            prefixed("lat"),
            [
                EthernetNic(mvt.name, mac=MAC_ETHERNET, trust=True),
                DirectNic(prefixed("lda"), mac=MAC_DIRECT, trust=True),
            ],
        )
        direct = guest.interfaces()[1].target_dev
        assert direct is not None
        shown = link_show(direct)
        assert shown is not None
        links.watch(mvt.ifindex)
        links.watch(int(shown["ifindex"]))
        macs = Macs()
        per_block = [
            args.changes // args.blocks + (1 if i < args.changes % args.blocks else 0)
            for i in range(args.blocks)
        ]
        for mode in modes:
            rcu.set(mode)
            for block, n in enumerate(per_block):
                common: dict[str, Any] = {
                    "rcu": mode,
                    "block": block,
                    "macs": macs,
                    "events": events,
                    "links": links,
                    "settle": args.settle,
                }
                load_before = loadavg()
                workdir = out / f"daemon-rcu{mode}-b{block}"
                # Our own subscription would be served before rxfilterd's (libvirtd
                # sends events in registration order): off while rxfilterd is measured.
                events.pause()
                try:
                    bench_daemon = BenchDaemon(workdir, trace=args.trace, nice=args.daemon_nice)
                    with bench_daemon as daemon:
                        daemon.wait_ready()
                        ours = measure(
                            guest, "eth0", "net0", mvt.ifindex, "rxfilterd", n,
                            nic=0, mine=[daemon.pid], **{**common, "events": None},
                        )  # fmt: skip
                finally:
                    events.resume()
                samples += with_steps(ours, daemon.records())
                if args.floor:
                    events.pause()
                    try:
                        floor = FloorClient(out / f"floor-rcu{mode}-b{block}", guest.name, mvt.name)
                        with floor:
                            least = measure(
                                guest, "eth0", "net0", mvt.ifindex, "floor", n,
                                nic=0, mine=[floor.pid], **{**common, "events": None},
                            )  # fmt: skip
                    finally:
                        events.resume()
                    samples += with_floor_stamps(least, floor.stamps)
                samples += measure(
                    guest, "eth1", "net1", int(shown["ifindex"]), "libvirt", n,
                    nic=1, mine=[], **common,
                )  # fmt: skip
                # net0: nobody else syncs it while rxfilterd is stopped.
                rtts.setdefault(mode, []).extend(query_rtts(guest, "net0", n))
                phases.append(
                    {"rcu": mode, "block": block, "loadavg_before": load_before,
                     "loadavg_after": loadavg()}
                )  # fmt: skip
                print(f"rcu_expedited={mode} block {block}: {n}+{n} changes, load {loadavg()}")
    result = report(samples, modes, rtts)
    for mode in modes:
        loads = [p for p in phases if p["rcu"] == mode]
        for path in paths_of(samples):
            result[f"rcu_expedited={mode}"][path]["loadavg"] = sorted(
                {p["loadavg_before"] for p in loads} | {p["loadavg_after"] for p in loads}
            )
    print_report(result)
    print(f"\nrcu_expedited restored to {rcu.original}; netlink overruns: {links.overruns}")
    write_json(
        out / "latency.json",
        {
            "machine": info,
            "args": vars(args),
            "result": result,
            "phases": phases,
            "samples": [asdict(s) | {"latency": s.latency} for s in samples],
        },
    )
    print(f"results: {Path(out) / 'latency.json'}")


if __name__ == "__main__":
    main()
