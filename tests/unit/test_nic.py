"""Reading NICs from live domain XML and deciding which are synced."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rxfilterd.nic import Nic, classify, parse_domain_nics
from rxfilterd.nic_sync import PARSED_DOMAINS, NicSyncer
from rxfilterd.sinks import Sinks
from rxfilterd.stats import Stats
from rxfilterd.testing import FakeHostNetwork
from rxfilterd.trust import Trust

LIVE_XML = """
<domain type='qemu' id='3'>
  <name>web1</name>
  <uuid>6f1b2c55-0000-4000-8000-000000000001</uuid>
  <devices>
    <interface type='direct' trustGuestRxFilters='yes'>
      <mac address='52:54:00:00:00:01'/>
      <source network='lan' portgroup='pg' portid='1f6d' dev='veth0' mode='bridge'/>
      <target dev='macvtap3'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <interface type='ethernet'>
      <mac address='52:54:00:00:00:02' currentAddress='52:54:00:aa:00:02'/>
      <target dev='mvt7' managed='no'/>
      <model type='virtio'/>
      <alias name='net1'/>
    </interface>
    <interface type='bridge'>
      <source bridge='br0'/>
      <target dev='vnet4'/>
      <model type='e1000'/>
      <alias name='net2'/>
    </interface>
    <interface type='user'><model type='virtio'/></interface>
  </devices>
</domain>
"""


def test_parse_live_xml() -> None:
    nics = parse_domain_nics(LIVE_XML, "host")
    assert [n.alias for n in nics] == ["net0", "net1", "net2"]  # no alias: not in QEMU yet
    assert nics[0] == Nic(
        libvirt="host",
        domain="web1",
        uuid="6f1b2c55-0000-4000-8000-000000000001",
        alias="net0",
        type="direct",
        model="virtio",
        ifname="macvtap3",
        mac="52:54:00:00:00:01",
        current_mac=None,
        network="lan",
        portgroup="pg",
        portid="1f6d",
        trust_attr=True,
    )
    assert nics[1].trust_attr is None and nics[1].ifname == "mvt7"
    # libvirt >= 11 notes the MAC a trusted guest uses now beside the configured one.
    assert (nics[1].mac, nics[1].current_mac) == ("52:54:00:00:00:02", "52:54:00:aa:00:02")


YES = Trust(True, "interface")
NO = Trust(False, "default")


@pytest.mark.parametrize(
    ("alias", "trust", "macvtap", "action", "reason", "libvirt_syncs"),
    [
        (
            "net0",
            YES,
            True,
            "sync",
            "trusted; libvirt itself writes mac, promiscuous, allmulti, multicast",
            True,
        ),
        ("net0", NO, True, "skip", "untrusted", False),
        ("net1", YES, True, "sync", "trusted", False),
        ("net1", YES, False, "skip", "not a macvtap", False),
        ("net2", YES, True, "skip", "not virtio", False),
    ],
)
def test_classify(
    alias: str, trust: Trust, macvtap: bool, action: str, reason: str, libvirt_syncs: bool
) -> None:
    nic = next(n for n in parse_domain_nics(LIVE_XML, "host") if n.alias == alias)
    verdict = classify(nic, trust, macvtap)
    assert (verdict.action, verdict.reason, verdict.libvirt_syncs) == (
        action,
        reason,
        libvirt_syncs,
    )


def test_a_syncer_parses_a_domains_xml_again_only_when_it_changed() -> None:
    syncer = NicSyncer(FakeHostNetwork(), Stats(), Sinks().decide)
    uuid = "6f1b2c55-0000-4000-8000-000000000001"
    first = syncer.nics_of("host", uuid, LIVE_XML)
    assert first == [replace(n, current_mac=None) for n in parse_domain_nics(LIVE_XML, "host")]
    assert syncer.nics_of("host", uuid, str(LIVE_XML)) is first  # equal text: kept
    # The same domain UUID on another libvirt (a pod's) is another domain.
    assert syncer.nics_of("pod-a", uuid, LIVE_XML)[0].libvirt == "pod-a"
    changed = LIVE_XML.replace("macvtap3", "macvtap9")
    again = syncer.nics_of("host", uuid, changed)
    assert again is not first and again[0].ifname == "macvtap9"
    # Bounded: the least recently used domains go.
    for n in range(PARSED_DOMAINS):
        syncer.nics_of("host", f"other-{n}", LIVE_XML)
    assert syncer.nics_of("host", uuid, changed) is not again


def test_a_syncer_reparses_no_xml_that_only_notes_the_guests_new_mac() -> None:
    syncer = NicSyncer(FakeHostNetwork(), Stats(), Sinks().decide)
    uuid = "6f1b2c55-0000-4000-8000-000000000001"
    first = syncer.nics_of("host", uuid, LIVE_XML)
    # libvirt >= 11 rewrites currentAddress on each guest MAC change: the same NICs.
    moved = LIVE_XML.replace(
        "currentAddress='52:54:00:aa:00:02'", "currentAddress='52:54:00:aa:00:09'"
    )
    assert moved != LIVE_XML
    assert syncer.nics_of("host", uuid, moved) is first
    # What is kept says nothing of the guest's MAC, rather than an old one.
    assert all(n.current_mac is None for n in first)
    # Anything else in the tag still counts.
    other = moved.replace("address='52:54:00:00:00:02' ", "address='52:54:00:00:00:03' ")
    assert other != moved and syncer.nics_of("host", uuid, other) is not first
    # A revocation in the same breath as a MAC change is read: what the cache is for.
    revoked = moved.replace(
        "<interface type='ethernet'>", "<interface type='ethernet' trustGuestRxFilters='no'>"
    ).replace("currentAddress='52:54:00:aa:00:09'", "currentAddress='52:54:00:aa:00:0a'")
    assert revoked != moved
    assert syncer.nics_of("host", uuid, revoked)[1].trust_attr is False
    # XML's other spelling of an attribute is no guest MAC kept either.
    quoted = revoked.replace("currentAddress='52:54:00:aa:00:0a'", 'currentAddress="x"')
    assert quoted != revoked
    assert all(n.current_mac is None for n in syncer.nics_of("pod-a", uuid, quoted))
