"""The host-network adapter: reads and changes macvtaps over rtnetlink.

The only module that imports pyroute2. One HostNetwork holds one netlink socket, one
open /proc/net/dev_mcast and one socket for interface ioctls, all in one network
namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno as errnos
import fcntl
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.ethtool.ioctl import IoctlEthtool
from pyroute2.netlink.exceptions import NetlinkError

from rxfilterd.host_state import HostState, LowerVlanFilter, MacvtapError
from rxfilterd.mac import from_bytes, is_multicast, parse_mac, to_bytes
from rxfilterd.plan import AddressListChange, Change, FlagChange, MacChange

# MacvtapError lives in host_state (the reconciler needs it without pyroute2).
__all__ = ["HostNetwork", "MacvtapError"]

IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200
NTF_SELF = 0x02
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"
# How long a lower device's VLAN filtering is trusted without asking again.
LOWER_CACHE_SECONDS = 30.0
# How long a quick read trusts a macvtap's mode and lower device index from a full read.
LINK_CACHE_SECONDS = 30.0
SIOCGIFFLAGS = 0x8913
SIOCGIFHWADDR = 0x8927
SIOCGIFINDEX = 0x8933
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
IFNAMSIZ = 16

_FLAG_BITS = {"promiscuous": IFF_PROMISC, "allmulti": IFF_ALLMULTI}
# pyroute2 decodes the mode to a name; the raw numbers are a fallback.
_MODES = {1: "private", 2: "vepa", 4: "bridge", 8: "passthru", 16: "source"}
# What an errno means for a given operation, where the kernel's text is misleading.
_HINTS = {
    ("set mac", errnos.EADDRINUSE): "another macvlan/macvtap on the same lower device has it",
    ("fdb add unicast", errnos.EOPNOTSUPP): "only passthru macvtaps accept unicast entries",
}


@dataclass(frozen=True)
class _LinkFacts:
    """What a full read learnt about a macvtap that an event does not change."""

    ifindex: int
    mode: str
    lower_index: int | None  # None: no lower device in our namespace
    read_at: float


class HostNetwork:
    """rtnetlink access to the macvtaps of one network namespace.

    netns: a name in /var/run/netns (or a path to a netns file); None means ours.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: Any = None
        self._mcast_fd: int | None = None
        # Lower device ifindex -> (read at, name, VLAN filtering). Offloads change
        # rarely and the probe costs as much as the rest of a read, so it is cached.
        self._lower_cache: dict[int, tuple[float, str, LowerVlanFilter]] = {}
        self._links: dict[str, _LinkFacts] = {}
        # Interface ioctls act in the namespace their socket was made in.
        self._sock: socket.socket | None = None

    async def __aenter__(self) -> HostNetwork:
        # dev_mcast shows the namespace of whoever opens it, and an open file keeps
        # that view: open it once (inside the target namespace) and pread() it.
        if self.netns is None:
            self._mcast_fd = os.open("/proc/self/net/dev_mcast", os.O_RDONLY | os.O_CLOEXEC)
        else:
            self._mcast_fd = await _open_in_netns(self.netns, "/proc/thread-self/net/dev_mcast")
        try:
            if self.netns is None:
                self._sock = _ioctl_socket()
            else:
                self._sock = await _in_netns(self.netns, _ioctl_socket)
            # flags=0: never create a namespace by accident; groups=0: request-only
            # socket, so no unread events pile up.
            if self.netns is None:
                self._ipr = AsyncIPRoute(groups=0)
            else:
                self._ipr = AsyncIPRoute(netns=self.netns, flags=0, groups=0)
            await self._ipr.setup_endpoint()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._mcast_fd is not None:
            os.close(self._mcast_fd)
            self._mcast_fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def is_macvtap(self, ifname: str) -> bool:
        msg = await self._get_link(ifname, ifname=ifname)
        return msg is not None and _kind_mode(msg)[0] == "macvtap"

    async def read(self, ifname: str, *, quick: bool = False) -> HostState | None:
        """The macvtap's filter; None if there is no such link.

        quick: take the MAC and flags from ioctls and the mode and lower device's index
        from the last full read (if under LINK_CACHE_SECONDS old and the ifindex is the
        same); the lower device's VLAN filtering comes from the same cache as in a full
        read. A netlink read costs ~0.7 ms of Python that would compete for the GIL
        with the query it runs beside; the ioctls cost microseconds.
        """
        if quick:
            state = await self._quick_read(ifname)
            if state is not None:
                return state
        msg = await self._get_link(ifname, ifname=ifname)
        if msg is None:
            return None
        kind, mode = _kind_mode(msg)
        if kind != "macvtap":
            raise MacvtapError(ifname, "read", None, f"is a {kind or 'plain'} link, not a macvtap")
        lower_index = msg.get_attr("IFLA_LINK")
        if not lower_index or msg.get_attr("IFLA_LINK_NETNSID") is not None:
            lower_index = None  # the lower device lives in another namespace
        facts = _LinkFacts(msg["index"], mode, lower_index, time.monotonic())
        self._remember(facts, ifname)
        return await self._state(
            ifname, facts, parse_mac(msg.get_attr("IFLA_ADDRESS")), msg["flags"]
        )

    async def _quick_read(self, ifname: str) -> HostState | None:
        """read() from ioctls and remembered facts; None when a full read is needed."""
        facts = self._links.get(ifname)
        if facts is None or time.monotonic() - facts.read_at >= LINK_CACHE_SECONDS:
            return None
        try:
            if self._ifindex(ifname) != facts.ifindex:
                return None  # recreated: its mode and lower device may differ
            family, hwaddr = struct.unpack_from("H6s", self._ifreq(ifname, SIOCGIFHWADDR), IFNAMSIZ)
            (flags,) = struct.unpack_from("H", self._ifreq(ifname, SIOCGIFFLAGS), IFNAMSIZ)
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

    def _ifreq(self, ifname: str, request: int, data: bytes = bytes(24)) -> bytes:
        """An interface ioctl on a struct ifreq for IFNAME (DATA: its union); the result."""
        assert self._sock is not None, "HostNetwork used outside 'async with'"
        name = ifname.encode()
        if not name or len(name) >= IFNAMSIZ:
            raise OSError(errnos.ENODEV, f"no such interface name: {ifname!r}")
        return fcntl.ioctl(self._sock, request, struct.pack("16s24s", name, data))

    def _set_mac(self, ifname: str, mac: str) -> None:
        self._ifreq(ifname, SIOCSIFHWADDR, struct.pack("H6s16x", ARPHRD_ETHER, to_bytes(mac)))

    def _ifindex(self, ifname: str) -> int:
        (index,) = struct.unpack_from("i", self._ifreq(ifname, SIOCGIFINDEX), IFNAMSIZ)
        return int(index)

    async def _lower_vlan_filter(self, index: int | None) -> tuple[str, LowerVlanFilter]:
        """The lower device INDEX's name and whether it drops VLAN ids nobody registered.

        Never raises: what cannot be read is "unknown", and the plan then falls back
        to what is safe for the guest (promiscuous).
        """
        if index is None:
            return "", "unknown"
        cached = self._lower_cache.get(index)
        if cached is not None and time.monotonic() - cached[0] < LOWER_CACHE_SECONDS:
            return cached[1], cached[2]
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
            lower = await self._get_link(str(index), index=index)
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
            if self.netns is None:
                active = _rx_vlan_filter(name)
            else:
                active = await _in_netns(self.netns, lambda: _rx_vlan_filter(name))
        except (OSError, ValueError, KeyError):
            return name, "unknown"
        return name, "hardware" if active else "none"

    async def apply(self, state: HostState, changes: Sequence[Change]) -> None:
        """Apply CHANGES in order to the link STATE was read from."""
        if not changes:
            return
        self._check_same_link(state)
        for n, change in enumerate(changes):
            await self._apply_one(state, change, checked=n == 0)

    def _check_same_link(self, state: HostState) -> None:
        if not self._same_link(state):
            # Same name, new ifindex (or the index went to another link): our state
            # describes a device that no longer exists.
            raise MacvtapError(
                state.ifname,
                "apply",
                None,
                f"link vanished/recreated (ifindex {state.ifindex} is no longer {state.ifname})",
            )

    def _same_link(self, state: HostState) -> bool:
        """Whether STATE's ifindex still carries its name (not deleted and recreated)."""
        # One ioctl instead of a netlink round trip: this is on the sync hot path.
        try:
            return self._ifindex(state.ifname) == state.ifindex
        except OSError:
            return False

    async def _apply_one(self, state: HostState, change: Change, *, checked: bool) -> None:
        """CHECKED: the link was checked with no await since (ioctls name the link)."""
        index = state.ifindex
        if isinstance(change, MacChange):
            mac = parse_mac(change.new)
            # By ioctl, as libvirt's virNetDevSetMAC: a pyroute2 request costs ~0.6 ms
            # of Python and loop turns here, on the path a guest's MAC change waits
            # on. The ioctl names the link: its ifindex is checked right before, with
            # no await between, so that it is still the link STATE describes.
            if not checked:
                self._check_same_link(state)
            try:
                self._set_mac(state.ifname, mac)
            except OSError as exc:
                hint = _HINTS.get(("set mac", exc.errno)) if exc.errno is not None else None
                raise MacvtapError(
                    state.ifname, "set mac", exc.errno, hint, subject=mac, change=change
                ) from exc
        elif isinstance(change, FlagChange):
            bit = _FLAG_BITS[change.field]
            value = "on" if change.new else "off"
            await self._call(
                state.ifname,
                f"set {change.field}",
                value,
                change,
                self._ipr.link("set", index=index, flags=bit if change.new else 0, change=bit),
            )
        elif isinstance(change, AddressListChange):
            # Removals first: frees room before adding; each step is idempotent.
            for command, macs, benign in (
                ("del", change.remove, errnos.ENOENT),
                ("add", change.add, errnos.EEXIST),
            ):
                for raw in sorted(macs):
                    mac = parse_mac(raw)
                    op = f"fdb {command} {change.field}"
                    request = self._ipr.fdb(command, ifindex=index, lladdr=mac, flags=NTF_SELF)
                    await self._call(state.ifname, op, mac, change, request, benign=benign)
        else:  # pragma: no cover - Change is a closed union
            raise TypeError(f"unknown change {change!r}")

    async def _call(
        self,
        ifname: str,
        op: str,
        what: str,
        change: Change,
        request: Any,
        benign: int | None = None,
    ) -> None:
        try:
            await request
        except (NetlinkError, OSError) as exc:
            code = exc.code if isinstance(exc, NetlinkError) else exc.errno
            if code is not None and code == benign:
                return
            hint = _HINTS.get((op, code)) if code is not None else None
            raise MacvtapError(ifname, op, code, hint, subject=what, change=change) from exc

    async def _get_link(self, label: str, **query: Any) -> Any:
        """The RTM_NEWLINK reply for QUERY, or None if there is no such link."""
        try:
            replies = await self._ipr.link("get", **query)
        except NetlinkError as exc:
            if exc.code == errnos.ENODEV:
                return None
            raise MacvtapError(label, "get link", exc.code) from exc
        except OSError as exc:
            raise MacvtapError(label, "get link", exc.errno) from exc
        return replies[0] if replies else None

    def _multicast(self, ifindex: int) -> tuple[frozenset[str], frozenset[str]]:
        """Multicast entries someone added, and those only the host stack joined.

        dev_mcast columns: ifindex, name, users, global users, address (hex, no
        colons). Only fdb/SIOCADDMULTI entries have global users.
        """
        assert self._mcast_fd is not None, "HostNetwork used outside 'async with'"
        static: set[str] = set()
        joined: set[str] = set()
        wanted = str(ifindex)
        for line in _pread_all(self._mcast_fd).splitlines():
            fields = line.split()
            if len(fields) == 5 and fields[0] == wanted:
                mac = from_bytes(bytes.fromhex(fields[4]))
                (static if fields[3] != "0" else joined).add(mac)
        return frozenset(static), frozenset(joined)

    async def _unicast(self, ifname: str, ifindex: int, own: str) -> frozenset[str]:
        found = set()
        try:
            async for msg in await self._ipr.fdb("dump", ifindex=ifindex):
                lladdr = msg.get_attr("NDA_LLADDR")
                if msg["ifindex"] != ifindex or lladdr is None:
                    continue
                mac = parse_mac(lladdr)
                if not is_multicast(mac) and mac != own:
                    found.add(mac)
        except NetlinkError as exc:
            raise MacvtapError(ifname, "fdb dump", exc.code) from exc
        return frozenset(found)


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


def _ioctl_socket() -> socket.socket:
    # Any family reaches the device ioctls; AF_UNIX stays allowed where a unit's
    # RestrictAddressFamilies= drops AF_INET (MQTT off).
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)


async def _open_in_netns(netns: str, path: str) -> int:
    return await _in_netns(netns, lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC))


_T = TypeVar("_T")


async def _in_netns(netns: str, call: Callable[[], _T]) -> _T:
    """Run CALL inside NETNS, in a throwaway thread.

    setns() switches only the calling thread, and a thread that leaves our namespace
    must not go back to a pool, so it is a dedicated thread that ends right after.
    """
    nspath = netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)
    result: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            nsfd = os.open(nspath, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(nsfd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns {nspath}: {os.strerror(code)}")
            finally:
                os.close(nsfd)
            result.append(call())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"rxfilterd-netns-{netns}", daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join)
    if failure:
        raise failure[0]
    return result[0]
