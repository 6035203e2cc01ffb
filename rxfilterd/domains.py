"""The domains and NICs a reconciler tracks, and the worker each one has.

Bookkeeping only: what a domain's or a NIC's worker does is the reconciler's (the
jobs it passes in); this module starts, restarts and stops the workers as surveys
come in, and proves none is left behind.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from rxfilterd.config import Config
from rxfilterd.filter_mute import DomainMute, NicMute
from rxfilterd.inventory import NicReport
from rxfilterd.nic_sync import NicSync
from rxfilterd.ports import HypervisorPort
from rxfilterd.sinks import Sinks
from rxfilterd.stats import Stats
from rxfilterd.worker import CoalescingWorker, WorkerPool

log = structlog.get_logger("rxfilterd")


@dataclass(frozen=True)
class Tracking:
    """What a reconciler tracks at one moment; `orphans` must always be 0."""

    # Domain name -> the aliases of its synced NICs.
    domains: Mapping[str, tuple[str, ...]]
    # Workers made and not yet told to stop, those stopping, and live ones that no
    # domain or NIC owns.
    workers: int
    stopping: int
    orphans: int


@dataclass
class DomainSync:
    uuid: str
    name: str
    worker: CoalescingWorker | None = None
    # Every NIC by alias, synced or not, so events for skipped NICs stay quiet.
    reports: dict[str, NicReport] = field(default_factory=dict)
    nics: dict[str, NicSync] = field(default_factory=dict)
    mute: DomainMute | None = None


# Why a domain was dropped when it was our own doing, no news about the domain.
OUR_DOING = ("disconnected", "stopping")


class Domains:
    """Running domains by UUID, each with its NICs and their workers."""

    def __init__(
        self,
        sinks: Sinks,
        stats: Stats,
        *,
        domain_job: Callable[[DomainSync, str], Awaitable[None]],
        nic_job: Callable[[NicSync, str], Awaitable[None]],
        settle: float,
        subscribe: Callable[[str], Awaitable[None]],
        unsubscribe: Callable[[str], Awaitable[None]],
    ) -> None:
        self.sinks = sinks
        self.stats = stats
        self.by_uuid: dict[str, DomainSync] = {}
        # Network ports' trust by port UUID: fixed from plug to unplug, so read once.
        self.ports: dict[str, bool] = {}
        # (domain, alias) published before a disconnect, not yet seen again.
        self.unconfirmed: set[tuple[str, str]] = set()
        self._domain_job = domain_job
        self._nic_job = nic_job
        self._settle = settle
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._workers = WorkerPool()

    def get(self, uuid: str) -> DomainSync | None:
        return self.by_uuid.get(uuid)

    def nics(self) -> list[NicSync]:
        return [nic for d in self.by_uuid.values() for nic in d.nics.values()]

    def set_rate(self, rate: float) -> None:
        for nic in self.nics():
            if nic.worker is not None:
                nic.worker.set_rate(rate, max(1, round(rate)))

    def tracking(self) -> Tracking:
        owned = {d.worker for d in self.by_uuid.values() if d.worker is not None}
        owned |= {n.worker for n in self.nics() if n.worker is not None}
        workers, stopping, orphans = self._workers.counts(owned)
        domains = {d.name: tuple(sorted(d.nics)) for d in self.by_uuid.values()}
        return Tracking(domains, workers, stopping, orphans)

    def worker(self, uuid: str, name: str) -> CoalescingWorker:
        """The domain's worker (the domain tracked from now on, if it was not)."""
        domain = self.by_uuid.get(uuid)
        if domain is None:
            domain = self.by_uuid[uuid] = DomainSync(uuid, name)
            domain.mute = self._mute(domain)
        if domain.worker is None:
            domain.worker = self._workers.start(
                f"domain {name}", functools.partial(self._domain_job, domain)
            )
        return domain.worker

    def _mute(self, domain: DomainSync) -> DomainMute:
        def resync(holder: NicMute) -> None:
            for nic in domain.nics.values():
                if nic.worker is not None and nic.worker.mute is not holder:
                    nic.worker.kick("unmuted")

        def refused() -> None:
            if domain.worker is not None:
                domain.worker.kick("subscribe")  # the re-read subscribes again

        return DomainMute(
            domain.uuid,
            subscribe=self._subscribe,
            unsubscribe=self._unsubscribe,
            nics=lambda: len(domain.nics),
            resync=resync,
            refused=refused,
        )

    def update(
        self, domain: DomainSync, name: str, reports: list[NicReport], cause: str, config: Config
    ) -> None:
        """A fresh survey of DOMAIN: say what changed, and sync what is to be synced."""
        domain.name = name
        old_reports, domain.reports = domain.reports, {r.nic.alias: r for r in reports}
        for alias, report in domain.reports.items():
            changed = old_reports.get(alias) != report
            if changed:
                self.sinks.surveyed(name, report, config)
            self._update_nic(domain, report, cause, changed, config)
        for alias in set(old_reports) - set(domain.reports):
            log.info("nic gone", domain=name, alias=alias)
            if alias in domain.nics:
                self._stop_nic(domain, alias)
            self.sinks.nic_gone(name, alias)
        self._count_nics()
        if set(old_reports) != set(domain.reports):
            self._log_tracking()

    def _update_nic(
        self, domain: DomainSync, report: NicReport, cause: str, changed: bool, config: Config
    ) -> None:
        """Start, restart or stop the worker of one surveyed NIC, and kick it."""
        alias = report.nic.alias
        nic = domain.nics.get(alias)
        if report.verdict.action != "sync":
            if nic is not None:
                self._stop_nic(domain, alias)
            if changed:
                self.sinks.nic_state(report, None)  # the fleet view lists skipped NICs too
            return
        if nic is None or nic.report != report:
            if nic is not None:
                self._stop_nic(domain, alias)
            nic = domain.nics[alias] = NicSync(report)
            rate = config.sync.max_syncs_per_second
            assert domain.mute is not None
            nic.worker = self._workers.start(
                f"{domain.name}/{alias}",
                functools.partial(self._nic_job, nic),
                rate=rate,
                burst=max(1, round(rate)),
                settle=self._settle,
                mute=domain.mute.for_nic(domain.name, alias, report.nic.ifname or ""),
            )
        assert nic.worker is not None
        nic.worker.kick(cause)
        if changed:
            self.sinks.nic_state(report, nic)

    def drop(
        self, uuid: str, why: str, hypervisor: HypervisorPort | None, grace: float = 0.0
    ) -> asyncio.Task[None] | None:
        """Forget a domain and everything of it now; its workers stop in a task."""
        domain = self.by_uuid.pop(uuid, None)
        if domain is None:
            return None
        if domain.mute is not None:
            domain.mute.close()
        ours = why in OUR_DOING
        if domain.nics:
            level = "debug" if ours else "info"
            getattr(log, level)(
                "domain gone", domain=domain.name, why=why, nics=sorted(domain.nics)
            )
        if not ours:
            for alias in domain.reports:
                self.sinks.nic_gone(domain.name, alias)
        else:
            # Losing libvirt says nothing about the NICs: their state stays published
            # and is refreshed by the reconcile after the reconnect.
            self.unconfirmed.update((domain.name, alias) for alias in domain.reports)
        workers = [n.worker for n in domain.nics.values() if n.worker is not None]
        if domain.worker is not None:
            workers.append(domain.worker)
        for report in domain.reports.values():
            if report.nic.portid:
                self.ports.pop(report.nic.portid, None)
        if hypervisor is not None:
            hypervisor.forget(uuid)
        self._count_nics()
        return self._workers.retire(workers, grace, then=self._log_tracking)

    def withdraw(self, keep: set[tuple[str, str]] | None = None) -> None:
        """NICs known before a disconnect and not seen since (KEEP aside) are gone."""
        for domain, alias in sorted(self.unconfirmed - (keep or set())):
            self.sinks.nic_gone(domain, alias)
        self.unconfirmed.clear()

    def forget_unplugged_ports(self) -> None:
        plugged = {r.nic.portid for d in self.by_uuid.values() for r in d.reports.values()}
        for portid in set(self.ports) - plugged:
            del self.ports[portid]

    def _stop_nic(self, domain: DomainSync, alias: str) -> None:
        nic = domain.nics.pop(alias)
        if nic.worker is not None:
            self._workers.retire([nic.worker], 0.0, then=self._log_tracking)

    def _count_nics(self) -> None:
        self.stats.nics_synced = sum(len(d.nics) for d in self.by_uuid.values())

    def _log_tracking(self) -> None:
        now = self.tracking()
        log.debug(
            "tracking",
            domains={name: list(aliases) for name, aliases in now.domains.items()},
            workers=now.workers,
            stopping=now.stopping,
            orphans=now.orphans,
        )
