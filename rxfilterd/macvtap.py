"""The host-network adapter: the macvtaps of one network namespace (a HostNetworkPort).

Reads are macvtap_read's, writes macvtap_write's, the namespace's sockets netns_handles'
(those three are the only modules importing pyroute2). One HostNetwork holds one
netlink socket, one open /proc/net/dev_mcast and one socket for interface ioctls, all
in one network namespace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from rxfilterd.host_state import HostState, MacvtapError
from rxfilterd.macvtap_read import MacvtapReader
from rxfilterd.macvtap_write import MacvtapWriter
from rxfilterd.netns_handles import NetnsHandles
from rxfilterd.plan import Change

# MacvtapError lives in host_state (the reconciler needs it without pyroute2).
__all__ = ["HostNetwork", "MacvtapError", "pinned_network"]


class HostNetwork:
    """rtnetlink access to the macvtaps of one network namespace.

    netns: a name in /var/run/netns (or a path to a netns file); None means ours.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._net = NetnsHandles(netns)
        self._reader = MacvtapReader(self._net)
        self._writer = MacvtapWriter(self._net)

    async def __aenter__(self) -> HostNetwork:
        await self._net.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._reader.close()
        self._net.close()

    async def is_macvtap(self, ifname: str) -> bool:
        return await self._reader.is_macvtap(ifname)

    async def read(self, ifname: str, *, quick: bool = False) -> HostState | None:
        """The macvtap's filter; None if there is no such link (see MacvtapReader.read)."""
        return await self._reader.read(ifname, quick=quick)

    async def apply(self, state: HostState, changes: Sequence[Change]) -> None:
        """Apply CHANGES in order to the link STATE was read from."""
        await self._writer.apply(state, changes)


@contextlib.asynccontextmanager
async def pinned_network(netns: str) -> AsyncIterator[HostNetwork]:
    """The macvtaps of the namespace at NETNS (a pod's /proc/PID/ns/net), held open.

    Every handle is entered through our own descriptor of the namespace, never its
    path again: a pid reused later cannot redirect a write to another namespace.
    """
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with HostNetwork(f"/proc/self/fd/{fd}") as network:
            yield network
    finally:
        os.close(fd)
