"""One sync of one NIC: query the guest's filter, read the host, plan, apply.

Every outcome is one decision (applied, would-apply, refused, rejected, drift, failed,
abandoned); the daemon decides when a NIC syncs and what a failure costs it (retries).
"""

from __future__ import annotations

import asyncio
import errno
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import structlog

from rxfilterd.config import Config
from rxfilterd.events import HypervisorError
from rxfilterd.guest_filter import GuestFilter, GuestFilterError, parse_reply
from rxfilterd.host_state import HostState, MacvtapError
from rxfilterd.inventory import NicReport, TrustResolver
from rxfilterd.libvirt_handler import trust_changes_live
from rxfilterd.nic import DomainXmlError, Nic, parse_domain_nics
from rxfilterd.plan import Change, Plan, host_after, make_plan
from rxfilterd.ports import DecisionSink, HostNetworkPort, HypervisorPort, LiveXml
from rxfilterd.records import Decision, DecisionEvent, Level
from rxfilterd.stats import Stats
from rxfilterd.worker import CoalescingWorker

log = structlog.get_logger("rxfilterd")

# After a failed query, how long libvirt gets to notice that the domain went away.
QUERY_SETTLE = 0.25
# Domains whose last live XML (and its NICs) is kept, so that a sync re-checking trust
# against an unchanged XML does not parse it again (a tenth of a sync's CPU).
PARSED_DOMAINS = 64

# ok: done (or nothing to retry); retry: try again later; stale: the NIC is no longer
# what the daemon synced (trust revoked, device changed or gone): re-read the domain.
SyncOutcome = Literal["ok", "retry", "stale"]


@dataclass
class NicSync:
    """What the daemon keeps per synced NIC."""

    report: NicReport
    worker: CoalescingWorker | None = None
    failures: int = 0
    last_failure: tuple[str, str] | None = None
    refused: set[tuple[str, str]] = field(default_factory=set)
    guest: GuestFilter | None = None
    host: HostState | None = None
    last_sync: float | None = None
    # What started the last sync: start, event, resync, retry, reset, ...
    last_cause: str | None = None
    result: str = "pending"
    noted: set[str] = field(default_factory=set)


def retry_delay(failures: int, retry_max: float) -> float:
    """Seconds before the next attempt after FAILURES failed ones in a row."""
    return float(min(2.0**failures, retry_max))


@dataclass
class _Attempt:
    """One sync in progress: what it works on, and how far it got (for the line that
    says what an interrupted sync left)."""

    hypervisor: HypervisorPort
    config: Config
    nic: NicSync
    cause: str
    stage: str = "queued"
    applied: list[str] = field(default_factory=list)
    in_flight: str | None = None
    pending: list[str] = field(default_factory=list)
    # Whether trust is re-read before writing, and the live XML read for it.
    rechecks: bool = False
    live_xml: LiveXml = None

    def decision(self, event: DecisionEvent, level: Level = "info") -> Decision:
        """A decision about this NIC; the caller adds what it is about."""
        nic = self.nic.report.nic
        return Decision(
            event=event,
            level=level,
            libvirt=nic.libvirt,
            domain=nic.domain,
            alias=nic.alias,
            ifname=nic.ifname,
        )

    def log_fields(self) -> dict[str, str | None]:
        nic = self.nic.report.nic
        return {
            "libvirt": nic.libvirt,
            "domain": nic.domain,
            "alias": nic.alias,
            "ifname": nic.ifname,
        }


class NicSyncer:
    """Runs syncs against one host network; counts them in STATS."""

    def __init__(
        self,
        network: HostNetworkPort,
        stats: Stats,
        decide: DecisionSink,
        *,
        query_settle: float = QUERY_SETTLE,
    ) -> None:
        self.network = network
        self.stats = stats
        self.decide = decide
        self.query_settle = query_settle
        self.nics_of = ParsedNics(PARSED_DOMAINS)

    async def sync(
        self,
        hypervisor: HypervisorPort,
        config: Config,
        nic: NicSync,
        cause: str,
        shutting_down: Callable[[], bool],
        trusts: TrustResolver,
    ) -> SyncOutcome:
        """One sync, and what its outcome costs NIC: a retry kick after a failure."""
        try:
            outcome = await self.once(hypervisor, config, nic, cause, shutting_down, trusts)
        finally:
            nic.last_sync = time.time()
            nic.last_cause = cause
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
        elif outcome == "retry":
            delay = retry_delay(nic.failures, config.sync.retry_max)
            nic.failures += 1
            if nic.worker is not None:
                nic.worker.kick("retry", delay=delay)
        return outcome

    async def once(
        self,
        hypervisor: HypervisorPort,
        config: Config,
        nic: NicSync,
        cause: str,
        shutting_down: Callable[[], bool],
        trusts: TrustResolver,
    ) -> SyncOutcome:
        """One query, plan and apply, written only while the NIC is still trusted."""
        attempt = _Attempt(hypervisor, config, nic, cause)
        ifname = nic.report.nic.ifname
        assert ifname is not None
        # The host read does not need the guest's answer: overlap it with the query,
        # which is the slow part (a libvirt round trip and the domain's job lock).
        # A guest's event changes no link facts, only what ioctls read: quick read.
        # Every other cause (start, resync, retry) reads everything again.
        host_read = asyncio.ensure_future(self.network.read(ifname, quick=cause == "event"))
        host_read.add_done_callback(_consume)
        # Trust can change under a running NIC (libvirt >= 10.0 changes it live), and
        # nothing announces it: every sync re-reads the domain's XML once the query
        # has answered, and writes only if the NIC still resolves to trusted. The read
        # follows the query in the same pool call (a hand-over there and back less).
        # Not beside the query: libvirt 11 blocks XMLDesc while the domain's monitor
        # is busy, so a hung domain would hold a second libvirtd call slot for nothing.
        # Older libvirt keeps a running NIC's trust (update-device leaves it, a port's
        # is fixed at plug), and a stop, an unplug or a recreated link come as events
        # and fail apply's ifindex check: there the round trip would buy nothing.
        attempt.rechecks = trust_changes_live(hypervisor.version)
        try:
            return await self._steps(attempt, host_read, trusts)
        except asyncio.CancelledError:
            _abandoned(self.decide, attempt, shutting_down())
            raise
        finally:
            host_read.cancel()

    async def _steps(
        self,
        attempt: _Attempt,
        host_read: asyncio.Future[HostState | None],
        trusts: TrustResolver,
    ) -> SyncOutcome:
        guest = await self._query(attempt)
        if not isinstance(guest, GuestFilter):
            return guest
        return await self._checked(attempt, guest, host_read, trusts)

    async def _checked(
        self,
        attempt: _Attempt,
        guest: GuestFilter,
        host_read: asyncio.Future[HostState | None],
        trusts: TrustResolver,
    ) -> SyncOutcome:
        """Read the host and the NIC's trust, then plan and apply."""
        nic = attempt.nic
        nic.guest = guest
        attempt.stage = "read"
        try:
            host = await host_read
        except MacvtapError as exc:
            return self._failed(attempt, "read", str(exc), _reason(exc))
        if host is None:
            gone = f"{nic.report.nic.ifname}: macvtap is gone"
            return self._failed(attempt, "read", gone, "gone")
        nic.host = host
        attempt.stage = "trust"
        try:
            why_not = await _still_ours(trusts, attempt, self.nics_of) if attempt.rechecks else ""
        except HypervisorError as exc:
            return self._failed(attempt, "trust", str(exc), "libvirt")
        if why_not:
            # Not one write for a NIC libvirt no longer trusts (or that is not the
            # device we synced any more); the daemon re-reads the domain.
            nic.result = f"stopped: {why_not}"
            log.info("not ours any more", **attempt.log_fields(), why=why_not, cause=attempt.cause)
            return "stale"
        plan = _plan(attempt, guest, host, self.stats, self.decide)
        return await self._apply(attempt, host, plan)

    async def _query(self, attempt: _Attempt) -> GuestFilter | SyncOutcome:
        """The guest's filter, or the outcome of a query that gave none."""
        synced = attempt.nic.report.nic
        self.stats.queries += 1
        attempt.stage = "query"
        try:
            if attempt.rechecks:
                reply, attempt.live_xml = await attempt.hypervisor.query_rx_filter_then_xml(
                    synced.uuid, synced.alias
                )
            else:
                reply = await attempt.hypervisor.query_rx_filter(synced.uuid, synced.alias)
        except HypervisorError as exc:
            # A domain being destroyed fails the query with a monitor error before
            # libvirt calls it gone: not a failure of ours (its stop event cleans up).
            if exc.gone or not await self._still_running(attempt.hypervisor, synced.uuid):
                log.debug("domain gone during query", **attempt.log_fields(), error=str(exc))
                return "ok"
            return self._failed(attempt, "query", str(exc), "libvirt")
        try:
            return parse_reply(reply, synced.alias)
        except GuestFilterError as exc:
            # Hostile or broken: never applied, and not retried until the guest changes.
            attempt.nic.result = f"rejected: {exc}"
            self.decide(replace(attempt.decision("rejected", "warning"), error=str(exc)))
            return "ok"

    async def _apply(self, attempt: _Attempt, host: HostState, plan: Plan) -> SyncOutcome:
        """Every change of PLAN, one at a time; a refused one does not hold back the rest."""
        dry_run = attempt.config.sync.dry_run
        attempt.nic.result = "dry-run" if dry_run and plan.changes else "ok"
        attempt.stage = "apply"
        attempt.pending = [c.field for c in plan.changes]
        applied: list[Change] = []
        outcome: SyncOutcome = "ok"
        for change in plan.changes:
            attempt.pending.remove(change.field)
            if dry_run:
                self.decide(
                    replace(attempt.decision("would-apply"), change=change, cause=attempt.cause)
                )
                continue
            attempt.in_flight = change.field
            try:
                await self.network.apply(host, [change])
            except MacvtapError as exc:
                attempt.in_flight = None
                outcome = self._failed(
                    attempt,
                    "apply",
                    str(exc),
                    _reason(exc),
                    "error",
                    change=change,
                    pending=tuple(attempt.pending),
                )
                if exc.errno is None:
                    break  # the link vanished: nothing more can land on it
                continue
            attempt.in_flight = None
            attempt.applied.append(change.field)
            applied.append(change)
            self.stats.writes += 1
            self.decide(replace(attempt.decision("applied"), change=change, cause=attempt.cause))
        if applied:
            attempt.nic.host = host_after(host, applied)  # saves a netlink re-read
        log.debug(
            "synced",
            **attempt.log_fields(),
            cause=attempt.cause,
            changes=len(plan.changes),
            outcome=outcome,
        )
        return outcome

    def _failed(
        self,
        attempt: _Attempt,
        stage: str,
        error: str,
        reason: str,
        level: Level = "warning",
        *,
        change: Change | None = None,
        pending: tuple[str, ...] | None = None,
    ) -> Literal["retry"]:
        nic, synced = attempt.nic, attempt.nic.report.nic
        self.stats.error(f"{synced.domain}/{synced.alias}: {error}")
        nic.result = f"failed: {error}"
        # The same failure again on a retry is no news for the log (sinks still
        # get every attempt); a new reason, or the first one, is.
        repeat = nic.failures > 0 and nic.last_failure == (stage, reason)
        nic.last_failure = (stage, reason)
        self.decide(
            replace(
                attempt.decision("failed", "debug" if repeat else level),
                stage=stage,
                reason=reason,
                change=change,
                pending=pending,
                error=error,
                cause=attempt.cause,
                attempt=nic.failures + 1,
                retry_in=retry_delay(nic.failures, attempt.config.sync.retry_max),
            )
        )
        return "retry"

    async def _still_running(self, hypervisor: HypervisorPort, uuid: str) -> bool:
        await asyncio.sleep(self.query_settle)  # let libvirt notice a QEMU that just exited
        try:
            return await hypervisor.domain(uuid) is not None
        except HypervisorError:
            return True  # cannot tell: report the failure


class ParsedNics:
    """The NICs of the last live XML seen per domain, for the trust re-check: parsed
    again only when it changed (each write's re-check reads it).

    libvirt >= 11 notes a trusted NIC's guest MAC in the XML (currentAddress), so every
    MAC change gives new text; the re-check reads no MAC, so that attribute neither
    counts as a change nor is kept (current_mac is None in what this returns)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._parsed: OrderedDict[tuple[str, str], tuple[str, list[Nic]]] = OrderedDict()

    def __call__(self, libvirt: str, uuid: str, xml: str) -> list[Nic]:
        """The NICs in domain UUID's live XML (from LIBVIRT); DomainXmlError if unreadable."""
        key = (libvirt, uuid)
        text = _CURRENT_MAC.sub("", xml) if "currentAddress" in xml else xml
        kept = self._parsed.get(key)
        if kept is not None and kept[0] == text:
            self._parsed.move_to_end(key)
            return kept[1]
        nics = parse_domain_nics(text, libvirt)  # DomainXmlError: nothing kept
        self._parsed[key] = (text, nics)
        self._parsed.move_to_end(key)
        if len(self._parsed) > self._size:
            self._parsed.popitem(last=False)
        return nics


# As libvirt formats attributes (virXMLFormatElement: one space before, ' quotes; "
# is XML too). Cut from the text that is parsed, so what is kept has no guest MAC.
# A literal prefix: a leading \s+ would cost ~35 us per re-check instead of ~3.
_CURRENT_MAC = re.compile(r""" currentAddress=(?:'[^']*'|"[^"]*")""")


def _abandoned(decide: DecisionSink, attempt: _Attempt, shutting_down: bool) -> None:
    """Shutdown (or the NIC went) with this sync in flight: say what it leaves."""
    half = bool(attempt.applied) or attempt.in_flight is not None
    # Only shutdown leaves work that was wanted; a NIC that went needs nothing.
    level: Level = "warning" if half else "info" if shutting_down else "debug"
    decide(
        replace(
            attempt.decision("abandoned", level),
            stage=attempt.stage,
            cause=attempt.cause,
            applied=tuple(attempt.applied),
            # Sent to the kernel, answer not seen: it may or may not have landed.
            in_flight=attempt.in_flight,
            pending=tuple(attempt.pending),
        )
    )


def _plan(
    attempt: _Attempt, guest: GuestFilter, host: HostState, stats: Stats, decide: DecisionSink
) -> Plan:
    """The plan, with its refusals, notes and drift said once each."""
    nic, synced = attempt.nic, attempt.nic.report.nic
    policy, _source = attempt.config.policy_for(synced.domain, synced.network, synced.portgroup)
    plan = make_plan(guest, host, policy, libvirt_syncs=nic.report.verdict.libvirt_syncs)
    stats.syncs += 1
    for refusal in plan.refusals:
        if (refusal.field, refusal.value) not in nic.refused:
            nic.refused.add((refusal.field, refusal.value))
            decide(replace(attempt.decision("refused", "warning"), refusal=refusal))
    for note in plan.notes:
        if note not in nic.noted:
            nic.noted.add(note)
            log.info("note", **attempt.log_fields(), note=note)
    if attempt.cause == "resync" and plan.changes:
        # Nobody asked for a change, yet the host differs from the guest: drift.
        decide(replace(attempt.decision("drift", "warning"), drift=plan.changes))
    return plan


async def _still_ours(
    trusts: TrustResolver,
    attempt: _Attempt,
    nics_of: Callable[[str, str, str], list[Nic]],
) -> str:
    """Why the NIC may not be written now ("" when it may): the XML read after its
    query, resolved."""
    synced = attempt.nic.report.nic
    xml = attempt.live_xml
    if isinstance(xml, HypervisorError):
        raise xml
    if xml is None:
        return "the domain is not running"
    try:
        found = [n for n in nics_of(synced.libvirt, synced.uuid, xml) if n.alias == synced.alias]
    except DomainXmlError:
        return "its domain XML is unreadable"
    if not found:
        return "the NIC is gone"
    # The MAC (libvirt may note the guest's) and trust may differ; not the device.
    if _device(found[0]) != _device(synced):
        return "the NIC's device changed"
    trust = await trusts.trust(found[0])
    return "" if trust.value else f"untrusted now ({trust.source})"


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
