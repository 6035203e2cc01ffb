"""A peer host for traffic tests: a network namespace holding the far ends of test veths.

The macvtap behind a guest's NIC sits on the near end of a veth (its lower device); the
peer owns the far end, in a namespace of its own with its own addresses (documentation
prefixes only), and sends traffic the way another machine on the LAN would. What it can
reach in the guest is what the macvtap lets through.

Namespaces are named with the test prefix, so :func:`cleanup_namespaces` removes an
interrupted run's leftovers and nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from tests.support.guest import ip, prefix

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


def namespaces(name_prefix: str | None = None) -> list[str]:
    """Named network namespaces (``ip netns``) whose name starts with the prefix."""
    p = prefix() if name_prefix is None else name_prefix
    if not NETNS_DIR.is_dir():
        return []
    return sorted(f.name for f in NETNS_DIR.iterdir() if f.name.startswith(p))


def cleanup_namespaces(name_prefix: str | None = None) -> list[str]:
    """Delete the named namespaces of this prefix (their links go with them)."""
    p = prefix() if name_prefix is None else name_prefix
    if not p:
        raise ValueError("refusing to clean up with an empty prefix")
    removed = []
    for name in namespaces(p):
        ip("netns", "del", name, check=False)
        removed.append(f"netns {name}")
    return removed


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns arrived in Python 3.12; this project runs on 3.11.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread in namespace NAME, then switch back.

    Sockets made inside stay in NAME for their whole life, whichever thread uses them.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


class Peer:
    """A namespace standing for another machine on the guest's LAN.

    ``with Peer(prefixed("peer")) as peer: peer.take(veth_end, "192.0.2.1/26")``.
    """

    def __init__(self, name: str) -> None:
        if not name.startswith(prefix()):
            raise ValueError(f"{name!r} does not start with the test prefix {prefix()!r}")
        self.name = name
        self.links: list[str] = []

    def start(self) -> Peer:
        ip("netns", "add", self.name)
        try:
            ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def take(self, link: str, *addresses: str, mac: str | None = None) -> None:
        """Move LINK (a veth end) here, bring it up with ADDRESSES (IPv6 without DAD)."""
        ip("link", "set", link, "netns", self.name)
        self.links.append(link)
        if mac is not None:
            ip("-n", self.name, "link", "set", link, "address", mac)
        ip("-n", self.name, "link", "set", link, "up")
        for addr in addresses:
            extra = ["nodad"] if ":" in addr else []
            ip("-n", self.name, "addr", "add", addr, "dev", link, *extra)

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """ARGS run in the namespace (``ip netns exec``); never raises on failure."""
        return netns_run(self.name, *args, timeout=timeout)

    def ping(self, addr: str, count: int = 1, wait: int = 1) -> bool:
        """True when ADDR answers at least one of COUNT echo requests.

        busybox's ping: the host has no iputils (scripts/setup-host installs busybox).
        """
        family = "-6" if ":" in addr else "-4"
        res = self.run("busybox", "ping", family, "-c", str(count), "-W", str(wait), addr)
        return res.returncode == 0

    def forget_neighbours(self) -> None:
        """Flush the neighbour cache, as a peer that has not talked to the guest yet."""
        ip("-n", self.name, "neigh", "flush", "all")

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket in the peer's namespace."""
        with in_netns(self.name):
            return socket.socket(family, kind, proto)

    def ifindex(self, link: str) -> int:
        with in_netns(self.name):
            return socket.if_nametoindex(link)

    def send_udp(self, group: str, port: int, link: str, payload: bytes) -> None:
        """One datagram to GROUP:PORT out of LINK (IPv4 or IPv6 multicast)."""
        if ":" in group:
            with contextlib.closing(self.socket(socket.AF_INET6, socket.SOCK_DGRAM)) as s:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex(link))
                s.sendto(payload, (group, port, 0, self.ifindex(link)))
        else:
            with contextlib.closing(self.socket(socket.AF_INET, socket.SOCK_DGRAM)) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.encode())
                s.sendto(payload, (group, port))

    def remove(self) -> None:
        """Delete the namespace (and the veth ends in it); safe to call twice."""
        if (NETNS_DIR / self.name).exists():
            ip("netns", "del", self.name, check=False)

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


# --------------------------------------------------------------------------- macvlan filter


def netns_run(netns: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """ARGS, the host's binaries, run in the named network namespace NETNS; never raises."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def quiet_host_ipv6(link: str) -> None:
    """Turn off the host's own IPv6 on LINK, a test lower device in this namespace.

    Its link-local address would join a solicited-node group derived from the link's
    random MAC, which lands in a random bucket of the macvlan port filter (see
    port_filter_bucket): with it off, which groups pass an unsynced macvtap is fixed.
    """
    Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6").write_text("1\n")


def port_filter_bucket(mac: str) -> int:
    """The bucket of a multicast MAC in a macvlan port's filter (mc_hash(NULL, addr)).

    A multicast frame reaches a macvtap only if its bucket is set in the port's filter,
    which holds the buckets of every group on the lower device (what its macvtaps have,
    synced, plus its own) and of broadcast: drivers/net/macvlan.c, macvlan_handle_frame
    and macvlan_compute_filter. hash_32 of the address's bytes 2-5 read as a CPU (little
    endian) word, 8 bits.
    """
    raw = bytes(int(x, 16) for x in mac.split(":"))
    word = int.from_bytes(raw[2:6], "little")
    return ((word * 0x61C88647) & 0xFFFFFFFF) >> 24


def lower_groups(lower: str) -> set[str]:
    """Multicast MACs on link LOWER in this namespace (/proc/net/dev_mcast)."""
    groups = set()
    for line in Path("/proc/net/dev_mcast").read_text().splitlines():
        _index, name, _users, _global, addr = line.split()
        if name == lower:
            groups.add(":".join(addr[i : i + 2] for i in range(0, 12, 2)))
    return groups


def bucket_mate(group: str, lower: str) -> str | None:
    """A group on LOWER (or broadcast) sharing GROUP's port filter bucket, else None.

    None means frames to GROUP cannot pass any macvtap on LOWER until GROUP itself is
    added to one of them: the negative half of a traffic test rests on that.
    """
    bucket = port_filter_bucket(group)
    for other in sorted(lower_groups(lower) | {"ff:ff:ff:ff:ff:ff"}):
        if other != group and port_filter_bucket(other) == bucket:
            return other
    return None
