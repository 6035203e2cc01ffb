"""Reading a macvtap: its filter as the kernel holds it, by rtnetlink, ioctls and dev_mcast."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

from pyroute2.ethtool.ioctl import IoctlEthtool
from pyroute2.netlink.exceptions import NetlinkError

from rxfilterd.host_state import HostState, LowerVlanFilter, MacvtapError
from rxfilterd.mac import from_bytes, is_multicast, parse_mac
from rxfilterd.netns_handles import (
    ARPHRD_ETHER,
    IFF_ALLMULTI,
    IFF_PROMISC,
    IFNAMSIZ,
    NetnsHandles,
)

# How long a lower device's VLAN filtering is trusted without asking again.
LOWER_CACHE_SECONDS = 30.0
# How long a quick read trusts a macvtap's mode and lower device index from a full read.
LINK_CACHE_SECONDS = 30.0
# A link message this young makes any read a quick one: the survey that found the
# NIC has just read what a full read would (each NIC's first sync follows its survey).
FRESH_LINK_SECONDS = 2.0
SIOCGIFFLAGS = 0x8913
SIOCGIFHWADDR = 0x8927
# pyroute2 decodes the mode to a name; the raw numbers are a fallback.
_MODES = {1: "private", 2: "vepa", 4: "bridge", 8: "passthru", 16: "source"}


@dataclass(frozen=True)
class _LinkFacts:
    """What a full read learnt about a macvtap that an event does not change."""

    ifindex: int
    mode: str
    lower_index: int | None  # None: no lower device in our namespace
    read_at: float


class MacvtapReader:
    """Reads the macvtaps of one namespace, caching what an event does not change."""

    def __init__(self, net: NetnsHandles) -> None:
        self._net = net
        # Lower device ifindex -> (read at, name, VLAN filtering). Offloads change
        # rarely and the probe costs as much as the rest of a read, so it is cached.
        self._lower_cache: dict[int, tuple[float, str, LowerVlanFilter]] = {}
        self._links: dict[str, _LinkFacts] = {}
        # Lower device ifindex -> its probe in flight (see _lower_vlan_filter).
        self._lower_probes: dict[int, asyncio.Future[tuple[str, LowerVlanFilter]]] = {}

    def close(self) -> None:
        for probe in self._lower_probes.values():
            probe.cancel()

    async def is_macvtap(self, ifname: str) -> bool:
        msg = await self._net.get_link(ifname, ifname=ifname)
        if msg is None:
            return False
        kind, mode = _kind_mode(msg)
        if kind == "macvtap":
            self._remember(_facts(msg, mode), ifname)
        return kind == "macvtap"

    async def read(self, ifname: str, *, quick: bool = False) -> HostState | None:
        """The macvtap's filter; None if there is no such link.

        quick: take the MAC and flags from ioctls and the mode and lower device's index
        from the last full read (if under LINK_CACHE_SECONDS old and the ifindex is the
        same); the lower device's VLAN filtering comes from the same cache as in a full
        read. A netlink read costs ~0.7 ms of Python that would compete for the GIL
        with the query it runs beside; the ioctls cost microseconds. Without QUICK the
        same, but only from facts under FRESH_LINK_SECONDS old (is_macvtap keeps them
        too): a NIC's survey and its first sync then cost one netlink read, not two.
        """
        state = await self._quick_read(ifname, LINK_CACHE_SECONDS if quick else FRESH_LINK_SECONDS)
        if state is not None:
            return state
        msg = await self._net.get_link(ifname, ifname=ifname)
        if msg is None:
            return None
        kind, mode = _kind_mode(msg)
        if kind != "macvtap":
            raise MacvtapError(ifname, "read", None, f"is a {kind or 'plain'} link, not a macvtap")
        facts = _facts(msg, mode)
        self._remember(facts, ifname)
        return await self._state(
            ifname, facts, parse_mac(msg.get_attr("IFLA_ADDRESS")), msg["flags"]
        )

    async def _quick_read(self, ifname: str, max_age: float) -> HostState | None:
        """read() from ioctls and facts under MAX_AGE; None when a full read is needed."""
        facts = self._links.get(ifname)
        if facts is None or time.monotonic() - facts.read_at >= max_age:
            return None
        try:
            if self._net.ifindex(ifname) != facts.ifindex:
                return None  # recreated: its mode and lower device may differ
            family, hwaddr = struct.unpack_from(
                "H6s", self._net.ifreq(ifname, SIOCGIFHWADDR), IFNAMSIZ
            )
            (flags,) = struct.unpack_from("H", self._net.ifreq(ifname, SIOCGIFFLAGS), IFNAMSIZ)
        except OSError:
            return None  # gone, or odd: the full read says what
        if family != ARPHRD_ETHER:
            return None
        return await self._state(ifname, facts, from_bytes(hwaddr), flags)

    async def _state(self, ifname: str, facts: _LinkFacts, mac: str, flags: int) -> HostState:
        """The HostState of a macvtap whose link facts, MAC and flags were just read."""
        unicast: frozenset[str] = frozenset()
        if facts.mode == "passthru":
            # Other modes refuse unicast entries, so only passthru pays for the dump.
            unicast = await self._unicast(ifname, facts.ifindex, mac)
        static, joined = self._multicast(facts.ifindex)
        lower, vlan_filter = await self._lower_vlan_filter(facts.lower_index)
        return HostState(
            ifname=ifname,
            ifindex=facts.ifindex,
            mode=facts.mode,
            mac=mac,
            promiscuous=bool(flags & IFF_PROMISC),
            allmulti=bool(flags & IFF_ALLMULTI),
            multicast=static,
            multicast_host=joined,
            unicast=unicast,
            lower=lower,
            lower_vlan_filter=vlan_filter,
        )

    def _remember(self, facts: _LinkFacts, ifname: str) -> None:
        if len(self._links) >= 1024:  # macvtaps come and go: drop stale ones
            self._links = {
                name: f
                for name, f in self._links.items()
                if facts.read_at - f.read_at < LINK_CACHE_SECONDS
            }
        self._links[ifname] = facts

    async def _lower_vlan_filter(self, index: int | None) -> tuple[str, LowerVlanFilter]:
        """The lower device INDEX's name and whether it drops VLAN ids nobody registered.

        Never raises: what cannot be read is "unknown", and the plan then falls back
        to what is safe for the guest (promiscuous). One probe per lower device at a
        time: at start-up every macvtap on it is read at once, and each would probe.
        """
        if index is None:
            return "", "unknown"
        cached = self._lower_cache.get(index)
        if cached is not None and time.monotonic() - cached[0] < LOWER_CACHE_SECONDS:
            return cached[1], cached[2]
        probe = self._lower_probes.get(index)
        if probe is None:
            probe = asyncio.ensure_future(self._probe_and_cache(index))
            self._lower_probes[index] = probe
            probe.add_done_callback(lambda _: self._lower_probes.pop(index, None))
        # Shielded: one reader cancelled (its sync abandoned) must not cancel the others'.
        return await asyncio.shield(probe)

    async def _probe_and_cache(self, index: int) -> tuple[str, LowerVlanFilter]:
        name, vlan_filter = await self._probe_lower(index)
        now = time.monotonic()
        if len(self._lower_cache) >= 256:  # lower devices come and go: drop stale ones
            self._lower_cache = {
                i: c for i, c in self._lower_cache.items() if now - c[0] < LOWER_CACHE_SECONDS
            }
        self._lower_cache[index] = (now, name, vlan_filter)
        return name, vlan_filter

    async def _probe_lower(self, index: int) -> tuple[str, LowerVlanFilter]:
        try:
            lower = await self._net.get_link(str(index), index=index)
        except MacvtapError:
            return "", "unknown"
        if lower is None:
            return "", "unknown"
        name = str(lower.get_attr("IFLA_IFNAME") or "")
        linkinfo = lower.get_attr("IFLA_LINKINFO")
        if linkinfo is not None and linkinfo.get_attr("IFLA_INFO_KIND") == "bridge":
            data = linkinfo.get_attr("IFLA_INFO_DATA")
            structured = data is not None and not isinstance(data, (str, bytes))
            if structured and data.get_attr("IFLA_BR_VLAN_FILTERING"):
                return name, "bridge"
        try:
            active = await self._net.run(lambda: _rx_vlan_filter(name))
        except (OSError, ValueError, KeyError):
            return name, "unknown"
        return name, "hardware" if active else "none"

    def _multicast(self, ifindex: int) -> tuple[frozenset[str], frozenset[str]]:
        assert self._net.mcast_fd is not None, "HostNetwork used outside 'async with'"
        return device_multicast(_pread_all(self._net.mcast_fd), ifindex)

    async def _unicast(self, ifname: str, ifindex: int, own: str) -> frozenset[str]:
        found = set()
        try:
            async for msg in await self._net.ipr.fdb("dump", ifindex=ifindex):
                lladdr = msg.get_attr("NDA_LLADDR")
                if msg["ifindex"] != ifindex or lladdr is None:
                    continue
                mac = parse_mac(lladdr)
                if not is_multicast(mac) and mac != own:
                    found.add(mac)
        except NetlinkError as exc:
            raise MacvtapError(ifname, "fdb dump", exc.code) from exc
        return frozenset(found)


def device_multicast(dev_mcast: str, ifindex: int) -> tuple[frozenset[str], frozenset[str]]:
    """IFINDEX's multicast entries someone added, and those only the host stack joined.

    DEV_MCAST is /proc/net/dev_mcast: ifindex ("%-4d"), name, users, global users,
    address (hex, no colons); only fdb/SIOCADDMULTI entries have global users. With
    hundreds of macvtaps it holds thousands of lines, read whole for every NIC's read:
    rather than split them all, find the device's first line and read on while lines
    are its (the kernel prints a device's list in one go: dev_mc_seq_show).
    """
    static: set[str] = set()
    joined: set[str] = set()
    key = f"{ifindex:<4} "
    at = 0 if dev_mcast.startswith(key) else dev_mcast.find("\n" + key) + 1
    while dev_mcast.startswith(key, at):
        end = dev_mcast.find("\n", at)
        end = len(dev_mcast) if end < 0 else end
        fields = dev_mcast[at:end].split()
        if len(fields) == 5:
            mac = from_bytes(bytes.fromhex(fields[4]))
            (static if fields[3] != "0" else joined).add(mac)
        at = end + 1
    return frozenset(static), frozenset(joined)


def _facts(msg: Any, mode: str) -> _LinkFacts:
    """What a macvtap's link message says that its guest's events do not change."""
    lower_index = msg.get_attr("IFLA_LINK")
    if not lower_index or msg.get_attr("IFLA_LINK_NETNSID") is not None:
        lower_index = None  # the lower device lives in another namespace
    return _LinkFacts(msg["index"], mode, lower_index, time.monotonic())


def _kind_mode(msg: Any) -> tuple[str | None, str]:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    if linkinfo is None:
        return None, ""
    kind = linkinfo.get_attr("IFLA_INFO_KIND")
    data = linkinfo.get_attr("IFLA_INFO_DATA")
    mode: object = None
    if data is not None and not isinstance(data, (str, bytes)):
        mode = data.get_attr("IFLA_MACVTAP_MODE") or data.get_attr("IFLA_MACVLAN_MODE")
    if isinstance(mode, int):
        mode = _MODES.get(mode, str(mode))
    return kind, str(mode) if mode is not None else ""


def _pread_all(fd: int) -> str:
    # seq_file restarts at offset 0, so one open file serves every read.
    chunks: list[bytes] = []
    offset = 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode("ascii", "replace")


def _rx_vlan_filter(ifname: str) -> bool:
    """Whether IFNAME's rx-vlan-filter feature is active (`ethtool -k`).

    NETIF_F_HW_VLAN_CTAG_FILTER: the device drops tagged frames whose id nobody added
    with vlan_vid_add(). A few microseconds of ioctl, so no thread for it.
    """
    ethtool = IoctlEthtool(ifname)
    try:
        for name, active, *_rest in ethtool.get_features():
            if name == "rx-vlan-filter":
                return bool(active)
    except Exception as exc:  # pyroute2's EthtoolError is not an OSError
        raise OSError(f"ethtool features of {ifname}: {exc}") from exc
    finally:
        ethtool.close()
    raise KeyError("rx-vlan-filter")
