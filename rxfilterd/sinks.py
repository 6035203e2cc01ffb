"""Where decisions and NIC state go: one log line each, and every sink the app wired."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import structlog

from rxfilterd.config import Config
from rxfilterd.inventory import NicReport
from rxfilterd.libvirt_handler import LIBVIRT_WRITES
from rxfilterd.nic_sync import NicSync
from rxfilterd.ports import DecisionSink, StateSink
from rxfilterd.records import NicState

log = structlog.get_logger("rxfilterd")


class Sinks:
    """The decision sinks and state sinks of one reconciler."""

    def __init__(
        self, decisions: Sequence[DecisionSink] = (), states: Sequence[StateSink] = ()
    ) -> None:
        self.decisions = tuple(decisions)
        self.states = tuple(states)

    def decide(self, event: str, *, level: str = "info", **fields: Any) -> None:
        """One decision: a structured log line, and the same record to every sink."""
        # ACTION is what the decision was, for `journalctl ACTION=applied`.
        fields.setdefault("action", event)
        getattr(log, level)(event, **fields)
        record = {"event": event, "time": time.time(), **fields}
        for sink in self.decisions:
            sink(record)

    def nic_state(self, report: NicReport, nic: NicSync | None) -> None:
        """The NIC's state now (NIC None: not synced) to every state sink."""
        if not self.states:
            return
        state: NicState = {
            **report.row(),
            "guest": nic.guest if nic else None,
            "host": nic.host if nic else None,
            "last_sync": nic.last_sync if nic else None,
            "cause": nic.last_cause if nic else None,
            "result": nic.result if nic else "not synced",
        }
        for sink in self.states:
            sink(report.nic.domain, report.nic.alias, state)

    def nic_gone(self, domain: str, alias: str) -> None:
        for sink in self.states:
            sink(domain, alias, None)

    def surveyed(self, domain: str, report: NicReport, config: Config) -> None:
        """A NIC of DOMAIN found, or found changed: whether it is synced, and why."""
        nic, verdict = report.nic, report.verdict
        extra: dict[str, Any] = {}
        if verdict.action == "sync":
            policy, source = config.policy_for(domain, nic.network, nic.portgroup)
            extra = {"policy": source, "fields": sorted(policy.fields)}
            if verdict.libvirt_syncs:
                # Said at start so nobody expects the policy to bind libvirt.
                extra["libvirt_writes"] = list(LIBVIRT_WRITES)
        if report.trust.note:
            extra["trust_note"] = report.trust.note
        self.decide(
            "syncing" if verdict.action == "sync" else "skipped",
            domain=domain,
            alias=nic.alias,
            ifname=nic.ifname,
            reason=verdict.reason,
            trust=report.trust.word,
            trust_source=report.trust.source,
            **extra,
        )
