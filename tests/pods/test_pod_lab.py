"""The pod lab itself: simulated virt-launcher pods are what rxfilterd will meet on a
KubeVirt node, and leave nothing behind.

Three pods at once (one in session mode as an unprivileged user, one whose macvtap is
renumbered on its move), each with a guest named as KubeVirt names it (the same name in
every pod) on a trusted macvtap of the same name in its own network namespace, beside a
same-named macvtap on the host. libvirt does not sync such a NIC: that is rxfilterd's job.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from tests.support.daemon import wait_until
from tests.support.guest import Guest, create_macvtap, delete_link, link_show, prefixed
from tests.support.pods import (
    SESSION_UID,
    KubevirtNic,
    PodMacvtap,
    SimulatedPod,
    cleanup_pods,
)

pytestmark = pytest.mark.pods

NIC = prefixed("net1")  # the pods' macvtap name, and the host's decoy
HOST_MAC = "52:54:00:9d:00:00"
PODS = {  # name: (MAC, session, clash_ifindex)
    "a": ("52:54:00:9d:00:01", False, False),
    "b": ("52:54:00:9d:00:02", False, True),
    "c": ("52:54:00:9d:00:03", True, False),
}
NAMESPACE, VMI = prefixed("ns"), prefixed("vm")
# KubeVirt names a pod's host after its VMI: a and b stand for same-named VMIs in two
# namespaces, so they share a hostname; c keeps the lab's default, its own.
HOSTNAMES = {"a": VMI, "b": VMI, "c": prefixed("pod-c")}


def _qemus(pod: SimulatedPod) -> list[int]:
    return [
        pid
        for pid in pod.processes()
        if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")
    ]


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^Uid:\s+(\d+)", status, re.M)
    assert m is not None
    return int(m.group(1))


def _current_address(guest: Guest) -> str | None:
    m = re.search(r"<mac address='[^']+' currentAddress='([^']+)'", guest.live_xml())
    return m.group(1) if m else None


def test_three_pods_guests_on_their_own_macvtaps(
    pods: Callable[..., SimulatedPod], lower: str
) -> None:
    decoy = create_macvtap(NIC, lower, mac=HOST_MAC)
    try:
        lab: dict[str, tuple[SimulatedPod, PodMacvtap, Guest]] = {}
        for name, (mac, session, clash) in PODS.items():
            hostname = HOSTNAMES[name] if name != "c" else None
            pod = pods(name, session=session, hostname=hostname)
            mvt = pod.add_macvtap(lower, NIC, mac=mac, clash_ifindex=clash)
            guest = pod.guest(NAMESPACE, VMI, [KubevirtNic(NIC, mac=mac, trust=True)])
            lab[name] = (pod, mvt, guest)

        host_netns = os.stat("/proc/self/ns/net").st_ino
        netns = {pod.netns_path.stat().st_ino for pod, _, _ in lab.values()}
        assert len(netns) == 3 and host_netns not in netns
        taps = {mvt.rdev for _, mvt, _ in lab.values()} | {decoy.tap_path.stat().st_rdev}
        assert len(taps) == 4, "four distinct macvtaps share one name"
        assert lab["a"][1].ifindex == lab["a"][1].host_ifindex  # kept across the move
        assert lab["b"][1].ifindex != lab["b"][1].host_ifindex  # renumbered: its index was taken

        for name, (pod, _, guest) in lab.items():
            mac, session, _ = PODS[name]
            assert Path(f"/proc/{pod.daemon_pid}/comm").read_text().strip() == "libvirtd"
            hostname = Path(f"/proc/{pod.daemon_pid}/root/etc/hostname").read_text().strip()
            assert hostname == pod.hostname == HOSTNAMES[name]
            assert pod.netns_path.stat().st_ino == pod.named_netns.stat().st_ino
            # rxfilterd's way in: the socket through the daemon's root.
            conn = libvirt.open(pod.proc_uri)
            try:
                assert f":///{'session' if session else 'system'}?" in conn.getURI()
                assert [d.name() for d in conn.listAllDomains(0)] == [f"{NAMESPACE}_{VMI}"]
            finally:
                conn.close()
            (qemu,) = _qemus(pod)
            assert _uid(qemu) == (SESSION_UID if session else 0)
            assert _uid(pod.daemon_pid) == (SESSION_UID if session else 0)
            (nic,) = guest.interfaces()
            assert (nic.type, nic.target_dev, nic.alias, nic.model, nic.mac) == (
                "ethernet",
                NIC,
                "ua-default",
                "virtio-non-transitional",
                mac,
            )
            assert mac in guest.run("cat /sys/class/net/eth0/address")

        # The guests change their MACs; libvirt takes note (currentAddress) and leaves
        # every macvtap alone, in the pods and on the host.
        for name, (_, _, guest) in lab.items():
            new = PODS[name][0][:-2] + "99"
            guest.set_mac(new)

            def seen(g: Guest = guest, m: str = new) -> bool:
                return _current_address(g) == m

            wait_until(seen, 30, f"{name}: libvirt saw the new MAC")
        for name, (pod, _, _) in lab.items():
            link = pod.link(NIC)
            assert link is not None and link["address"] == PODS[name][0]
        host_link = link_show(NIC)
        assert host_link is not None and host_link["address"] == HOST_MAC

        # A pod's daemon killed: its QEMU lives on; restarted, it finds the guest again.
        pod, _, guest = lab["a"]
        (qemu,) = _qemus(pod)
        old = pod.daemon_pid
        pod.kill_daemon(signal.SIGKILL)
        assert pod.pid is None and Path(f"/proc/{qemu}").exists()
        pod.start()
        assert pod.daemon_pid != old
        conn = libvirt.open(pod.proc_uri)
        try:
            assert conn.lookupByName(guest.name).isActive()
        finally:
            conn.close()

        for name, (pod, _, _) in lab.items():
            pod.close(graceful=name != "c")  # c: everything SIGKILLed, as a lost pod
            pod.close()  # idempotent
        for name, (pod, _, _) in lab.items():

            def gone(p: SimulatedPod = pod) -> bool:
                return not p.leftovers()

            wait_until(gone, 30, f"pod {name} gone: {pod.leftovers()}")
        assert link_show(NIC) is not None, "the host's macvtap of the same name survives"
    finally:
        delete_link(NIC)


def test_cleanup_removes_an_interrupted_pod(lower: str) -> None:
    pod = SimulatedPod("z")
    pod.close()
    try:
        pod.start()
        pod.add_macvtap(lower, NIC)
        with pytest.raises(libvirt.libvirtError, match="specified dev"):
            pod.guest(NAMESPACE, VMI, [KubevirtNic("nosuch")])  # a failed start leaves nothing
        assert pod.conn.listAllDomains(0) == []
        assert pod.leftovers()
        # As a run killed here would leave it: found again by its prefix alone.
        assert cleanup_pods() == ["pod z"]
        wait_until(lambda: not pod.leftovers(), 30, f"leftovers gone: {pod.leftovers()}")
    finally:
        pod.close()
