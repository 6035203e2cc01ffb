"""The metrics' pure part: what decisions, NIC states and traced events do to the registry."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Literal

import pytest
from prometheus_client.parser import text_string_to_metric_families

import rxfilterd
from rxfilterd.events import DomainChanged, RxFilterChanged
from rxfilterd.metrics import DaemonMetrics
from rxfilterd.nic import Action
from rxfilterd.plan import AddressListChange, MacChange, Refusal
from rxfilterd.records import Decision, NicRow, NicState
from rxfilterd.stats import Board, Stats
from rxfilterd.tracing import Tracers, combine

T0 = 1_800_000_000.0


MAC = "52:54:00:10:00:01"
ROW = NicRow(
    "host", "web1", "net0", "macvtap3", MAC, "virtio", "direct", "yes", "port", "sync", "trusted"
)


def state(
    *,
    last_sync: float | None,
    result: str = "ok",
    cause: str | None = "event",
    trust: str = "yes",
    action: Action = "sync",
) -> NicState:
    row = dataclasses.replace(ROW, trust=trust, action=action)
    return NicState(row, last_sync=last_sync, cause=cause, result=result)


def applied(at: float, field: Literal["mac", "multicast"] = "mac") -> Decision:
    none: frozenset[str] = frozenset()
    change = (
        MacChange(MAC, MAC) if field == "mac" else AddressListChange(field, none, none, none, none)
    )
    return Decision(
        libvirt="host",
        event="applied",
        time=at,
        domain="web1",
        alias="net0",
        ifname="macvtap3",
        change=change,
    )


@pytest.fixture
def metrics() -> Iterator[DaemonMetrics]:
    m = DaemonMetrics(Board())
    yield m
    m.close()


def get(m: DaemonMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_a_sync_after_an_event_counts_and_times_it(metrics: DaemonMetrics) -> None:
    metrics.nic_state(("host", "web1", "net0"), state(last_sync=None, result="pending"))
    assert get(metrics, "rxfilterd_nics", trust="yes", action="sync") == 1
    metrics.dispatched(RxFilterChanged("u", "web1", "net0", T0), T0 + 0.001)
    metrics.dispatched(RxFilterChanged("u", "web1", "net0", T0 + 0.002), T0 + 0.003)
    metrics.step("query", "net0", T0 + 0.001, T0 + 0.004)
    metrics.decision(applied(T0 + 0.005))
    metrics.decision(applied(T0 + 0.006, "multicast"))
    metrics.nic_state(("host", "web1", "net0"), state(last_sync=T0 + 0.007))
    assert get(metrics, "rxfilterd_events_total", kind="rx_filter_changed") == 2
    assert get(metrics, "rxfilterd_changes_applied_total", field="mac") == 1
    assert get(metrics, "rxfilterd_changes_applied_total", field="multicast") == 1
    assert get(metrics, "rxfilterd_syncs_total", result="ok") == 1
    assert get(metrics, "rxfilterd_query_duration_seconds_count") == 1
    # One observation per sync, from the first event to the first write.
    assert get(metrics, "rxfilterd_event_to_write_seconds_count") == 1
    assert get(metrics, "rxfilterd_event_to_write_seconds_sum") == pytest.approx(0.005, abs=1e-6)
    assert get(metrics, "rxfilterd_event_to_write_seconds_bucket", le="0.0075") == 1
    assert get(metrics, "rxfilterd_event_to_write_seconds_bucket", le="0.0025") == 0
    assert get(metrics, "rxfilterd_nics", trust="yes", action="sync") == 1  # the same NIC


def test_a_sync_that_writes_nothing_answers_its_events(metrics: DaemonMetrics) -> None:
    # libvirt wrote it first (type='direct'): nothing to apply, and the event is answered,
    # so a later write is not timed from it.
    metrics.dispatched(RxFilterChanged("u", "web1", "net0", T0), T0)
    metrics.step("query", "net0", T0, T0 + 0.003)
    metrics.nic_state(("host", "web1", "net0"), state(last_sync=T0 + 0.004))
    metrics.step("query", "net0", T0 + 50, T0 + 50.003)
    metrics.decision(applied(T0 + 50.004))
    assert get(metrics, "rxfilterd_event_to_write_seconds_count") == 0


def test_an_event_after_the_query_waits_for_the_follow_up(metrics: DaemonMetrics) -> None:
    metrics.dispatched(RxFilterChanged("u", "web1", "net0", T0), T0)
    metrics.step("query", "net0", T0, T0 + 0.003)
    metrics.decision(applied(T0 + 0.004))
    metrics.dispatched(RxFilterChanged("u", "web1", "net0", T0 + 0.0045), T0 + 0.0045)
    metrics.nic_state(("host", "web1", "net0"), state(last_sync=T0 + 0.005))
    metrics.step("query", "net0", T0 + 0.03, T0 + 0.032)
    metrics.decision(applied(T0 + 0.0335))
    metrics.nic_state(("host", "web1", "net0"), state(last_sync=T0 + 0.034))
    assert get(metrics, "rxfilterd_event_to_write_seconds_count") == 2
    assert get(metrics, "rxfilterd_event_to_write_seconds_sum") == pytest.approx(
        0.004 + 0.029, abs=1e-6
    )


def test_results_retries_refusals_failures_and_gone_nics(metrics: DaemonMetrics) -> None:
    metrics.nic_state(
        ("host", "web1", "net0"), state(last_sync=T0, result="failed: EPERM", cause="event")
    )
    metrics.nic_state(("host", "web1", "net0"), state(last_sync=T0 + 2, result="ok", cause="retry"))
    metrics.nic_state(("host", "web1", "net0"), state(last_sync=T0 + 2, result="ok", cause="retry"))
    refusal = Refusal("mac", "02:00:00:00:00:01", "not in mac_allow")
    metrics.decision(
        dataclasses.replace(applied(T0), event="refused", change=None, refusal=refusal)
    )
    metrics.decision(
        dataclasses.replace(applied(T0), event="failed", change=None, stage="apply", reason="EPERM")
    )
    metrics.dispatched(DomainChanged("u", "web1", "started"), T0)
    metrics.nic_state(("host", "web1", "net1"), state(trust="no", action="skip", last_sync=None))
    assert get(metrics, "rxfilterd_syncs_total", result="failed") == 1
    assert get(metrics, "rxfilterd_syncs_total", result="ok") == 1  # same sync seen twice
    assert get(metrics, "rxfilterd_retries_total") == 1
    assert get(metrics, "rxfilterd_refusals_total", field="mac", reason="not in mac_allow") == 1
    assert get(metrics, "rxfilterd_sync_failures_total", stage="apply", reason="EPERM") == 1
    assert get(metrics, "rxfilterd_decisions_total", event="refused") == 1
    assert get(metrics, "rxfilterd_events_total", kind="started") == 1
    assert get(metrics, "rxfilterd_nics", trust="no", action="skip") == 1
    metrics.nic_state(("host", "web1", "net0"), None)
    metrics.nic_state(("host", "web1", "net1"), None)
    assert get(metrics, "rxfilterd_nics", trust="yes", action="sync") == 0
    assert get(metrics, "rxfilterd_nics", trust="no", action="skip") == 0


def test_domain_label_is_optional_and_leaves_no_series_behind() -> None:
    m = DaemonMetrics(Board(), domain_label=True)
    m.nic_state(("host", "web1", "net0"), state(last_sync=T0))
    host = {"libvirt": "host", "domain": "web1"}
    assert get(m, "rxfilterd_syncs_total", **host, result="ok") == 1
    assert get(m, "rxfilterd_nics", **host, trust="yes", action="sync") == 1
    # The same domain name in a pod's libvirt is another series.
    m.nic_state(("pod/l-1", "web1", "net0"), state(last_sync=T0))
    assert (
        get(m, "rxfilterd_nics", libvirt="pod/l-1", domain="web1", trust="yes", action="sync") == 1
    )
    m.nic_state(("host", "web1", "net0"), None)
    assert get(m, "rxfilterd_nics", **host, trust="yes", action="sync") is None
    # Without the option no sample has a domain label.
    plain = DaemonMetrics(Board())
    plain.nic_state(("host", "web1", "net0"), state(last_sync=T0))
    labels = {k for family in plain.registry.collect() for s in family.samples for k in s.labels}
    assert not labels & {"libvirt", "domain", "alias"}


def test_the_endpoint_speaks_prometheus_text(metrics: DaemonMetrics) -> None:
    board = Board()
    board.add(Stats(connected=True, queries=7, libvirt_version=9_000_000))
    # A pod's libvirt, still connecting: counted among the connections, not as up.
    board.add(Stats(name="pod/launcher-1", queries=2))
    m = DaemonMetrics(board, mqtt=lambda: (True, 3))
    m.serve("127.0.0.1", 0)
    try:
        assert m.port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    finally:
        m.close()
    assert m.port is None
    families = {f.name: f for f in text_string_to_metric_families(text)}
    info = families["rxfilterd_info"].samples[0]
    assert info.name == "rxfilterd_info"
    assert info.labels == {"version": rxfilterd.__version__, "libvirt_version": "9.0.0"}
    assert families["rxfilterd_queries"].samples[0].value == 9  # every connection's
    assert families["rxfilterd_libvirt_connections_up"].samples[0].value == 1
    assert families["rxfilterd_libvirt_connections"].samples[0].value == 2
    assert families["rxfilterd_mqtt_connected"].samples[0].value == 1
    assert families["rxfilterd_mqtt_dropped_events"].samples[0].value == 3
    assert families["rxfilterd_event_to_write_seconds"].type == "histogram"
    assert "process_resident_memory_bytes" in {s.name for f in families.values() for s in f.samples}
    for family in families.values():  # Prometheus conventions
        assert family.name.startswith(("rxfilterd", "process_")), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def started(self, stats: Stats) -> None:
        self.seen.append("started")

    def stopped(self, stats: Stats) -> None:
        self.seen.append("stopped")

    def event_received(self, event: RxFilterChanged, at: float) -> None:
        self.seen.append("received")

    def dispatched(self, event: object, at: float) -> None:
        self.seen.append("dispatched")

    def step(self, step: str, subject: str, started: float, ended: float) -> None:
        self.seen.append(step)


def test_tracers_combined() -> None:
    assert combine(None, None) is None
    one = Recorder()
    assert combine(None, one) is one
    two = Recorder()
    both = combine(one, two)
    assert isinstance(both, Tracers)
    both.started(Stats())
    both.event_received(RxFilterChanged("u", "d", "net0", T0), T0)
    both.step("write", "mac", T0, T0)
    assert one.seen == two.seen == ["started", "received", "write"]


def test_prometheus_client_is_imported_only_with_metrics_on() -> None:
    # The default configuration does not carry it (docs/benchmarks.md: 4.3 MiB of RSS).
    code = (
        "import sys; from rxfilterd import app, cli; from rxfilterd.config import Config;"
        "from rxfilterd.stats import Board, Stats;"
        "assert app.make_metrics(Config(), Stats(), None) is None;"
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
