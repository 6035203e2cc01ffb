"""One sync of one NIC: query the guest's filter, read the host, plan, apply.

Every outcome is one decision (applied, would-apply, refused, rejected, drift, failed,
abandoned); the daemon decides when a NIC syncs and what a failure costs it (retries).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog

from rxfilterd.config import Config
from rxfilterd.guest_filter import GuestFilterError, parse_reply
from rxfilterd.host_state import HostState
from rxfilterd.hypervisor import Hypervisor, HypervisorError
from rxfilterd.inventory import NicReport, TrustResolver
from rxfilterd.macvtap import HostNetwork, MacvtapError
from rxfilterd.nic import DomainXmlError, Nic, parse_domain_nics
from rxfilterd.plan import AddressListChange, Change, host_after, make_plan
from rxfilterd.stats import Stats
from rxfilterd.worker import CoalescingWorker

log = structlog.get_logger("rxfilterd")

# After a failed query, how long libvirt gets to notice that the domain went away.
QUERY_SETTLE = 0.25

# ok: done (or nothing to retry); retry: try again later; stale: the NIC is no longer
# what the daemon synced (trust revoked, device changed or gone): re-read the domain.
SyncOutcome = Literal["ok", "retry", "stale"]


class Decide(Protocol):
    """Takes one decision: a log line, and the same record to every sink."""

    def __call__(self, event: str, *, level: str = "info", **fields: Any) -> None: ...


@dataclass
class NicSync:
    """What the daemon keeps per synced NIC."""

    report: NicReport
    worker: CoalescingWorker | None = None
    failures: int = 0
    last_failure: tuple[str, str] | None = None
    refused: set[tuple[str, str]] = field(default_factory=set)
    guest: dict[str, Any] | None = None
    host: dict[str, Any] | None = None
    last_sync: float | None = None
    result: str = "pending"
    noted: set[str] = field(default_factory=set)
    synced_once: asyncio.Event = field(default_factory=asyncio.Event)


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


def retry_delay(failures: int, retry_max: float) -> float:
    """Seconds before the next attempt after FAILURES failed ones in a row."""
    return float(min(2.0**failures, retry_max))


@dataclass
class _Progress:
    """How far one sync got, for the line that says what an interrupted sync left."""

    stage: str = "queued"
    applied: list[str] = field(default_factory=list)
    in_flight: str | None = None
    pending: list[str] = field(default_factory=list)


class NicSyncer:
    """Runs syncs against one host network; counts them in STATS."""

    def __init__(self, network: HostNetwork, stats: Stats, decide: Decide) -> None:
        self.network = network
        self.stats = stats
        self.decide = decide

    async def once(
        self,
        hypervisor: Hypervisor,
        config: Config,
        nic: NicSync,
        cause: str,
        shutting_down: Callable[[], bool],
        trusts: TrustResolver,
    ) -> SyncOutcome:
        """One query, plan and apply, written only while the NIC is still trusted."""
        progress = _Progress()
        assert nic.report.nic.ifname is not None
        # The host read does not need the guest's answer: overlap it with the query,
        # which is the slow part (a libvirt round trip and the domain's job lock).
        # A guest's event changes no link facts, only what ioctls read: quick read.
        # Every other cause (start, resync, retry) reads everything again.
        host_read = asyncio.ensure_future(
            self.network.read(nic.report.nic.ifname, quick=cause == "event")
        )
        host_read.add_done_callback(_consume)
        # Trust can change under a running NIC (libvirt >= 10.0 changes it live), and
        # nothing announces it: every sync re-reads it, beside the query, and writes
        # only if the NIC's current XML still resolves to trusted.
        current = asyncio.ensure_future(_still_ours(hypervisor, trusts, nic))
        current.add_done_callback(_consume)
        try:
            return await self._steps(hypervisor, config, nic, cause, progress, host_read, current)
        except asyncio.CancelledError:
            # Shutdown (or the NIC went) with this sync in flight: say what it leaves.
            report = nic.report
            half = bool(progress.applied) or progress.in_flight is not None
            # Only shutdown leaves work that was wanted; a NIC that went needs nothing.
            level = "warning" if half else "info" if shutting_down() else "debug"
            self.decide(
                "abandoned",
                level=level,
                domain=report.nic.domain,
                alias=report.nic.alias,
                ifname=report.nic.ifname,
                stage=progress.stage,
                cause=cause,
                applied=progress.applied,
                # Sent to the kernel, answer not seen: it may or may not have landed.
                in_flight=progress.in_flight,
                pending=progress.pending,
            )
            raise
        finally:
            host_read.cancel()
            current.cancel()

    async def _steps(
        self,
        hypervisor: Hypervisor,
        config: Config,
        nic: NicSync,
        cause: str,
        progress: _Progress,
        host_read: asyncio.Future[HostState | None],
        current: asyncio.Future[str],
    ) -> SyncOutcome:
        report = nic.report
        where: dict[str, Any] = {
            "domain": report.nic.domain,
            "alias": report.nic.alias,
            "ifname": report.nic.ifname,
        }

        def failed(
            stage: str, error: str, reason: str, level: str = "warning", **extra: Any
        ) -> Literal["retry"]:
            self.stats.error(f"{report.nic.domain}/{report.nic.alias}: {error}")
            nic.result = f"failed: {error}"
            # The same failure again on a retry is no news for the log (sinks still
            # get every attempt); a new reason, or the first one, is.
            repeat = nic.failures > 0 and nic.last_failure == (stage, reason)
            nic.last_failure = (stage, reason)
            self.decide(
                "failed",
                level="debug" if repeat else level,
                **where,
                stage=stage,
                reason=reason,
                **extra,
                error=error,
                cause=cause,
                attempt=nic.failures + 1,
                retry_in=retry_delay(nic.failures, config.sync.retry_max),
            )
            return "retry"

        assert report.nic.ifname is not None
        self.stats.queries += 1
        progress.stage = "query"
        try:
            reply = await hypervisor.query_rx_filter(report.nic.uuid, report.nic.alias)
        except HypervisorError as exc:
            # A domain being destroyed fails the query with a monitor error before
            # libvirt calls it gone: not a failure of ours (its stop event cleans up).
            if exc.gone or not await _still_running(hypervisor, report.nic.uuid):
                log.debug("domain gone during query", **where, error=str(exc))
                return "ok"
            return failed("query", str(exc), "libvirt")
        try:
            guest = parse_reply(reply, report.nic.alias)
        except GuestFilterError as exc:
            # Hostile or broken: never applied, and not retried until the guest changes.
            nic.result = f"rejected: {exc}"
            self.decide("rejected", level="warning", **where, error=str(exc))
            return "ok"
        nic.guest = guest.summary()
        progress.stage = "read"
        try:
            host = await host_read
        except MacvtapError as exc:
            return failed("read", str(exc), _reason(exc))
        if host is None:
            return failed("read", f"{report.nic.ifname}: macvtap is gone", "gone")
        nic.host = host.summary()
        progress.stage = "trust"
        try:
            why_not = await current
        except HypervisorError as exc:
            return failed("trust", str(exc), "libvirt")
        if why_not:
            # Not one write for a NIC libvirt no longer trusts (or that is not the
            # device we synced any more); the daemon re-reads the domain.
            nic.result = f"stopped: {why_not}"
            log.info("not ours any more", **where, why=why_not, cause=cause)
            return "stale"
        policy, _source = config.policy_for(
            report.nic.domain, report.nic.network, report.nic.portgroup
        )
        plan = make_plan(guest, host, policy, libvirt_syncs=report.verdict.libvirt_syncs)
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
        if cause == "resync" and plan.changes:
            # Nobody asked for a change, yet the host differs from the guest: drift.
            fields = [change_fields(c) for c in plan.changes]
            self.decide(
                "drift",
                level="warning",
                **where,
                fields=[f["field"] for f in fields],
                found={f["field"]: f["old"] for f in fields},
                expected={f["field"]: f["new"] for f in fields},
            )
        dry_run = config.sync.dry_run
        nic.result = "dry-run" if dry_run and plan.changes else "ok"
        progress.stage = "apply"
        progress.pending = [c.field for c in plan.changes]
        applied: list[Change] = []
        outcome: SyncOutcome = "ok"
        for change in plan.changes:
            progress.pending.remove(change.field)
            if dry_run:
                self.decide("would-apply", **where, **change_fields(change), cause=cause)
                continue
            progress.in_flight = change.field
            try:
                await self.network.apply(host, [change])
            except MacvtapError as exc:
                progress.in_flight = None
                # The other changes do not depend on this one: they still go in.
                outcome = failed(
                    "apply",
                    str(exc),
                    _reason(exc),
                    "error",
                    **change_fields(change),
                    pending=list(progress.pending),
                )
                if exc.errno is None:
                    break  # the link vanished: nothing more can land on it
                continue
            progress.in_flight = None
            progress.applied.append(change.field)
            applied.append(change)
            self.stats.writes += 1
            self.decide("applied", **where, **change_fields(change), cause=cause)
        if applied:
            nic.host = host_after(host, applied).summary()  # saves a netlink re-read
        log.debug("synced", **where, cause=cause, changes=len(plan.changes), outcome=outcome)
        return outcome


async def _still_ours(hypervisor: Hypervisor, trusts: TrustResolver, nic: NicSync) -> str:
    """Why NIC may not be written now ("" when it may): its current XML, resolved."""
    synced = nic.report.nic
    xml = await hypervisor.domain_xml(synced.uuid)
    if xml is None:
        return "the domain is not running"
    try:
        found = [n for n in parse_domain_nics(xml) if n.alias == synced.alias]
    except DomainXmlError:
        return "its domain XML is unreadable"
    if not found:
        return "the NIC is gone"
    # The MAC (libvirt may note the guest's) and trust may differ; not the device.
    if _device(found[0]) != _device(synced):
        return "the NIC's device changed"
    trust = await trusts.trust(found[0])
    return "" if trust.value else f"untrusted now ({trust.source})"


async def _still_running(hypervisor: Hypervisor, uuid: str) -> bool:
    await asyncio.sleep(QUERY_SETTLE)  # let libvirt notice a QEMU that just exited
    try:
        return await hypervisor.domain(uuid) is not None
    except HypervisorError:
        return True  # cannot tell: report the failure


def _device(nic: Nic) -> tuple[str | None, ...]:
    return (nic.type, nic.model, nic.ifname, nic.network, nic.portgroup, nic.portid)


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned future's exception, so asyncio does not report it."""
    if not future.cancelled():
        future.exception()


def _reason(exc: MacvtapError) -> str:
    """A short, stable word for why a host operation failed (the errno's name)."""
    if exc.errno is None:
        # Only apply's ifindex check and read's kind check fail without an errno.
        return "vanished" if exc.op == "apply" else "not-macvtap"
    if exc.errno == errno.EOPNOTSUPP:  # Python names 95 ENOTSUP
        return "EOPNOTSUPP"
    return errno.errorcode.get(exc.errno, f"errno {exc.errno}")
