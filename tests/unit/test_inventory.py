"""Trust as libvirt holds it for a running NIC: a network NIC's port, else its XML."""

from __future__ import annotations

import asyncio

import pytest

from rxfilterd.inventory import TrustResolver
from rxfilterd.nic import Nic
from rxfilterd.trust import Trust

NETWORK_NO = "<network><name>n1</name><portgroup name='pg' trustGuestRxFilters='no'/></network>"
PORT_YES = "<networkport><rxfilters trustGuest='yes'/></networkport>"
PORT_NO = "<networkport><rxfilters trustGuest='no'/></networkport>"


class Libvirt:
    """What the resolver reads: network and port XML, and how often it asked."""

    def __init__(self, network: str | None, port: str | None) -> None:
        self.network, self.port = network, port
        self.calls: list[str] = []

    async def network_xml(self, name: str) -> str | None:
        self.calls.append(f"network {name}")
        return self.network

    async def network_port_xml(self, network: str, portid: str) -> str | None:
        self.calls.append(f"port {network} {portid}")
        return self.port


def network_nic(portid: str | None = "p1", trust_attr: bool | None = None) -> Nic:
    return Nic(
        libvirt="host",
        domain="d1",
        uuid="u1",
        alias="net0",
        type="direct",
        model="virtio",
        ifname="macvtap0",
        mac="52:54:00:00:00:01",
        current_mac=None,
        network="n1",
        portgroup="pg",
        portid=portid,
        trust_attr=trust_attr,
    )


def resolve(
    libvirt: Libvirt, nic: Nic, ports: dict[str, bool] | None = None, replug: bool = True
) -> Trust:
    resolver = TrustResolver(libvirt, ports, replug=replug)
    return asyncio.run(resolver.trust(nic))


def test_the_port_wins_over_the_networks_current_xml() -> None:
    # The portgroup said yes when the NIC was plugged and says no now.
    trust = resolve(Libvirt(NETWORK_NO, PORT_YES), network_nic())
    assert (trust.value, trust.source, trust.replug) == (True, "port", False)
    assert "applies when the NIC is plugged again" in trust.note


def test_a_revoked_portgroup_does_not_reach_a_plugged_untrusted_nic() -> None:
    network_yes = NETWORK_NO.replace("'no'", "'yes'")
    trust = resolve(Libvirt(network_yes, PORT_NO), network_nic())
    assert (trust.value, trust.source, trust.replug) == (False, "port", True)


@pytest.mark.parametrize("port", [None, "<networkport"])
def test_an_unreadable_port_is_untrusted_and_says_why(port: str | None) -> None:
    trust = resolve(Libvirt(NETWORK_NO.replace("'no'", "'yes'"), port), network_nic())
    assert (trust.value, trust.source) == (False, "port")
    assert "network port" in trust.note


def test_without_a_port_the_network_xml_decides() -> None:
    trust = resolve(Libvirt(NETWORK_NO, PORT_YES), network_nic(portid=None))
    assert (trust.value, trust.source) == (False, "portgroup")


def test_a_port_is_read_once_and_the_sync_path_skips_the_network() -> None:
    libvirt = Libvirt(NETWORK_NO, PORT_YES)
    ports: dict[str, bool] = {}
    assert resolve(libvirt, network_nic(), ports=ports).value is True
    assert ports == {"p1": True}
    libvirt.calls.clear()
    trust = resolve(libvirt, network_nic(), ports=ports, replug=False)
    assert (trust.value, trust.source, libvirt.calls) == (True, "port", [])
