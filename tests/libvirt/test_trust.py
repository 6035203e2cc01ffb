"""Trust exactly as libvirt holds it for a running NIC (issue 20).

A network NIC's trust is its network port's, resolved by libvirt when the NIC was
plugged. Editing the network (portgroup or network trust) afterwards reaches NICs
plugged later (hot-plugged, or a restarted domain), never the running one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.support.daemon import Record, RunningDaemon, holds_for, wait_until, write_config
from tests.support.guest import (
    EthernetNic,
    LibvirtTarget,
    Network,
    NetworkNic,
    Portgroup,
    Resources,
    link_show,
    prefixed,
)

pytestmark = pytest.mark.libvirt

MAC0 = "52:54:00:50:00:01"
MAC1 = "52:54:00:50:00:02"
NEW_MAC = "52:54:00:50:aa:01"


def set_portgroup_trust(net: Network, trust: bool) -> None:
    """`virsh net-update NET modify portgroup ... --live --config`."""
    word = "yes" if trust else "no"
    net.net.update(
        libvirt.VIR_NETWORK_UPDATE_COMMAND_MODIFY,
        libvirt.VIR_NETWORK_SECTION_PORTGROUP,
        -1,
        f"<portgroup name='pg' trustGuestRxFilters='{word}'/>",
        libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG,
    )


def explain(tmp_path: Path, domain: str) -> list[dict[str, Any]]:
    config = write_config(tmp_path / "explain.toml", {"log": {"level": "warning"}})
    out = subprocess.run(
        [sys.executable, "-m", "rxfilterd", "explain", "--config", str(config), "--json", domain],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def decision(daemon: RunningDaemon, domain: str, alias: str, timeout: float = 30) -> Record:
    return daemon.wait_for(
        lambda r: (
            r.get("event") in ("syncing", "skipped")
            and r.get("domain") == domain
            and r.get("alias") == alias
        ),
        timeout,
        f"the decision on {domain}/{alias}",
    )


def host_mac(ifname: str) -> str:
    info = link_show(ifname)
    assert info is not None, f"{ifname} is gone"
    return str(info["address"])


@pytest.mark.parametrize("plugged", [False, True], ids=["granted-later", "revoked-later"])
def test_a_running_nic_keeps_the_trust_of_its_port(
    stack: Resources, tmp_path: Path, plugged: bool
) -> None:
    tag = "tg" if plugged else "tn"
    stack.veth(prefixed(tag + "a"), prefixed(tag + "b"))
    net = stack.network(
        prefixed(tag), prefixed(tag + "a"), portgroups=[Portgroup("pg", trust=plugged)]
    )
    guest = stack.guest(prefixed(tag), [NetworkNic(net.name, mac=MAC0, portgroup="pg")])
    # The network changes under the running NIC: its port keeps what it was plugged with.
    set_portgroup_trust(net, not plugged)
    word, now = ("yes", "no") if plugged else ("no", "yes")
    assert [f"trustGuest='{word}'" in xml for xml in net.ports_xml()] == [True]
    [nic] = guest.interfaces()
    assert nic.target_dev is not None

    [row] = explain(tmp_path, guest.name)
    assert (row["trust"], row["trust_source"]) == (word, "port"), row
    assert f"the network now says {now}: applies when the NIC is plugged again" in row["reason"]
    assert row["action"] == ("sync" if plugged else "skip")

    with RunningDaemon(tmp_path) as daemon:
        line = decision(daemon, guest.name, "net0")
        assert (line["trust"], line["trust_source"]) == (word, "port"), line
        assert "plugged again" in line["trust_note"]
        guest.set_mac(NEW_MAC)
        if plugged:
            # Trusted as libvirt holds it: libvirt and rxfilterd both follow the guest.
            wait_until(lambda: host_mac(nic.target_dev or "") == NEW_MAC, 10, "the new MAC")
            daemon.wait_for(
                lambda r: r.get("event") in ("applied", "synced") and r.get("domain") == guest.name,
                10,
                "rxfilterd syncing the NIC",
            )
        else:
            # Untrusted as libvirt holds it: nothing reaches the host, nothing is asked.
            assert holds_for(lambda: host_mac(nic.target_dev or "") == MAC0, 3)
            # (On the host's shared libvirtd, other runs' domains are synced too.)
            queried = [
                r
                for r in daemon.records()
                if r.get("event") in ("applied", "synced") and r.get("domain") == guest.name
            ]
            assert queried == []

        # A NIC plugged after the change gets the network's new trust.
        guest.dom.attachDeviceFlags(
            NetworkNic(net.name, mac=MAC1, portgroup="pg").xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
        line = decision(daemon, guest.name, "net1")
        assert (line["trust"], line["trust_source"]) == (now, "port"), line
        assert "trust_note" not in line

        # So does every NIC of a restarted domain.
        guest.dom.destroy()
        guest.dom.create()
        restarted = daemon.wait_for(
            lambda r: (
                r.get("event") in ("syncing", "skipped")
                and r.get("domain") == guest.name
                and r.get("alias") == "net0"
                and r.get("trust") == now
            ),
            30,
            "net0 with the new trust after a restart",
        )
        assert restarted["trust_source"] == "port"


def test_a_network_restart_keeps_what_the_daemon_read(stack: Resources, tmp_path: Path) -> None:
    # Restarting a network drops its ports (libvirt 9.0), while the running NICs keep
    # the trust libvirt gave them. rxfilterd keeps the value it read from the port; a
    # daemon that never saw the port cannot read it and treats the NIC as untrusted.
    stack.veth(prefixed("tra"), prefixed("trb"))
    net = stack.network(prefixed("tr"), prefixed("tra"), portgroups=[Portgroup("pg", trust=True)])
    guest = stack.guest(prefixed("tr"), [NetworkNic(net.name, mac=MAC0, portgroup="pg")])
    [nic] = guest.interfaces()
    with RunningDaemon(tmp_path, sync={"resync_interval": 1}) as daemon:
        assert decision(daemon, guest.name, "net0")["trust"] == "yes"
        net.net.destroy()
        net.net.create()
        resyncs = len([r for r in daemon.records() if r.get("event") == "synced"])
        wait_until(
            lambda: len([r for r in daemon.records() if r.get("event") == "synced"]) > resyncs + 1,
            15,
            "resyncs after the network restart",
        )
        assert [r for r in daemon.records() if r.get("event") == "skipped"] == []
        guest.set_mac(NEW_MAC)
        wait_until(lambda: host_mac(nic.target_dev or "") == NEW_MAC, 10, "the new MAC")
    assert net.ports_xml() == [] or all("<rxfilters" in x for x in net.ports_xml())
    if net.ports_xml() == []:
        [row] = explain(tmp_path, guest.name)
        assert (row["trust"], row["trust_source"]) == ("no", "port"), row
        assert "its network port cannot be found" in row["reason"]


def test_a_trust_changed_on_the_running_domain_takes_effect_both_ways(
    stack: Resources, tmp_path: Path, libvirt_under_test: LibvirtTarget
) -> None:
    # update-device --live changes an ethernet NIC's trust (libvirt >= 10.0) and
    # announces nothing. Granted: rxfilterd finds out by itself, queries and syncs,
    # though the guest does nothing more. Revoked: not one more write.
    mvt = stack.veth_macvtap("lv", mac=MAC0)
    guest = stack.guest(prefixed("lv"), [EthernetNic(mvt.name, mac=MAC0, trust=False)])
    with RunningDaemon(tmp_path) as daemon:
        assert decision(daemon, guest.name, "net0")["trust"] == "no"
        guest.set_mac(NEW_MAC)
        assert holds_for(lambda: host_mac(mvt.name) == MAC0, 1.0)

        guest.set_trust_live("net0", True)
        if libvirt_under_test.label == "9.0":
            # 9.0 accepts the call and keeps the old trust: so does rxfilterd.
            assert "trustGuestRxFilters='no'" in guest.interface_xml("net0")
            assert holds_for(lambda: host_mac(mvt.name) == MAC0, 3.0)
            return
        took = wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 10, "the granted NIC synced")
        print(f"libvirt {libvirt_under_test.label}: granted trust in effect after {took:.2f} s")
        granted = daemon.wait_for(
            lambda r: r.get("event") == "syncing" and r.get("domain") == guest.name, 5
        )
        assert (granted["trust"], granted["trust_source"]) == ("yes", "interface")

        # The MAC is the sync's first write: its multicast write and the guest's own
        # follow-up (a new solicited-node group) may come after. Revoke once they are over.
        def mine_now() -> int:
            return len([r for r in daemon.records() if r.get("domain") == guest.name])

        def quiet_for(seconds: float) -> bool:
            before = mine_now()
            return holds_for(lambda: mine_now() == before, seconds)

        daemon.wait_for(lambda r: r.get("event") == "synced" and r.get("domain") == guest.name, 5)
        for _ in range(10):
            if quiet_for(1.0):
                break

        guest.set_trust_live("net0", False)
        revoked_at = len(daemon.records())
        guest.set_mac(MAC1)
        # The guest's change reaches neither host nor log as a write.
        assert holds_for(lambda: host_mac(mvt.name) == NEW_MAC, 3.0)
        after = daemon.records()[revoked_at:]
        mine = [r for r in after if r.get("domain") == guest.name]
        assert [r for r in mine if r.get("event") == "applied"] == []
        daemon.wait_for(
            lambda r: (
                r.get("event") == "skipped"
                and r.get("domain") == guest.name
                and r.get("reason") == "untrusted"
            ),
            10,
            "the revoked NIC skipped",
        )
