"""Prometheus metrics: the daemon's own registry, fed by its sinks and tracer, served over HTTP.

Imported only when [metrics] listen is set (app.py). Everything that counts runs on
the event loop and only increments prometheus_client's metrics (a lock and an add);
the HTTP server runs in a thread of its own, so a scrape never waits for a sync nor a
sync for a scrape. What the scrape thread reads itself (Stats' integers, the MQTT
publisher's two attributes) are single attribute reads.

No per-NIC label anywhere, and a domain label only with [metrics] domain_label: a
host's series stay a few dozen whatever its guests do.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

import rxfilterd
from rxfilterd.events import DomainChanged, HypervisorEvent, RxFilterChanged
from rxfilterd.ports import TraceStep
from rxfilterd.records import Decision, NicKey, NicState
from rxfilterd.stats import Board, Stats

log = structlog.get_logger("rxfilterd")

# Seconds. A sync here takes 2-10 ms after QEMU's event (docs/benchmarks.md); the upper
# buckets catch a stuck domain's queries and rate-limited bursts.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

# A sync's result is the first word of NicState.result ("failed: ..." -> failed).
SYNC_RESULTS = ("ok", "dry-run", "failed", "rejected", "stopped")
FIELDS = ("mac", "promiscuous", "multicast", "allmulti", "unicast", "vlan")

# (connected, dropped events) of the MQTT publisher, read on the scrape thread.
MqttView = Callable[[], tuple[bool, int]]


class _Snapshot(Collector):
    """What is read at scrape time: Stats' counters and connection, MQTT, rxfilterd_info."""

    def __init__(self, board: Board, mqtt: MqttView | None) -> None:
        self._board = board
        self._mqtt = mqtt

    def collect(self) -> Iterable[Metric]:
        # A copy: pods come and go on the event loop while this runs on the scrape thread.
        connections = list(self._board.connections.values())
        stats = self._board.host or (connections[0] if connections else Stats())
        info = InfoMetricFamily("rxfilterd", "rxfilterd's version and the connected libvirt's")
        info.add_metric(
            [],
            {
                "version": rxfilterd.__version__,
                "libvirt_version": stats.libvirt_version_text,
            },
        )
        yield info
        yield CounterMetricFamily(
            "rxfilterd_queries",
            "query-rx-filter calls made (each re-arms QEMU's event for the NIC)",
            value=sum(c.queries for c in connections),
        )
        yield GaugeMetricFamily(
            "rxfilterd_libvirt_connections_up",
            "libvirt connections currently up (the host's and each pod's)",
            value=sum(c.connected for c in connections),
        )
        yield GaugeMetricFamily(
            "rxfilterd_libvirt_connections",
            "libvirt connections served (the host's and each pod's)",
            value=len(connections),
        )
        if self._mqtt is not None:
            connected, dropped = self._mqtt()
            yield GaugeMetricFamily(
                "rxfilterd_mqtt_connected",
                "1 while the MQTT broker is connected",
                value=1 if connected else 0,
            )
            yield CounterMetricFamily(
                "rxfilterd_mqtt_dropped_events",
                "decision events dropped because the MQTT queue was full",
                value=dropped,
            )


class DaemonMetrics:
    """The daemon's metrics: a decision sink, a state sink and a Tracer, in one registry.

    DOMAIN_LABEL adds a domain label to the per-sync counters and the NIC gauge.
    """

    def __init__(
        self, board: Board, *, domain_label: bool = False, mqtt: MqttView | None = None
    ) -> None:
        # No *_created series: they double the series count and no dashboard reads them.
        # (A process-wide switch; the daemon has no other registry.)
        cast(Callable[[], None], disable_created_metrics)()  # untyped in 0.26
        self.registry = CollectorRegistry()
        self.domain_label = domain_label
        # A domain's name is unique only within its libvirt (pods): both label it.
        by = ["libvirt", "domain"] if domain_label else []
        self._families(by)
        self.registry.register(_Snapshot(board, mqtt))
        ProcessCollector(registry=self.registry)
        if not domain_label:
            self._start_at_zero()
        self.events.labels(kind="rx_filter_changed")
        # NIC -> its (trust, action) and when the last sync seen ended.
        self._nics: dict[NicKey, tuple[str, str, float | None]] = {}
        self._nic_counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        # NIC -> QEMU's timestamp of the earliest event no sync has answered yet.
        self._pending: dict[tuple[str, str], float] = {}
        # NICs whose current sync has had its latency observed.
        self._observed: set[tuple[str, str]] = set()
        # alias -> when its last query ended (for which events a sync answered).
        self._query_ended: dict[str, float] = {}
        self._server: Any = None

    def _families(self, by: list[str]) -> None:
        """The metric families fed by the sinks and the tracer (BY: the domain labels)."""
        r = self.registry
        self.events = Counter(
            "rxfilterd_events",
            "libvirt events taken on, by kind (rx_filter_changed, or the domain change)",
            ["kind"],
            registry=r,
        )
        self.syncs = Counter(
            "rxfilterd_syncs", "NIC syncs done, by result", [*by, "result"], registry=r
        )
        self.applied = Counter(
            "rxfilterd_changes_applied",
            "changes written to a macvtap, by field",
            [*by, "field"],
            registry=r,
        )
        self.refusals = Counter(
            "rxfilterd_refusals",
            "guest changes the policy refused (said once per NIC and value), by field and reason",
            [*by, "field", "reason"],
            registry=r,
        )
        self.failures = Counter(
            "rxfilterd_sync_failures",
            "failed sync steps (each one is retried), by stage and reason",
            [*by, "stage", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "rxfilterd_retries", "syncs run again after a failure", by, registry=r
        )
        self.decisions = Counter(
            "rxfilterd_decisions",
            "decisions logged, by event (applied, refused, drift, failed, ...)",
            ["event"],
            registry=r,
        )
        self.event_to_write = Histogram(
            "rxfilterd_event_to_write_seconds",
            "from QEMU's timestamp of the first event a sync answers to the end of its"
            " first macvtap write",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.query = Histogram(
            "rxfilterd_query_duration_seconds",
            "query-rx-filter through libvirt, waiting for the domain's turn included",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.nics = Gauge(
            "rxfilterd_nics",
            "NICs of running domains, by trust (yes/no) and action (sync/skip)",
            [*by, "trust", "action"],
            registry=r,
        )

    def _start_at_zero(self) -> None:
        """Series at 0 from the start, so rate() sees the first one."""
        for result in SYNC_RESULTS:
            self.syncs.labels(result=result)
        for name in FIELDS:
            self.applied.labels(field=name)
        for trust in ("yes", "no"):
            for action in ("sync", "skip"):
                self.nics.labels(trust=trust, action=action)
        self.retries.inc(0)

    def _by(self, libvirt: str, domain: str) -> dict[str, str]:
        return {"libvirt": libvirt, "domain": domain} if self.domain_label else {}

    # The decision sink.
    def decision(self, decision: Decision) -> None:
        self.decisions.labels(event=decision.event).inc()
        by = self._by(decision.libvirt, decision.domain)
        if decision.event == "applied" and decision.change is not None:
            self.applied.labels(**by, field=decision.change.field).inc()
            key = (decision.domain, decision.alias)
            if key not in self._observed:
                self._observed.add(key)
                since = self._pending.pop(key, None)
                if since is not None:
                    self.event_to_write.observe(max(0.0, decision.time - since))
        elif decision.event == "refused" and decision.refusal is not None:
            refusal = decision.refusal
            self.refusals.labels(**by, field=refusal.field, reason=refusal.reason).inc()
        elif decision.event == "failed":
            self.failures.labels(
                **by, stage=decision.stage or "", reason=decision.reason or ""
            ).inc()

    # The state sink.
    def nic_state(self, nic: NicKey, state: NicState | None) -> None:
        # Latency is keyed as the tracer sees events, by domain and alias (two pods'
        # same-named NICs may share a pending start: a histogram sample, no identity).
        key = nic[1:]
        before = self._nics.pop(nic, None)
        if before is not None:
            self._count(nic, before[0], before[1], -1)
        if state is None:
            self._pending.pop(key, None)
            self._observed.discard(key)
            return
        trust, action = state.row.trust, state.row.action
        self._nics[nic] = (trust, action, state.last_sync)
        self._count(nic, trust, action, +1)
        if state.last_sync is not None and (before is None or before[2] != state.last_sync):
            self._sync_ended(nic, state)

    def _sync_ended(self, nic: NicKey, state: NicState) -> None:
        key = nic[1:]
        by = self._by(nic[0], nic[1])
        result = state.result.split(":", 1)[0]
        self.syncs.labels(**by, result=result).inc()
        if state.cause == "retry":
            (self.retries.labels(**by) if by else self.retries).inc()
        self._observed.discard(key)
        # Events up to the end of this sync's query are answered by it; a later one
        # has a follow-up sync of its own. (Keyed by alias: another domain's later query
        # of the same alias can only make an event count as answered, never the reverse.)
        since = self._pending.get(key)
        ended = self._query_ended.get(key[1])
        if since is not None and (ended is None or since <= ended):
            del self._pending[key]

    def _count(self, nic: NicKey, trust: str, action: str, delta: int) -> None:
        labels = (*(nic[:2] if self.domain_label else ()), trust, action)
        self._nic_counts[labels] += delta
        count = self._nic_counts[labels]
        if count <= 0 and self.domain_label:
            del self._nic_counts[labels]
            self.nics.remove(*labels)  # no series left behind for a domain that went
        else:
            self.nics.labels(*labels).set(count)

    # The Tracer (every method but event_received runs on the event loop).
    def started(self, stats: Stats) -> None:
        pass

    def stopped(self, stats: Stats) -> None:
        pass

    def event_received(self, event: RxFilterChanged, at: float) -> None:
        pass  # on libvirt's thread: counted at dispatch instead

    def dispatched(self, event: HypervisorEvent, at: float) -> None:
        if isinstance(event, RxFilterChanged):
            self.events.labels(kind="rx_filter_changed").inc()
            self._pending.setdefault((event.domain, event.alias), event.timestamp)
        elif isinstance(event, DomainChanged):
            self.events.labels(kind=event.change).inc()

    def step(self, step: TraceStep, subject: str, started: float, ended: float) -> None:
        if step == "query":
            self.query.observe(max(0.0, ended - started))
            self._query_ended[subject] = ended

    # The endpoint.
    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on HOST:PORT from a thread of its own (OSError if it cannot)."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    @property
    def port(self) -> int | None:
        """The port served, None when not serving."""
        return None if self._server is None else int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def names(self) -> Iterator[str]:
        """Every sample name the registry exports (dashboards may use only these), also
        of labelled families that have no series yet."""
        suffixes = {
            "counter": ("_total",),
            "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum"),
            "info": ("_info",),
        }
        for family in self.registry.collect():
            yield from (family.name + suffix for suffix in suffixes.get(family.type, ()))
            yield from (sample.name for sample in family.samples)
