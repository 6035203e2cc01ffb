"""The daemon: wires the hypervisor and the host network to the plan.

One coalescing worker per synced NIC (a burst of events becomes one query and one
apply) and one per domain (re-reading its NICs after lifecycle and device events).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from rxfilterd.config import Config
from rxfilterd.guest_filter import GuestFilterError, parse_reply
from rxfilterd.hypervisor import (
    ConnectionLost,
    DomainChanged,
    Hypervisor,
    HypervisorError,
    HypervisorEvent,
    RxFilterChanged,
)
from rxfilterd.inventory import NetworkCache, NicReport, survey_domain
from rxfilterd.macvtap import HostNetwork, MacvtapError
from rxfilterd.plan import AddressListChange, Change, make_plan
from rxfilterd.worker import CoalescingWorker

log = structlog.get_logger("rxfilterd")

# A decision record goes to every sink (the log always; MQTT when enabled).
DecisionSink = Callable[[dict[str, Any]], None]
# Each NIC's current state, (domain, alias, state); None when the NIC is gone.
StateSink = Callable[[str, str, dict[str, Any] | None], None]


def change_fields(change: Change) -> dict[str, Any]:
    if isinstance(change, AddressListChange):
        return {
            "field": change.field,
            "old": sorted(change.old),
            "new": sorted(change.new),
            "added": sorted(change.add),
            "removed": sorted(change.remove),
        }
    return {"field": change.field, "old": change.old, "new": change.new}


@dataclass
class Stats:
    connected: bool = False
    nics_synced: int = 0
    syncs: int = 0
    queries: int = 0
    writes: int = 0
    last_error: str = ""
    last_error_time: float = 0.0

    def summary(self, nics: int) -> str:
        state = "connected" if self.connected else "not connected to libvirt"
        line = f"{state}; {nics} NICs synced; {self.writes} changes applied"
        if self.last_error:
            line += f"; last error: {self.last_error}"
        return line


@dataclass
class NicSync:
    """What the daemon keeps per synced NIC."""

    report: NicReport
    worker: CoalescingWorker | None = None
    failures: int = 0
    refused: set[tuple[str, str]] = field(default_factory=set)
    guest: dict[str, Any] | None = None
    host: dict[str, Any] | None = None
    last_sync: float | None = None
    result: str = "pending"
    noted: set[str] = field(default_factory=set)
    synced_once: asyncio.Event = field(default_factory=asyncio.Event)


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
        self.sinks: list[DecisionSink] = []
        self.state_sinks: list[StateSink] = []
        self.on_ready: Callable[[], object] | None = None
        self.on_status: Callable[[str], object] | None = None
        self._hypervisor: Hypervisor | None = None
        self._events: asyncio.Queue[HypervisorEvent] = asyncio.Queue()
        self._domains: dict[str, DomainSync] = {}
        self._generation = 0
        self._ready = False

    # Decisions: one structured log line each, and the same record to every sink.
    def decide(self, event: str, *, level: str = "info", **fields: Any) -> None:
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

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            self._generation += 1
            generation = self._generation
            hypervisor = Hypervisor(
                self.config.libvirt.uri, functools.partial(self._on_event, generation)
            )
            try:
                await hypervisor.connect()
            except HypervisorError as exc:
                self._error(f"cannot connect to {self.config.libvirt.uri}: {exc}")
                log.warning(
                    "libvirt unreachable",
                    uri=self.config.libvirt.uri,
                    error=str(exc),
                    retry_in=backoff,
                )
                hypervisor.shutdown()
                self._publish_status()
                await _wait(stop, backoff)
                backoff = min(backoff * 2, self.config.libvirt.reconnect_max)
                continue
            backoff = 1.0
            self._hypervisor = hypervisor
            self.stats.connected = True
            log.info("connected", uri=self.config.libvirt.uri)
            try:
                await self._serve(hypervisor, stop)
            finally:
                self.stats.connected = False
                await self._drop_all()
                self._hypervisor = None
                await hypervisor.close()
                hypervisor.shutdown()
                self._publish_status()

    def _on_event(self, generation: int, event: HypervisorEvent) -> None:
        if generation == self._generation:  # events of an old connection are stale
            self._events.put_nowait(event)

    async def _serve(self, hypervisor: Hypervisor, stop: asyncio.Event) -> None:
        await self._reconcile_all("start")
        if not self._ready:
            self._ready = True
            if self.on_ready is not None:
                self.on_ready()
        self._publish_status()
        interval = self.config.sync.resync_interval
        next_resync = time.monotonic() + interval if interval > 0 else None
        stop_wait = asyncio.ensure_future(stop.wait())
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
                event = get.result()
                if isinstance(event, ConnectionLost):
                    self._error(f"libvirt connection lost: {event.reason}")
                    log.warning("libvirt connection lost", reason=event.reason)
                    return
                self._dispatch(event)
        finally:
            stop_wait.cancel()

    def _dispatch(self, event: HypervisorEvent) -> None:
        if isinstance(event, RxFilterChanged):
            domain = self._domains.get(event.uuid)
            nic = domain.nics.get(event.alias) if domain else None
            if nic is not None and nic.worker is not None:
                nic.worker.kick("event")
            elif domain is None or event.alias not in domain.reports:
                # A NIC we have not seen (hot-plugged, or a domain just started).
                self._domain_worker(event.uuid, event.domain).kick("event")
        elif isinstance(event, DomainChanged):
            if event.change == "stopped":
                asyncio.get_running_loop().create_task(self._drop_domain(event.uuid, "stopped"))
            elif event.change == "reboot":
                # QEMU restores the MAC and clears the tables on reset without an event.
                domain = self._domains.get(event.uuid)
                for nic in domain.nics.values() if domain else ():
                    if nic.worker is not None:
                        nic.worker.kick("reset")
            else:
                self._domain_worker(event.uuid, event.domain).kick(event.change)

    def _domain_worker(self, uuid: str, name: str) -> CoalescingWorker:
        domain = self._domains.get(uuid)
        if domain is None:
            domain = self._domains[uuid] = DomainSync(uuid, name)
        if domain.worker is None:

            async def job(cause: str) -> None:
                await self._reconcile_domain(uuid, cause)

            domain.worker = CoalescingWorker(f"domain {name}", job)
        return domain.worker

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
        networks = NetworkCache(hypervisor)
        seen = set()
        for domain in running:
            seen.add(domain.uuid)
            self._domain_worker(domain.uuid, domain.name)
            try:
                reports = await survey_domain(domain, self.network, networks)
            except (HypervisorError, MacvtapError) as exc:
                log.warning("cannot read domain", domain=domain.name, error=str(exc))
                continue
            self._update_domain(domain.uuid, domain.name, reports, cause)
        for uuid in set(self._domains) - seen:
            await self._drop_domain(uuid, "not running")
        # Ready means every synced NIC had its first sync (or a failure logged).
        waits = [nic.synced_once.wait() for d in self._domains.values() for nic in d.nics.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout=10)

    async def _reconcile_domain(self, uuid: str, cause: str) -> None:
        hypervisor = self._hypervisor
        if hypervisor is None:
            return
        try:
            domain = await hypervisor.domain(uuid)
            if domain is None:
                await self._drop_domain(uuid, "not running")
                return
            reports = await survey_domain(domain, self.network, NetworkCache(hypervisor))
        except (HypervisorError, MacvtapError) as exc:
            self._error(f"reading domain {uuid}: {exc}")
            log.warning("cannot read domain", uuid=uuid, error=str(exc))
            return
        self._update_domain(uuid, domain.name, reports, cause)

    def _update_domain(self, uuid: str, name: str, reports: list[NicReport], cause: str) -> None:
        domain = self._domains.setdefault(uuid, DomainSync(uuid, name))
        domain.name = name
        old_reports, domain.reports = domain.reports, {r.nic.alias: r for r in reports}
        for alias, report in domain.reports.items():
            if old_reports.get(alias) != report:
                self.decide(
                    "syncing" if report.verdict.action == "sync" else "skipped",
                    domain=name,
                    alias=alias,
                    ifname=report.nic.ifname,
                    action=report.verdict.action,
                    reason=report.verdict.reason,
                    trust=report.trust.word,
                    trust_source=report.trust.source,
                )
            nic = domain.nics.get(alias)
            if report.verdict.action != "sync":
                if nic is not None:
                    self._stop_nic(domain, alias)
                continue
            if nic is None or nic.report != report:
                if nic is not None:
                    self._stop_nic(domain, alias)
                nic = domain.nics[alias] = NicSync(report)
                nic.worker = CoalescingWorker(
                    f"{name}/{alias}",
                    functools.partial(self._sync_nic, nic),
                    rate=self.config.sync.max_syncs_per_second,
                    burst=max(1, round(self.config.sync.max_syncs_per_second)),
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
            asyncio.get_running_loop().create_task(nic.worker.stop())

    async def _drop_domain(self, uuid: str, why: str) -> None:
        domain = self._domains.pop(uuid, None)
        if domain is None:
            return
        if domain.nics:
            log.info("domain gone", domain=domain.name, why=why, nics=sorted(domain.nics))
        for alias in domain.reports:
            self._publish_gone(domain.name, alias)
        workers = [n.worker for n in domain.nics.values() if n.worker is not None]
        if domain.worker is not None and asyncio.current_task() is not domain.worker._task:
            workers.append(domain.worker)
        for worker in workers:
            await worker.stop()
        if self._hypervisor is not None:
            self._hypervisor.forget(uuid)
        self.stats.nics_synced = sum(len(d.nics) for d in self._domains.values())

    async def _drop_all(self) -> None:
        for uuid in list(self._domains):
            await self._drop_domain(uuid, "disconnected")

    def _error(self, message: str) -> None:
        self.stats.last_error = message
        self.stats.last_error_time = time.time()

    async def _sync_nic(self, nic: NicSync, cause: str) -> None:
        """Query, plan, apply. Every failure is logged and retried for this NIC only."""
        try:
            ok = await self._sync_once(nic, cause)
        finally:
            nic.synced_once.set()
            nic.last_sync = time.time()
            self._publish_nic(nic.report, nic)
        if ok:
            nic.failures = 0
            return
        nic.failures += 1
        delay = min(2.0 ** (nic.failures - 1), self.config.sync.retry_max)
        if nic.worker is not None:
            nic.worker.kick("retry", delay=delay)

    async def _sync_once(self, nic: NicSync, cause: str) -> bool:
        """One query, plan and apply; False when it should be retried."""
        hypervisor = self._hypervisor
        if hypervisor is None:
            return True
        report = nic.report
        where: dict[str, Any] = {
            "domain": report.nic.domain,
            "alias": report.nic.alias,
            "ifname": report.nic.ifname,
        }

        def failed(stage: str, error: str, level: str = "warning", **extra: Any) -> bool:
            self._error(f"{report.nic.domain}/{report.nic.alias}: {error}")
            nic.result = f"failed: {error}"
            self.decide("failed", level=level, **where, stage=stage, **extra, error=error)
            return False

        self.stats.queries += 1
        try:
            reply = await hypervisor.query_rx_filter(report.nic.uuid, report.nic.alias)
        except HypervisorError as exc:
            if exc.gone:  # the domain worker cleans up after it
                return True
            return failed("query", str(exc))
        try:
            guest = parse_reply(reply, report.nic.alias)
        except GuestFilterError as exc:
            # Hostile or broken: never applied, and not retried until the guest changes.
            nic.result = f"rejected: {exc}"
            self.decide("rejected", level="warning", **where, error=str(exc))
            return True
        nic.guest = guest.summary()
        assert report.nic.ifname is not None
        try:
            host = await self.network.read(report.nic.ifname)
        except MacvtapError as exc:
            return failed("read", str(exc))
        if host is None:
            return failed("read", "macvtap is gone")
        nic.host = host.summary()
        sync = self.config.sync
        plan = make_plan(guest, host, sync.policy(), libvirt_syncs=report.verdict.libvirt_syncs)
        self.stats.syncs += 1
        for refusal in plan.refusals:
            if (refusal.field, refusal.value) not in nic.refused:
                nic.refused.add((refusal.field, refusal.value))
                self.decide(
                    "refused",
                    level="warning",
                    **where,
                    field=refusal.field,
                    value=refusal.value,
                    reason=refusal.reason,
                )
        for note in plan.notes:
            if note not in nic.noted:
                nic.noted.add(note)
                log.info("note", **where, note=note)
        nic.result = "dry-run" if sync.dry_run and plan.changes else "ok"
        for change in plan.changes:
            if sync.dry_run:
                self.decide("would-apply", **where, **change_fields(change), cause=cause)
                continue
            try:
                await self.network.apply(host, [change])
            except MacvtapError as exc:
                return failed("apply", str(exc), "error", **change_fields(change))
            self.stats.writes += 1
            self.decide("applied", **where, **change_fields(change), cause=cause)
        if plan.changes and not sync.dry_run:
            with contextlib.suppress(MacvtapError):
                after = await self.network.read(report.nic.ifname)
                nic.host = after.summary() if after else None
        if not plan.changes:
            log.debug("in sync", **where, cause=cause)
        return True


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
