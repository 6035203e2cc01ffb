"""The reconciler: one connection's domains and NICs, and when each NIC syncs.

One coalescing worker per synced NIC (a burst of events becomes one query and one
apply) and one per domain (re-reading its NICs after lifecycle and device events).
What one sync does is nic_sync's; keeping the connection up is the supervisor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from rxfilterd.config import Config
from rxfilterd.domains import Domains, DomainSync, Tracking
from rxfilterd.events import (
    ConnectionLost,
    DomainChanged,
    HypervisorError,
    HypervisorEvent,
    RunningDomain,
    RxFilterChanged,
)
from rxfilterd.host_state import MacvtapError
from rxfilterd.inventory import NicReport, TrustResolver, survey_domain
from rxfilterd.libvirt_handler import trust_changes_live
from rxfilterd.nic import DomainXmlError, parse_domain_nics
from rxfilterd.nic_sync import NicSync, NicSyncer
from rxfilterd.ports import HostNetworkPort, HypervisorPort, Tracer
from rxfilterd.sinks import Sinks
from rxfilterd.stats import Stats
from rxfilterd.supervisor import EventStream, wait
from rxfilterd.tracing import TracedHostNetwork

log = structlog.get_logger("rxfilterd")


@dataclass(frozen=True)
class Timings:
    """The reconciler's fixed waits, in seconds (tests shorten them)."""

    # At shutdown a sync in flight gets this long to finish before it is abandoned (a
    # netlink write takes milliseconds; a query to a stuck domain may never return).
    shutdown_grace: float = 1.5
    # A follow-up sync waits until a NIC's events pause this long (capped at 250 ms), so
    # a guest command that fires events over a few hundred ms costs two queries in all.
    follow_up_settle: float = 0.02
    # Ready (sd_notify) waits at most this long for every NIC's first sync.
    ready_wait: float = 10.0
    # After a failed query, how long libvirt gets to notice that the domain went away.
    query_settle: float = 0.25


class Reconciler:
    """Domains and NICs of one connection, synced through a host network's macvtaps."""

    def __init__(
        self,
        config: Config,
        network: HostNetworkPort,
        *,
        stats: Stats | None = None,
        sinks: Sinks | None = None,
        on_ready: Callable[[], None] = lambda: None,
        on_status: Callable[[], None] = lambda: None,
        timings: Timings | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.network = network
        self.stats = stats or Stats()
        self.sinks = sinks or Sinks()
        # The connection's name, on every NIC it finds ("host", "pod/<name>").
        self.libvirt = self.sinks.libvirt
        self.timings = timings = timings or Timings()
        self._on_ready = on_ready
        self._on_status = on_status
        self._tracer = tracer
        if tracer is not None:
            network = TracedHostNetwork(network, tracer)
        self._syncer = NicSyncer(
            network, self.stats, self.sinks.decide, query_settle=timings.query_settle
        )
        self._hypervisor: HypervisorPort | None = None
        self._domains = Domains(
            self.sinks,
            self.stats,
            domain_job=self._reconcile_domain,
            nic_job=self._sync_nic,
            settle=timings.follow_up_settle,
            subscribe=self._subscribe,
            unsubscribe=self._unsubscribe,
        )
        self._ready = False
        self._ready_task: asyncio.Task[None] | None = None
        # Until ready: the NICs whose first sync it waits for (by id: NicSync is not
        # hashable), and what is set when the last of them has had it.
        self._unsynced: dict[int, NicSync] = {}
        self._all_synced = asyncio.Event()
        self._shutting_down = False

    def reload(self, config: Config) -> None:
        """New settings take effect from the next sync of each NIC."""
        self.config = config
        self._domains.set_rate(config.sync.max_syncs_per_second)

    def tracking(self) -> Tracking:
        """What is tracked now (for tests and the debug log)."""
        return self._domains.tracking()

    def close(self) -> None:
        """The reconciler will not serve again: no ready notice any more."""
        if self._ready_task is not None:
            self._ready_task.cancel()

    def withdraw(self) -> None:
        """Its libvirt is gone for good (a pod ended): every NIC it knew is gone too."""
        self._domains.withdraw()

    # The session the supervisor runs on each connection.
    async def serve(
        self, hypervisor: HypervisorPort, events: EventStream, stop: asyncio.Event, cause: str
    ) -> str | None:
        """Sync everything, then follow events; the reason if the connection is lost."""
        self._hypervisor = hypervisor
        await self._reconcile_all(cause)
        # NICs known before the connection dropped that are not there any more.
        self._domains.withdraw(
            keep={(d.name, a) for d in self._domains.by_uuid.values() for a in d.reports}
        )
        if not self._ready and self._ready_task is None:
            self._unsynced = {id(n): n for n in self._domains.nics() if n.last_sync is None}
            # Not awaited here: a stuck domain must not hold up events for the others.
            self._ready_task = asyncio.get_running_loop().create_task(self._announce_ready())
        self._on_status()
        watch = asyncio.get_running_loop().create_task(self._watch_trust(hypervisor, stop))
        events.follow(self._dispatch)
        try:
            return await self._follow(events, stop)
        finally:
            events.follow(None)
            watch.cancel()

    async def _follow(self, events: EventStream, stop: asyncio.Event) -> str | None:
        next_resync = self._next_resync()
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                timeout = None if next_resync is None else max(0, next_resync - time.monotonic())
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait(
                    {get, stop_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    if not stop.is_set():  # resync timer
                        await self._reconcile_all("resync")
                        next_resync = self._next_resync()
                    continue
                event = get.result()
                if isinstance(event, ConnectionLost):
                    return event.reason
                self._dispatch(event)
        finally:
            stop_wait.cancel()
        return None

    def _next_resync(self) -> float | None:
        interval = self.config.sync.resync_interval
        return time.monotonic() + interval if interval > 0 else None

    async def disconnected(self, *, stopping: bool) -> None:
        """Forget every domain; syncs in flight get the shutdown grace to finish."""
        self._shutting_down = stopping
        why = "stopping" if stopping else "disconnected"
        grace = self.timings.shutdown_grace
        hypervisor = self._hypervisor
        tasks = [self._domains.drop(u, why, hypervisor, grace) for u in list(self._domains.by_uuid)]
        await asyncio.gather(*(t for t in tasks if t is not None))
        self._hypervisor = None

    async def _watch_trust(self, hypervisor: HypervisorPort, stop: asyncio.Event) -> None:
        """Re-read domains whose untrusted NICs libvirt may trust live (>= 10.0).

        update-device --live grants trust without any event. One XMLDesc per watched
        domain and interval; the domain is surveyed again only when a NIC changed.
        """
        if not trust_changes_live(hypervisor.version):
            return
        while self.config.libvirt.trust_poll > 0 and not stop.is_set():
            await wait(stop, self.config.libvirt.trust_poll)
            for domain in [d for d in self._domains.by_uuid.values() if _may_be_granted(d)]:
                try:
                    xml = await hypervisor.domain_xml(domain.uuid)
                    nics = {n.alias: n for n in parse_domain_nics(xml or "<domain/>", self.libvirt)}
                except (HypervisorError, DomainXmlError):
                    continue  # the domain worker and the resync deal with these
                known = {alias: report.nic for alias, report in domain.reports.items()}
                if xml is not None and nics != known and domain.worker is not None:
                    domain.worker.kick("trust")

    async def _announce_ready(self) -> None:
        """Ready once every synced NIC had its first sync (or a failure logged)."""
        if self._unsynced:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_synced.wait(), timeout=self.timings.ready_wait)
        self._unsynced = {}
        self._ready = True
        self._on_ready()

    def _dispatch(self, event: HypervisorEvent) -> None:
        if self._tracer is not None:
            self._tracer.dispatched(event, time.time())
        if isinstance(event, RxFilterChanged):
            self._filter_changed(event)
        elif isinstance(event, DomainChanged):
            self._domain_changed(event)

    def _filter_changed(self, event: RxFilterChanged) -> None:
        log.debug("rx-filter event", domain=event.domain, alias=event.alias)
        domain = self._domains.get(event.uuid)
        nic = domain.nics.get(event.alias) if domain else None
        if nic is not None and nic.worker is not None:
            nic.worker.kick("event")
        elif domain is None or _worth_a_look(domain.reports.get(event.alias)):
            # A NIC we have not seen (hot-plugged, or a domain just started), or an
            # untrusted one speaking up: nobody queries it but libvirt, and libvirt
            # only queries trusted NICs, so its trust may have been granted live.
            self._domains.worker(event.uuid, event.domain).kick("event")

    def _domain_changed(self, event: DomainChanged) -> None:
        if event.change == "defined" and self._domains.get(event.uuid) is None:
            return  # a domain that does not run: nothing to sync
        log.info("domain event", domain=event.domain, change=event.change, detail=event.detail)
        if event.change == "stopped":
            # At once, not in a task: a start right behind it must find a clean slate.
            self._domains.drop(event.uuid, f"stopped ({event.detail})", self._hypervisor)
        elif event.change == "reboot":
            # QEMU restores the MAC and clears the tables on reset without an event.
            domain = self._domains.get(event.uuid)
            for nic in domain.nics.values() if domain else ():
                if nic.worker is not None:
                    nic.worker.kick("reset")
        else:
            # Started (booted, restored, migrated in), resumed, or a NIC came or went.
            self._domains.worker(event.uuid, event.domain).kick(event.change)

    async def _subscribe(self, uuid: str) -> None:
        if self._hypervisor is None:
            raise HypervisorError("not connected")
        await self._hypervisor.subscribe(uuid)

    async def _unsubscribe(self, uuid: str) -> None:
        if self._hypervisor is not None:
            await self._hypervisor.unsubscribe(uuid)

    async def _survey(
        self,
        hypervisor: HypervisorPort,
        domain: DomainSync,
        found: RunningDomain,
        trusts: TrustResolver,
    ) -> list[NicReport]:
        """DOMAIN's NICs as FOUND says, its filter events subscribed first (unless muted):
        a change after the subscription gets an event, one before it the first query."""
        if domain.mute is None or not domain.mute.muted:
            await hypervisor.subscribe(domain.uuid)
        return await survey_domain(self.libvirt, found, self.network, trusts)

    async def _reconcile_all(self, cause: str) -> None:
        """Re-read every running domain and sync every trusted NIC."""
        hypervisor = self._hypervisor
        assert hypervisor is not None
        try:
            running = await hypervisor.running_domains()
        except HypervisorError as exc:
            self.stats.error(f"listing domains: {exc}")
            log.warning("cannot list domains", error=str(exc))
            return
        trusts = TrustResolver(hypervisor, self._domains.ports)
        seen = set()
        for found in running:
            seen.add(found.uuid)
            self._domains.worker(found.uuid, found.name)
            domain = self._domains.by_uuid[found.uuid]
            try:
                reports = await self._survey(hypervisor, domain, found, trusts)
            except (HypervisorError, MacvtapError) as exc:
                log.warning("cannot read domain", domain=found.name, error=str(exc))
                continue
            if self._domains.get(found.uuid) is domain:
                self._domains.update(domain, found.name, reports, cause, self.config)
        for uuid in set(self._domains.by_uuid) - seen:
            self._domains.drop(uuid, "not running", hypervisor)
        self._domains.forget_unplugged_ports()

    async def _reconcile_domain(self, domain: DomainSync, cause: str) -> None:
        hypervisor = self._hypervisor
        if hypervisor is None:
            return
        try:
            found = await hypervisor.domain(domain.uuid)
            if found is None:
                self._domains.drop(domain.uuid, "not running", hypervisor)
                return
            trusts = TrustResolver(hypervisor, self._domains.ports)
            reports = await self._survey(hypervisor, domain, found, trusts)
        except (HypervisorError, MacvtapError) as exc:
            self.stats.error(f"reading domain {domain.uuid}: {exc}")
            log.warning("cannot read domain", uuid=domain.uuid, error=str(exc))
            return
        # Dropped (stopped) while we were reading it: what we read is already stale.
        if self._domains.get(domain.uuid) is domain:
            self._domains.update(domain, found.name, reports, cause, self.config)

    async def _sync_nic(self, nic: NicSync, cause: str) -> None:
        """Query, plan, apply. Every failure is logged and retried for this NIC only."""
        hypervisor = self._hypervisor
        if hypervisor is None:
            return
        trusts = TrustResolver(hypervisor, self._domains.ports, replug=False)
        try:
            outcome = await self._syncer.sync(
                hypervisor, self.config, nic, cause, lambda: self._shutting_down, trusts
            )
        finally:
            self.sinks.nic_state(nic.report, nic)
            if self._unsynced.pop(id(nic), None) is not None and not self._unsynced:
                self._all_synced.set()
        if outcome == "stale":
            # Re-read the domain: it stops this NIC's worker if the NIC is not ours.
            domain = self._domains.get(nic.report.nic.uuid)
            if domain is not None and domain.worker is not None:
                domain.worker.kick("trust")


def _may_be_granted(domain: DomainSync) -> bool:
    """Whether DOMAIN has an untrusted macvtap NIC (its trust or its port may change)."""
    return any(r.verdict.reason == "untrusted" for r in domain.reports.values())


def _worth_a_look(report: NicReport | None) -> bool:
    """Whether a filter event for this NIC calls for re-reading its domain."""
    return report is None or report.verdict.reason == "untrusted"
