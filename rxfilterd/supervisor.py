"""Supervision of one libvirt connection: connect, back off, reconnect, say so once.

Each attempt is a fresh connection with a fresh EventStream, so nothing a dropped
connection still delivers reaches the session behind it. Several connections (pods)
are several supervisors, each with a session of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from rxfilterd.events import HypervisorError, HypervisorEvent, RxFilterChanged
from rxfilterd.ports import EventHandler, HypervisorFactory, HypervisorPort, Tracer
from rxfilterd.stats import Stats

log = structlog.get_logger("rxfilterd")


class EventStream:
    """One connection's events, in order.

    While a handler follows the stream, a guest's filter event goes to it within the
    connection's callback (the queue's hand-over costs loop turns on the latency
    path), but only with nothing queued ahead of it, so events keep their order.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[HypervisorEvent] = asyncio.Queue()
        # Queued and not yet taken (the queue alone cannot say: a reader may hold one
        # it took out and has not handled yet).
        self._undispatched = 0
        self._handler: EventHandler | None = None
        self._closed = False

    def put(self, event: HypervisorEvent) -> None:
        if self._closed:  # the connection is gone: what it still says is stale
            return
        handler = self._handler
        if handler is not None and self._undispatched == 0 and isinstance(event, RxFilterChanged):
            handler(event)
            return
        self._undispatched += 1
        self._queue.put_nowait(event)

    async def get(self) -> HypervisorEvent:
        """The next queued event; hand it on before awaiting anything else."""
        event = await self._queue.get()
        self._undispatched -= 1
        return event

    def follow(self, handler: EventHandler | None) -> None:
        """Filter events go straight to HANDLER when nothing is queued (None: never)."""
        self._handler = handler

    def close(self) -> None:
        self._closed = True
        self._handler = None


class Session(Protocol):
    """Protocol: what runs on each live connection (the reconciler)."""

    async def serve(
        self, hypervisor: HypervisorPort, events: EventStream, stop: asyncio.Event, cause: str
    ) -> str | None:
        """Sync everything, then follow EVENTS until STOP; the reason if the connection is lost."""
        ...

    async def disconnected(self, *, stopping: bool) -> None:
        """The connection is going (STOPPING: for good): drop what depends on it."""
        ...


class ConnectionSupervisor:
    """Keeps one libvirt connection up for a session, with capped exponential backoff."""

    def __init__(
        self,
        uri: str,
        session: Session,
        *,
        connect: HypervisorFactory,
        reconnect_max: float,
        stats: Stats,
        on_status: Callable[[], None],
        tracer: Tracer | None = None,
        queries: int = 3,
    ) -> None:
        self.uri = uri
        self._queries = queries
        self.reconnect_max = reconnect_max
        self._session = session
        self._connect = connect
        self._stats = stats
        self._on_status = on_status
        self._tracer = tracer
        self._away_attempts = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, serve, reconnect, until STOP is set."""
        backoff = first_backoff = min(1.0, self.reconnect_max)
        cause = "start"
        while not stop.is_set():
            events = EventStream()
            hypervisor = self._connect(
                self.uri, events.put, tracer=self._tracer, queries=self._queries
            )
            try:
                await hypervisor.connect()
            except HypervisorError as exc:
                events.close()
                await _close(hypervisor)
                self._stats.error(f"cannot connect to {self.uri}: {exc}")
                self._away(f"cannot connect: {exc}", retry_in=backoff)
                self._on_status()
                await wait(stop, backoff)
                backoff = min(backoff * 2, self.reconnect_max)
                continue
            connected_at = time.monotonic()
            lost = await self._serve(hypervisor, events, stop, cause)
            if lost is not None:
                self._on_status()
                cause = "reconnect"
                # A connection that held a while reconnects at once; one that keeps
                # dropping right after connecting keeps backing off.
                if time.monotonic() - connected_at >= self.reconnect_max:
                    backoff = first_backoff
                else:
                    await wait(stop, backoff)
                    backoff = min(backoff * 2, self.reconnect_max)

    async def _serve(
        self, hypervisor: HypervisorPort, events: EventStream, stop: asyncio.Event, cause: str
    ) -> str | None:
        self._back()
        self._stats.connected = True
        self._stats.libvirt_version = hypervisor.version
        try:
            lost = await self._session.serve(hypervisor, events, stop, cause)
            if lost is not None:
                self._stats.error(f"libvirt connection lost: {lost}")
                self._away(lost, retry_in=0)  # before the session's clean-up lines
            return lost
        finally:
            self._stats.connected = False
            events.close()
            await self._session.disconnected(stopping=stop.is_set())
            await _close(hypervisor)

    def _away(self, reason: str, retry_in: float) -> None:
        """Say once that libvirt is away; each further failed attempt only at debug."""
        self._away_attempts += 1
        if self._stats.away_since is None:
            self._stats.away_since = time.time()
            self._away_attempts = 0
            log.warning("libvirt away", uri=self.uri, reason=reason)
        else:
            log.debug(
                "libvirt still away",
                uri=self.uri,
                reason=reason,
                attempt=self._away_attempts,
                retry_in=retry_in,
            )

    def _back(self) -> None:
        if self._stats.away_since is None:
            log.info("connected", uri=self.uri)
            return
        away = time.time() - self._stats.away_since
        self._stats.away_since = None
        log.info(
            "libvirt back", uri=self.uri, away_seconds=round(away, 1), attempts=self._away_attempts
        )
        log.debug("connected", uri=self.uri)


async def _close(hypervisor: HypervisorPort) -> None:
    await hypervisor.close()
    hypervisor.shutdown()


async def wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep SECONDS, or less if STOP is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
