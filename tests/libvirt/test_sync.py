"""Acceptance: a real guest changes its NIC, the real host macvtap follows (or not)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import RunningDaemon, holds_for, wait_until, write_config
from tests.support.guest import (
    DirectNic,
    EthernetNic,
    NetworkNic,
    Portgroup,
    Resources,
    current_libvirt,
    link_show,
    prefixed,
)

pytestmark = pytest.mark.libvirt

MAC0 = "52:54:00:10:00:01"
NEW_MAC = "52:54:00:aa:bb:cc"
IPV6 = "2001:db8::12:3456"
SOLICITED = "33:33:ff:12:34:56"  # ff02::1:ff12:3456, the group IPV6 makes the guest join


def host_mac(ifname: str) -> str:
    info = link_show(ifname)
    assert info is not None, f"{ifname} is gone"
    return str(info["address"])


def host_flags(ifname: str) -> set[str]:
    info = link_show(ifname)
    assert info is not None, f"{ifname} is gone"
    return set(info["flags"])


def static_groups(ifname: str) -> set[str]:
    """Multicast entries added on IFNAME (global users > 0), straight from the kernel."""
    groups = set()
    for line in Path("/proc/net/dev_mcast").read_text().splitlines():
        _index, name, _users, global_users, addr = line.split()
        if name == ifname and global_users != "0":
            groups.add(":".join(addr[i : i + 2] for i in range(0, 12, 2)))
    return groups


def domain_log(name: str) -> str:
    return current_libvirt().domain_log(name)


def test_trusted_ethernet_macvtap_follows_the_guest(stack: Resources, tmp_path: Path) -> None:
    mvt = stack.veth_macvtap("te", mac=MAC0)
    with RunningDaemon(tmp_path) as daemon:
        guest = stack.guest(prefixed("te"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
        daemon.wait_for(
            lambda r: r.get("domain") == guest.name and r.get("event") == "syncing", 30, "nic line"
        )
        guest.set_mac(NEW_MAC)
        wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 5, "new MAC on the host")
        guest.set_promisc(True)
        wait_until(lambda: "PROMISC" in host_flags(mvt.name), 5, "promiscuous on the host")
        guest.add_ipv6(IPV6)
        wait_until(lambda: SOLICITED in static_groups(mvt.name), 5, "solicited-node group")
        guest.set_promisc(False)
        wait_until(lambda: "PROMISC" not in host_flags(mvt.name), 5, "promiscuous off")
        # 8021q is loaded in the guest, so it reports vlan-table [0]: never promiscuous.
        assert holds_for(lambda: "PROMISC" not in host_flags(mvt.name), 1.0)
        applied = [
            r
            for r in daemon.records()
            if r.get("event") == "applied" and r.get("domain") == guest.name
        ]
    mac_line = next(r for r in applied if r["field"] == "mac" and r["new"] == NEW_MAC)
    assert mac_line["domain"] == guest.name and mac_line["alias"] == "net0"
    assert mac_line["ifname"] == mvt.name and mac_line["old"] == MAC0
    assert any(r["field"] == "multicast" and SOLICITED in r["added"] for r in applied)
    assert "custom-monitor" in domain_log(guest.name)  # the query taints: see the next test


def test_untrusted_nic_is_never_queried_or_touched(stack: Resources, tmp_path: Path) -> None:
    explicit_no = stack.veth_macvtap("un", mac=MAC0)
    unset = stack.veth_macvtap("uu", mac="52:54:00:10:00:02")
    with RunningDaemon(tmp_path) as daemon:
        guest = stack.guest(
            prefixed("un"),
            [
                EthernetNic(explicit_no.name, mac=MAC0, trust=False),
                EthernetNic(unset.name, mac="52:54:00:10:00:02"),
            ],
        )
        daemon.wait_for(lambda r: r.get("domain") == guest.name and r.get("alias") == "net1", 30)
        before = {
            n: (host_mac(n), host_flags(n), static_groups(n))
            for n in (explicit_no.name, unset.name)
        }
        for dev in ("eth0", "eth1"):
            guest.run(f"ip link set {dev} address {NEW_MAC.replace('cc', dev[-1] + 'c')}")
            guest.run(f"ip link set {dev} promisc on")
            guest.add_ipv6(IPV6.replace("::", f"::{dev[-1]}:"), dev=dev)
        after_ok = holds_for(
            lambda: (
                {
                    n: (host_mac(n), host_flags(n), static_groups(n))
                    for n in (explicit_no.name, unset.name)
                }
                == before
            ),
            3.0,
        )
        records = daemon.records()
    assert after_ok, "an untrusted guest changed its host macvtap"
    records = [r for r in records if r.get("domain") == guest.name]
    skips = {r["alias"]: r for r in records if r.get("event") == "skipped"}
    assert skips["net0"]["reason"] == "untrusted" and skips["net0"]["trust_source"] == "interface"
    assert skips["net1"]["reason"] == "untrusted" and skips["net1"]["trust_source"] == "default"
    assert not [r for r in records if r.get("event") in ("applied", "failed", "rejected")]
    assert "custom-monitor" not in domain_log(guest.name)


def test_trusted_direct_converges_beside_libvirt(stack: Resources, tmp_path: Path) -> None:
    stack.veth(prefixed("tda"), prefixed("tdb"))
    with RunningDaemon(tmp_path) as daemon:
        guest = stack.guest(prefixed("td"), [DirectNic(prefixed("tda"), mac=MAC0, trust=True)])
        [nic] = guest.interfaces()
        ifname = nic.target_dev
        assert ifname is not None
        daemon.wait_for(lambda r: r.get("domain") == guest.name and r.get("alias") == "net0", 30)
        guest.set_mac(NEW_MAC)
        guest.add_ipv6(IPV6)
        guest.set_allmulti(True)

        def converged() -> bool:
            # libvirt's rules: a VLAN table of [0] (8021q loaded) makes it promiscuous.
            flags = host_flags(ifname)
            return (
                host_mac(ifname) == NEW_MAC
                and SOLICITED in static_groups(ifname)
                and {"PROMISC", "ALLMULTI"} <= flags
            )

        wait_until(converged, 10, "direct macvtap converged")
        assert holds_for(converged, 2.0), "rxfilterd and libvirt fight over the macvtap"
        guest.set_allmulti(False)
        wait_until(lambda: "ALLMULTI" not in host_flags(ifname), 5, "allmulti off")
        assert holds_for(lambda: "ALLMULTI" not in host_flags(ifname), 1.0)
        failed = [
            r
            for r in daemon.records()
            if r.get("event") == "failed" and r.get("domain") == guest.name
        ]
    assert not failed


def test_explain_resolves_trust_through_networks_and_portgroups(
    stack: Resources, tmp_path: Path
) -> None:
    stack.veth(prefixed("exa"), prefixed("exb"))
    stack.veth(prefixed("eya"), prefixed("eyb"))
    trusting = stack.network(
        prefixed("nt"),
        prefixed("exa"),
        trust=True,
        portgroups=[
            Portgroup("pgyes", trust=True),
            Portgroup("pgno", trust=False),
            Portgroup("plain"),
            Portgroup("dflt", default=True, trust=False),
        ],
    )
    plain = stack.network(prefixed("np"), prefixed("eya"))
    cases = [
        # (nic, trust, trust_source, action)
        # A plugged network NIC's trust is its port's: libvirt resolved interface,
        # portgroup (named, else the default one), network, default when plugging it.
        (NetworkNic(trusting.name, portgroup="pgno", trust=True), "yes", "port", "sync"),
        (NetworkNic(trusting.name, portgroup="pgyes"), "yes", "port", "sync"),
        (NetworkNic(trusting.name, portgroup="pgno"), "no", "port", "skip"),
        (NetworkNic(trusting.name), "no", "port", "skip"),  # the default portgroup
        (NetworkNic(trusting.name, portgroup="plain"), "yes", "port", "sync"),
        (NetworkNic(plain.name), "no", "port", "skip"),
        (NetworkNic(trusting.name, portgroup="pgyes", model="e1000"), "yes", "port", "skip"),
    ]
    nics = [
        NetworkNic(
            c[0].network,
            mac=f"52:54:00:20:00:{i:02x}",
            portgroup=c[0].portgroup,
            trust=c[0].trust,
            model=c[0].model,
        )
        for i, c in enumerate(cases)
    ]
    guest = stack.guest(prefixed("ex"), nics)
    config = write_config(tmp_path / "rxfilterd.toml", {"log": {"level": "warning"}})
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rxfilterd",
            "explain",
            "--config",
            str(config),
            "--json",
            guest.name,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = json.loads(out)
    assert [set(r) for r in rows] == [
        {
            "libvirt",
            "domain",
            "alias",
            "ifname",
            "current_mac",
            "model",
            "type",
            "trust",
            "trust_source",
            "action",
            "reason",
        }
    ] * len(cases)
    for row, (_nic, trust, source, action) in zip(rows, cases, strict=True):
        assert (row["trust"], row["trust_source"], row["action"]) == (trust, source, action), row
        assert row["type"] == "direct"  # live XML shows the actual type
    assert rows[-1]["reason"] == "not virtio"
    assert {r["libvirt"] for r in rows} == {"host"}  # the configured libvirt's NICs
    # libvirt resolves the same trust for each network port.
    by_mac = {n.mac: n for n in guest.interfaces()}
    ports = {}
    for net in (trusting, plain):
        for port_xml in net.ports_xml():
            mac = port_xml.split("<mac address='")[1].split("'")[0]
            ports[mac] = "trustGuest='yes'" in port_xml
    for nic, row in zip(nics, rows, strict=True):
        assert nic.mac in by_mac
        assert ports[nic.mac] == (row["trust"] == "yes"), (nic, row)
    table = subprocess.run(
        [sys.executable, "-m", "rxfilterd", "explain", "--config", str(config), guest.name],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert table.splitlines()[0].split()[:4] == ["LIBVIRT", "DOMAIN", "ALIAS", "IFNAME"]
    assert len(table.splitlines()) == len(cases) + 1


def test_a_change_made_while_the_daemon_was_away_lands_on_restart(
    stack: Resources, tmp_path: Path
) -> None:
    mvt = stack.veth_macvtap("rs", mac=MAC0)
    guest = stack.guest(prefixed("rs"), [EthernetNic(mvt.name, mac=MAC0, trust=True)])
    with RunningDaemon(tmp_path) as daemon:
        daemon.wait_for(lambda r: r.get("domain") == guest.name, 30)
        guest.set_mac("52:54:00:10:00:99")
        wait_until(lambda: host_mac(mvt.name) == "52:54:00:10:00:99", 5, "first MAC")
    assert daemon.exit_seconds is not None and daemon.exit_seconds < 5
    # Away: the change below raises one event nobody hears, and QEMU goes quiet.
    guest.set_mac(NEW_MAC)
    guest.add_ipv6(IPV6)
    assert holds_for(lambda: host_mac(mvt.name) == "52:54:00:10:00:99", 1.0)
    with RunningDaemon(tmp_path) as daemon:
        wait_until(lambda: host_mac(mvt.name) == NEW_MAC, 10, "MAC after restart")
        wait_until(lambda: SOLICITED in static_groups(mvt.name), 5, "group after restart")
        # Re-armed: QEMU emits events again, and they are followed.
        guest.set_mac("52:54:00:aa:bb:dd")
        wait_until(lambda: host_mac(mvt.name) == "52:54:00:aa:bb:dd", 5, "MAC after re-arm")
        # The line follows the write: wait for it rather than race it.
        daemon.wait_for(
            lambda r: r.get("event") == "applied" and r.get("new") == "52:54:00:aa:bb:dd",
            5,
            "the re-armed change's line",
        )
        causes = {
            r.get("cause")
            for r in daemon.records()
            if r.get("event") == "applied" and r.get("domain") == guest.name
        }
    assert "start" in causes and "event" in causes
