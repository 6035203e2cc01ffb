"""What libvirt itself does, per version, with no rxfilterd running.

The facts docs/compatibility.md states, each checked on the real stack of the version
under test. Where versions differ, the test says what each one does. They run on a
libvirtd of their own (tests/support/libvirts.py), so that no rxfilterd another test
run left connected to the host's libvirtd can touch these guests' macvtaps.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.support.daemon import holds_for, wait_until
from tests.support.guest import (
    DirectNic,
    EthernetNic,
    Guest,
    LibvirtTarget,
    NetworkNic,
    Resources,
    link_show,
    prefixed,
)
from tests.support.libvirtd import LabLibvirtd

pytestmark = pytest.mark.libvirt

MAC = "52:54:00:40:00:{:02x}"
IPV6 = "2001:db8::40:{:x}"


def host(ifname: str) -> dict[str, Any]:
    info = link_show(ifname)
    assert info is not None, f"{ifname} is gone"
    return info


def static_groups(ifname: str) -> set[str]:
    groups = set()
    for line in Path("/proc/net/dev_mcast").read_text().splitlines():
        _index, name, _users, global_users, addr = line.split()
        if name == ifname and global_users != "0":
            groups.add(":".join(addr[i : i + 2] for i in range(0, 12, 2)))
    return groups


def unicast_fdb(ifname: str) -> set[str]:
    out = subprocess.run(
        ["bridge", "-j", "fdb", "show", "dev", ifname], capture_output=True, text=True, check=True
    ).stdout
    return {e["mac"] for e in json.loads(out or "[]") if not int(e["mac"][:2], 16) & 1}


def interface(guest: Guest, alias: str) -> str:
    """The live XML of the NIC with ALIAS."""
    return guest.interface_xml(alias)


def with_trust(nic_xml: str, trust: str) -> str:
    nic_xml = re.sub(r" trustGuestRxFilters='\w+'", "", nic_xml, count=1)
    return nic_xml.replace("<interface ", f"<interface trustGuestRxFilters='{trust}' ", 1)


def solicited(addr_suffix: int) -> str:
    return f"33:33:ff:40:00:{addr_suffix:02x}"


def test_libvirt_syncs_trusted_direct_nics_only(
    lv: LabLibvirtd, conn: Any, stack: Resources
) -> None:
    """A trusted virtio NIC: libvirt syncs MAC, promiscuous (guest's, or any VLAN id),
    multicast list and allmulti on type='direct' (bridge and passthrough), never the
    unicast table, and nothing at all on type='ethernet' over an existing macvtap."""
    stack.veth(prefixed("lba"), prefixed("lbb"))
    stack.veth(prefixed("lpa"), prefixed("lpb"))
    eth = stack.veth_macvtap("le", mac=MAC.format(2))
    guest = stack.guest(
        prefixed("ls"),
        [
            DirectNic(prefixed("lba"), mac=MAC.format(1), trust=True),
            EthernetNic(eth.name, mac=MAC.format(2), trust=True),
            DirectNic(prefixed("lpa"), mac=MAC.format(3), trust=True, mode="passthrough"),
        ],
        conn=conn,
    )
    bridge, _, passthru = (nic.target_dev or "" for nic in guest.interfaces())
    synced, untouched = (bridge, passthru), eth.name
    # 8021q is loaded in the guest: VLAN table [0], which libvirt makes promiscuous.
    for ifname in synced:
        wait_until(lambda: "PROMISC" in host(ifname)["flags"], 10, f"{ifname} promiscuous")  # noqa: B023
    before = host(untouched)
    for i, dev in enumerate(("eth0", "eth1", "eth2"), start=1):
        guest.set_mac(MAC.format(0x10 + i), dev=dev)
        guest.add_ipv6(IPV6.format(0x10 + i), dev=dev)
        guest.set_allmulti(True, dev=dev)
        guest.add_macvlan(f"mv{i}", MAC.format(0x20 + i), dev=dev)
    for i, ifname in ((1, bridge), (3, passthru)):

        def followed(ifname: str = ifname, i: int = i) -> bool:
            info = host(ifname)
            return (
                info["address"] == MAC.format(0x10 + i)
                and "ALLMULTI" in info["flags"]
                and solicited(0x10 + i) in static_groups(ifname)
            )

        wait_until(followed, 10, f"libvirt syncs {ifname}")
    # The guests' extra MACs (unicast table) never reach a passthrough macvtap.
    assert MAC.format(0x23) not in unicast_fdb(passthru)
    assert holds_for(
        lambda: (
            host(untouched)["address"] == before["address"]
            and host(untouched)["flags"] == before["flags"]
            and not static_groups(untouched)
        ),
        1.5,
    ), "libvirt touched a type='ethernet' macvtap"


def test_live_trust_change_by_update_device(
    lv: LabLibvirtd, conn: Any, stack: Resources, libvirt_under_test: LibvirtTarget
) -> None:
    """9.0 accepts `update-device --live` with another trustGuestRxFilters but keeps the
    old value; 11.3 applies it, queries a newly trusted NIC itself (its next change raises
    an event, so currentAddress follows the guest) and stops at once on revocation. A
    revoked direct NIC's macvtap keeps what the last trusted sync gave it."""
    stack.veth(prefixed("lta"), prefixed("ltb"))
    guest = stack.guest(
        prefixed("lt"), [DirectNic(prefixed("lta"), mac=MAC.format(1), trust=False)], conn=conn
    )
    [nic] = guest.interfaces()
    ifname = nic.target_dev or ""
    # Whatever the boot raised, the NIC is silent now: nobody queries an untrusted NIC.
    guest.set_mac(MAC.format(2))
    assert holds_for(lambda: host(ifname)["address"] == MAC.format(1), 1.0)

    guest.dom.updateDeviceFlags(
        with_trust(interface(guest, "net0"), "yes"), libvirt.VIR_DOMAIN_AFFECT_LIVE
    )
    granted = interface(guest, "net0")
    guest.set_mac(MAC.format(3))
    if libvirt_under_test.label == "9.0":
        assert "trustGuestRxFilters='no'" in granted
        assert holds_for(lambda: host(ifname)["address"] == MAC.format(1), 1.5)
        assert "currentAddress" not in interface(guest, "net0")
        return
    assert "trustGuestRxFilters='yes'" in granted
    wait_until(lambda: host(ifname)["address"] == MAC.format(3), 10, "synced once trusted")
    assert f"currentAddress='{MAC.format(3)}'" in interface(guest, "net0")
    guest.set_mac(MAC.format(4))  # re-armed: libvirt queried the NIC again
    wait_until(lambda: host(ifname)["address"] == MAC.format(4), 10, "second change")

    guest.dom.updateDeviceFlags(
        with_trust(interface(guest, "net0"), "no"), libvirt.VIR_DOMAIN_AFFECT_LIVE
    )
    revoked = interface(guest, "net0")
    assert "trustGuestRxFilters='no'" in revoked and "currentAddress" not in revoked
    guest.set_mac(MAC.format(5))
    assert holds_for(lambda: host(ifname)["address"] == MAC.format(4), 1.5)


def test_update_device_on_a_network_nic(
    lv: LabLibvirtd, conn: Any, stack: Resources, libvirt_under_test: LibvirtTarget
) -> None:
    """On a type='network' NIC (macvtap network trusting its guests) an update-device
    written as type='network' with trustGuestRxFilters='no' is accepted and ignored by
    both: libvirt goes on trusting and syncing, and the port keeps trustGuest='yes'. The
    live XML (type='direct' with the network's portid) with 'no' is ignored by 9.0; 11.3
    applies it by turning the NIC into a plain type='direct' one and deleting its port."""
    stack.veth(prefixed("lna"), prefixed("lnb"))
    net = stack.network(prefixed("ln"), prefixed("lna"), trust=True, conn=conn)
    guest = stack.guest(prefixed("ln"), [NetworkNic(net.name, mac=MAC.format(1))], conn=conn)
    ifname = guest.interfaces()[0].target_dev or ""
    as_configured = (
        f"<interface type='network' trustGuestRxFilters='no'><mac address='{MAC.format(1)}'/>"
        f"<source network='{net.name}'/><model type='virtio'/><alias name='net0'/>"
        "<rom enabled='no'/></interface>"
    )
    guest.dom.updateDeviceFlags(as_configured, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert "trustGuestRxFilters" not in interface(guest, "net0")
    assert ["trustGuest='yes'" in p for p in net.ports_xml()] == [True]
    guest.set_mac(MAC.format(2))
    wait_until(lambda: host(ifname)["address"] == MAC.format(2), 10, "still synced")

    live = interface(guest, "net0")
    guest.dom.updateDeviceFlags(with_trust(live, "no"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    after = interface(guest, "net0")
    if libvirt_under_test.label == "9.0":
        assert "trustGuestRxFilters" not in after and f"network='{net.name}'" in after
        assert len(net.ports_xml()) == 1
        return
    assert "trustGuestRxFilters='no'" in after and "network=" not in after
    assert net.ports_xml() == []
    guest.set_mac(MAC.format(3))
    assert holds_for(lambda: host(ifname)["address"] == MAC.format(2), 1.5)
