"""Least privilege on a real guest: sync fields, [[policy]] tables and mac_allow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.libvirt.test_sync import IPV6, MAC0, NEW_MAC, SOLICITED, host_flags, host_mac
from tests.libvirt.test_sync import static_groups as groups
from tests.support.daemon import RunningDaemon, holds_for, wait_until, write_config
from tests.support.guest import EthernetNic, Resources, prefixed

pytestmark = pytest.mark.libvirt

SPOOF = "02:11:22:33:44:55"
EXPLAIN = [sys.executable, "-m", "rxfilterd", "explain"]


def test_multicast_only_policy_then_mac_allow(stack: Resources, tmp_path: Path) -> None:
    mvt = stack.veth_macvtap("po", mac=MAC0)
    name = prefixed("po")
    daemon = RunningDaemon(
        tmp_path, raw=f'[[policy]]\nname = "ipv6-only"\ndomain = "{name}"\nfields = ["multicast"]\n'
    )
    with daemon:
        guest = stack.guest(name, [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        syncing = daemon.wait_for(
            lambda r: r.get("event") == "syncing" and r.get("domain") == name, 30
        )
        assert syncing["policy"] == "ipv6-only" and syncing["fields"] == ["multicast"]
        guest.set_mac(NEW_MAC)
        guest.set_promisc(True)
        guest.add_ipv6(IPV6)
        wait_until(lambda: SOLICITED in groups(mvt.name), 5, "IPv6 group on the host")
        assert holds_for(
            lambda: host_mac(mvt.name) == MAC0 and "PROMISC" not in host_flags(mvt.name), 1.5
        ), "a field outside the policy reached the host"
        refused = [
            r for r in daemon.records() if r.get("event") == "refused" and r["domain"] == name
        ]
        assert {(r["field"], r["value"]) for r in refused} == {
            ("mac", NEW_MAC),
            ("promiscuous", "promiscuous on"),
        }
        assert all(r["level"] == "warning" for r in refused)
        assert len(refused) == 2, "a refusal is logged once per distinct value"
        explained = subprocess.run(
            [*EXPLAIN, "--config", str(daemon.config), "--json", "--notes", name],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        [row] = json.loads(explained)
        assert "policy ipv6-only: multicast" in row["notes"]

        # Now everything, but only MACs from the QEMU/KVM OUI.
        write_config(
            daemon.config,
            {"log": {"level": "debug", "format": "json"}, "sync": {"mac_allow": ["52:54:00"]}},
        )
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(lambda r: r.get("event") == "config reloaded", 10)
        guest.set_promisc(False)  # any change makes QEMU emit an event
        wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 5, "allowed MAC applied")
        guest.set_mac(SPOOF)
        daemon.wait_for(
            lambda r: r.get("event") == "refused" and r.get("value") == SPOOF, 10, "refusal"
        )
        assert holds_for(lambda: host_mac(mvt.name) == NEW_MAC, 1.0)
