"""Pods: one rxfilterd serving many virt-launcher pods' libvirts (issue 15).

PODS simulated pods (tests/support/pods.py: each a libvirtd 11.3 in mount, network and
PID namespaces of its own) hold one guest each with NICS trusted KubeVirt-shaped NICs on
macvtaps moved into the pod. With every guest booted, rxfilterd (no host libvirt,
[pods] on, default scan interval) is started twice:
  A. log level debug: spawn -> each pod found -> every NIC's first sync;
  B. log level info: idle CPU (utime+stime from /proc/PID/stat over --idle seconds),
     RSS, threads and descriptors with every connection up; then one more pod started
     under it: pod up -> its NIC's first sync (what "served within 5 s" means).

    .venv/bin/python -m bench.pods [--pods 20] [--nics 5] [--idle 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.figures import write_json
from bench.machine import loadavg
from bench.process import proc_cpu_seconds, proc_status
from bench.session import BenchSession
from tests.support.daemon import cli_json
from tests.support.guest import Guest, create_veth, delete_link, prefix, prefixed
from tests.support.pods import KubevirtNic, SimulatedPod, cleanup_pods

SYNCED = {"synced", "in sync", "applied"}
NAMESPACE = prefixed("ns")


def mac(pod: int, nic: int) -> str:
    return f"52:54:00:fc:{pod:02x}:{nic:02x}"


def stamp(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["timestamp"])).timestamp()


def pods_config(scan_interval: float | None = None) -> dict[str, dict[str, Any]]:
    pods: dict[str, Any] = {"enabled": True, "match": f"{prefix()}*"}
    if scan_interval is not None:
        pods["scan_interval"] = scan_interval
    return {"libvirt": {"uri": ""}, "pods": pods}


def make_pod(stack: ExitStack, lower: str, index: int, nics: int, memory: int) -> Guest:
    pod = stack.enter_context(SimulatedPod(f"b{index}"))
    names = [f"{prefix()}n{j}" for j in range(nics)]
    for j, name in enumerate(names):
        pod.add_macvtap(lower, name, mac=mac(index, j))
    nic_list = [
        KubevirtNic(name, mac=mac(index, j), trust=True, alias=f"ua-n{j}")
        for j, name in enumerate(names)
    ]
    return pod.guest(NAMESPACE, f"vm{index}", nic_list, memory_mib=memory)


def first_syncs(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    first: dict[tuple[str, str, str], float] = {}
    for r in records:
        if r.get("event") in SYNCED and str(r.get("libvirt", "")).startswith("pod/"):
            key = (str(r["libvirt"]), str(r.get("domain")), str(r.get("alias")))
            first.setdefault(key, stamp(r))
    return first


def run_startup(workdir: Path, expected: int) -> dict[str, Any]:
    load = loadavg()
    with BenchDaemon(workdir, level="debug", sections=pods_config()) as daemon:
        deadline = time.monotonic() + 180
        while len(first_syncs(daemon.records())) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        records = daemon.records()
    found = sorted(stamp(r) for r in records if r.get("event") == "pod found")
    synced = sorted(first_syncs(records).values())
    return {
        "pods_found": len(found),
        "nics_synced": len(synced),
        "nics_expected": expected,
        "last_pod_found_after_spawn_s": round(found[-1] - daemon.spawned, 3) if found else None,
        "all_synced_after_spawn_s": round(synced[-1] - daemon.spawned, 3) if synced else None,
        "first_synced_after_spawn_s": round(synced[0] - daemon.spawned, 3) if synced else None,
        "failed": sum(r.get("event") in ("failed", "rejected") for r in records),
        "loadavg": [load, loadavg()],
    }


def status(daemon: BenchDaemon) -> dict[str, Any]:
    """The daemon's status answer ({} while its socket is not up yet)."""
    try:
        answer: dict[str, Any] = cli_json(daemon.config, "status")
    except subprocess.CalledProcessError:
        return {}
    return answer


def run_idle(workdir: Path, expected: int, idle: float, lower: str, memory: int) -> dict[str, Any]:
    load = loadavg()
    with BenchDaemon(workdir, sections=pods_config()) as daemon:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            nics = status(daemon).get("nics", [])
            if sum(n.get("last_sync") is not None for n in nics) >= expected:
                break
            time.sleep(0.5)
        time.sleep(2)
        cpu0, t0 = proc_cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(idle)
        cpu1, t1 = proc_cpu_seconds(daemon.pid), time.monotonic()
        proc = proc_status(daemon.pid)
        fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        connections = len(status(daemon).get("connections", []))
        # One more pod under the running daemon: from the pod's libvirt up to its NIC synced.
        with ExitStack() as stack:
            started = time.time()
            pod = stack.enter_context(SimulatedPod("late"))
            pod_up = time.time()
            pod.add_macvtap(lower, f"{prefix()}late", mac=mac(0xEE, 0))
            nic = KubevirtNic(f"{prefix()}late", mac=mac(0xEE, 0), trust=True)
            pod.guest(NAMESPACE, "late", [nic], memory_mib=memory)
            guest_up = time.time()
            deadline = time.monotonic() + 60
            late: float | None = None
            while late is None and time.monotonic() < deadline:
                late = next(
                    (
                        stamp(r)
                        for r in daemon.records()
                        if r.get("event") in SYNCED and "late" in str(r.get("libvirt", ""))
                    ),
                    None,
                )
                time.sleep(0.1)
            found = next(
                (
                    stamp(r)
                    for r in daemon.records()
                    if r.get("event") == "pod found" and "late" in str(r.get("libvirt"))
                ),
                None,
            )
    return {
        "connections": connections,
        "idle_seconds": round(t1 - t0, 1),
        "idle_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 3),
        "rss_mib": round(proc["VmRSS"] / 1024, 1),
        "rss_peak_mib": round(proc["VmHWM"] / 1024, 1),
        "threads": proc["Threads"],
        "fds": fds,
        "late_pod_start_s": round(pod_up - started, 3),
        "late_pod_found_after_its_libvirt_up_s": round(found - pod_up, 3) if found else None,
        "late_nic_synced_after_its_guest_defined_s": round(late - guest_up, 3) if late else None,
        "late_nic_synced_after_its_libvirt_up_s": round(late - pod_up, 3) if late else None,
        "loadavg": [load, loadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--nics", type=int, default=5, help="per pod")
    parser.add_argument("--memory", type=int, default=96, help="MiB per guest")
    parser.add_argument("--parallel", type=int, default=4, help="guests booting at once")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    parser.add_argument("--out", help="directory for the JSON results and logs")
    args = parser.parse_args()
    with BenchSession("pods", args.out, cleanups=[cleanup_pods]) as session, ExitStack() as pods:
        lower, far = prefixed("bpa"), prefixed("bpb")
        create_veth(lower, far)
        pods.callback(delete_link, lower)
        started = time.monotonic()
        guests = [make_pod(pods, lower, i, args.nics, args.memory) for i in range(args.pods)]
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda g: g.wait_ready(timeout=600), guests))
        print(
            f"{args.pods} pods with {args.nics} NICs each up in {time.monotonic() - started:.0f} s"
        )
        expected = args.pods * args.nics
        results = {
            "pods": args.pods,
            "nics_per_pod": args.nics,
            "startup": run_startup(session.out / "startup", expected),
            "idle": run_idle(session.out / "idle", expected, args.idle, lower, args.memory),
            "machine": session.info,
        }
        write_json(session.out / "pods.json", results)
        print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
