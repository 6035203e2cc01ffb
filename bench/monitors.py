"""Monitors that watch the stack beside rxfilterd: link notifications and QEMU events.

Both stamp what they see on arrival in a thread of their own, so a benchmark can time
rxfilterd's work from outside it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from tests.support.guest import current_libvirt

RTMGRP_LINK = 1
RTM_NEWLINK = 16
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
SO_RCVBUFFORCE = 33
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200


@dataclass(frozen=True)
class LinkSample:
    """One RTM_NEWLINK notification, stamped when our reader thread got it."""

    time: float
    ifindex: int
    ifname: str
    address: str
    flags: int


class LinkMonitor:
    """Link notifications (RTNLGRP_LINK) on a raw netlink socket, read by a thread.

    The kernel puts no timestamp on netlink messages (SO_TIMESTAMP gives none), so a
    thread that does nothing but a blocking recv() stamps each one on arrival.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self._sock.bind((0, RTMGRP_LINK))
        self._sock.settimeout(0.5)
        self._watched: set[int] = set()
        self.samples: list[LinkSample] = []
        self.overruns = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bench-netlink", daemon=True)
        self._thread.start()

    def watch(self, ifindex: int) -> None:
        with self._cond:
            self._watched.add(ifindex)

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed:
                    return
                self.overruns += 1  # ENOBUFS: notifications were lost
                if exc.errno is None:
                    time.sleep(0.01)
                continue
            now = time.time()
            found = list(_parse_links(data, now))
            if found:
                with self._cond:
                    self.samples += [s for s in found if s.ifindex in self._watched]
                    self._cond.notify_all()

    def find(self, match: Callable[[LinkSample], bool]) -> LinkSample | None:
        with self._cond:
            return next((s for s in self.samples if match(s)), None)

    def wait(self, match: Callable[[LinkSample], bool], timeout: float) -> LinkSample | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hit = next((s for s in self.samples if match(s)), None)
                left = deadline - time.monotonic()
                if hit is not None or left <= 0:
                    return hit
                self._cond.wait(left)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self._sock.close()


def _parse_links(data: bytes, now: float) -> Iterable[LinkSample]:
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return
        if kind == RTM_NEWLINK and length >= 32:
            _family, _pad, _type, index, flags, _change = struct.unpack_from(
                "=BBHiII", data, offset + 16
            )
            address, name = "", ""
            at = offset + 32
            end = offset + length
            while at + 4 <= end:
                rta_len, rta_type = struct.unpack_from("=HH", data, at)
                if rta_len < 4:
                    break
                payload = data[at + 4 : at + rta_len]
                if rta_type == IFLA_ADDRESS:
                    address = ":".join(f"{b:02x}" for b in payload)
                elif rta_type == IFLA_IFNAME:
                    name = payload.rstrip(b"\0").decode(errors="replace")
                at += (rta_len + 3) & ~3
            yield LinkSample(now, index, name, address, flags)
        offset += (length + 3) & ~3


_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_libvirt_event_loop() -> None:
    """libvirt's default event loop in a thread (before opening connections)."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="bench-libvirt-events", daemon=True).start()
        _event_loop_started = True


@dataclass(frozen=True)
class QemuEvent:
    """NIC_RX_FILTER_CHANGED: QEMU's timestamp, and when it reached us through libvirt."""

    qemu_time: float
    received: float
    domain: str
    alias: str


class EventMonitor:
    """Our own NIC_RX_FILTER_CHANGED subscription (it never queries, so re-arms nothing)."""

    def __init__(self) -> None:
        start_libvirt_event_loop()
        self._conn: Any = libvirt.open(current_libvirt().uri)
        self._lock = threading.Lock()
        self.events: list[QemuEvent] = []
        self._id: int | None = None
        self.resume()

    def pause(self) -> None:
        """Stop receiving events (deregister), e.g. while another subscriber is measured."""
        if self._id is not None:
            libvirt_qemu.qemuMonitorEventDeregister(self._conn, self._id)
            self._id = None

    def resume(self) -> None:
        if self._id is None:
            self._id = libvirt_qemu.qemuMonitorEventRegister(
                self._conn, None, "NIC_RX_FILTER_CHANGED", self._event, None, 0
            )

    def _event(
        self, _conn: Any, dom: Any, _ev: str, seconds: int, micros: int, details: Any, _o: Any
    ) -> None:
        now = time.time()
        if isinstance(details, str):
            with contextlib.suppress(ValueError):
                details = json.loads(details)
        alias = details.get("name") if isinstance(details, dict) else None
        with self._lock:
            self.events.append(QemuEvent(seconds + micros / 1e6, now, dom.name(), str(alias)))

    def of(self, domain: str, alias: str | None = None, since: float = 0.0) -> list[QemuEvent]:
        """Events of DOMAIN (and ALIAS) whose QEMU timestamp is at or after SINCE."""
        with self._lock:
            return [
                e
                for e in self.events
                if e.domain == domain
                and (alias is None or e.alias == alias)
                and e.qemu_time >= since
            ]

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.pause()
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()
