"""Changing a macvtap: its MAC by ioctl, flags and fdb entries by rtnetlink."""

from __future__ import annotations

import errno as errnos
import struct
from collections.abc import Sequence
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from rxfilterd.host_state import HostState, MacvtapError
from rxfilterd.mac import parse_mac, to_bytes
from rxfilterd.netns_handles import ARPHRD_ETHER, IFF_ALLMULTI, IFF_PROMISC, NetnsHandles
from rxfilterd.plan import AddressListChange, Change, FlagChange, MacChange

NTF_SELF = 0x02
SIOCSIFHWADDR = 0x8924
_FLAG_BITS = {"promiscuous": IFF_PROMISC, "allmulti": IFF_ALLMULTI}
# What an errno means for a given operation, where the kernel's text is misleading.
_HINTS = {
    ("set mac", errnos.EADDRINUSE): "another macvlan/macvtap on the same lower device has it",
    ("fdb add unicast", errnos.EOPNOTSUPP): "only passthru macvtaps accept unicast entries",
}


class MacvtapWriter:
    """Applies planned changes to the macvtaps of one namespace, one at a time."""

    def __init__(self, net: NetnsHandles) -> None:
        self._net = net

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
            return self._net.ifindex(state.ifname) == state.ifindex
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
                self._net.ipr.link("set", index=index, flags=bit if change.new else 0, change=bit),
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
                    request = self._net.ipr.fdb(command, ifindex=index, lladdr=mac, flags=NTF_SELF)
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

    def _set_mac(self, ifname: str, mac: str) -> None:
        self._net.ifreq(ifname, SIOCSIFHWADDR, struct.pack("H6s16x", ARPHRD_ETHER, to_bytes(mac)))
