"""The floor of any daemon outside libvirtd: the least work that follows a guest's MAC.

One process, no asyncio, no worker threads: libvirt's event thread gets
NIC_RX_FILTER_CHANGED for one NIC, calls query-rx-filter at once on a connection of its
own, and writes the reported MAC to the macvtap with SIOCSIFHWADDR, the same ioctl
libvirt's own handler uses (virNetDevSetMAC). No validation, no trust, no policy, no
rate limit, no logging: it is a yardstick for bench.latency, never a way to run.

What it pays is what every external client pays on this machine: libvirtd's RPC hop for
the event, one client round trip for the query (waiting, like any qemuMonitorCommand,
for the domain job that libvirt's own query of a trusted NIC holds), and the kernel's
write. rxfilterd's latency minus this one is what rxfilterd itself adds.

    python -m bench.floor_client --domain NAME --alias net0 --ifname DEV --stamps FILE

Prints READY when subscribed; on SIGTERM writes its stamps (JSON) to FILE and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

import libvirt
import libvirt_qemu

SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1


def set_mac(sock: socket.socket, ifname: str, mac: str) -> None:
    raw = bytes.fromhex(mac.replace(":", ""))
    ifreq = struct.pack("16sH6s8x", ifname.encode(), ARPHRD_ETHER, raw)
    fcntl.ioctl(sock, SIOCSIFHWADDR, ifreq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--domain", required=True)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--ifname", required=True)
    parser.add_argument("--stamps", required=True)
    args = parser.parse_args()
    # Every thread started below inherits the mask: only sigwait sees these.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    libvirt.virEventRegisterDefaultImpl()
    events_conn = libvirt.open(args.uri)
    query_conn = libvirt.open(args.uri)
    dom_q = query_conn.lookupByName(args.domain)
    dom_e = events_conn.lookupByName(args.domain)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    command = json.dumps({"execute": "query-rx-filter", "arguments": {"name": args.alias}})
    # (QEMU's timestamp, callback, call start, call end, ioctl done, MAC or error)
    stamps: list[tuple[float, float, float, float, float, str]] = []

    def on_event(
        _conn: Any, _dom: Any, _ev: str, seconds: int, micros: int, details: Any, _o: Any
    ) -> None:
        callback = time.time()
        if isinstance(details, str):
            with contextlib.suppress(ValueError):
                details = json.loads(details)
        if not isinstance(details, dict) or details.get("name") != args.alias:
            return
        start = time.time()
        try:
            reply = libvirt_qemu.qemuMonitorCommand(dom_q, command, 0)
            end = time.time()
            mac = str(json.loads(reply)["return"][0]["main-mac"])
            set_mac(sock, args.ifname, mac)
            what = mac
        except (libvirt.libvirtError, OSError, LookupError, ValueError) as exc:
            end = time.time()
            what = f"error: {exc}"
        stamps.append((seconds + micros / 1e6, callback, start, end, time.time(), what))

    libvirt_qemu.qemuMonitorEventRegister(
        events_conn, dom_e, "NIC_RX_FILTER_CHANGED", on_event, None, 0
    )

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="floor-events", daemon=True).start()
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    with open(args.stamps, "w", encoding="utf-8") as f:
        json.dump(stamps, f)
    sys.exit(0)


if __name__ == "__main__":
    main()
