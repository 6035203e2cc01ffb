"""The daemon: follows libvirt's events and decides which NIC syncs when.

One coalescing worker per synced NIC (a burst of events becomes one query and one
apply) and one per domain (re-reading its NICs after lifecycle and device events).
What one sync does is nic_sync's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from rxfilterd.config import Config
from rxfilterd.hypervisor import (
    ConnectionLost,
    DomainChanged,
    Hypervisor,
    HypervisorError,
    HypervisorEvent,
    RxFilterChanged,
)
from rxfilterd.inventory import NicReport, TrustResolver, survey_domain
from rxfilterd.libvirt_handler import LIBVIRT_WRITES, trust_changes_live
from rxfilterd.macvtap import HostNetwork, MacvtapError
from rxfilterd.nic import DomainXmlError, parse_domain_nics
from rxfilterd.nic_sync import NicSync, NicSyncer, SyncOutcome, retry_delay
from rxfilterd.stats import Stats
from rxfilterd.worker import CoalescingWorker

log = structlog.get_logger("rxfilterd")

# A decision record goes to every sink (the log always; MQTT when enabled).
DecisionSink = Callable[[dict[str, Any]], None]

# Each NIC's current state, (domain, alias, state); None when the NIC is gone.
StateSink = Callable[[str, str, dict[str, Any] | None], None]


# At shutdown a sync in flight gets this long to finish before it is abandoned (a
# netlink write takes milliseconds; a query to a stuck domain may never return).
SHUTDOWN_GRACE = 1.5
# A follow-up sync waits until a NIC's events pause this long (capped at 250 ms), so a
# guest command that fires events over a few hundred ms costs two queries in all.
FOLLOW_UP_SETTLE = 0.02
# Ready (sd_notify) waits at most this long for every NIC's first sync.
READY_WAIT = 10.0


@dataclass
class DomainSync:
    uuid: str
    name: str
    worker: CoalescingWorker | None = None
    # Every NIC by alias, synced or not, so events for skipped NICs stay quiet.
    reports: dict[str, NicReport] = field(default_factory=dict)
    nics: dict[str, NicSync] = field(default_factory=dict)


class Daemon:
    def __init__(self, config: Config, network: HostNetwork) -> None:
        self.config = config
        self.network = network
        self.stats = Stats()
        self._syncer = NicSyncer(network, self.stats, self.decide)
        self.sinks: list[DecisionSink] = []
        self.state_sinks: list[StateSink] = []
        self.on_ready: Callable[[], object] | None = None
        self.on_status: Callable[[str], object] | None = None
        self._hypervisor: Hypervisor | None = None
        # Events tagged with the connection generation they came from.
        self._events: asyncio.Queue[tuple[int, HypervisorEvent]] = asyncio.Queue()
        # Queued and not yet dispatched (the queue alone cannot say: _serve may hold
        # one it took out), and whether _serve is following events.
        self._undispatched = 0
        self._serving = False
        self._domains: dict[str, DomainSync] = {}
        self._generation = 0
        self._ready = False
        self._ready_task: asyncio.Task[None] | None = None
        # Every worker we made and have not yet told to stop, and those stopping: the
        # bookkeeping that proves nothing is left behind for a NIC or domain that went.
        self._workers: set[CoalescingWorker] = set()
        # (domain, alias) published before a disconnect, not yet seen again.
        self._unconfirmed: set[tuple[str, str]] = set()
        self._stopping: set[CoalescingWorker] = set()
        self._away_attempts = 0
        self._shutting_down = False
        # Network ports' trust by port UUID: fixed from plug to unplug, so read once.
        self._ports: dict[str, bool] = {}

    # Decisions: one structured log line each, and the same record to every sink.
    def decide(self, event: str, *, level: str = "info", **fields: Any) -> None:
        # ACTION is what the decision was, for `journalctl ACTION=applied`.
        fields.setdefault("action", event)
        getattr(log, level)(event, **fields)
        record = {"event": event, "time": time.time(), **fields}
        for sink in self.sinks:
            sink(record)

    def status(self) -> str:
        return self.stats.summary(sum(len(d.nics) for d in self._domains.values()))

    def _publish_status(self) -> None:
        if self.on_status is not None:
            self.on_status(self.status())

    def reload(self, config: Config) -> None:
        """New settings take effect from the next sync of each NIC."""
        self.config = config
        rate = config.sync.max_syncs_per_second
        for domain in self._domains.values():
            for nic in domain.nics.values():
                if nic.worker is not None:
                    nic.worker.set_rate(rate, max(1, round(rate)))

    async def run(self, stop: asyncio.Event) -> None:
        backoff = first_backoff = min(1.0, self.config.libvirt.reconnect_max)
        cause = "start"
        try:
            while not stop.is_set():
                self._generation += 1
                hypervisor = Hypervisor(
                    self.config.libvirt.uri, functools.partial(self._on_event, self._generation)
                )
                try:
                    await hypervisor.connect()
                except HypervisorError as exc:
                    await hypervisor.close()
                    hypervisor.shutdown()
                    self._error(f"cannot connect to {self.config.libvirt.uri}: {exc}")
                    self._away(f"cannot connect: {exc}", retry_in=backoff)
                    self._publish_status()
                    await _wait(stop, backoff)
                    backoff = min(backoff * 2, self.config.libvirt.reconnect_max)
                    continue
                connected_at = time.monotonic()
                self._back()
                self._hypervisor = hypervisor
                self.stats.connected = True
                lost: str | None = None
                try:
                    lost = await self._serve(hypervisor, stop, cause)
                finally:
                    self.stats.connected = False
                    self._shutting_down = stop.is_set()
                    await self._drop_all("stopping" if stop.is_set() else "disconnected")
                    self._hypervisor = None
                    await hypervisor.close()
                    hypervisor.shutdown()
                if lost is not None:
                    self._publish_status()
                    cause = "reconnect"
                    # A connection that held a while reconnects at once; one that keeps
                    # dropping right after connecting keeps backing off.
                    if time.monotonic() - connected_at >= self.config.libvirt.reconnect_max:
                        backoff = first_backoff
                    else:
                        await _wait(stop, backoff)
                        backoff = min(backoff * 2, self.config.libvirt.reconnect_max)
        finally:
            if self._ready_task is not None:
                self._ready_task.cancel()
            self._publish_status()

    def _away(self, reason: str, retry_in: float) -> None:
        """Say once that libvirt is away; each further failed attempt only at debug."""
        self._away_attempts += 1
        if self.stats.away_since is None:
            self.stats.away_since = time.time()
            self._away_attempts = 0
            log.warning("libvirt away", uri=self.config.libvirt.uri, reason=reason)
        else:
            log.debug(
                "libvirt still away",
                uri=self.config.libvirt.uri,
                reason=reason,
                attempt=self._away_attempts,
                retry_in=retry_in,
            )

    def _back(self) -> None:
        if self.stats.away_since is None:
            log.info("connected", uri=self.config.libvirt.uri)
            return
        away = time.time() - self.stats.away_since
        self.stats.away_since = None
        log.info(
            "libvirt back",
            uri=self.config.libvirt.uri,
            away_seconds=round(away, 1),
            attempts=self._away_attempts,
        )
        log.debug("connected", uri=self.config.libvirt.uri)

    def _on_event(self, generation: int, event: HypervisorEvent) -> None:
        if generation != self._generation:  # events of an old connection are stale
            return
        # A guest's filter change goes straight to its NIC's worker: the queue's
        # hand-over to _serve costs loop turns on the latency path. Only with nothing
        # queued ahead of it, so that events are still dispatched in order.
        if self._serving and self._undispatched == 0 and isinstance(event, RxFilterChanged):
            self._dispatch(event)
            return
        self._undispatched += 1
        self._events.put_nowait((generation, event))

    async def _serve(self, hypervisor: Hypervisor, stop: asyncio.Event, cause: str) -> str | None:
        """Sync everything, then follow events; the reason if the connection is lost."""
        await self._reconcile_all(cause)
        # NICs known before the connection dropped that are not there any more.
        current = {(d.name, alias) for d in self._domains.values() for alias in d.reports}
        for domain, alias in sorted(self._unconfirmed - current):
            self._publish_gone(domain, alias)
        self._unconfirmed.clear()
        if not self._ready and self._ready_task is None:
            # Not awaited here: a stuck domain must not hold up events for the others.
            self._ready_task = asyncio.get_running_loop().create_task(self._announce_ready())
        self._publish_status()
        interval = self.config.sync.resync_interval
        next_resync = time.monotonic() + interval if interval > 0 else None
        stop_wait = asyncio.ensure_future(stop.wait())
        watch = asyncio.get_running_loop().create_task(self._watch_trust(hypervisor, stop))
        self._serving = True
        try:
            while not stop.is_set():
                timeout = None if next_resync is None else max(0, next_resync - time.monotonic())
                get = asyncio.ensure_future(self._events.get())
                done, _ = await asyncio.wait(
                    {get, stop_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    if not stop.is_set():  # resync timer
                        await self._reconcile_all("resync")
                        interval = self.config.sync.resync_interval
                        next_resync = time.monotonic() + interval if interval > 0 else None
                    continue
                generation, event = get.result()
                self._undispatched -= 1
                if generation != self._generation:
                    continue  # queued by a connection that is gone
                if isinstance(event, ConnectionLost):
                    self._error(f"libvirt connection lost: {event.reason}")
                    self._away(event.reason, retry_in=0)  # before the clean-up lines
                    return event.reason
                self._dispatch(event)
        finally:
            self._serving = False
            stop_wait.cancel()
            watch.cancel()
        return None

    async def _watch_trust(self, hypervisor: Hypervisor, stop: asyncio.Event) -> None:
        """Re-read domains whose untrusted NICs libvirt may trust live (>= 10.0).

        update-device --live grants trust without any event. One XMLDesc per watched
        domain and interval; the domain is surveyed again only when a NIC changed.
        """
        if not trust_changes_live(hypervisor.version):
            return
        while self.config.libvirt.trust_poll > 0 and not stop.is_set():
            await _wait(stop, self.config.libvirt.trust_poll)
            for domain in [d for d in self._domains.values() if _may_be_granted(d)]:
                try:
                    xml = await hypervisor.domain_xml(domain.uuid)
                    nics = {n.alias: n for n in parse_domain_nics(xml or "<domain/>")}
                except (HypervisorError, DomainXmlError):
                    continue  # the domain worker and the resync deal with these
                known = {alias: report.nic for alias, report in domain.reports.items()}
                if xml is not None and nics != known and domain.worker is not None:
                    domain.worker.kick("trust")

    async def _announce_ready(self) -> None:
        """Ready once every synced NIC had its first sync (or a failure logged)."""
        waits = [nic.synced_once.wait() for d in self._domains.values() for nic in d.nics.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout=READY_WAIT)
        self._ready = True
        if self.on_ready is not None:
            self.on_ready()

    def _dispatch(self, event: HypervisorEvent) -> None:
        if isinstance(event, RxFilterChanged):
            log.debug("rx-filter event", domain=event.domain, alias=event.alias)
            domain = self._domains.get(event.uuid)
            nic = domain.nics.get(event.alias) if domain else None
            if nic is not None and nic.worker is not None:
                nic.worker.kick("event")
            elif domain is None or _worth_a_look(domain.reports.get(event.alias)):
                # A NIC we have not seen (hot-plugged, or a domain just started), or an
                # untrusted one speaking up: nobody queries it but libvirt, and libvirt
                # only queries trusted NICs, so its trust may have been granted live.
                self._domain_worker(event.uuid, event.domain).kick("event")
        elif isinstance(event, DomainChanged):
            if event.change == "defined" and event.uuid not in self._domains:
                return  # a domain that does not run: nothing to sync
            log.info("domain event", domain=event.domain, change=event.change, detail=event.detail)
            if event.change == "stopped":
                # At once, not in a task: a start right behind it must find a clean slate.
                self._drop_domain(event.uuid, f"stopped ({event.detail})")
            elif event.change == "reboot":
                # QEMU restores the MAC and clears the tables on reset without an event.
                domain = self._domains.get(event.uuid)
                for nic in domain.nics.values() if domain else ():
                    if nic.worker is not None:
                        nic.worker.kick("reset")
            else:
                # Started (booted, restored, migrated in), resumed, or a NIC came or went.
                self._domain_worker(event.uuid, event.domain).kick(event.change)

    def _domain_worker(self, uuid: str, name: str) -> CoalescingWorker:
        domain = self._domains.get(uuid)
        if domain is None:
            domain = self._domains[uuid] = DomainSync(uuid, name)
        if domain.worker is None:
            domain.worker = self._worker(
                f"domain {name}", functools.partial(self._reconcile_domain, domain)
            )
        return domain.worker

    def _worker(
        self,
        name: str,
        job: Callable[[str], Awaitable[None]],
        rate: float | None = None,
        burst: int = 1,
        settle: float = 0.0,
    ) -> CoalescingWorker:
        worker = CoalescingWorker(name, job, rate=rate, burst=burst, settle=settle)
        self._workers.add(worker)
        return worker

    def _retire(self, workers: list[CoalescingWorker], grace: float = 0.0) -> asyncio.Task[None]:
        """Stop WORKERS (in a task: callers may be one of their jobs)."""
        for worker in workers:
            self._workers.discard(worker)
            self._stopping.add(worker)

        async def stop_all() -> None:
            try:
                await asyncio.gather(*(w.stop(grace) for w in workers))
            finally:
                self._stopping.difference_update(workers)
                self._log_tracking()

        return asyncio.get_running_loop().create_task(stop_all())

    def _log_tracking(self) -> None:
        """What is tracked now; `orphans` (workers no domain or NIC owns) must be 0."""
        owned = {d.worker for d in self._domains.values() if d.worker is not None}
        owned |= {n.worker for d in self._domains.values() for n in d.nics.values() if n.worker}
        log.debug(
            "tracking",
            domains={d.name: sorted(d.nics) for d in self._domains.values()},
            workers=len(self._workers),
            stopping=len(self._stopping),
            orphans=len(self._workers - owned),
        )

    async def _reconcile_all(self, cause: str) -> None:
        """Re-read every running domain and sync every trusted NIC."""
        hypervisor = self._hypervisor
        assert hypervisor is not None
        try:
            running = await hypervisor.running_domains()
        except HypervisorError as exc:
            self._error(f"listing domains: {exc}")
            log.warning("cannot list domains", error=str(exc))
            return
        trusts = TrustResolver(hypervisor, self._ports)
        seen = set()
        for found in running:
            seen.add(found.uuid)
            self._domain_worker(found.uuid, found.name)
            domain = self._domains[found.uuid]
            try:
                reports = await survey_domain(found, self.network, trusts)
            except (HypervisorError, MacvtapError) as exc:
                log.warning("cannot read domain", domain=found.name, error=str(exc))
                continue
            if self._domains.get(found.uuid) is domain:
                self._update_domain(domain, found.name, reports, cause)
        for uuid in set(self._domains) - seen:
            self._drop_domain(uuid, "not running")
        plugged = {r.nic.portid for d in self._domains.values() for r in d.reports.values()}
        for portid in set(self._ports) - plugged:
            del self._ports[portid]

    async def _reconcile_domain(self, domain: DomainSync, cause: str) -> None:
        hypervisor = self._hypervisor
        if hypervisor is None:
            return
        try:
            found = await hypervisor.domain(domain.uuid)
            if found is None:
                self._drop_domain(domain.uuid, "not running")
                return
            reports = await survey_domain(
                found, self.network, TrustResolver(hypervisor, self._ports)
            )
        except (HypervisorError, MacvtapError) as exc:
            self._error(f"reading domain {domain.uuid}: {exc}")
            log.warning("cannot read domain", uuid=domain.uuid, error=str(exc))
            return
        # Dropped (stopped) while we were reading it: what we read is already stale.
        if self._domains.get(domain.uuid) is domain:
            self._update_domain(domain, found.name, reports, cause)

    def _update_domain(
        self, domain: DomainSync, name: str, reports: list[NicReport], cause: str
    ) -> None:
        domain.name = name
        old_reports, domain.reports = domain.reports, {r.nic.alias: r for r in reports}
        for alias, report in domain.reports.items():
            if old_reports.get(alias) != report:
                extra: dict[str, Any] = {}
                if report.verdict.action == "sync":
                    policy, source = self.config.policy_for(
                        name, report.nic.network, report.nic.portgroup
                    )
                    extra = {"policy": source, "fields": sorted(policy.fields)}
                    if report.verdict.libvirt_syncs:
                        # Said at start so nobody expects the policy to bind libvirt.
                        extra["libvirt_writes"] = list(LIBVIRT_WRITES)
                if report.trust.note:
                    extra["trust_note"] = report.trust.note
                self.decide(
                    "syncing" if report.verdict.action == "sync" else "skipped",
                    domain=name,
                    alias=alias,
                    ifname=report.nic.ifname,
                    reason=report.verdict.reason,
                    trust=report.trust.word,
                    trust_source=report.trust.source,
                    **extra,
                )
            nic = domain.nics.get(alias)
            if report.verdict.action != "sync":
                if nic is not None:
                    self._stop_nic(domain, alias)
                if old_reports.get(alias) != report:
                    self._publish_nic(report, None)  # the fleet view lists skipped NICs too
                continue
            if nic is None or nic.report != report:
                if nic is not None:
                    self._stop_nic(domain, alias)
                nic = domain.nics[alias] = NicSync(report)
                nic.worker = self._worker(
                    f"{name}/{alias}",
                    functools.partial(self._sync_nic, nic),
                    rate=self.config.sync.max_syncs_per_second,
                    burst=max(1, round(self.config.sync.max_syncs_per_second)),
                    settle=FOLLOW_UP_SETTLE,
                )
            assert nic.worker is not None
            nic.worker.kick(cause)
            if old_reports.get(alias) != report:
                self._publish_nic(report, domain.nics.get(alias))
        for alias in set(old_reports) - set(domain.reports):
            log.info("nic gone", domain=name, alias=alias)
            if alias in domain.nics:
                self._stop_nic(domain, alias)
            self._publish_gone(name, alias)
        self.stats.nics_synced = sum(len(d.nics) for d in self._domains.values())
        if set(old_reports) != set(domain.reports):
            self._log_tracking()

    def _publish_nic(self, report: NicReport, nic: NicSync | None) -> None:
        if not self.state_sinks:
            return
        state: dict[str, Any] = {
            **report.row(),
            "guest": nic.guest if nic else None,
            "host": nic.host if nic else None,
            "last_sync": nic.last_sync if nic else None,
            "result": nic.result if nic else "not synced",
        }
        for sink in self.state_sinks:
            sink(report.nic.domain, report.nic.alias, state)

    def _publish_gone(self, domain: str, alias: str) -> None:
        for sink in self.state_sinks:
            sink(domain, alias, None)

    def _stop_nic(self, domain: DomainSync, alias: str) -> None:
        nic = domain.nics.pop(alias)
        if nic.worker is not None:
            self._retire([nic.worker])

    def _drop_domain(self, uuid: str, why: str, grace: float = 0.0) -> asyncio.Task[None] | None:
        """Forget a domain and everything of it now; its workers stop in a task."""
        domain = self._domains.pop(uuid, None)
        if domain is None:
            return None
        if domain.nics:
            # Our own disconnect or shutdown is no news about the domain itself.
            level = "debug" if why in ("disconnected", "stopping") else "info"
            getattr(log, level)(
                "domain gone", domain=domain.name, why=why, nics=sorted(domain.nics)
            )
        if why not in ("disconnected", "stopping"):
            # Losing libvirt says nothing about the NICs: their state stays published
            # and is refreshed by the reconcile after the reconnect.
            for alias in domain.reports:
                self._publish_gone(domain.name, alias)
        else:
            self._unconfirmed.update((domain.name, alias) for alias in domain.reports)
        workers = [n.worker for n in domain.nics.values() if n.worker is not None]
        if domain.worker is not None:
            workers.append(domain.worker)
        for report in domain.reports.values():
            if report.nic.portid:
                self._ports.pop(report.nic.portid, None)
        if self._hypervisor is not None:
            self._hypervisor.forget(uuid)
        self.stats.nics_synced = sum(len(d.nics) for d in self._domains.values())
        return self._retire(workers, grace)

    async def _drop_all(self, why: str) -> None:
        """Forget every domain; syncs in flight get SHUTDOWN_GRACE to finish."""
        tasks = [self._drop_domain(uuid, why, SHUTDOWN_GRACE) for uuid in list(self._domains)]
        await asyncio.gather(*(t for t in tasks if t is not None))

    def _error(self, message: str) -> None:
        self.stats.error(message)

    async def _sync_nic(self, nic: NicSync, cause: str) -> None:
        """Query, plan, apply. Every failure is logged and retried for this NIC only."""
        try:
            outcome = await self._sync_once(nic, cause)
        finally:
            nic.synced_once.set()
            nic.last_sync = time.time()
            self._publish_nic(nic.report, nic)
        if outcome == "stale":
            # Re-read the domain: it stops this NIC's worker if the NIC is not ours.
            domain = self._domains.get(nic.report.nic.uuid)
            if domain is not None and domain.worker is not None:
                domain.worker.kick("trust")
            return
        if outcome == "ok":
            if nic.failures:
                log.info(
                    "recovered",
                    domain=nic.report.nic.domain,
                    alias=nic.report.nic.alias,
                    ifname=nic.report.nic.ifname,
                    after_attempts=nic.failures,
                )
            nic.failures = 0
            nic.last_failure = None
            return
        delay = self._retry_delay(nic)
        nic.failures += 1
        if nic.worker is not None:
            nic.worker.kick("retry", delay=delay)

    def _retry_delay(self, nic: NicSync) -> float:
        return retry_delay(nic.failures, self.config.sync.retry_max)

    async def _sync_once(self, nic: NicSync, cause: str) -> SyncOutcome:
        """One query, plan and apply."""
        hypervisor = self._hypervisor
        if hypervisor is None:
            return "ok"
        trusts = TrustResolver(hypervisor, self._ports, replug=False)
        return await self._syncer.once(
            hypervisor, self.config, nic, cause, lambda: self._shutting_down, trusts
        )


def _may_be_granted(domain: DomainSync) -> bool:
    """Whether DOMAIN has an untrusted macvtap NIC (its trust or its port may change)."""
    return any(r.verdict.reason == "untrusted" for r in domain.reports.values())


def _worth_a_look(report: NicReport | None) -> bool:
    """Whether a filter event for this NIC calls for re-reading its domain."""
    return report is None or report.verdict.reason == "untrusted"


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
