"""Where decisions and NIC state go: one log line each, and every sink the app wired."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from rxfilterd.config import Config
from rxfilterd.inventory import NicReport
from rxfilterd.libvirt_handler import LIBVIRT_WRITES
from rxfilterd.nic_sync import NicSync
from rxfilterd.ports import DecisionSink, StateSink
from rxfilterd.records import Decision, NicState

log = structlog.get_logger("rxfilterd")


class Sinks:
    """The decision sinks and state sinks of one reconciler, on the connection LIBVIRT."""

    def __init__(
        self,
        *,
        libvirt: str = "host",
        decisions: Sequence[DecisionSink] = (),
        states: Sequence[StateSink] = (),
    ) -> None:
        self.libvirt = libvirt
        self.decisions = tuple(decisions)
        self.states = tuple(states)

    def decide(self, decision: Decision) -> None:
        """One decision: a structured log line, and the same record to every sink."""
        getattr(log, decision.level)(decision.event, **decision.fields())
        for sink in self.decisions:
            sink(decision)

    def nic_state(self, report: NicReport, nic: NicSync | None) -> None:
        """The NIC's state now (NIC None: not synced) to every state sink."""
        if not self.states:
            return
        row = report.row()
        state = (
            NicState(row)
            if nic is None
            else NicState(
                row,
                guest=nic.guest,
                host=nic.host,
                last_sync=nic.last_sync,
                cause=nic.last_cause,
                result=nic.result,
            )
        )
        for sink in self.states:
            sink(state.key, state)

    def nic_gone(self, domain: str, alias: str) -> None:
        key = (self.libvirt, domain, alias)
        for sink in self.states:
            sink(key, None)

    def surveyed(self, domain: str, report: NicReport, config: Config) -> None:
        """A NIC of DOMAIN found, or found changed: whether it is synced, and why."""
        nic, verdict = report.nic, report.verdict
        policy = fields = libvirt_writes = None
        if verdict.action == "sync":
            rule, policy = config.policy_for(domain, nic.network, nic.portgroup)
            fields = tuple(sorted(rule.fields))
            if verdict.libvirt_syncs:
                # Said at start so nobody expects the policy to bind libvirt.
                libvirt_writes = LIBVIRT_WRITES
        self.decide(
            Decision(
                event="syncing" if verdict.action == "sync" else "skipped",
                libvirt=nic.libvirt,
                domain=domain,
                alias=nic.alias,
                ifname=nic.ifname,
                reason=verdict.reason,
                trust=report.trust.word,
                trust_source=report.trust.source,
                trust_note=report.trust.note or None,
                policy=policy,
                fields_synced=fields,
                libvirt_writes=libvirt_writes,
            )
        )
