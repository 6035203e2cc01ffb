"""The hypervisor: our libvirt connection. Nothing else imports libvirt.

libvirt API calls are blocking RPCs, and `qemuMonitorCommand` waits for the domain's
job lock, which a busy domain can hold for seconds. So libvirt's own event loop runs in
a thread of its own, callbacks hand events to asyncio with `call_soon_threadsafe`, and
every call runs in a worker thread. Calls that touch one domain's monitor are
serialised per domain, so a stuck domain ties up one worker, never the event loop or
another domain.

A guest changing its filter non-stop sends hundreds of events a second (libvirt's own
handler queries a trusted NIC on each, which re-arms QEMU's event at once), and each
hand-over wakes the event loop. The event thread therefore hands over one filter event
per NIC and drops the NIC's further ones (but one every 10 ms) until a query of ours for
it starts: that query, sent after they arrived, answers them all (rxfilterd.event_holds).
Filter events are subscribed per domain, so that the reconciler can stop libvirtd sending
a noisy domain's while the NIC waits out its rate limit (rxfilterd.filter_mute): even a
dropped event costs libvirt's client library and libvirt-python ~70 us to receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from rxfilterd.event_holds import EventHolds
from rxfilterd.events import (
    ConnectionLost,
    DomainChange,
    DomainChanged,
    HypervisorError,
    HypervisorEvent,
    RunningDomain,
    RxFilterChanged,
)
from rxfilterd.libvirt_handler import unsupported
from rxfilterd.ports import EventHandler, LiveXml, Tracer

__all__ = [
    "ConnectionLost",
    "DomainChanged",
    "Hypervisor",
    "HypervisorError",
    "HypervisorEvent",
    "RunningDomain",
    "RxFilterChanged",
]

_T = TypeVar("_T")

_GONE_CODES = {
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_OPERATION_INVALID,  # "domain is not running"
    libvirt.VIR_ERR_NO_NETWORK,
    getattr(libvirt, "VIR_ERR_NO_NETWORK_PORT", -1),
}


def _error(exc: libvirt.libvirtError) -> HypervisorError:
    """EXC as the rest of rxfilterd sees it: its message, and whether the thing is gone."""
    gone = exc.get_error_code() in _GONE_CODES
    return HypervisorError(exc.get_error_message() or str(exc), gone=gone)


# A migrated-in or restored domain arrives as STARTED then RESUMED (detail "migrated"
# or "restored"): its guest state, rx filter included, came with it and QEMU emits no
# rx-filter event for it, so both re-read the domain and sync every NIC.
_LIFECYCLE: dict[int, DomainChange] = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "stopped",
    # `update-device --live --config` (and any redefinition) says only this: the live
    # definition, trust included, may have changed too.
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
}


def _details(prefix: str) -> dict[int, str]:
    return {
        value: name.removeprefix(prefix).lower().replace("_", "-")
        for name, value in vars(libvirt).items()
        if name.startswith(prefix)
    }


_DETAILS: dict[int, dict[int, str]] = {
    event: _details(f"VIR_DOMAIN_EVENT_{word}_")
    for event, word in (
        (libvirt.VIR_DOMAIN_EVENT_STARTED, "STARTED"),
        (libvirt.VIR_DOMAIN_EVENT_RESUMED, "RESUMED"),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, "STOPPED"),
        (libvirt.VIR_DOMAIN_EVENT_CRASHED, "CRASHED"),
        (libvirt.VIR_DOMAIN_EVENT_DEFINED, "DEFINED"),
    )
}

# How long opening the connection may take: a hung libvirtd must not hang us.
CONNECT_TIMEOUT = 10.0
# libvirtd serves at most 5 calls at once per client connection (max_client_requests),
# and a query to a hung QEMU holds its slot until QEMU answers. Queries therefore go
# over a few connections of their own, to the least busy one: many hung domains
# cannot starve the others (each domain has at most one query in flight).
QUERY_CONNECTIONS = 3


# libvirt's domain handles by UUID (libvirt-python has no type hints: Any to mypy).
DomainHandles = dict[str, "libvirt.virDomain"]


def _handle(conn: Any, domains: DomainHandles, uuid: str) -> Any:
    """The domain's handle on CONN, looked up once and kept in DOMAINS (CONN's)."""
    dom = domains.get(uuid)
    if dom is None:
        dom = domains[uuid] = conn.lookupByUUIDString(uuid)
    return dom


@dataclass(frozen=True)
class _Query:
    uuid: str
    alias: str
    command: str
    then_xml: bool


@dataclass
class _QueryConnection:
    conn: Any
    in_flight: int = 0
    # virDomain handles belong to one connection, so each keeps its own.
    domains: DomainHandles = field(default_factory=dict)


_event_impl_lock = threading.Lock()
_event_impl_started = False


def _start_event_thread() -> None:
    """libvirt's default event loop, once per process, in a daemon thread."""
    global _event_impl_started
    with _event_impl_lock:
        if _event_impl_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_impl_started = True


def _silence_libvirt_stderr() -> None:
    # libvirt prints every error to stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class _Subscriptions:
    """The connection's event callbacks: libvirt's events, handed to ON_EVENT on the loop."""

    def __init__(self, on_event: EventHandler, tracer: Tracer | None) -> None:
        self._on_event = on_event
        self._tracer = tracer
        self.holds = EventHolds()
        # Each NIC's event data is the same string every time: parsed once per NIC.
        self._aliases: dict[str, str] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lost = False
        # Filter event subscriptions by domain UUID (callback IDs).
        self.filter_callbacks: dict[str, int] = {}
        self._domain_callbacks: list[int] = []

    def register(self, conn: Any) -> None:
        # Keepalive makes a dead libvirtd show up as a close event within ~20 s.
        conn.setKeepAlive(5, 3)
        conn.registerCloseCallback(self._closed, None)
        self._domain_callbacks = [
            conn.domainEventRegisterAny(None, event_id, callback, None)
            for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._reboot),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._device_added),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._device_removed),
            )
        ]

    # Subscribing and unsubscribing run on one thread, in the order asked: an
    # unsubscribe whose caller was cancelled still runs before a later subscribe.
    def subscribe(self, conn: Any, uuid: str, domains: DomainHandles) -> None:
        if uuid in self.filter_callbacks:
            return
        # libvirtd filters by domain: an unsubscribed domain's events are never sent.
        self.filter_callbacks[uuid] = int(
            libvirt_qemu.qemuMonitorEventRegister(
                conn,
                _handle(conn, domains, uuid),
                "NIC_RX_FILTER_CHANGED",
                self._qemu_event,
                None,
                0,
            )
        )

    def unsubscribe(self, conn: Any, uuid: str) -> None:
        callback_id = self.filter_callbacks.pop(uuid, None)
        if callback_id is not None:
            with contextlib.suppress(libvirt.libvirtError):  # the connection went meanwhile
                libvirt_qemu.qemuMonitorEventDeregister(conn, callback_id)

    # Callbacks below run on libvirt's event thread: hand over, never block.
    def _emit(self, event: HypervisorEvent) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing during shutdown
                loop.call_soon_threadsafe(self._on_event, event)

    def _qemu_event(
        self, _conn: Any, dom: Any, _event: str, seconds: int, micros: int, details: Any, _o: Any
    ) -> None:
        alias = self._aliases.get(details) if isinstance(details, str) else None
        if alias is None:
            alias = self._alias(details)
            if alias is None:
                return
        uuid = dom.UUIDString()
        tracer = self._tracer
        if not self.holds.admit(uuid, alias):
            if tracer is not None:
                event = RxFilterChanged(uuid, dom.name(), alias, seconds + micros / 1e6)
                tracer.event_received(event, time.time())
            return
        at = time.time() if tracer is not None else 0.0
        event = RxFilterChanged(uuid, dom.name(), alias, seconds + micros / 1e6)
        self._emit(event)
        if tracer is not None:  # after the hand-over, which it must not delay
            tracer.event_received(event, at)

    def _alias(self, details: Any) -> str | None:
        """The NIC's alias from the event's data (libvirt-python gives it as JSON text)."""
        data = details
        if isinstance(details, str):
            try:
                data = json.loads(details)
            except ValueError:
                return None
        alias = data.get("name") if isinstance(data, dict) else None
        if not isinstance(alias, str):
            return None
        if isinstance(details, str):
            if len(self._aliases) >= 4096:  # NICs come and go: bounded
                self._aliases.clear()
            self._aliases[details] = alias
        return alias

    def _domain_event(self, dom: Any, change: DomainChange, detail: str = "") -> None:
        uuid = dom.UUIDString()
        # Before the hand-over: a filter event behind this one is handed over too.
        self.holds.release(uuid)
        self._emit(DomainChanged(uuid, dom.name(), change, detail))

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _o: Any) -> None:
        change = _LIFECYCLE.get(event)
        if change is not None:
            self._domain_event(dom, change, _DETAILS.get(event, {}).get(detail, str(detail)))

    def _reboot(self, _conn: Any, dom: Any, _o: Any) -> None:
        self._domain_event(dom, "reboot")

    def _device_added(self, _conn: Any, dom: Any, _dev: str, _o: Any) -> None:
        self._domain_event(dom, "device-added")

    def _device_removed(self, _conn: Any, dom: Any, _dev: str, _o: Any) -> None:
        self._domain_event(dom, "device-removed")

    def _closed(self, _conn: Any, reason: int, _o: Any) -> None:
        self.lost = True
        names = {
            libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
            libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
            libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
            libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
        }
        self._emit(ConnectionLost(names.get(reason, f"reason {reason}")))

    def deregister(self, conn: Any) -> None:
        # Registered callbacks hold references to the connection: without these the
        # client side of every dropped connection would live on until exit.
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        for uuid in list(self.filter_callbacks):
            self.unsubscribe(conn, uuid)
        for callback_id in self._domain_callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        self._domain_callbacks = []


class Hypervisor:
    """One libvirt connection with its event subscriptions."""

    def __init__(
        self,
        uri: str,
        on_event: EventHandler,
        *,
        tracer: Tracer | None = None,
        subscribe: bool = True,
        workers: int = 16,
        queries: int = QUERY_CONNECTIONS,
    ) -> None:
        self._uri = uri
        self._tracer = tracer
        self._events = _Subscriptions(on_event, tracer)
        self._subscribe = subscribe
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        self._conn: Any = None
        self._domain_locks: dict[str, asyncio.Lock] = {}
        # Filter event subscriptions change on this one thread, in order.
        self._ordered = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libvirt-sub")
        self._domains: DomainHandles = {}
        self._queries: list[_QueryConnection] = []
        self._query_count = queries
        # libvirt's version, packed (major * 1e6 + minor * 1e3 + micro); 0 until connected.
        self.version = 0

    async def _call(
        self, fn: Callable[..., _T], *args: Any, pool: ThreadPoolExecutor | None = None
    ) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool or self._pool, fn, *args)
        except libvirt.libvirtError as exc:
            raise _error(exc) from None

    async def connect(self) -> None:
        """Open the connection and subscribe to the events rxfilterd needs."""
        _silence_libvirt_stderr()
        if self._subscribe:
            _start_event_thread()
        self._events.loop = asyncio.get_running_loop()
        self._events.lost = False
        self._events.filter_callbacks.clear()  # they went with the old connection
        self._domains.clear()
        try:
            await asyncio.wait_for(self._open(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise HypervisorError(f"no answer within {CONNECT_TIMEOUT:g} s") from None

    async def _open(self) -> None:
        conn = await self._call(libvirt.open, self._uri)
        self._conn = conn
        # The daemon's version (for a remote or socket URI, not our client library's).
        self.version = await self._call(conn.getLibVersion)
        problem = unsupported(self.version)
        if problem is not None:
            raise HypervisorError(problem)
        if self._subscribe:
            await self._call(self._events.register, conn)
            for _ in range(self._query_count):
                extra = await self._call(libvirt.open, self._uri)
                self._queries.append(_QueryConnection(extra))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        queries, self._queries = self._queries, []
        self._domains.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(self._close_quietly, conn), timeout=1)
        for query in queries:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(query.conn.close), timeout=1)

    def _close_quietly(self, conn: Any) -> None:
        self._events.deregister(conn)
        conn.close()

    def shutdown(self) -> None:
        # Worker threads stuck in a libvirt call must not hold up process exit.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._ordered.shutdown(wait=False, cancel_futures=True)

    # Filter event subscriptions, per domain.
    async def subscribe(self, uuid: str) -> None:
        """Receive the running domain's filter events from now on (again); idempotent."""
        if not self._subscribe:
            return
        try:
            await self._call(
                self._events.subscribe, self._conn, uuid, self._domains, pool=self._ordered
            )
        except HypervisorError as exc:
            if not exc.gone:
                raise
            self._domains.pop(uuid, None)

    async def unsubscribe(self, uuid: str) -> None:
        """No more filter events of the domain until subscribe() (events in flight aside)."""
        await self._call(self._events.unsubscribe, self._conn, uuid, pool=self._ordered)

    # Look-ups
    async def running_domains(self) -> list[RunningDomain]:
        self._events.holds.clear()  # every domain is surveyed again
        return await self._call(self._running_domains)

    def _running_domains(self) -> list[RunningDomain]:
        found = []
        for dom in self._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                found.append(RunningDomain(dom.UUIDString(), dom.name(), dom.XMLDesc(0)))
            except libvirt.libvirtError:
                continue  # stopped between the list and the look-up
            self._domains[dom.UUIDString()] = dom
        return found

    async def domain(self, uuid: str) -> RunningDomain | None:
        """The running domain's live XML, or None if it is not running."""
        self._events.holds.release(uuid)  # a survey: see EventHolds
        try:
            return await self._call(self._domain, uuid)
        except HypervisorError as exc:
            if exc.gone:
                self._domains.pop(uuid, None)
                return None
            raise

    def _domain(self, uuid: str) -> RunningDomain | None:
        dom = self._conn.lookupByUUIDString(uuid)
        if not dom.isActive():
            return None
        self._domains[uuid] = dom
        return RunningDomain(uuid, dom.name(), dom.XMLDesc(0))

    async def domain_xml(self, uuid: str) -> str | None:
        """The running domain's live XML in one call (None if it is not running)."""
        try:
            return await self._call(self._domain_xml, uuid)
        except HypervisorError as exc:
            if exc.gone:
                self._domains.pop(uuid, None)
                return None
            raise

    def _domain_xml(self, uuid: str) -> str:
        return str(_handle(self._conn, self._domains, uuid).XMLDesc(0))

    async def network_xml(self, name: str) -> str | None:
        try:
            return await self._call(lambda: self._conn.networkLookupByName(name).XMLDesc(0))
        except HypervisorError as exc:
            if exc.gone:
                return None
            raise

    async def network_port_xml(self, network: str, portid: str) -> str | None:
        """A network port's XML (libvirt's record of a plugged NIC), None if there is none."""
        try:
            return await self._call(self._network_port_xml, network, portid)
        except HypervisorError as exc:
            if exc.gone:
                return None
            raise

    def _network_port_xml(self, network: str, portid: str) -> str:
        net = self._conn.networkLookupByName(network)
        return str(net.portLookupByUUIDString(portid).XMLDesc(0))

    async def query_rx_filter(self, uuid: str, alias: str) -> str:
        """The raw QMP reply to query-rx-filter for ALIAS (re-arms QEMU's event)."""
        reply, _ = await self._query_rx_filter(uuid, alias, then_xml=False)
        return reply

    async def query_rx_filter_then_xml(self, uuid: str, alias: str) -> tuple[str, LiveXml]:
        """query_rx_filter, then the domain's live XML read right after it in the same
        pool call (no return to the loop between them): None if the domain is not
        running any more, a HypervisorError if that read failed."""
        return await self._query_rx_filter(uuid, alias, then_xml=True)

    async def _query_rx_filter(
        self, uuid: str, alias: str, *, then_xml: bool
    ) -> tuple[str, LiveXml]:
        started = time.time() if self._tracer is not None else 0.0
        lock = self._domain_locks.setdefault(uuid, asyncio.Lock())
        command = json.dumps({"execute": "query-rx-filter", "arguments": {"name": alias}})
        try:
            async with lock:
                # Events from here on are handed over: this query may not answer them.
                self._events.holds.release(uuid, alias)
                query = _Query(uuid, alias, command, then_xml)
                if not self._queries:  # a connection without subscriptions (explain)
                    return await self._call(self._monitor_command, self._conn, self._domains, query)
                chosen = min(self._queries, key=lambda q: q.in_flight)
                chosen.in_flight += 1
                try:
                    return await self._call(
                        self._monitor_command, chosen.conn, chosen.domains, query
                    )
                finally:
                    chosen.in_flight -= 1
        finally:
            if self._tracer is not None:
                self._tracer.step("query", alias, started, time.time())

    def _monitor_command(
        self, conn: Any, domains: DomainHandles, query: _Query
    ) -> tuple[str, LiveXml]:
        # In a pool thread.
        started = time.time() if self._tracer is not None else 0.0
        try:
            dom = _handle(conn, domains, query.uuid)
            reply = str(libvirt_qemu.qemuMonitorCommand(dom, query.command, 0))
        finally:
            if self._tracer is not None:
                self._tracer.step("call", query.alias, started, time.time())
        if not query.then_xml:
            return reply, None
        try:
            return reply, str(dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            error = _error(exc)
            return reply, None if error.gone else error

    def forget(self, uuid: str) -> None:
        if self._conn is not None:
            # Not awaited: a domain that stopped sends no more events meanwhile. Always
            # asked: a subscribe may still be on its way on the ordered thread.
            with contextlib.suppress(RuntimeError):  # shut down already
                self._ordered.submit(self._events.unsubscribe, self._conn, uuid)
        self._events.holds.release(uuid)
        self._domains.pop(uuid, None)
        self._domain_locks.pop(uuid, None)
        for query in self._queries:
            query.domains.pop(uuid, None)
