"""One rxfilterd serving the libvirts of simulated virt-launcher pods (tests/support/pods.py).

Each pod holds a guest named as KubeVirt names it (the same name in every pod) on a
trusted macvtap named alike in its own network namespace, beside a same-named macvtap
on the host. The daemon finds the pods by itself ([pods], no host libvirt), runs with
only the capabilities the DaemonSet grants (docs/kubernetes.md), writes each guest's MAC
to its own pod's macvtap and never to the host's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rxfilterd.app import DEFAULT_WORKERS
from rxfilterd.mqtt_topics import topic_segment
from tests.support.daemon import Record, RunningDaemon, cli_json, wait_until
from tests.support.guest import (
    Guest,
    create_macvtap,
    delete_link,
    link_show,
    prefix,
    prefixed,
    skip_or_fail,
)
from tests.support.mqtt import (
    SHARED_HOST,
    SHARED_PORT,
    broker_problem,
    clear_retained,
    random_prefix,
    retained,
)
from tests.support.pods import KubevirtNic, SimulatedPod

pytestmark = pytest.mark.pods

NIC = prefixed("net1")  # every pod's macvtap name, and the host's decoy
HOST_MAC = "52:54:00:9e:00:00"
NAMESPACE, VMI = prefixed("ns"), prefixed("vm")
# The DaemonSet's capabilities (deploy/kubernetes/daemonset.yaml): the daemon gets no other.
CAPABILITIES = ("net_admin", "sys_admin", "sys_ptrace", "dac_override")
# Generous: a TCG guest and a libvirt connection under a loaded CI machine.
SERVED = 60.0


def pod_daemon(tmp_path: Path, mqtt_prefix: str | None = None) -> RunningDaemon:
    """rxfilterd with no host libvirt, serving only this test's pods, capabilities bounded;
    with MQTT_PREFIX, publishing to the shared broker under it."""
    bounding = ",".join(["-all", *(f"+{c}" for c in CAPABILITIES)])
    mqtt: dict[str, Any] = {"enabled": False}
    if mqtt_prefix is not None:
        mqtt = {"enabled": True, "host": SHARED_HOST, "port": SHARED_PORT}
        mqtt |= {"topic_prefix": mqtt_prefix, "client_id": "node1"}
    return RunningDaemon(
        tmp_path,
        sections={
            "libvirt": {"uri": ""},
            # Only this run's pods: other libvirts in other mount namespaces (the 11.3
            # root of the libvirt tier, other agents' labs) are pods to the scanner too.
            "pods": {"enabled": True, "match": f"{prefix()}*", "scan_interval": 0.5},
            "mqtt": mqtt,
        },
        wrap=["setpriv", f"--bounding-set={bounding}", f"--inh-caps={bounding}"],
    )


def mac_of(pod: SimulatedPod, name: str = NIC) -> str | None:
    link = pod.link(name)
    return None if link is None else str(link["address"])


def applied(daemon: RunningDaemon, libvirt: str, mac: str) -> Callable[[Record], bool]:
    def match(r: Record) -> bool:
        return (
            r.get("event") == "applied"
            and r.get("libvirt") == libvirt
            and r.get("field") == "mac"
            and r.get("new") == mac
        )

    return match


def has_mac(pod: SimulatedPod, mac: str) -> Callable[[], bool]:
    return lambda: mac_of(pod) == mac


def logged(event: str, libvirt: str) -> Callable[[Record], bool]:
    return lambda r: r.get("event") == event and r.get("libvirt") == libvirt


def listed(daemon: RunningDaemon, libvirt: str) -> Callable[[], bool]:
    """Whether `rxfilterd status` lists the connection LIBVIRT."""
    return lambda: libvirt in _connections(daemon)


def connection_of(daemon: RunningDaemon, pod: SimulatedPod) -> str:
    """The name the daemon gave POD's connection (from its "pod found" line)."""
    record = daemon.wait_for(
        lambda r: r.get("event") == "pod found" and r.get("pid") == pod.daemon_pid,
        SERVED,
        f"pod {pod.name} found",
    )
    return str(record["libvirt"])


def explain(daemon: RunningDaemon) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = cli_json(daemon.config, "explain")
    return rows


def test_three_pods_each_guest_reaches_its_own_macvtap_only(
    pods: Callable[..., SimulatedPod], lower: str, tmp_path: Path
) -> None:
    problem = broker_problem()
    if problem is not None:
        skip_or_fail(problem)
    topics = random_prefix()
    decoy = create_macvtap(NIC, lower, mac=HOST_MAC)
    try:
        lab: list[tuple[SimulatedPod, Guest, str]] = []
        # a and b: same-named VMIs in two namespaces share a hostname in KubeVirt; c is
        # a non-root (session) virt-launcher.
        for name, session, hostname in (("a", False, VMI), ("b", False, VMI), ("c", True, None)):
            pod = pods(name, session=session, hostname=hostname)
            mac = f"52:54:00:9e:00:0{len(lab) + 1}"
            pod.add_macvtap(lower, NIC, mac=mac)
            guest = pod.guest(NAMESPACE, VMI, [KubevirtNic(NIC, mac=mac, trust=True)])
            lab.append((pod, guest, mac))
        with pod_daemon(tmp_path, topics) as daemon:
            names = [connection_of(daemon, pod) for pod, _, _ in lab]
            assert len(set(names)) == 3, names  # one connection each, never merged
            for index, (pod, guest, _) in enumerate(lab):
                guest.wait_ready()
                new = f"52:54:00:9e:01:0{index + 1}"
                guest.set_mac(new)
                daemon.wait_for(applied(daemon, names[index], new), SERVED, f"{new} applied")
                wait_until(has_mac(pod, new), SERVED, f"{pod.name} has {new}")
            # Each pod's macvtap has its own guest's MAC; the host's, of the same name,
            # was never touched.
            assert [mac_of(pod) for pod, _, _ in lab] == [f"52:54:00:9e:01:0{i}" for i in (1, 2, 3)]
            decoy_now = link_show(decoy.name)
            assert decoy_now is not None and decoy_now["address"] == HOST_MAC
            # explain lists every connection's NICs, each row naming its libvirt.
            rows = [r for r in explain(daemon) if r["domain"] == f"{NAMESPACE}_{VMI}"]
            assert sorted(r["libvirt"] for r in rows) == sorted(names)
            assert {(r["ifname"], r["action"], r["model"]) for r in rows} == {
                (NIC, "sync", "virtio-non-transitional")
            }
            # Every decision line names its connection.
            lines = [r for r in daemon.records() if r.get("event") in ("applied", "syncing")]
            assert lines and all(r.get("libvirt") in names for r in lines)
            # Three retained NIC states for one domain name: a topic each, by connection.
            domain = f"{NAMESPACE}_{VMI}"
            kept = asyncio.run(retained(SHARED_PORT, f"{topics}/node1/nic/#"))
            want = {f"{topics}/node1/nic/{topic_segment(n)}/{domain}/ua-default": n for n in names}
            assert set(kept) == set(want)
            assert all(kept[t].json()["libvirt"] == n for t, n in want.items())
    finally:
        delete_link(decoy.name)
        asyncio.run(clear_retained(SHARED_PORT, topics))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _answers(daemon: RunningDaemon) -> bool:
    try:
        return _connections(daemon) == []
    except subprocess.CalledProcessError:
        return False


def _connections(daemon: RunningDaemon) -> list[str]:
    return [str(c["libvirt"]) for c in cli_json(daemon.config, "status")["connections"]]


def test_pods_come_and_go_and_leave_nothing_behind(
    pods: Callable[..., SimulatedPod], tmp_path: Path
) -> None:
    """50 pod start/stop cycles: no connection, thread or file descriptor left behind."""
    with pod_daemon(tmp_path) as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        wait_until(lambda: _answers(daemon), SERVED, "the status socket answers")
        took = []
        fds = threads = 0
        for cycle in range(50):
            if cycle == 5:
                # Warm now: libvirt's event thread, the default executor's workers. From
                # here on, a leak per pod would grow with every cycle.
                fds, threads = _fds(pid), _threads(pid)
            with SimulatedPod(f"cy{cycle % 2}") as pod:
                name = connection_of(daemon, pod)
                took.append(wait_until(listed(daemon, name), SERVED, f"{name} served"))
                daemon.wait_for(
                    logged("connected", name),
                    SERVED,
                    f"cycle {cycle}: connected",
                )
            wait_until(lambda: _connections(daemon) == [], SERVED, f"cycle {cycle}: dropped")
        # Threads of a dropped connection's pool end on their own; a leak would grow with
        # every pod. The loop's default executor may still grow to its bound meanwhile.
        bound = threads + DEFAULT_WORKERS
        wait_until(lambda: _threads(pid) <= bound, SERVED, f"threads back to {bound} at most")
        wait_until(lambda: _fds(pid) <= fds, SERVED, f"fds back to {fds} (now {_fds(pid)})")
        dropped = [r for r in daemon.records() if r.get("event") == "pod dropped"]
        assert len(dropped) == 50 and all(r["why"] == "gone" for r in dropped)
        print(f"status lists a new pod after {max(took):.2f} s at most ({sum(took) / 50:.2f} mean)")


def test_a_pods_libvirt_killed_mid_sync_costs_only_that_pod(
    pods: Callable[..., SimulatedPod], lower: str, tmp_path: Path
) -> None:
    a, b = pods("ka"), pods("kb")
    guests = {}
    for index, pod in enumerate((a, b)):
        mac = f"52:54:00:9e:02:0{index}"
        pod.add_macvtap(lower, NIC, mac=mac)
        guests[pod.name] = pod.guest(NAMESPACE, VMI, [KubevirtNic(NIC, mac=mac, trust=True)])
    with pod_daemon(tmp_path) as daemon:
        name_a, name_b = connection_of(daemon, a), connection_of(daemon, b)
        for g in guests.values():
            g.wait_ready()
        # Guest a changes its MAC non-stop; its libvirt dies while syncs are under way.
        guests["ka"].run(
            "( i=0; while true; do i=$(( (i + 1) % 200 ));"
            " ip link set eth0 address 52:54:00:9e:03:$(printf %02x $i); done ) >/dev/null 2>&1 &"
        )
        daemon.wait_for(
            lambda r: r.get("libvirt") == name_a and r.get("event") == "applied", SERVED
        )
        a.kill_daemon(signal.SIGKILL)
        daemon.wait_for(
            logged("pod dropped", name_a),
            SERVED,
            "the dead pod dropped",
        )
        # The other pod is served as before.
        guests["kb"].set_mac("52:54:00:9e:04:01")
        daemon.wait_for(applied(daemon, name_b, "52:54:00:9e:04:01"), SERVED, "pod b synced")
        assert mac_of(b) == "52:54:00:9e:04:01"

        # The pod's libvirt back (same pod, a new daemon process): served again.
        def surveyed() -> int:
            return sum(
                r.get("event") == "syncing" and r.get("libvirt") == name_a for r in daemon.records()
            )

        before = surveyed()
        a.start()
        assert connection_of(daemon, a) == name_a
        wait_until(lambda: surveyed() > before, SERVED, "pod a's NIC surveyed again")
        assert daemon.proc is not None and daemon.proc.poll() is None
