"""Acceptance: /metrics and `rxfilterd status` show a real guest's changes as they happen.

The daemon runs as tests/support/daemon.py runs it, with [metrics] on 127.0.0.1 at a
free port and the status socket in the test's directory. Scrapes are parsed with
prometheus_client's own parser, so what is checked is what Prometheus would read.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import rxfilterd
from tests.libvirt.test_sync import IPV6, MAC0, NEW_MAC, SOLICITED, host_mac, static_groups
from tests.support.daemon import RunningDaemon, wait_until
from tests.support.guest import EthernetNic, Resources, prefixed

pytestmark = pytest.mark.libvirt

# sample name -> {frozenset of label pairs -> value}
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Every sample of the endpoint, and each family's type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of NAME's samples whose labels include LABELS (0 when there is none)."""
    want = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if want <= k)


def status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rxfilterd", "status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_scrape_and_status_during_real_guest_changes(stack: Resources, tmp_path: Path) -> None:
    port = free_port()
    mvt = stack.veth_macvtap("ob", mac=MAC0)
    name = prefixed("ob")
    sections: dict[str, dict[str, Any]] = {
        # The domain label lets the test tell its guest from other agents' on this libvirtd.
        "metrics": {"listen": f"127.0.0.1:{port}", "domain_label": True},
        "status": {"socket": str(tmp_path / "status.sock")},
    }
    with RunningDaemon(tmp_path, sections=sections) as daemon:
        guest = stack.guest(name, [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        wait_until(
            lambda: value(scrape(port)[0], "rxfilterd_syncs_total", domain=name, result="ok") >= 1,
            60,
            "the first sync of the guest's NIC in the scrape",
        )
        before, types = scrape(port)
        guest.set_mac(NEW_MAC)
        wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 10, "new MAC on the host")
        # The MAC's events answered first: an event of the next change arriving while
        # the MAC's query is in flight counts as answered by it (see metrics.py).
        daemon.wait_quiet()
        guest.add_ipv6(IPV6)
        wait_until(lambda: SOLICITED in static_groups(mvt.name), 10, "solicited-node group")
        wait_until(
            lambda: (
                value(scrape(port)[0], "rxfilterd_changes_applied_total", domain=name)
                >= value(before, "rxfilterd_changes_applied_total", domain=name) + 2
            ),
            10,
            "the MAC and the multicast change counted",
        )
        after, _ = scrape(port)

        answer = status(daemon.config, "--json")
        text = status(daemon.config)
    config = daemon.config
    gone = status(config)

    def moved(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert types["rxfilterd_event_to_write_seconds"] == "histogram"
    assert types["rxfilterd_query_duration_seconds"] == "histogram"
    assert types["rxfilterd_changes_applied"] == "counter"
    assert moved("rxfilterd_events_total", kind="rx_filter_changed") >= 2
    assert moved("rxfilterd_queries_total") >= 2
    assert moved("rxfilterd_syncs_total", domain=name, result="ok") >= 2
    assert moved("rxfilterd_changes_applied_total", domain=name, field="mac") >= 1
    assert moved("rxfilterd_changes_applied_total", domain=name, field="multicast") >= 1
    assert moved("rxfilterd_query_duration_seconds_count") >= 2
    assert moved("rxfilterd_query_duration_seconds_sum") > 0
    # Each of the two changes was written after its own QEMU event.
    assert moved("rxfilterd_event_to_write_seconds_count") >= 2
    assert moved("rxfilterd_event_to_write_seconds_sum") > 0
    buckets = after["rxfilterd_event_to_write_seconds_bucket"]
    assert buckets[frozenset({("le", "+Inf")})] == value(
        after, "rxfilterd_event_to_write_seconds_count"
    )
    assert value(after, "rxfilterd_nics", domain=name, trust="yes", action="sync") == 1
    assert value(after, "rxfilterd_libvirt_connections_up") == 1
    (info,) = after["rxfilterd_info"]
    assert dict(info)["version"] == rxfilterd.__version__
    assert dict(info)["libvirt_version"].count(".") == 2

    assert answer.returncode == 0, answer.stderr
    state = json.loads(answer.stdout)
    (nic,) = [n for n in state["nics"] if n["domain"] == name]
    assert nic["alias"] == "net0" and nic["ifname"] == mvt.name
    assert nic["host"]["mac"] == NEW_MAC and SOLICITED in nic["host"]["multicast"]
    assert nic["trust"] == "yes" and nic["action"] == "sync" and nic["result"] == "ok"
    assert nic["last_sync"] > state["started"] and nic["cause"] == "event"
    assert state["connections"][0]["connected"] is True
    assert state["counters"]["queries"] >= 3
    assert state["metrics"] == {"url": f"http://127.0.0.1:{port}/metrics"}
    assert text.returncode == 0, text.stderr
    assert name in text.stdout and NEW_MAC in text.stdout and mvt.name in text.stdout

    assert gone.returncode == 1
    assert "no rxfilterd is running" in gone.stderr
    assert not (tmp_path / "status.sock").exists()  # removed at exit
