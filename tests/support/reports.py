"""NIC reports as a survey makes them, for unit tests of what follows a survey."""

from __future__ import annotations

from rxfilterd.inventory import NicReport
from rxfilterd.nic import Nic, Verdict
from rxfilterd.trust import Trust


def trusted_report(
    alias: str = "net0",
    ifname: str = "mvt0",
    *,
    domain: str = "d1",
    uuid: str = "u1",
    mac: str = "52:54:00:10:00:01",
) -> NicReport:
    """A trusted virtio `type='ethernet'` NIC on IFNAME, to be synced."""
    nic = Nic(
        libvirt="host",
        domain=domain,
        uuid=uuid,
        alias=alias,
        type="ethernet",
        model="virtio",
        ifname=ifname,
        mac=mac,
        current_mac=None,
        network=None,
        portgroup=None,
        portid=None,
        trust_attr=True,
    )
    return NicReport(nic, Trust(True, "interface"), Verdict("sync", "trusted", False))
