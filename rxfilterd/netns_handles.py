"""The handles of one network namespace: rtnetlink, an ioctl socket and dev_mcast.

With macvtap_read.py and macvtap_write.py, the only modules that import pyroute2.
Every handle is opened inside the namespace it serves and keeps acting there.
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
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from rxfilterd.host_state import MacvtapError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"
# Interface ioctls: struct ifreq's name size, the requests, the flags they read.
IFNAMSIZ = 16
SIOCGIFINDEX = 0x8933
ARPHRD_ETHER = 1
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200

_T = TypeVar("_T")


class NetnsHandles:
    """rtnetlink, an interface-ioctl socket and /proc's dev_mcast of one namespace.

    netns: a name in /var/run/netns (or a path to a netns file); None means ours.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.ipr: Any = None
        self.mcast_fd: int | None = None
        # Interface ioctls act in the namespace their socket was made in.
        self._sock: socket.socket | None = None

    async def open(self) -> None:
        # dev_mcast shows the namespace of whoever opens it, and an open file keeps
        # that view: open it once (inside the target namespace) and pread() it.
        if self.netns is None:
            self.mcast_fd = os.open("/proc/self/net/dev_mcast", os.O_RDONLY | os.O_CLOEXEC)
        else:
            self.mcast_fd = await _open_in_netns(self.netns, "/proc/thread-self/net/dev_mcast")
        try:
            if self.netns is None:
                self._sock = _ioctl_socket()
            else:
                self._sock = await in_netns(self.netns, _ioctl_socket)
            # groups=0: a request-only socket, so no unread events pile up. In another
            # namespace the socket is made here, in a thread that entered it: pyroute2's
            # own netns= forks a child, which can hang on a lock another thread held
            # (libvirt's) and blocks the event loop while it waits (seen: a minute).
            if self.netns is None:
                self.ipr = AsyncIPRoute(groups=0)
            else:
                fileno = await in_netns(self.netns, _netlink_socket)
                self.ipr = AsyncIPRoute(fileno=fileno, groups=0)
            await self.ipr.setup_endpoint()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None
        if self.mcast_fd is not None:
            os.close(self.mcast_fd)
            self.mcast_fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self, call: Callable[[], _T]) -> _T:
        """CALL in this namespace (in a throwaway thread unless it is ours)."""
        return call() if self.netns is None else await in_netns(self.netns, call)

    def ifreq(self, ifname: str, request: int, data: bytes = bytes(24)) -> bytes:
        """An interface ioctl on a struct ifreq for IFNAME (DATA: its union); the result."""
        assert self._sock is not None, "HostNetwork used outside 'async with'"
        name = ifname.encode()
        if not name or len(name) >= IFNAMSIZ:
            raise OSError(errnos.ENODEV, f"no such interface name: {ifname!r}")
        return fcntl.ioctl(self._sock, request, struct.pack("16s24s", name, data))

    def ifindex(self, ifname: str) -> int:
        (index,) = struct.unpack_from("i", self.ifreq(ifname, SIOCGIFINDEX), IFNAMSIZ)
        return int(index)

    async def get_link(self, label: str, **query: Any) -> Any:
        """The RTM_NEWLINK reply for QUERY, or None if there is no such link."""
        try:
            replies = await self.ipr.link("get", **query)
        except NetlinkError as exc:
            if exc.code == errnos.ENODEV:
                return None
            raise MacvtapError(label, "get link", exc.code) from exc
        except OSError as exc:
            raise MacvtapError(label, "get link", exc.errno) from exc
        return replies[0] if replies else None


def _netlink_socket() -> int:
    """A new rtnetlink socket of the calling thread's namespace, as a bare descriptor."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)
    return sock.detach()


def _ioctl_socket() -> socket.socket:
    # Any family reaches the device ioctls; AF_UNIX stays allowed where a unit's
    # RestrictAddressFamilies= drops AF_INET (MQTT off).
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)


async def _open_in_netns(netns: str, path: str) -> int:
    return await in_netns(netns, lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC))


async def in_netns(netns: str, call: Callable[[], _T]) -> _T:
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
