"""Acceptance: rxfilterd survives the hypervisor, with every fault really injected.

These tests run on a libvirtd of their own, of the version under test
(tests/support/libvirts.py): the real libvirtd and QEMU, in a private mount namespace,
so killing and restarting it breaks nobody else's tests and no other guest's NIC is
touched by these daemons.
Each daemon runs with resync off unless the test is about the resync, so what
repaired the host is always what the test says (the `cause` on the applied line).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.support.daemon import Record, RunningDaemon, holds_for, wait_until
from tests.support.guest import (
    RUN_DIR,
    EthernetNic,
    Guest,
    Macvtap,
    Resources,
    create_macvtap,
    delete_link,
    ip,
    link_show,
    prefixed,
)
from tests.support.libvirtd import LabLibvirtd

pytestmark = pytest.mark.libvirt

MAC0 = "52:54:00:30:00:01"
MAC1 = "52:54:00:30:00:02"


# --------------------------------------------------------------------------- helpers


def host_mac(ifname: str) -> str:
    info = link_show(ifname)
    assert info is not None, f"{ifname} is gone"
    return str(info["address"])


def promisc(ifname: str) -> bool:
    info = link_show(ifname)
    assert info is not None, f"{ifname} is gone"
    return "PROMISC" in info["flags"]


def lines(daemon: RunningDaemon, event: str, **match: Any) -> list[Record]:
    return [
        r
        for r in daemon.records()
        if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
    ]


def wait_line(daemon: RunningDaemon, event: str, timeout: float = 10, **match: object) -> Record:
    return daemon.wait_for(
        lambda r: r.get("event") == event and all(r.get(k) == v for k, v in match.items()),
        timeout,
        f"{event} {match}",
    )


def make_daemon(
    workdir: Path,
    lv: LabLibvirtd,
    sync: dict[str, Any] | None = None,
    wrap: tuple[str, ...] = (),
) -> RunningDaemon:
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = RunningDaemon(
        workdir,
        {"resync_interval": 0, **(sync or {})},
        sections={"libvirt": {"uri": lv.uri, "reconnect_max": 1.0}},
        wrap=wrap,
    )
    return daemon  # `with` starts it; else call .start()


# --------------------------------------------------------------------------- fixtures


class TwoNics:
    """A guest whose eth0 sits on macvtap A (with a neighbour macvtap on A's lower
    device) and eth1 on macvtap B, both trusted ethernet NICs."""

    def __init__(self, guest: Guest, a: Macvtap, b: Macvtap, neighbour: Macvtap) -> None:
        self.guest, self.a, self.b, self.neighbour = guest, a, b, neighbour
        self.lower_a = prefixed("fla")


@pytest.fixture(scope="module")
def two_nics(lv: LabLibvirtd) -> Iterator[TwoNics]:
    """One boot shared by the host-fault tests: each test states what it expects."""
    res = Resources()
    c = lv.connect()
    try:
        a = res.veth_macvtap("fl", mac=MAC0)
        b = res.veth_macvtap("fm", mac=MAC1)
        neighbour = res.macvtap(prefixed("fln"), prefixed("fla"), mac="52:54:00:30:00:99")
        guest = res.guest(
            prefixed("fl"),
            [EthernetNic(a.name, mac=MAC0, trust=True), EthernetNic(b.name, mac=MAC1, trust=True)],
            conn=c,
        )
        yield TwoNics(guest, a, b, neighbour)
    finally:
        res.close()
        with contextlib.suppress(libvirt.libvirtError):
            c.close()
        lv.destroy_domains()


# --------------------------------------------------------------------------- libvirtd


def test_libvirtd_killed_or_stopped_is_survived_and_missed_changes_land(
    lv: LabLibvirtd, conn: Any, stack: Resources, tmp_path: Path
) -> None:
    mvt = stack.veth_macvtap("lk", mac=MAC0)
    guest = stack.guest(prefixed("lk"), [EthernetNic(mvt.name, mac=MAC0, trust=True)], conn=conn)
    daemon = make_daemon(tmp_path, lv).start()
    try:
        wait_line(daemon, "syncing", domain=guest.name, alias="net0")
        guest.set_mac("52:54:00:30:10:00")
        wait_until(lambda: host_mac(mvt.name) == "52:54:00:30:10:00", 5, "MAC before")
        for round_, signum in enumerate((signal.SIGKILL, signal.SIGTERM), start=1):
            lv.kill(signum)
            wait_line(daemon, "libvirt away", timeout=30)
            # Changed while libvirtd is away: QEMU keeps the NIC state, and the one
            # event it raises reaches nobody.
            mac = f"52:54:00:30:10:{round_:02x}"
            guest.set_mac(mac)
            time.sleep(2.5)  # several reconnect attempts fail meanwhile
            assert host_mac(mvt.name) != mac
            lv.start()
            wait_until(lambda: host_mac(mvt.name) == mac, 15, "MAC after reconnect")  # noqa: B023 - called at once
            assert len(lines(daemon, "libvirt back")) == round_
        # Re-armed by the resync: a later change arrives as an event again.
        guest.set_mac("52:54:00:30:10:ff")
        wait_until(lambda: host_mac(mvt.name) == "52:54:00:30:10:ff", 5, "MAC after re-arm")
        assert daemon.proc is not None and daemon.proc.poll() is None  # stayed up
    finally:
        assert daemon.stop() == 0
        lv.destroy_domains()  # the guest's own connection died with the first libvirtd
    # Said once per outage, not once per failed attempt.
    away, back = lines(daemon, "libvirt away"), lines(daemon, "libvirt back")
    assert len(away) == 2 and len(back) == 2
    assert all(r["level"] == "warning" for r in away) and all(r["level"] == "info" for r in back)
    retries = lines(daemon, "libvirt still away")
    assert len(retries) >= 2 and all(r["level"] == "debug" for r in retries)
    assert max(r["retry_in"] for r in retries) <= 1.0  # capped by reconnect_max
    applied = lines(daemon, "applied", domain=guest.name, field="mac")
    assert [r["cause"] for r in applied if r["new"].endswith(":01")] == ["reconnect"]
    assert [r["cause"] for r in applied if r["new"].endswith(":02")] == ["reconnect"]
    assert [r["cause"] for r in applied if r["new"].endswith(":ff")] == ["event"]


# --------------------------------------------------------------------------- lifecycle


def test_reset_plug_unplug_restore_and_stop(
    lv: LabLibvirtd, conn: Any, stack: Resources, tmp_path: Path
) -> None:
    mvt = stack.veth_macvtap("lc", mac=MAC0)
    plug = stack.veth_macvtap("lp", mac="52:54:00:30:20:77")  # not yet the NIC's MAC
    guest = stack.guest(prefixed("lc"), [EthernetNic(mvt.name, mac=MAC0, trust=True)], conn=conn)
    with make_daemon(tmp_path, lv) as daemon:
        wait_line(daemon, "syncing", domain=guest.name, alias="net0")
        guest.set_mac("52:54:00:30:20:01")
        wait_until(lambda: host_mac(mvt.name) == "52:54:00:30:20:01", 5, "MAC before reset")
        # The guest's own follow-ups (its new solicited-node group) first: a sync of
        # theirs still pending at the reset would be the one to find the reset state.
        daemon.wait_quiet()

        # Reset: QEMU restores the configured MAC and says nothing about the NIC.
        guest.reset()
        wait_until(lambda: host_mac(mvt.name) == MAC0, 10, "configured MAC after reset")
        # The line follows the write: wait for it rather than race it.
        reset = wait_line(daemon, "applied", domain=guest.name, field="mac", new=MAC0)
        assert reset["cause"] == "reset"

        # Hot-plug a second trusted NIC: synced like any other.
        nic = EthernetNic(plug.name, mac=MAC1, trust=True).xml()
        guest.dom.attachDeviceFlags(nic, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        wait_line(daemon, "syncing", domain=guest.name, alias="net1")
        wait_until(lambda: host_mac(plug.name) == MAC1, 10, "plugged NIC's first sync")
        # The guest notices the new PCI device (ACPI hotplug) a moment later.
        guest.run(
            "i=0; until ip link show eth1 >/dev/null 2>&1; do"
            " i=$((i+1)); [ $i -gt 100 ] && exit 1; sleep 0.2; done;"
            " ip link set eth1 up && ip link set eth1 address 52:54:00:30:20:11"
        )
        wait_until(lambda: host_mac(plug.name) == "52:54:00:30:20:11", 10, "plugged NIC")

        # Unplug it: nothing of it stays behind.
        guest.dom.detachDeviceFlags(nic, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        wait_line(daemon, "nic gone", timeout=30, domain=guest.name, alias="net1")
        daemon.wait_for(
            lambda r: (
                r.get("event") == "tracking"
                and r.get("domains", {}).get(guest.name) == ["net0"]
                and r.get("stopping") == 0
                and r.get("orphans") == 0
            ),
            5,
            "net1 forgotten",
        )

        # A domain arriving from elsewhere. One host cannot migrate to itself; a
        # save and restore is the same thing seen from here: a new QEMU starts with
        # the guest's state (its changed MAC included) on a macvtap that carries the
        # configured MAC, libvirt says STARTED/RESUMED (detail "restored" here,
        # "migrated" after a migration) and QEMU raises no rx-filter event.
        guest.set_mac("52:54:00:30:20:02")
        wait_until(lambda: host_mac(mvt.name) == "52:54:00:30:20:02", 5, "MAC before save")
        # Where both this host and the libvirtd under test (maybe in a root of its
        # own) see the same file; cleanup_leftovers removes it after an aborted run.
        image = RUN_DIR / f"{guest.name}.save"
        guest.dom.save(str(image))
        wait_line(daemon, "domain event", domain=guest.name, change="stopped", detail="saved")
        delete_link(mvt.name)  # the destination's macvtap: fresh, configured MAC
        create_macvtap(mvt.name, prefixed("lca"), mac=MAC0)
        conn.restore(str(image))
        image.unlink()
        wait_line(daemon, "domain event", domain=guest.name, change="started", detail="restored")
        wait_until(lambda: host_mac(mvt.name) == "52:54:00:30:20:02", 10, "MAC after restore")
        # Put back by the sync of the domain's start, not by a guest event. A restore is
        # STARTED then RESUMED; on 11.3 the resume may find the NIC's live XML changed
        # (currentAddress) and start its sync afresh: either lifecycle cause, never "event".
        daemon.wait_for(
            lambda r: (
                r.get("event") == "applied"
                and r.get("domain") == guest.name
                and r.get("new") == "52:54:00:30:20:02"
                and r.get("cause") in ("started", "resumed")
            ),
            10,
            "the MAC put back by the restore's sync",
        )

        # Stop: the domain and all its workers are gone.
        conn.lookupByName(guest.name).destroy()
        wait_line(daemon, "domain gone", domain=guest.name)
        daemon.wait_for(
            lambda r: (
                r.get("event") == "tracking"
                and guest.name not in r.get("domains", {})
                and r.get("stopping") == 0
                and r.get("orphans") == 0
            ),
            5,
            "nothing tracked for the stopped domain",
        )
    assert not lines(daemon, "failed", domain=guest.name)


# --------------------------------------------------------------------------- host faults


def test_macvtap_vanishing_and_coming_back_is_retried_and_synced(
    lv: LabLibvirtd, two_nics: TwoNics, tmp_path: Path
) -> None:
    guest, a = two_nics.guest, two_nics.a
    with contextlib.ExitStack() as cleanup, make_daemon(tmp_path, lv, {"retry_max": 2.0}) as daemon:
        wait_line(daemon, "syncing", domain=guest.name, alias="net0")
        guest.set_mac("52:54:00:30:30:01")
        wait_until(lambda: host_mac(a.name) == "52:54:00:30:30:01", 5, "MAC before")
        delete_link(a.name)
        # The module's later tests need link A: put it back if this one fails first.
        cleanup.callback(_recreated, two_nics)
        guest.set_mac("52:54:00:30:30:02")
        gone = wait_line(daemon, "failed", domain=guest.name, alias="net0")
        # Read after the delete: gone. Or a sync of the guest's multicast joins that
        # followed the first MAC read the link before the delete and wrote after it:
        # the write's ifindex check finds the link vanished. Nothing was written.
        assert (gone["stage"], gone["reason"]) in {("read", "gone"), ("apply", "vanished")}
        wait_line(daemon, "failed", domain=guest.name, alias="net0", attempt=2)
        # Same name, new ifindex, the configured MAC: re-read and synced by the retry,
        # or by a follow-up of the guest's own events if one runs first (the guest
        # joins multicast groups after a MAC change); either reads the new link.
        new = _recreated(two_nics)
        assert new.ifindex != a.ifindex
        wait_until(lambda: host_mac(a.name) == "52:54:00:30:30:02", 10, "MAC on the new link")
        # The lines follow the write: wait for them rather than race them.
        landed = wait_line(daemon, "applied", domain=guest.name, new="52:54:00:30:30:02")
        assert landed["cause"] in ("retry", "event")
        recovered = wait_line(daemon, "recovered", domain=guest.name, alias="net0")
        assert recovered["after_attempts"] >= 2
        assert len(lines(daemon, "applied", domain=guest.name, new="52:54:00:30:30:02")) == 1

        # The lower device going down: the macvtap still takes its filter.
        ip("link", "set", two_nics.lower_a, "down")
        try:
            guest.set_mac("52:54:00:30:30:03")
            wait_until(lambda: host_mac(a.name) == "52:54:00:30:30:03", 5, "MAC, lower down")
        finally:
            ip("link", "set", two_nics.lower_a, "up")
        failed = lines(daemon, "failed", domain=guest.name)
    # Only the attempts while the link was away failed (two, maybe a third).
    assert {r["reason"] for r in failed} <= {"gone", "vanished"}
    assert "gone" in {r["reason"] for r in failed}
    assert two_nics.a is new


def _recreated(two_nics: TwoNics) -> Macvtap:
    """Link A again if it is missing (same name, configured MAC), as TWO_NICS.a."""
    if link_show(two_nics.a.name) is None:
        two_nics.a = create_macvtap(two_nics.a.name, two_nics.lower_a, mac=MAC0)
    return two_nics.a


def test_mac_in_use_fails_clearly_retries_and_spares_the_other_nic(
    lv: LabLibvirtd, two_nics: TwoNics, tmp_path: Path
) -> None:
    guest, a, b = two_nics.guest, two_nics.a, two_nics.b
    taken = two_nics.neighbour.mac  # another macvtap on A's lower device has it
    with make_daemon(tmp_path, lv, {"retry_max": 8.0}) as daemon:
        wait_line(daemon, "syncing", domain=guest.name, alias="net1")
        before = host_mac(a.name)
        guest.set_mac(taken)
        first = wait_line(daemon, "failed", domain=guest.name, alias="net0")
        assert first["reason"] == "EADDRINUSE" and first["stage"] == "apply"
        assert first["level"] == "error" and first["field"] == "mac" and first["new"] == taken
        assert "same lower device" in first["error"]
        # The other NIC of the same guest keeps following while net0 retries.
        guest.set_mac("52:54:00:30:40:11", dev="eth1")
        wait_until(lambda: host_mac(b.name) == "52:54:00:30:40:11", 5, "the other NIC")
        second = wait_line(daemon, "failed", domain=guest.name, alias="net0", attempt=2)
        assert second["retry_in"] > first["retry_in"]  # backing off
        assert host_mac(a.name) == before
        # The guest picks a free MAC: it lands (the retry timer does not hold it up).
        guest.set_mac("52:54:00:30:40:01")
        wait_until(lambda: host_mac(a.name) == "52:54:00:30:40:01", 5, "free MAC")
        assert daemon.proc is not None and daemon.proc.poll() is None
    assert not lines(daemon, "failed", alias="net1")


def test_the_host_refusing_a_write_with_eperm_is_said_and_retried(
    lv: LabLibvirtd, two_nics: TwoNics, tmp_path: Path
) -> None:
    guest, a = two_nics.guest, two_nics.a
    no_net_admin = ("setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--")
    with make_daemon(tmp_path, lv, {"retry_max": 2.0}, wrap=no_net_admin) as daemon:
        wait_line(daemon, "syncing", domain=guest.name, alias="net0")
        before = host_mac(a.name)
        guest.set_mac("52:54:00:30:50:01")
        first = wait_line(daemon, "failed", domain=guest.name, alias="net0")
        assert first["reason"] == "EPERM" and "Operation not permitted" in first["error"]
        third = wait_line(daemon, "failed", domain=guest.name, alias="net0", attempt=3)
        assert third["retry_in"] == 2.0  # 1, 2, then capped by retry_max
        assert host_mac(a.name) == before
    assert daemon.exit_seconds is not None and daemon.exit_seconds < 5


def test_drift_by_hand_is_put_back_and_logged(
    lv: LabLibvirtd, two_nics: TwoNics, tmp_path: Path
) -> None:
    guest, b = two_nics.guest, two_nics.b
    with make_daemon(tmp_path, lv, {"resync_interval": 2}) as daemon:
        wait_line(daemon, "synced", domain=guest.name, alias="net1")  # in sync first
        mac = host_mac(b.name)
        assert not promisc(b.name)
        ip("link", "set", b.name, "promisc", "on")
        wait_until(lambda: not promisc(b.name), 6, "promiscuous put back")
        ip("link", "set", b.name, "address", "52:54:00:30:60:66")
        wait_until(lambda: host_mac(b.name) == mac, 6, "MAC put back")
        # The MAC is back a moment before the sync that wrote it logs its line.
        wait_line(daemon, "applied", domain=guest.name, alias="net1", field="mac")
        drift = lines(daemon, "drift", domain=guest.name, alias="net1")
    assert [d["fields"] for d in drift] == [["promiscuous"], ["mac"]]
    assert drift[0]["found"] == {"promiscuous": True}
    assert drift[0]["expected"] == {"promiscuous": False}
    assert drift[1]["found"] == {"mac": "52:54:00:30:60:66"} and drift[1]["level"] == "warning"
    fixed = lines(daemon, "applied", domain=guest.name, alias="net1", cause="resync")
    assert [r["field"] for r in fixed] == ["promiscuous", "mac"]


# --------------------------------------------------------------------------- hostile guest


FLIPS = 400
RATE = 2.0
# Flipping through sysfs costs the guest no exec per flip (an `ip` run is ~0.2 s under
# TCG), so the guest really flips as fast as it can. 0x100 is IFF_PROMISC, 0x200
# IFF_ALLMULTI; `f` is the NIC's flags with both off.
FLAGS = "/sys/class/net/eth0/flags"
FLAGS_OFF = f"f=$(( $(cat {FLAGS}) & ~0x300 ))"


def test_a_guest_flipping_its_filter_costs_bounded_syncs_and_lands(
    lv: LabLibvirtd, conn: Any, stack: Resources, tmp_path: Path
) -> None:
    mvt = stack.veth_macvtap("hf", mac=MAC0)
    guest = stack.guest(prefixed("hf"), [EthernetNic(mvt.name, mac=MAC0, trust=True)], conn=conn)
    where: dict[str, Any] = {"domain": guest.name, "alias": "net0"}
    with make_daemon(tmp_path / "rate", lv, {"max_syncs_per_second": RATE}) as daemon:
        wait_line(daemon, "synced", **where)
        syncs_before = len(lines(daemon, "synced", **where))
        started = time.monotonic()
        guest.run(
            f"{FLAGS_OFF}; i=0; while [ $i -lt {FLIPS} ]; do echo $((f | 0x100)) >{FLAGS};"
            f" echo $f >{FLAGS}; i=$((i+1)); done; echo $((f | 0x100)) >{FLAGS}",
            timeout=120,
        )
        flipped = time.monotonic() - started
        wait_until(lambda: promisc(mvt.name), 5, "the last state (promiscuous on)")
        assert holds_for(lambda: promisc(mvt.name), 1.0)
        window = time.monotonic() - started
        syncs = len(lines(daemon, "synced", **where)) - syncs_before
    # The token bucket: a burst of round(RATE), then RATE a second.
    assert syncs <= RATE + RATE * window + 1, (syncs, window)
    assert syncs < FLIPS / 4, f"{syncs} syncs for {2 * FLIPS} flips in {flipped:.1f} s"

    # SIGTERM in the middle of a burst that changes two fields at once.
    # Each write flips two fields at once: every sync applies a two-change plan.
    loop = (
        f"{FLAGS_OFF}; (while :; do echo $((f | 0x300)) >{FLAGS}; echo $f >{FLAGS}; done)"
        " >/dev/null 2>&1 & echo $! >/tmp/flip.pid"
    )
    daemon = make_daemon(tmp_path / "term", lv).start()
    try:
        wait_line(daemon, "synced", **where)
        # Where the first sync left the host: a field no later sync applies stays so.
        before = {
            "promiscuous": promisc(mvt.name),
            "allmulti": "ALLMULTI" in (link_show(mvt.name) or {}).get("flags", []),
        }
        guest.run(loop)
        daemon.wait_for(
            lambda r: r.get("event") == "applied" and r.get("cause") == "event", 10, "the burst"
        )
        time.sleep(1.0)
    finally:
        assert daemon.stop() == 0
        final_mac, final_promisc = host_mac(mvt.name), promisc(mvt.name)
        final_allmulti = "ALLMULTI" in (link_show(mvt.name) or {}).get("flags", [])
        guest.run("kill $(cat /tmp/flip.pid)")
    assert daemon.exit_seconds is not None and daemon.exit_seconds < 5
    # Whatever the host was left with, the log accounts for it: the last applied
    # value of each field, or a line saying a sync was cut off there.
    records = [r for r in daemon.records() if r.get("domain") == guest.name]
    abandoned = {
        f
        for r in records
        if r.get("event") == "abandoned"
        for f in [*r["applied"], *r["pending"], r["in_flight"]]
        if f
    }
    applied = [r for r in records if r.get("event") == "applied"]
    last = {r["field"]: r["new"] for r in applied}
    assert last.keys() & {"promiscuous", "allmulti"}, "the burst applied nothing"
    assert final_mac == last.get("mac", MAC0)
    # A field no sync ever found different (the queries sample a moving guest) must
    # still be where the first sync left it.
    for name, now in (("promiscuous", final_promisc), ("allmulti", final_allmulti)):
        if name not in abandoned:
            assert now == last.get(name, before[name]), (name, now, last, before)


def test_a_guest_changing_its_filter_non_stop_is_muted_and_its_other_nic_still_syncs(
    lv: LabLibvirtd, conn: Any, stack: Resources, tmp_path: Path
) -> None:
    noisy = stack.veth_macvtap("hn", mac=MAC0)
    other = stack.veth_macvtap("ho", mac=MAC1)
    nics = [EthernetNic(m.name, mac=m.mac, trust=True) for m in (noisy, other)]
    guest = stack.guest(prefixed("hn"), nics, conn=conn)
    net0: dict[str, Any] = {"domain": guest.name, "alias": "net0"}
    with make_daemon(tmp_path, lv) as daemon:
        wait_line(daemon, "synced", **net0)
        wait_line(daemon, "synced", domain=guest.name, alias="net1")
        flip = f"while :; do echo $((f | 0x100)) >{FLAGS}; echo $f >{FLAGS}; done"
        guest.run(f"{FLAGS_OFF}; ({flip}) >/dev/null 2>&1 & echo $! >/tmp/flip.pid")
        try:
            # libvirt re-arms a trusted NIC's event on each change: hundreds a second.
            muted = wait_line(daemon, "filter events muted", **net0)
            assert muted["ifname"] == noisy.name
            # The domain's events go unsent now, net1's too; its change still lands.
            guest.run("ip link set eth1 address 52:54:00:30:00:77")
            wait_until(lambda: host_mac(other.name) == "52:54:00:30:00:77", 10, "net1's new MAC")
            # Waited for, not read at once: the MAC is on the device a moment before the
            # sync that wrote it logs its line.
            wait_line(daemon, "synced", 5, domain=guest.name, alias="net1", cause="unmuted")
            # While muted, rxfilterd hears a few events per sync, not hundreds.
            muted_at = daemon.records().index(muted)
            time.sleep(2.0)
            later = daemon.records()[muted_at:]
            net0_lines = [r.get("event") for r in later if r.get("alias") == "net0"]
            heard, syncs = net0_lines.count("rx-filter event"), net0_lines.count("synced")
            assert syncs >= 2 and heard <= 10 * syncs, (heard, syncs)
        finally:
            guest.run("kill $(cat /tmp/flip.pid)")
        guest.run(f"{FLAGS_OFF}; echo $((f | 0x100)) >{FLAGS}")  # the last word: promiscuous
        wait_line(daemon, "filter events unmuted", **net0)
        wait_until(lambda: promisc(noisy.name), 5, "the last state (promiscuous on)")
        assert not lines(daemon, "rejected") and not lines(daemon, "failed")


# --------------------------------------------------------------------------- stuck domain


def test_a_stuck_domain_delays_no_other_and_shutdown_abandons_it(
    lv: LabLibvirtd, conn: Any, stack: Resources, tmp_path: Path
) -> None:
    ok_tap = stack.veth_macvtap("so", mac=MAC0)
    stuck_tap = stack.veth_macvtap("ss", mac=MAC1)
    ok = stack.guest(prefixed("so"), [EthernetNic(ok_tap.name, mac=MAC0, trust=True)], conn=conn)
    # Started, not booted: it is stopped at once, so its shell would never answer.
    stuck = Guest(prefixed("ss"), [EthernetNic(stuck_tap.name, mac=MAC1, trust=True)], conn=conn)
    conn.defineXML(stuck.xml()).create()  # removed by the `conn` fixture
    # A stopped QEMU never answers its monitor: libvirt's qemuMonitorCommand for it
    # blocks (holding that domain's job) for as long as it stays stopped.
    qemu = lv.qemu_pid(stuck.name)
    os.kill(qemu, signal.SIGSTOP)
    try:
        daemon = make_daemon(tmp_path, lv).start()
        try:
            wait_line(daemon, "synced", domain=ok.name, alias="net0")
            ok.set_mac("52:54:00:30:80:01")
            daemon.wait_until(
                lambda: host_mac(ok_tap.name) == "52:54:00:30:80:01", 5, "other domain"
            )
            assert not lines(daemon, "synced", domain=stuck.name)
        finally:
            assert daemon.stop() == 0
    finally:
        os.kill(qemu, signal.SIGCONT)
    assert daemon.exit_seconds is not None and daemon.exit_seconds < 5
    [cut] = lines(daemon, "abandoned", domain=stuck.name)
    assert cut["stage"] == "query" and cut["applied"] == []
    assert host_mac(stuck_tap.name) == MAC1  # never queried, never touched


def test_more_stuck_domains_than_libvirtd_serves_per_client_still_spare_the_others(
    lv: LabLibvirtd, conn: Any, stack: Resources, tmp_path: Path
) -> None:
    """libvirtd runs at most 5 calls per client connection (max_client_requests): six
    domains whose monitors hang must not take every slot from a healthy one."""
    ok_tap = stack.veth_macvtap("mo", mac=MAC0)
    ok = stack.guest(prefixed("mo"), [EthernetNic(ok_tap.name, mac=MAC0, trust=True)], conn=conn)
    stuck_pids = []
    for i in range(6):
        tap = stack.veth_macvtap(f"m{i}", mac=f"52:54:00:30:90:{i:02x}")
        guest = Guest(
            prefixed(f"m{i}"), [EthernetNic(tap.name, mac=tap.mac, trust=True)], conn=conn
        )
        conn.defineXML(guest.xml()).create()  # removed by the `conn` fixture
        stuck_pids.append(lv.qemu_pid(guest.name))
    for pid in stuck_pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        daemon = make_daemon(tmp_path, lv).start()
        try:
            wait_line(daemon, "synced", domain=ok.name, alias="net0")
            ok.set_mac("52:54:00:30:90:aa")
            daemon.wait_until(
                lambda: host_mac(ok_tap.name) == "52:54:00:30:90:aa", 5, "healthy domain"
            )
        finally:
            assert daemon.stop() == 0
    finally:
        for pid in stuck_pids:
            os.kill(pid, signal.SIGCONT)
