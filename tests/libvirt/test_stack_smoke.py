"""Smoke test of the real-stack infrastructure (no rxfilterd involved)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from tests.support.guest import EthernetNic, Resources, current_libvirt, prefixed

pytestmark = pytest.mark.libvirt

INITIAL_MAC = "52:54:00:12:34:56"
NEW_MAC = "52:54:00:aa:bb:cc"


def _virsh_rx_filter(domain: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            "virsh",
            "-c",
            current_libvirt().uri,
            "qemu-monitor-command",
            domain,
            json.dumps({"execute": "query-rx-filter"}),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    result: list[dict[str, object]] = json.loads(out)["return"]
    return result


def test_guest_mac_change_reaches_qemu(
    stack: Resources, record_property: Callable[[str, object], None]
) -> None:
    mvt = stack.veth_macvtap("sm")
    guest = stack.guest(prefixed("smoke"), [EthernetNic(mvt.name, mac=INITIAL_MAC, trust=True)])
    record_property("guest_boot_seconds", round(guest.boot_seconds or 0.0, 2))

    [nic] = guest.interfaces()
    assert (nic.alias, nic.type, nic.target_dev) == ("net0", "ethernet", mvt.name)
    [before] = _virsh_rx_filter(guest.name)
    assert before["main-mac"] == INITIAL_MAC

    guest.run(f"ip link set eth0 address {NEW_MAC}")

    [after] = _virsh_rx_filter(guest.name)
    assert after["name"] == "net0"
    assert after["main-mac"] == NEW_MAC
    assert json.loads(guest.run("ip -j link show eth0"))[0]["address"] == NEW_MAC
