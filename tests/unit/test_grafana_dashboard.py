"""deploy/grafana/rxfilterd.json asks only for metrics the daemon's registry exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rxfilterd.metrics import DaemonMetrics
from rxfilterd.stats import Board

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "rxfilterd.json"
# A metric name in PromQL: ours, or the process collector's.
METRIC = re.compile(r"\b(?:rxfilterd|process)_[a-z0-9_]+\b")


def queries(node: Any) -> Iterator[str]:
    """Every PromQL string of the dashboard: panel targets and template variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def test_every_metric_the_dashboard_uses_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # Every optional family present: MQTT on, and one NIC so the labelled ones have series.
    metrics = DaemonMetrics(Board(), mqtt=lambda: (True, 0))
    exported = set(metrics.names())
    used = {name for query in queries(dashboard) for name in METRIC.findall(query)}
    assert used, "no metric found in the dashboard"
    assert used - exported == set(), f"exported: {sorted(exported)}"
    # Each panel asks something, and a metric of ours or the process's.
    for panel in dashboard["panels"]:
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs and all(METRIC.search(e) for e in exprs), panel["title"]
    # The families a dashboard most needs are on it.
    for family in (
        "rxfilterd_event_to_write_seconds_bucket",
        "rxfilterd_query_duration_seconds_bucket",
        "rxfilterd_syncs_total",
        "rxfilterd_changes_applied_total",
        "rxfilterd_refusals_total",
        "rxfilterd_libvirt_connections_up",
        "rxfilterd_mqtt_dropped_events_total",
        "rxfilterd_nics",
    ):
        assert family in used, family
