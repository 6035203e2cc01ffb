"""Trust resolution: every combination of interface, portgroup, default portgroup, network."""

from __future__ import annotations

import itertools

import pytest

from rxfilterd.trust import (
    NetworkTrust,
    Portgroup,
    Trust,
    parse_network,
    parse_port,
    port_trust,
    resolve_trust,
)

TRI = [None, True, False]


def expected(
    iface: bool | None,
    named: bool | None,
    default: bool | None,
    net: bool | None,
    uses_named: bool,
) -> Trust:
    """libvirt's rule written out plainly, independent of the code under test."""
    if iface is not None:
        return Trust(iface, "interface")
    group = named if uses_named else default
    if group is not None:
        return Trust(group, "portgroup")
    if net is not None:
        return Trust(net, "network")
    return Trust(False, "default")


@pytest.mark.parametrize(
    ("iface", "named", "default", "net", "uses_named"),
    list(itertools.product(TRI, TRI, TRI, TRI, [True, False])),
)
def test_trust_table(
    iface: bool | None,
    named: bool | None,
    default: bool | None,
    net: bool | None,
    uses_named: bool,
) -> None:
    network = NetworkTrust(
        "n", net, (Portgroup("named", False, named), Portgroup("dflt", True, default))
    )
    got = resolve_trust(iface, network, "named" if uses_named else None)
    assert got == expected(iface, named, default, net, uses_named)


def test_unknown_portgroup_falls_to_the_network_not_the_default() -> None:
    network = NetworkTrust("n", False, (Portgroup("dflt", True, True),))
    assert resolve_trust(None, network, "missing") == Trust(False, "network")


def test_no_network() -> None:
    assert resolve_trust(None, None, None) == Trust(False, "default")
    assert resolve_trust(True, None, None) == Trust(True, "interface")


def test_parse_network_xml() -> None:
    net = parse_network(
        """<network trustGuestRxFilters='no'><name>lan</name>
          <forward mode='bridge'><interface dev='veth0'/></forward>
          <portgroup name='a' default='yes' trustGuestRxFilters='yes'/>
          <portgroup name='b'/>
        </network>"""
    )
    assert net == NetworkTrust(
        "lan", False, (Portgroup("a", True, True), Portgroup("b", False, None))
    )
    assert resolve_trust(None, net, None) == Trust(True, "portgroup")
    assert resolve_trust(None, net, "b") == Trust(False, "network")


def test_a_port_holds_the_trust_libvirt_resolved_when_it_was_plugged() -> None:
    assert parse_port("<networkport><rxfilters trustGuest='yes'/></networkport>") is True
    assert parse_port("<networkport><rxfilters trustGuest='no'/></networkport>") is False
    assert parse_port("<networkport/>") is False  # nothing resolved: libvirt's default
    with pytest.raises(ValueError, match="network port XML"):
        parse_port("<networkport")


@pytest.mark.parametrize(("port", "now"), list(itertools.product([True, False], repeat=2)))
def test_port_trust_wins_and_says_what_a_replug_would_bring(port: bool, now: bool) -> None:
    trust = port_trust(port, Trust(now, "portgroup"))
    assert (trust.value, trust.source) == (port, "port")
    if port == now:
        assert trust.replug is None and trust.note == ""
    else:
        assert trust.replug is now
        assert trust.note == (
            f"the network now says {'yes' if now else 'no'}: applies when the NIC is plugged again"
        )
