"""The host state: what a macvtap currently filters, as read from the kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How the macvtap's lower device treats VLAN-tagged frames (see docs/filters.md):
# "none": no VLAN filter (veth, a bridge without vlan_filtering, rx-vlan-filter off), so
#   tagged frames reach the macvtap by MAC whatever their id; QEMU drops unwanted ids.
# "hardware": rx-vlan-filter is on: ids nobody registered never leave the NIC.
# "bridge": a bridge with vlan_filtering: ids missing from the bridge's own VLAN list are
#   dropped before they reach the macvtap.
# "unknown": could not be read (lower device in another namespace, ethtool refused).
LowerVlanFilter = Literal["none", "hardware", "bridge", "unknown"]


@dataclass(frozen=True)
class HostState:
    """One macvtap's receive filter as the kernel reports it."""

    ifname: str
    ifindex: int
    # macvlan mode: "private", "vepa", "bridge", "passthru" or "source".
    mode: str
    mac: str
    promiscuous: bool
    allmulti: bool
    # Multicast entries someone added (fdb / SIOCADDMULTI): the only ones a sync may
    # remove. Groups the host's own stack joined are not in here.
    multicast: frozenset[str]
    # Groups only the host's own stack holds (33:33:00:00:00:01 and the like): they
    # already pass the filter, and fdb add cannot take them over (EEXIST).
    multicast_host: frozenset[str]
    # Unicast fdb entries (only passthru macvtaps accept them).
    unicast: frozenset[str]
    # The lower device's name ("" when unknown) and its VLAN filtering.
    lower: str = ""
    lower_vlan_filter: LowerVlanFilter = "unknown"

    def summary(self) -> dict[str, object]:
        return {
            "ifname": self.ifname,
            "mode": self.mode,
            "mac": self.mac,
            "promiscuous": self.promiscuous,
            "allmulti": self.allmulti,
            "multicast": sorted(self.multicast),
            "multicast_host": sorted(self.multicast_host),
            "unicast": sorted(self.unicast),
            "lower": self.lower,
            "lower_vlan_filter": self.lower_vlan_filter,
        }
