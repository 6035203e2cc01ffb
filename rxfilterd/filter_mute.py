"""Muting a domain's filter events while a noisy NIC of it waits for its next sync.

A guest changing its filter non-stop makes QEMU emit an event per change (libvirt
queries a trusted NIC on each, which re-arms QEMU's one-shot event): about a thousand a
second, each costing libvirt's client library and libvirt-python some 70 us to receive
even when dropped at once (rxfilterd.event_holds). Such a NIC's worker turns noisy
(rxfilterd.worker) and waits its next sync out with its domain unsubscribed, so
libvirtd sends none of them; it subscribes again before that sync's query, which
answers every change made meanwhile.

libvirt subscribes per domain, not per NIC, so the domain's other NICs miss their events
too: when the last hold goes, each of them is synced (cause "unmuted"). That costs every
other NIC a query per cycle (about four a second), so a domain with more than MAX_NICS
synced NICs is never muted: receiving its events costs less.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from rxfilterd.events import HypervisorError

log = structlog.get_logger("rxfilterd")

# Above this many synced NICs in a domain, muting costs more queries than it saves events.
MAX_NICS = 4


class DomainMute:
    """One domain's filter events: subscribed, or muted while any NIC holds the mute."""

    def __init__(
        self,
        uuid: str,
        *,
        subscribe: Callable[[str], Awaitable[None]],
        unsubscribe: Callable[[str], Awaitable[None]],
        nics: Callable[[], int],
        resync: Callable[[NicMute], None],
        refused: Callable[[], None],
    ) -> None:
        """NICS: how many NICs are synced now; RESYNC(holder) kicks every one of them
        but HOLDER's (cause "unmuted"); REFUSED: subscribing again failed (the domain
        must be re-read)."""
        self.uuid = uuid
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._nics = nics
        self._resync = resync
        self._refused = refused
        self._holders: set[NicMute] = set()
        self._lock = asyncio.Lock()
        self.closed = False

    @property
    def muted(self) -> bool:
        return bool(self._holders)

    def close(self) -> None:
        """The domain is dropped: its subscription is the connection's business now."""
        self.closed = True
        self._holders.clear()

    def for_nic(self, domain: str, alias: str, ifname: str) -> NicMute:
        return NicMute(self, domain, alias, ifname)

    async def hold(self, holder: NicMute) -> bool:
        """Mute for HOLDER; False if declined (dropped, or too many NICs)."""
        async with self._lock:
            if self.closed or self._nics() > MAX_NICS:
                return False
            first = not self._holders
            self._holders.add(holder)
            if first:
                # Failing, the events keep coming: that costs CPU, never a change.
                with contextlib.suppress(HypervisorError):
                    await self._unsubscribe(self.uuid)
            return True

    async def release(self, holder: NicMute) -> None:
        async with self._lock:
            if holder not in self._holders:
                return
            self._holders.discard(holder)
            if self._holders or self.closed:
                return
            try:
                await self._subscribe(self.uuid)
            except HypervisorError as exc:
                log.warning("cannot subscribe again", uuid=self.uuid, error=str(exc))
                self._refused()
                return
        # Their events since the mute went unsent; a query now answers them. By worker,
        # not alias: a NIC restarted under the same alias meanwhile is synced too.
        self._resync(holder)


class NicMute:
    """The worker.Mute of one NIC: its domain's mute, and the one log line per storm."""

    def __init__(self, domain_mute: DomainMute, domain: str, alias: str, ifname: str) -> None:
        self._domain_mute = domain_mute
        self.domain = domain
        self.alias = alias
        self.ifname = ifname
        self._storm = False

    async def hold(self) -> None:
        if await self._domain_mute.hold(self) and not self._storm:
            self._storm = True
            self._say("muted", "the guest changes its filter without pause: synced on a timer")

    async def release(self) -> None:
        await self._domain_mute.release(self)

    def calm(self) -> None:
        if self._storm:
            self._storm = False
            self._say("unmuted", "the guest paused")

    def _say(self, what: str, why: str) -> None:
        fields = {"domain": self.domain, "alias": self.alias, "ifname": self.ifname}
        log.info(f"filter events {what}", **fields, why=why)
