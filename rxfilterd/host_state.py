"""The host state: what a macvtap currently filters, as read from the kernel."""

from __future__ import annotations

import errno as errnos
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # plan imports this module
    from rxfilterd.plan import Change

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

    def summary(self) -> dict[str, str | bool | list[str] | list[int]]:
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


class MacvtapError(Exception):
    """An operation on a host link failed."""

    def __init__(
        self,
        ifname: str,
        op: str,
        errno: int | None = None,
        detail: str | None = None,
        *,
        subject: str | None = None,
        change: Change | None = None,
    ) -> None:
        self.ifname = ifname
        self.op = op
        self.errno = errno
        self.detail = detail
        # What the op was about (a MAC, "on"/"off"), and the Change it came from.
        self.subject = subject
        self.change = change
        super().__init__(ifname, op, errno, detail)

    def __str__(self) -> str:
        parts: list[str] = []
        if self.errno is not None:
            parts.append(f"{_errno_name(self.errno)} ({os.strerror(self.errno)})")
        if self.detail:
            parts.append(self.detail)
        op = f"{self.op} {self.subject}" if self.subject else self.op
        return f"{self.ifname}: {op} failed: {': '.join(parts) or 'unknown error'}"


def _errno_name(code: int) -> str:
    # Python maps 95 to ENOTSUP; the kernel and iproute2 say EOPNOTSUPP.
    if code == errnos.EOPNOTSUPP:
        return "EOPNOTSUPP"
    return errnos.errorcode.get(code, f"errno {code}")
