"""Time from the guest's command to the first packet that reaches the guest.

What a user waits for: after `ip link set eth0 address NEW` (or `ip -6 addr add A`) in
the guest, how long until frames a peer keeps sending to the new MAC (or to A's
solicited-node group) get through the host macvtap. One guest, two trusted NICs, each
on its own veth whose far end is in a peer namespace: net0 is type='ethernet' on a
macvtap we made (only rxfilterd syncs it), net1 is type='direct' (libvirt's own handler
syncs it; rxfilterd is stopped while it is measured, so each figure is one path alone).

- The peer sends a frame (ethertype 0x88b5) to the target every --interval seconds.
- The host captures on the macvtap itself (an AF_PACKET socket bound to it): a frame
  seen there has passed the macvtap's filter and is queued for QEMU. The kernel stamps
  it on arrival (SO_TIMESTAMPNS); no frame to the target may be seen before the command
  (a sample where one is, e.g. by a multicast hash collision, is dropped and counted).
- Start: when the bench sends the command to the guest's serial console. QEMU's
  NIC_RX_FILTER_CHANGED timestamp splits the total into the guest's part (shell, `ip`,
  driver, QEMU: the same for both paths) and the host's (event to first packet).

    .venv/bin/python -m bench.first_packet [--changes 20] [--blocks 2] [--rcu 1]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.daemon import BenchDaemon
from bench.figures import summary_ms, write_json
from bench.machine import other_rxfilterd
from bench.monitors import EventMonitor
from bench.session import BenchSession
from tests.support.guest import (
    DirectNic,
    EthernetNic,
    Guest,
    link_show,
    prefixed,
)
from tests.support.peer import Peer, cleanup_namespaces, lower_groups

ETHERTYPE = 0x88B5  # IEEE "local experimental": nothing in the guest or host consumes it
TYPE_BYTES = ETHERTYPE.to_bytes(2, "big")
ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
PEER_MAC = "02:00:00:fb:0b:01"
MACS = ("52:54:00:fb:10:01", "52:54:00:fb:20:01")  # net0 (ethernet), net1 (direct)
PATHS = ("rxfilterd", "libvirt")
SCENARIOS = ("mac", "ipv6")


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


class Capture:
    """Frames of our ethertype arriving on a host link, with the kernel's timestamps."""

    def __init__(self, ifname: str) -> None:
        # ETH_P_ALL: such taps see a frame before the macvtap's rx handler hands it to
        # QEMU's queue; a socket for one protocol would only see what the handler leaves.
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.bind((ifname, ETH_P_ALL))
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self.frames: list[tuple[float, str]] = []  # (arrival, destination MAC)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bench-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data, ancdata, _flags, addr = self._sock.recvmsg(128, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING or len(data) < 14 or data[12:14] != TYPE_BYTES:
                continue
            stamp = time.time()
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    stamp = sec + nsec / 1e9
            dst = ":".join(f"{b:02x}" for b in data[:6])
            with self._lock:
                self.frames.append((stamp, dst))

    def first(self, dst: str, since: float) -> float | None:
        with self._lock:
            return next((t for t, d in self.frames if d == dst and t >= since), None)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self._sock.close()


class Sender:
    """The peer sending a frame to one destination every INTERVAL seconds, in a thread."""

    def __init__(self, peer: Peer, link: str, interval: float) -> None:
        self._sock = peer.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self._sock.bind((link, 0))
        self.interval = interval
        self._dst: bytes | None = None
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sender", daemon=True)
        self._thread.start()

    def aim(self, dst: str | None) -> None:
        """Send to DST from now on (None: pause)."""
        self._dst = mac_bytes(dst) if dst else None

    def _run(self) -> None:
        seq = 0
        src = mac_bytes(PEER_MAC)
        while not self._stop.is_set():
            time.sleep(self.interval)
            dst = self._dst
            if dst is None:
                continue
            seq += 1
            frame = dst + src + struct.pack("!HQ", ETHERTYPE, seq)
            with contextlib.suppress(OSError):
                self._sock.send(frame.ljust(60, b"\0"))
                self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


@dataclass(frozen=True)
class Sample:
    path: str
    scenario: str
    block: int
    target: str  # the destination MAC the peer sent to
    command_sent: float
    command_returned: float
    event: float | None  # QEMU's timestamp of the first NIC_RX_FILTER_CHANGED after it
    first_packet: float | None
    leaked: bool  # a frame to the target passed before the command: not counted
    others_running: int
    spacing: float  # the peer's actual time between frames during this sample

    @property
    def total(self) -> float | None:
        return None if self.first_packet is None else self.first_packet - self.command_sent

    @property
    def guest_part(self) -> float | None:
        return None if self.event is None else self.event - self.command_sent

    @property
    def host_part(self) -> float | None:
        if self.event is None or self.first_packet is None:
            return None
        return self.first_packet - self.event


@dataclass
class Nic:
    path: str
    dev: str  # in the guest
    alias: str
    macvtap: str
    capture: Capture
    sender: Sender
    count: int = 0

    def next_target(self, scenario: str) -> tuple[str, str, str]:
        """(guest command, target MAC, undo command) for this NIC's next change."""
        self.count += 1
        k = self.count
        nic = 1 if self.alias == "net0" else 2
        if scenario == "mac":
            mac = f"52:54:00:fc:{nic}{k // 256 % 10}:{k % 256:02x}"
            return f"ip link set {self.dev} address {mac}", mac, ""
        addr = f"2001:db8:fb{nic}::{k:x}"
        group = f"33:33:ff:00:{k >> 8 & 0xFF:02x}:{k & 0xFF:02x}"
        return (
            f"ip -6 addr add {addr}/64 dev {self.dev} nodad",
            group,
            f"ip -6 addr del {addr}/64 dev {self.dev}",
        )


def measure(
    guest: Guest,
    nic: Nic,
    scenario: str,
    block: int,
    changes: int,
    events: EventMonitor,
    mine: list[int],
    settle: float,
) -> list[Sample]:
    out = []
    for _ in range(changes):
        command, target, undo = nic.next_target(scenario)
        aimed = time.time()
        sent_before = nic.sender.sent
        nic.sender.aim(target)
        # Quiet window: nothing to the target may pass before the command.
        time.sleep(max(0.1, 20 * nic.sender.interval))
        sent = time.time()
        seen = nic.capture.first(target, aimed)
        leaked = seen is not None and seen < sent
        others = len(other_rxfilterd(mine))
        guest.run(command)
        returned = time.time()
        deadline = time.monotonic() + 5
        first = None
        while first is None and time.monotonic() < deadline:
            first = nic.capture.first(target, sent)
            if first is None:
                time.sleep(0.005)
        nic.sender.aim(None)
        spacing = (time.time() - aimed) / max(1, nic.sender.sent - sent_before)
        evs = events.of(guest.name, nic.alias, since=sent - 0.001)
        out.append(
            Sample(
                nic.path, scenario, block, target, sent, returned,
                evs[0].qemu_time if evs else None, first, leaked, others, spacing,
            )
        )  # fmt: skip
        if undo:
            guest.run(undo)
            deadline = time.monotonic() + 10
            while target in lower_groups(nic.macvtap) and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(settle)
    return out


def link_flags(ifname: str) -> list[str]:
    flags: list[str] = (link_show(ifname) or {}).get("flags", [])
    return flags


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def report(samples: list[Sample]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for scenario in SCENARIOS:
        for path in PATHS:
            mine = [s for s in samples if s.scenario == scenario and s.path == path]
            good = [s for s in mine if not s.leaked]
            result[f"{scenario}/{path}"] = {
                "command_to_first_packet": summary_ms([s.total for s in good if s.total]),
                "command_to_event": summary_ms([s.guest_part for s in good if s.guest_part]),
                "event_to_first_packet": summary_ms([s.host_part for s in good if s.host_part]),
                "missed": sum(1 for s in good if s.first_packet is None),
                "leaked": len(mine) - len(good),
                "with_other_rxfilterd": sum(1 for s in good if s.others_running),
                "peer_spacing_ms": round(
                    1000 * sum(s.spacing for s in mine) / max(1, len(mine)), 2
                ),
            }
    return result


def print_report(result: dict[str, Any]) -> None:
    print("\nms; the peer's spacing between frames bounds the resolution")
    print(f"{'scenario/path':20s} {'measure':26s} {'n':>4s} {'p50':>8s} {'p95':>8s} {'max':>8s}")
    for key, row in result.items():
        for measure_name in (
            "command_to_first_packet",
            "command_to_event",
            "event_to_first_packet",
        ):
            st = row[measure_name]
            if st.get("n"):
                print(
                    f"{key:20s} {measure_name:26s} {st['n']:4d} {st['p50']:8.2f}"
                    f" {st['p95']:8.2f} {st['max']:8.2f}"
                )
        print(
            f"{key:20s} missed={row['missed']} leaked={row['leaked']}"
            f" with_other_rxfilterd={row['with_other_rxfilterd']}"
            f" peer_spacing={row['peer_spacing_ms']} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20, help="per path, scenario and block")
    parser.add_argument("--blocks", type=int, default=2, help="alternations of the two paths")
    parser.add_argument("--rcu", type=int, choices=(0, 1), default=1, help="rcu_expedited")
    parser.add_argument("--interval", type=float, default=0.0005, help="peer's send interval")
    parser.add_argument("--settle", type=float, default=0.2, help="seconds between changes")
    parser.add_argument("--out", help="directory for the JSON results and logs")
    args = parser.parse_args()
    samples: list[Sample] = []
    nics: list[Nic] = []
    session = BenchSession(
        "first-packet", args.out, events=True, rcu=True, cleanups=[cleanup_namespaces]
    )
    with session as s:
        out, info, events, rcu = s.out, s.info, s.events, s.rcu
        try:
            with Peer(prefixed("peer")) as peer:
                mvt = s.stack.veth_macvtap("fe", mac=MACS[0])
                s.stack.veth(prefixed("fda"), prefixed("fdb"))
                peer.take(prefixed("feb"), mac=PEER_MAC)
                peer.take(prefixed("fdb"), mac=PEER_MAC)
                guest = s.stack.guest(
                    prefixed("fp"),
                    [
                        EthernetNic(mvt.name, mac=MACS[0], trust=True),
                        DirectNic(prefixed("fda"), mac=MACS[1], trust=True),
                    ],
                )
                direct = guest.interfaces()[1].target_dev
                assert direct is not None
                # The guest loads 8021q, so it reports VLAN table [0], and libvirt makes the
                # macvtap promiscuous for that: every group would pass the direct NIC at once.
                # Without 8021q the table is empty and libvirt's multicast path is measured.
                guest.run("rmmod 8021q")
                promisc = not wait_for(lambda: "PROMISC" not in link_flags(direct), 10)
                info["direct_nic_promiscuous"] = promisc
                if promisc:
                    print(f"warning: {direct} stays promiscuous: ipv6/libvirt samples will leak")
                for path, dev, alias, ifname, far in (
                    ("rxfilterd", "eth0", "net0", mvt.name, "feb"),
                    ("libvirt", "eth1", "net1", direct, "fdb"),
                ):
                    nics.append(
                        Nic(path, dev, alias, ifname, Capture(ifname),
                            Sender(peer, prefixed(far), args.interval))
                    )  # fmt: skip
                rcu.set(args.rcu)
                for block in range(args.blocks):
                    for scenario in SCENARIOS:
                        # Our subscription would be served before rxfilterd's (libvirtd sends
                        # events in registration order): re-registered once it is up.
                        events.pause()
                        daemon = BenchDaemon(out / f"daemon-b{block}-{scenario}")
                        with daemon:
                            daemon.wait_ready()
                            events.resume()
                            samples += measure(
                                guest, nics[0], scenario, block, args.changes, events,
                                [daemon.pid], args.settle,
                            )  # fmt: skip
                        samples += measure(
                            guest, nics[1], scenario, block, args.changes, events, [], args.settle
                        )
                        print(f"block {block} {scenario}: done")
        finally:
            for nic in nics:
                nic.sender.close()
                nic.capture.close()
    result = report(samples)
    print_report(result)
    write_json(
        out / "first_packet.json",
        {
            "machine": info,
            "args": vars(args),
            "result": result,
            "samples": [
                asdict(s) | {"total": s.total, "guest_part": s.guest_part, "host_part": s.host_part}
                for s in samples
            ],
        },
    )
    print(f"results: {Path(out) / 'first_packet.json'}")


if __name__ == "__main__":
    main()
