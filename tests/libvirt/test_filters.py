"""Beyond libvirt: VLAN tables, unicast tables on passthru, multicast overflow.

Each test boots a real guest and runs the real daemon; every outcome is read from the
kernel (ip -j link, /proc/net/dev_mcast, bridge fdb) or from the guest's own counters,
never from rxfilterd. docs/filters.md explains each behaviour.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import RunningDaemon, holds_for, wait_until
from tests.support.guest import EthernetNic, Guest, Resources, link_show, prefixed

pytestmark = pytest.mark.libvirt

MAC0 = "52:54:00:30:00:01"
EXTRA_MAC = "52:54:00:30:00:aa"  # a guest macvlan's own MAC
IPV6 = "2001:db8::12:3456"
SOLICITED = "33:33:ff:12:34:56"  # the solicited-node group of IPV6
MANY = 70  # more groups than QEMU's 64-entry MAC table holds
EXPLAIN_KEYS = {
    "libvirt",
    "domain",
    "alias",
    "ifname",
    "current_mac",
    "model",
    "type",
    "trust",
    "trust_source",
    "action",
    "reason",
}


def flags(ifname: str) -> set[str]:
    info = link_show(ifname)
    assert info is not None, f"{ifname} is gone"
    return set(info["flags"])


def promiscuous(ifname: str) -> bool:
    # `ip -j link` shows PROMISC in flags only while IFF_PROMISC is set by someone.
    return "PROMISC" in flags(ifname)


def dev_mcast(ifname: str) -> tuple[set[str], set[str]]:
    """(groups added with fdb/SIOCADDMULTI, groups only the host stack joined) on IFNAME."""
    static: set[str] = set()
    joined: set[str] = set()
    for line in Path("/proc/net/dev_mcast").read_text().splitlines():
        _index, name, _users, global_users, addr = line.split()
        if name == ifname:
            mac = ":".join(addr[i : i + 2] for i in range(0, 12, 2))
            (static if global_users != "0" else joined).add(mac)
    return static, joined


def fdb_unicast(ifname: str) -> set[str]:
    out = subprocess.run(
        ["bridge", "-j", "fdb", "show", "dev", ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries: list[dict[str, Any]] = json.loads(out or "[]")
    return {e["mac"] for e in entries if not int(e["mac"][:2], 16) & 1}


def send_tagged(ifname: str, dst: str, vid: int, count: int) -> None:
    """COUNT 802.1Q frames for DST with VLAN id VID, sent out of IFNAME (a veth end).

    The host kernel has no 8021q, so the tag is written by hand; the ethertype is the
    IEEE local experimental one, which nobody in the guest consumes.
    """
    frame = (
        bytes.fromhex(dst.replace(":", ""))
        + bytes.fromhex("02aabbccdd01")
        + struct.pack("!HHH", 0x8100, vid, 0x88B5)
        + bytes(46)
    )
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        for _ in range(count):
            sock.send(frame)


def rx_packets(guest: Guest, dev: str) -> int:
    return int(guest.run(f"cat /sys/class/net/{dev}/statistics/rx_packets").split()[-1])


def explain(config: Path, domain: str, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "rxfilterd", "explain", "--config", str(config), *args, domain],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def boot(stack: Resources, daemon: RunningDaemon, tag: str, ifname: str) -> Guest:
    guest = stack.guest(prefixed(tag), [EthernetNic(ifname, mac=MAC0, trust=True)])
    daemon.wait_for(
        lambda r: r.get("domain") == guest.name and r.get("event") == "syncing", 30, "syncing"
    )
    # A guest still booting reports QEMU's reset state (promiscuous, every VLAN id); its
    # driver then narrows it. Wait for the booted guest's filter on the host.
    wait_until(lambda: not promiscuous(ifname), 30, "the booted guest's filter on the host")
    return guest


def notes(daemon: RunningDaemon, guest: Guest, text: str) -> list[dict[str, Any]]:
    return [
        r
        for r in daemon.records()
        if r.get("event") == "note" and r.get("domain") == guest.name and text in r["note"]
    ]


def vlan_table(guest: Guest) -> list[int]:
    [entry] = guest.query_rx_filter("net0")
    return sorted(entry["vlan-table"])


# --------------------------------------------------------------------------- VLAN


def test_vlan_promiscuous_policy(stack: Resources, tmp_path: Path) -> None:
    mvt = stack.veth_macvtap("vp", mac=MAC0)
    with RunningDaemon(tmp_path, {"vlan": "promiscuous"}) as daemon:
        guest = boot(stack, daemon, "vp", mvt.name)
        # 8021q is loaded in the guest: VID 0 alone, which libvirt would make promiscuous.
        assert vlan_table(guest) == [0]
        assert holds_for(lambda: not promiscuous(mvt.name), 1.5)
        guest.add_vlan(100)
        wait_until(lambda: promiscuous(mvt.name), 10, "promiscuous for VID 100")
        guest.run("ip link del eth0.100")
        wait_until(lambda: not promiscuous(mvt.name), 10, "promiscuous off with VID 0 left")
        assert vlan_table(guest) == [0]


def test_vlan_ignore_policy(stack: Resources, tmp_path: Path) -> None:
    mvt = stack.veth_macvtap("vi", mac=MAC0)
    with RunningDaemon(tmp_path, {"vlan": "ignore"}) as daemon:
        guest = boot(stack, daemon, "vi", mvt.name)
        guest.add_vlan(100)
        assert vlan_table(guest) == [0, 100]
        # The promiscuous policy reacts within a second (see above); ignore never does.
        assert holds_for(lambda: not promiscuous(mvt.name), 2.0)
        assert notes(daemon, guest, "vlan = ignore")


def test_vlan_filter_policy_on_a_lower_device_without_vlan_filter(
    stack: Resources, tmp_path: Path
) -> None:
    """The only real case here: veth has no rx VLAN filter, so no promiscuous is needed."""
    mvt = stack.veth_macvtap("vf", mac=MAC0)
    peer = prefixed("vfb")
    with RunningDaemon(tmp_path, {"vlan": "filter"}) as daemon:
        guest = boot(stack, daemon, "vf", mvt.name)
        guest.add_vlan(100)
        assert vlan_table(guest) == [0, 100]
        assert holds_for(lambda: not promiscuous(mvt.name), 2.0)
        assert notes(daemon, guest, "without promiscuous")
        # Tagged frames for VID 100 reach the guest's eth0.100 through a macvtap that is
        # not promiscuous: the kernel delivers by MAC whatever the tag.
        before = rx_packets(guest, "eth0.100")
        send_tagged(peer, MAC0, 100, 20)
        wait_until(lambda: rx_packets(guest, "eth0.100") >= before + 20, 10, "VID 100 frames")
        # An id the guest did not ask for is dropped by QEMU's virtio-net VLAN filter.
        eth0 = rx_packets(guest, "eth0")
        send_tagged(peer, MAC0, 200, 20)
        assert holds_for(lambda: rx_packets(guest, "eth0") < eth0 + 20, 1.0)
        # One note per NIC, however often the guest changes its ids.
        guest.add_vlan(300)
        wait_until(lambda: vlan_table(guest) == [0, 100, 300], 5, "VID 300")
        assert holds_for(lambda: not promiscuous(mvt.name), 1.0)
        assert len(notes(daemon, guest, "vlan:")) == 1
        table = explain(daemon.config, guest.name)
        rows = json.loads(explain(daemon.config, guest.name, "--json"))
        noted = json.loads(explain(daemon.config, guest.name, "--json", "--notes"))
    assert "NOTES" in table.splitlines()[0]
    assert f"lower device {prefixed('vfa')} has no VLAN filter" in table
    assert [set(r) for r in rows] == [EXPLAIN_KEYS]
    [row] = noted
    assert set(row) == EXPLAIN_KEYS | {"notes"}
    assert any("without promiscuous" in n for n in row["notes"])
    assert any(n.startswith("unicast: table not applied: bridge") for n in row["notes"])


# --------------------------------------------------------------------------- unicast


def test_passthru_macvtap_takes_the_guests_extra_unicast_macs(
    stack: Resources, tmp_path: Path
) -> None:
    mvt = stack.veth_macvtap("pu", mode="passthru", mac=MAC0)
    with RunningDaemon(tmp_path) as daemon:
        guest = boot(stack, daemon, "pu", mvt.name)
        assert EXTRA_MAC not in fdb_unicast(mvt.name)
        guest.add_macvlan("mv1", EXTRA_MAC)
        wait_until(lambda: EXTRA_MAC in fdb_unicast(mvt.name), 10, "unicast fdb entry")
        guest.run("ip link del mv1")
        wait_until(lambda: EXTRA_MAC not in fdb_unicast(mvt.name), 10, "fdb entry removed")
        noted = json.loads(explain(daemon.config, guest.name, "--json", "--notes"))
    assert any("table -> fdb entries" in n for n in noted[0]["notes"])


def test_unicast_on_a_bridge_macvtap_is_noted_once(stack: Resources, tmp_path: Path) -> None:
    mvt = stack.veth_macvtap("ub", mac=MAC0)
    with RunningDaemon(tmp_path) as daemon:
        guest = boot(stack, daemon, "ub", mvt.name)
        guest.add_macvlan("mv1", EXTRA_MAC)
        daemon.wait_for(lambda r: bool(notes(daemon, guest, "unicast:")), 10, "unicast note")
        guest.add_macvlan("mv2", "52:54:00:30:00:bb")
        wait_until(
            lambda: len(guest.query_rx_filter("net0")[0]["unicast-table"]) == 2, 5, "two MACs"
        )
        assert holds_for(lambda: len(notes(daemon, guest, "unicast:")) == 1, 1.0)
        # The kernel refuses unicast entries on a bridge macvtap: none appeared.
        assert fdb_unicast(mvt.name) <= {MAC0}


# --------------------------------------------------------------------------- multicast


def test_multicast_overflow_turns_allmulti_on_and_back_off(
    stack: Resources, tmp_path: Path
) -> None:
    mvt = stack.veth_macvtap("mo", mac=MAC0)
    with RunningDaemon(tmp_path) as daemon:
        guest = boot(stack, daemon, "mo", mvt.name)
        guest.add_ipv6(IPV6)
        wait_until(lambda: SOLICITED in dev_mcast(mvt.name)[0], 10, "solicited-node group")
        guest.add_ipv6_many(MANY)
        [entry] = guest.query_rx_filter("net0")
        assert entry["multicast-overflow"] and entry["multicast-table"] == []
        wait_until(lambda: "ALLMULTI" in flags(mvt.name), 10, "allmulti on")
        kept = dev_mcast(mvt.name)[0]
        # Groups added before the overflow stay: the empty table is not mirrored.
        assert SOLICITED in kept
        assert holds_for(
            lambda: "ALLMULTI" in flags(mvt.name) and dev_mcast(mvt.name)[0] == kept, 1.5
        )
        guest.run(
            f"i=1; while [ $i -le {MANY} ]; do"
            " ip -6 addr del 2001:db8:1::$(printf %x $i)/64 dev eth0 || exit 1;"
            " i=$((i+1)); done",
            timeout=30.0 + MANY * 0.5,
        )
        [entry] = guest.query_rx_filter("net0")
        assert not entry["multicast-overflow"]
        wait_until(lambda: "ALLMULTI" not in flags(mvt.name), 10, "allmulti off")

        def mirrors() -> bool:
            static, joined = dev_mcast(mvt.name)
            [now] = guest.query_rx_filter("net0")
            return static == set(now["multicast-table"]) - joined

        wait_until(mirrors, 10, "host list mirrors the guest again")
        assert SOLICITED in dev_mcast(mvt.name)[0]
