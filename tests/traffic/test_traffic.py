"""What users see: packets from another host reach the guest once rxfilterd has synced.

Each test boots one guest with two NICs that differ only in trust: net0 trusted (rxfilterd
syncs its macvtap), net1 an untrusted twin (nobody does). Each NIC's macvtap sits on its
own veth whose far end belongs to the peer, a namespace standing for another machine on
the LAN. The same traffic is sent to both NICs: it must reach the trusted one and must
not reach the twin, so a pass shows the sync is what lets it through.

Addresses: documentation prefixes only. NIC n (0 trusted, 1 twin) has 192.0.2.(64n)/26
and 2001:db8:(n+1)::/64; the peer is .1 / ::1 there, the guest .10 / ::10.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import RunningDaemon, wait_until
from tests.support.guest import (
    EthernetNic,
    Guest,
    Macvtap,
    Resources,
    create_macvtap,
    delete_link,
    ip,
    link_show,
    prefixed,
    skip_or_fail,
)
from tests.support.peer import Peer, bucket_mate, lower_groups, quiet_host_ipv6

pytestmark = pytest.mark.traffic

TRUSTED, TWIN = 0, 1
MACS = ("52:54:00:7a:00:01", "52:54:00:7a:00:05")
NEW_MACS = ("52:54:00:7a:01:01", "52:54:00:7a:01:05")
EXTRA_MACS = ("52:54:00:7a:02:01", "52:54:00:7a:02:05")  # a guest macvlan's, per NIC
MDNS_V4, MDNS_V6, MDNS_PORT = "224.0.0.251", "ff02::fb", 5353
MDNS_GROUPS = ("01:00:5e:00:00:fb", "33:33:00:00:00:fb")
LISTENER = "rxft-mcast-listen"


@dataclass(frozen=True)
class Cable:
    """One NIC's path: guest ethN - macvtap - lower - veth - the peer's end."""

    n: int
    mvt: Macvtap
    lower: str  # the macvtap's lower device in the host namespace
    peer_end: str

    @property
    def dev(self) -> str:
        return f"eth{self.n}"

    def guest_v4(self, host: int = 10) -> str:
        return f"192.0.2.{64 * self.n + host}"

    def guest_v6(self) -> str:
        return f"2001:db8:{self.n + 1}::10"

    def solicited_node_group(self) -> str:
        """The MAC of guest_v6()'s solicited-node group, ff02::1:ff00:10."""
        return "33:33:ff:00:00:10"


def cable(stack: Resources, peer: Peer, n: int) -> Cable:
    """A bridge-mode macvtap on a veth whose far end the peer takes, with addresses."""
    tag = f"c{n}"
    mvt = stack.veth_macvtap(tag, mac=MACS[n])
    lower, far = prefixed(tag + "a"), prefixed(tag + "b")
    quiet_host_ipv6(lower)
    # The host's own groups on the macvtap (all-nodes, its link-local's solicited-node)
    # would sit in its own filter, whose buckets are salted per device (macvlan's
    # mc_hash mixes in the device's address): each a 1-in-256 chance per run that a
    # tested group passes an untrusted twin unsynced. Off: only the guest's groups count.
    quiet_host_ipv6(mvt.name)
    peer.take(far, f"192.0.2.{64 * n + 1}/26", f"2001:db8:{n + 1}::1/64")
    made = Cable(n, mvt, lower, far)
    return unsalted(peer, made) if n == TWIN else made


# The groups the tests send to that an untrusted twin must not let through unsynced:
# the guests' solicited-node group (::10) and mDNS over IPv4 and IPv6.
PROBED = ("33:33:ff:00:00:10", "01:00:5e:00:00:fb", "33:33:00:00:00:fb")
# Sends one frame to each of PROBED from an interface (AF_PACKET; run in the peer).
SEND_PROBES = """
import socket, sys
iface, groups = sys.argv[1], sys.argv[2:]
src = open(f"/sys/class/net/{iface}/address").read().strip()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
for g in groups * 3:
    s.send(bytes.fromhex(g.replace(":", "") + src.replace(":", "") + "88b5") + bytes(46))
"""


def unsalted(peer: Peer, twin: Cable) -> Cable:
    """TWIN with a macvtap whose own filter lets none of PROBED through.

    A macvtap's multicast filter hashes with a salt taken from its kernel address
    (macvlan mc_hash), which a reused allocation can repeat run after run: broadcast
    and IPv4 all-hosts, always in it, may then share a bucket with a tested group, and
    the twin would receive it with nothing synced (seen: the peer's solicitation
    answered). Probe it before the guest boots; on a pass, make the macvtap anew (the
    new one allocated while the old still exists, so another salt) and probe again.
    """
    for _ in range(8):
        if not passes(peer, twin):
            return twin
        name, fresh = twin.mvt.name, prefixed(f"c{twin.n}n")
        create_macvtap(fresh, twin.lower)  # a random MAC: the port refuses a second one
        delete_link(name)
        ip("link", "set", fresh, "down")
        ip("link", "set", fresh, "name", name, "address", MACS[twin.n])
        ip("link", "set", name, "up")
        quiet_host_ipv6(name)
        info = link_show(name)
        assert info is not None
        index = int(info["ifindex"])
        mvt = Macvtap(name, index, Path(f"/dev/tap{index}"), MACS[twin.n])
        twin = Cable(twin.n, mvt, twin.lower, twin.peer_end)
    raise AssertionError(f"no macvtap on {twin.lower} kept {PROBED} out in 8 tries")


def passes(peer: Peer, twin: Cable) -> bool:
    """Whether frames to PROBED from the peer reach the twin's macvtap."""
    stats = Path(f"/sys/class/net/{twin.mvt.name}/statistics")

    def received() -> int:
        names = ("rx_packets", "rx_dropped", "rx_errors")
        return sum(int((stats / n).read_text()) for n in names)

    before = received()
    sent = peer.run(sys.executable, "-c", SEND_PROBES, twin.peer_end, *PROBED)
    assert sent.returncode == 0, sent.stderr
    time.sleep(0.2)  # the macvlan broadcast queue delivers from a work item
    return received() > before


def passthru_cable(stack: Resources, peer: Peer, links: list[str], n: int) -> Cable:
    """A passthru macvtap with nopromisc on a bridge holding a veth to the peer.

    A veth lower passes every frame whatever its destination, so a passthru macvtap on
    one would deliver any unicast MAC and the twin could not fail. The bridge stands for
    a NIC that filters unicast by its own address list (an SR-IOV VF, say): frames for a
    MAC reach the macvtap only when the MAC is the bridge's own or on its list, which a
    unicast entry on the passthru macvtap (bridge fdb ... self) puts there.
    """
    tag = f"p{n}"
    far, port, bridge = prefixed(tag + "b"), prefixed(tag + "a"), prefixed(tag + "r")
    stack.veth(port, far)
    ip("link", "add", bridge, "address", MACS[n], "type", "bridge")
    links.append(bridge)
    ip("link", "set", port, "master", bridge)
    ip("link", "set", bridge, "up")
    mvt = stack.macvtap(prefixed(tag + "m"), bridge, mode="passthru", mac=MACS[n])
    ip("link", "set", mvt.name, "type", "macvtap", "mode", "passthru", "nopromisc")
    peer.take(far, f"192.0.2.{64 * n + 1}/26")
    return Cable(n, mvt, bridge, far)


def boot(stack: Resources, daemon: RunningDaemon, name: str, cables: list[Cable]) -> Guest:
    """The guest with net0 trusted and net1 untrusted, once rxfilterd has seen both."""
    trusted, twin = cables
    guest = stack.guest(
        prefixed(name),
        [
            EthernetNic(trusted.mvt.name, mac=MACS[TRUSTED], trust=True),
            EthernetNic(twin.mvt.name, mac=MACS[TWIN], trust=False),
        ],
    )
    for alias, event in (("net0", "syncing"), ("net1", "skipped")):
        daemon.wait_for(line_of(guest.name, alias, event), 30, f"{event} line for {alias}")
    return guest


def line_of(domain: str, alias: str, event: str) -> Callable[[dict[str, Any]], bool]:
    """Matches rxfilterd's log line EVENT for DOMAIN's NIC ALIAS."""
    return lambda r: (
        r.get("domain") == domain and r.get("alias") == alias and r.get("event") == event
    )


def twin_drops(group: str, twin: Cable) -> None:
    """Assert that frames to GROUP cannot pass the twin's macvtap by a hash collision.

    The macvlan port filters multicast by 256 hash buckets of the groups on its lower;
    a group sharing a bucket with one of them would pass without any sync, and the
    negative half of a test would prove nothing. The addresses here are chosen so that
    it cannot happen; this says so if a kernel ever joins other groups.
    """
    mate = bucket_mate(group, twin.lower)
    assert mate is None, (
        f"test setup: {group} shares the macvlan filter bucket of {mate} on {twin.lower}"
        f" ({sorted(lower_groups(twin.lower))}); pick other addresses"
    )
    # What the twin's own filter holds besides broadcast (its buckets are salted per
    # device, so they cannot be checked here): nothing from the host, nothing synced.
    assert lower_groups(twin.mvt.name) <= {"01:00:5e:00:00:01"}, lower_groups(twin.mvt.name)


def why_twin(peer: Peer, twin: Cable) -> str:
    """What a failed negative check needs to be told apart: the twin macvtap's flags,
    groups and counters, and how the peer reached the twin's address."""
    mvt = twin.mvt.name
    stats = Path(f"/sys/class/net/{mvt}/statistics")
    return "\n".join(
        [
            ip_out("-d", "link", "show", "dev", mvt),
            f"{mvt} groups: {sorted(lower_groups(mvt))}",
            f"{mvt} rx_packets={(stats / 'rx_packets').read_text().strip()}"
            f" multicast={(stats / 'multicast').read_text().strip()}",
            peer.run("ip", "-6", "route", "get", twin.guest_v6()).stdout,
            peer.run("ip", "-6", "neigh").stdout,
            peer.run("ip", "-6", "addr").stdout,
        ]
    )


def ip_out(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False).stdout


def peer_neighbour(peer: Peer, addr: str) -> str:
    return ip("-n", peer.name, "neigh", "show", addr).strip()


# --------------------------------------------------------------------------- the tests


def test_peer_reaches_the_guest_over_ipv6_only_after_the_sync(
    stack: Resources, peer: Peer, tmp_path: Path
) -> None:
    """Neighbour discovery: the solicitation goes to the guest's solicited-node group."""
    cables = [cable(stack, peer, n) for n in (TRUSTED, TWIN)]
    trusted, twin = cables
    with RunningDaemon(tmp_path) as daemon:
        guest = boot(stack, daemon, "t6", cables)
        for c in cables:
            guest.run(
                f"ip addr add {c.guest_v4()}/26 dev {c.dev}"
                f" && ip -6 addr add {c.guest_v6()}/64 dev {c.dev} nodad"
            )
        # Both cables work: IPv4 resolves by broadcast, which every macvtap passes.
        for c in cables:
            reached(peer, c.guest_v4())
        wait_until(lambda: peer.ping(trusted.guest_v6()), 20, "peer pings the trusted NIC")
        twin_drops(twin.solicited_node_group(), twin)
        answered = peer.ping(twin.guest_v6(), count=3)
        assert not answered, f"the untrusted twin answered ping6\n{why_twin(peer, twin)}"
        # The solicitation never got through, so the peer never learnt the twin's MAC.
        assert MACS[TWIN] not in peer_neighbour(peer, twin.guest_v6())
        group = trusted.solicited_node_group()
        assert group in lower_groups(trusted.mvt.name)
        assert group not in lower_groups(twin.mvt.name)
        twin_untouched(daemon, guest)


def test_peer_reaches_the_guest_at_its_new_mac(
    stack: Resources, peer: Peer, tmp_path: Path
) -> None:
    """Unicast demux is by destination MAC: the macvtap must carry the guest's new one."""
    cables = [cable(stack, peer, n) for n in (TRUSTED, TWIN)]
    trusted, twin = cables
    with RunningDaemon(tmp_path) as daemon:
        guest = boot(stack, daemon, "tm", cables)
        for c in cables:
            guest.run(f"ip addr add {c.guest_v4()}/26 dev {c.dev}")
            reached(peer, c.guest_v4())
        for c in cables:
            guest.set_mac(NEW_MACS[c.n], dev=c.dev)
        peer.forget_neighbours()
        wait_until(lambda: peer.ping(trusted.guest_v4()), 20, "peer pings the new trusted MAC")
        assert NEW_MACS[TRUSTED] in peer_neighbour(peer, trusted.guest_v4())
        assert not peer.ping(twin.guest_v4(), count=3), "the twin answered at its new MAC"
        # The guest did answer ARP (broadcast passes) with its new MAC; the frames sent
        # to that MAC are what the twin's macvtap turned away.
        assert NEW_MACS[TWIN] in peer_neighbour(peer, twin.guest_v4())
        twin_untouched(daemon, guest)


def test_multicast_listener_in_the_guest_receives_the_peers_datagrams(
    stack: Resources, peer: Peer, tmp_path: Path
) -> None:
    """An mDNS-like listener joins 224.0.0.251 and ff02::fb on each NIC; the peer sends."""
    cables = [cable(stack, peer, n) for n in (TRUSTED, TWIN)]
    trusted, twin = cables
    with RunningDaemon(tmp_path) as daemon:
        guest = boot(stack, daemon, "tl", cables)
        have_listener(guest)
        for c in cables:
            guest.run(f"ip addr add {c.guest_v4()}/26 dev {c.dev}")
            guest.run(
                f"{LISTENER} {c.dev} {MDNS_PORT} {MDNS_V4} {MDNS_V6} >/tmp/mdns.{c.dev} 2>&1 &"
            )
        for c in cables:
            listening(guest, c.dev)
        for group in MDNS_GROUPS:
            twin_drops(group, twin)
        seq = itertools.count()

        def send_round() -> None:
            n = next(seq)
            for c, group in itertools.product(cables, (MDNS_V4, MDNS_V6)):
                peer.send_udp(group, MDNS_PORT, c.peer_end, f"rxft-mdns {c.dev} {n}".encode())

        def received(c: Cable) -> list[str]:
            out = guest.run(f"cat /tmp/mdns.{c.dev}")
            return [line for line in out.splitlines() if line.startswith("rx ")]

        def trusted_got_both() -> bool:
            send_round()
            families = {line.split()[1] for line in received(trusted)}
            return families == {"inet", "inet6"}

        wait_until(trusted_got_both, 30, "the trusted NIC's listener receives v4 and v6")
        before = len(received(trusted))
        for _ in range(5):  # the same datagrams keep going to both NICs
            send_round()
        wait_until(lambda: len(received(trusted)) >= before + 10, 10, "ten more datagrams")
        got = received(trusted)
        assert all(f"rxft-mdns {trusted.dev} " in line for line in got), got
        assert received(twin) == [], "the untrusted twin's listener received datagrams"
        twin_untouched(daemon, guest)


def test_passthru_extra_unicast_mac_receives_traffic(
    stack: Resources, peer: Peer, links: list[str], tmp_path: Path
) -> None:
    """The guest adds a macvlan with a MAC of its own; the peer pings its address."""
    cables = [passthru_cable(stack, peer, links, n) for n in (TRUSTED, TWIN)]
    trusted, twin = cables
    with RunningDaemon(tmp_path) as daemon:
        guest = boot(stack, daemon, "tp", cables)
        # Only the interface holding an address answers ARP for it: otherwise ethN would
        # answer for the macvlan's address with its own MAC and nothing would test it.
        guest.run("sysctl -w net.ipv4.conf.all.arp_ignore=1")
        for c in cables:
            guest.run(f"ip addr add {c.guest_v4()}/26 dev {c.dev}")
            guest.add_macvlan(f"mv{c.n}", EXTRA_MACS[c.n], dev=c.dev)
            guest.run(f"ip addr add {c.guest_v4(20)}/26 dev mv{c.n}")
        for c in cables:  # each NIC's own MAC is the bridge's: both answer
            reached(peer, c.guest_v4())
        wait_until(lambda: peer.ping(trusted.guest_v4(20)), 20, "peer pings the trusted macvlan")
        assert EXTRA_MACS[TRUSTED] in peer_neighbour(peer, trusted.guest_v4(20))
        assert not peer.ping(twin.guest_v4(20), count=3), "the twin's macvlan answered"
        assert EXTRA_MACS[TWIN] in peer_neighbour(peer, twin.guest_v4(20))
        # The mechanism: the trusted macvtap carries the extra MAC (so its lower, the
        # bridge, accepts it); the twin's does not.
        assert EXTRA_MACS[TRUSTED] in fdb_self(trusted.mvt.name)
        assert EXTRA_MACS[TWIN] not in fdb_self(twin.mvt.name)
        twin_untouched(daemon, guest)


# --------------------------------------------------------------------------- helpers


def reached(peer: Peer, addr: str, timeout: float = 20) -> None:
    """Wait until ADDR answers the peer's ping (the first may wait for resolution)."""
    wait_until(lambda: peer.ping(addr), timeout, f"peer pings {addr}")


def listening(guest: Guest, dev: str) -> None:
    wait_until(lambda: "joined" in guest.run(f"cat /tmp/mdns.{dev}"), 20, f"listener on {dev}")


def twin_untouched(daemon: RunningDaemon, guest: Guest) -> None:
    """Our rxfilterd changed nothing on the untrusted twin (net1).

    Which daemon synced the trusted NIC is not asserted: on a shared machine another
    test run's rxfilterd may do it first. The traffic and the host state are the proof.
    """
    touched = [
        r
        for r in daemon.records()
        if r.get("domain") == guest.name
        and r.get("alias") == "net1"
        and r.get("event") in ("applied", "failed", "rejected")
    ]
    assert touched == [], touched


def have_listener(guest: Guest) -> None:
    status, _ = guest.run_status(f"command -v {LISTENER}")
    if status != 0:
        skip_or_fail(f"the guest image has no {LISTENER}: run scripts/build-guest")


def fdb_self(ifname: str) -> str:
    return subprocess.run(
        ["bridge", "fdb", "show", "dev", ifname], capture_output=True, text=True, check=False
    ).stdout
