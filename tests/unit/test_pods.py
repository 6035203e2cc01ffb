"""Pods: finding their libvirts in /proc, and one daemon serving each on its own network.

The scanner reads a /proc laid out in a temporary directory (real unix sockets, real
symlinks); the daemon runs its real reconcilers against FakeNode's pods. The real
pods, on the real stack, are tests/pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rxfilterd.config import PodSettings, from_dict
from rxfilterd.daemon import Daemon
from rxfilterd.live import LiveState
from rxfilterd.plan import MacChange
from rxfilterd.pods import PodScanner, missing_capabilities
from rxfilterd.reconciler import Timings
from rxfilterd.records import NicKey, NicState
from rxfilterd.stats import Board
from rxfilterd.testing import FakeHostNetwork, FakeLibvirt, FakeNode
from tests.unit.test_daemon_faults import MAC0, MAC1, domain_xml, host_state, reply, until

SOCK = "/run/libvirt/virtqemud-sock"


class FakeProc:
    """A /proc with processes in it, laid out under ROOT."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sockets: list[socket.socket] = []
        self.add("self", "rxfilterd", mnt="mnt:[1]", sock=None)

    def add(
        self,
        pid: int | str,
        comm: str,
        *,
        mnt: str = "mnt:[2]",
        uid: int = 0,
        started: int = 500,
        hostname: str | None = None,
        sock: str | None = SOCK,
    ) -> None:
        base = self.root / str(pid)
        (base / "ns").mkdir(parents=True)
        (base / "comm").write_text(comm + "\n")
        os.symlink(mnt, base / "ns" / "mnt")
        (base / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        self.restart(pid, started)
        if hostname is not None:
            (base / "root" / "etc").mkdir(parents=True)
            (base / "root" / "etc" / "hostname").write_text(hostname + "\n")
        if sock is not None:
            path = base / "root" / sock.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(path))
            self.sockets.append(listener)

    def restart(self, pid: int | str, started: int) -> None:
        # comm in parentheses may hold spaces and ')': the scanner counts from the last.
        fields = ["S", *["0"] * 18, str(started), "0"]
        (self.root / str(pid) / "stat").write_text(f"{pid} (a) b) {' '.join(fields)}\n")

    def close(self) -> None:
        for listener in self.sockets:
            listener.close()


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[FakeProc]:
    # A short path: unix socket paths are limited to 107 bytes.
    fake = FakeProc(tmp_path)
    yield fake
    fake.close()


def scanner(proc: FakeProc, **settings: Any) -> PodScanner:
    return PodScanner(PodSettings(enabled=True, **settings), proc=proc.root)


def test_a_libvirt_in_another_mount_namespace_is_a_pod(proc: FakeProc) -> None:
    proc.add(101, "virtqemud", hostname="virt-launcher-vm1-abcde")
    proc.add(102, "virtqemud", mnt="mnt:[1]")  # in our own mount namespace: the host's
    proc.add(103, "qemu-system-x86", mnt="mnt:[3]")  # not a libvirt daemon
    proc.add(104, "libvirtd", mnt="mnt:[4]", sock=None)  # no socket (yet)
    [pod] = scanner(proc).scan()
    assert pod.name == "pod/virt-launcher-vm1-abcde"
    assert pod.uri == f"qemu+unix:///system?socket={proc.root}/101/root{SOCK}"
    assert pod.netns == f"{proc.root}/101/ns/net"
    assert (pod.pid, pod.started) == (101, 500)
    assert pod.queries == 1  # one VM per pod: one query connection


def test_a_non_root_daemon_is_asked_for_its_session(proc: FakeProc) -> None:
    proc.add(101, "virtqemud", uid=107, hostname="launcher")
    [pod] = scanner(proc).scan()
    assert pod.uri.startswith("qemu+unix:///session?socket=")


def test_sockets_are_tried_in_order_and_one_pod_is_one_connection(proc: FakeProc) -> None:
    proc.add(101, "libvirtd", hostname="p1", sock="/var/run/libvirt/libvirt-sock")
    [pod] = scanner(proc).scan()
    assert pod.uri.endswith("/101/root/var/run/libvirt/libvirt-sock")
    assert scanner(proc, sockets=("/elsewhere",)).scan() == []


def test_names_come_from_the_hostname(proc: FakeProc) -> None:
    proc.add(101, "virtqemud", mnt="mnt:[5]", hostname="vm1")
    proc.add(102, "virtqemud", mnt="mnt:[6]", hostname="vm1")  # same-named VMIs
    proc.add(103, "virtqemud", mnt="mnt:[7]", hostname="bad/name")
    proc.add(104, "virtqemud", mnt="mnt:[8]")  # no /etc/hostname
    proc.add(105, "virtqemud", mnt="mnt:[9]", hostname="x" * 200)
    found = scanner(proc).scan()
    names = ["pod/pid-103", "pod/pid-104", "pod/pid-105", "pod/vm1", "pod/vm1"]
    assert [e.name for e in found] == names  # the daemon adds a pid to a second vm1
    assert len({e.identity for e in found}) == 5


def test_a_forking_daemon_is_one_pod_reached_through_its_newest_process(proc: FakeProc) -> None:
    proc.add(101, "libvirtd", hostname="p1", started=500)
    # Its child (daemonizing, or forked to exec QEMU), in the same mount namespace.
    proc.add(102, "libvirtd", mnt="mnt:[2]", hostname="p1", started=600)
    [pod] = scanner(proc).scan()
    assert pod.pid == 102 and pod.uri.endswith(f"/102/root{SOCK}")


def test_match_and_alive(proc: FakeProc) -> None:
    proc.add(101, "virtqemud", hostname="virt-launcher-a")
    proc.add(102, "virtqemud", mnt="mnt:[3]", hostname="other")
    pods = scanner(proc, match="virt-launcher-*")
    assert [e.name for e in pods.scan() if pods.wanted(e)] == ["pod/virt-launcher-a"]
    [_, pod] = pods.scan()  # by name: "other" first
    assert pods.alive(pod)
    proc.restart(101, 999)  # the pid now names another process
    assert not pods.alive(pod)


def test_config_keys_are_checked() -> None:
    config = from_dict(
        {"pods": {"enabled": True, "match": "virt-launcher-*"}, "libvirt": {"uri": ""}}
    )
    assert config.pods.enabled and config.libvirt.uri == ""


# -- one daemon, many pods


def pod_libvirt(mac: str) -> FakeLibvirt:
    """A pod's libvirt: one domain named as KubeVirt names it, its guest at MAC."""
    libvirt = FakeLibvirt(11_003_000)
    libvirt.reply = reply(**{"main-mac": mac})
    libvirt.domains["u1"] = domain_xml().replace("<name>d1</name>", "<name>default_vm1</name>")
    return libvirt


class Node:
    """A Daemon with no host libvirt, serving FakeNode's pods; its sinks recorded."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.states: dict[NicKey, NicState] = {}
        config = from_dict(
            {"libvirt": {"uri": ""}, "pods": {"enabled": True, "scan_interval": 0.02}}
        )
        board = Board()
        self.live = LiveState(board)
        self.daemon = Daemon(
            config,
            None,
            states=[self._state, self.live.nic_state],
            connect=node.connect,
            timings=Timings(shutdown_grace=0.1, ready_wait=0.5),
            board=board,
            pods=node,
            open_network=node.open_network,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _state(self, key: NicKey, state: NicState | None) -> None:
        if state is None:
            self.states.pop(key, None)
        else:
            self.states[key] = state

    async def __aenter__(self) -> Node:
        self.task = asyncio.ensure_future(self.daemon.run(self.stop))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


def synced(network: FakeHostNetwork, mac: str) -> bool:
    return any(isinstance(c, MacChange) and c.new == mac for c in network.applied)


def test_two_pods_with_the_same_domain_never_mix() -> None:
    node = FakeNode()
    net_a, net_b = FakeHostNetwork(host_state()), FakeHostNetwork(host_state())
    # Same-named VMIs in two namespaces: KubeVirt gives both pods the VMI's hostname.
    node.add_pod("vm1", pod_libvirt(MAC1), net_a, key="a")
    node.add_pod("vm1", pod_libvirt("52:54:00:10:00:0b"), net_b, key="b")

    async def scenario() -> None:
        async with Node(node) as running:
            await until(lambda: synced(net_a, MAC1) and synced(net_b, "52:54:00:10:00:0b"), "both")
            # Each guest's MAC went to its own pod's network, and only there.
            assert [c.new for c in net_a.applied if isinstance(c, MacChange)] == [MAC1]
            assert [c.new for c in net_b.applied if isinstance(c, MacChange)] == [
                "52:54:00:10:00:0b"
            ]
            keys = sorted(running.states)
            assert keys == [
                ("pod/vm1", "default_vm1", "net0"),
                ("pod/vm1@1001", "default_vm1", "net0"),
            ]
            assert running.states[keys[1]].row.libvirt == "pod/vm1@1001"
            assert list(running.daemon.board.connections) == ["pod/vm1", "pod/vm1@1001"]
            assert "2 pods (2 connected)" in running.daemon.status()
            # Each pod's libvirt was asked for the one query connection its endpoint says.
            assert [v.queries_asked for v in node.libvirts.values()] == [[1], [1]]

    asyncio.run(scenario())


def test_a_pod_going_away_is_dropped_with_its_nics_and_leaves_nothing_behind() -> None:
    node = FakeNode()
    network = FakeHostNetwork(host_state())

    async def scenario() -> None:
        async with Node(node) as running:
            await until(lambda: node.scans >= 1, "the first scan")
            for cycle in range(50):
                libvirt = pod_libvirt(MAC1 if cycle % 2 else MAC0)
                node.add_pod("launcher", libvirt, network)
                await until(lambda: len(running.states) == 1, f"cycle {cycle}: pod served")
                node.remove_pod("launcher")
                await until(lambda: not running.states, f"cycle {cycle}: NIC withdrawn")
                await until(lambda: not running.daemon.connections, f"cycle {cycle}: dropped")
                assert all(c.closed for c in libvirt.connections)
            assert node.open == []  # every pod's network closed again
            assert running.daemon.board.connections == {}

            def left() -> list[str]:
                # A pod's tasks are named: its connection "libvirt pod/...", its domain
                # workers "domain <name>", its NIC workers "<domain>/<alias>". (Unnamed
                # ones are the daemon's own passing waits, not the pod's.)
                names = [t.get_name() for t in asyncio.all_tasks()]
                return [n for n in names if n.startswith(("libvirt ", "domain ")) or "/" in n]

            with contextlib.suppress(AssertionError):
                await until(lambda: not left(), "no task left behind")
            assert not left(), left()

    asyncio.run(scenario())


def test_a_reused_pid_is_not_served() -> None:
    node = FakeNode()
    node.add_pod("launcher", pod_libvirt(MAC1), FakeHostNetwork(host_state()))
    node.replaced.add("launcher")

    async def scenario() -> None:
        async with Node(node) as running:
            await until(lambda: node.scans >= 3, "three scans")
            assert running.daemon.connections == [] and node.open == []

    asyncio.run(scenario())


def test_the_hosts_libvirt_is_no_pod_even_from_a_private_mount_namespace(proc: FakeProc) -> None:
    # Under the unit's PrivateMounts= our mount namespace is not the host's (PID 1's).
    proc.add(1, "systemd", mnt="mnt:[7]", sock=None)
    proc.add(101, "libvirtd", mnt="mnt:[7]", hostname="hv1")
    proc.add(102, "virtqemud", mnt="mnt:[8]", hostname="vm1")
    assert [e.name for e in scanner(proc).scan()] == ["pod/vm1"]


def test_missing_capabilities_are_named(tmp_path: Path) -> None:
    status = tmp_path / "status"
    everything = (1 << 1) | (1 << 12) | (1 << 19) | (1 << 21)
    status.write_text(f"Name:\trxfilterd\nCapEff:\t{everything:016x}\n")
    assert missing_capabilities(status) == []
    status.write_text(f"CapEff:\t{1 << 12:016x}\n")  # CAP_NET_ADMIN only: host mode's unit
    assert missing_capabilities(status) == ["CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN"]
