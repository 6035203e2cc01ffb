"""The host state: what a macvtap currently filters, as read from the kernel."""

from __future__ import annotations

from dataclasses import dataclass


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
        }
