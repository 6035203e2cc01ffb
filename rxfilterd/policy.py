"""What rxfilterd may apply for a trusted NIC: the sync policy the plan follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from rxfilterd.mac import parse_mac_prefix

# The parts of a guest filter a policy can allow, by their names in the docs and config.
Field = Literal["mac", "promiscuous", "multicast", "unicast", "vlan"]
ALL_FIELDS: frozenset[Field] = frozenset({"mac", "promiscuous", "multicast", "unicast", "vlan"})

# "promiscuous": libvirt's rule (any VLAN makes the host promiscuous) except that a
# table of only VID 0, which every Linux guest with 8021q reports, does not.
# "ignore": VLAN tables never change the host.
# "filter": the guest's VLAN ids are let through as far as the host can express them:
# a lower device without a VLAN filter already passes every id, so nothing changes;
# one that filters VLANs falls back to promiscuous, with a note (docs/filters.md says
# why no kernel interface registers ids for a macvtap).
VlanPolicy = Literal["promiscuous", "ignore", "filter"]

# A MAC ("52:54:00:12:34:56") or an OUI prefix ("52:54:00"), lower-cased: the config
# validator runs the function on every such value before the settings are built.
MacPrefix = Annotated[str, parse_mac_prefix]


@dataclass(frozen=True)
class SyncPolicy:
    fields: frozenset[Field] = ALL_FIELDS
    vlan: VlanPolicy = "promiscuous"
    # None allows any MAC.
    mac_allow: tuple[MacPrefix, ...] | None = None

    def mac_allowed(self, mac: str) -> bool:
        if self.mac_allow is None:
            return True
        return any(mac == entry or mac.startswith(entry + ":") for entry in self.mac_allow)
