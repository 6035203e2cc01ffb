"""The plan: right changes for each field, and applying it twice changes nothing."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rxfilterd.guest_filter import GuestFilter
from rxfilterd.host_state import HostState
from rxfilterd.plan import (
    AddressListChange,
    Change,
    FlagChange,
    MacChange,
    handling,
    host_after,
    make_plan,
)
from rxfilterd.policy import ALL_FIELDS, SyncPolicy, VlanPolicy

GUEST = GuestFilter(
    name="net0",
    main_mac="52:54:00:00:00:01",
    promiscuous=False,
    multicast="normal",
    unicast="normal",
    vlan="normal",
    broadcast_allowed=False,
    multicast_overflow=False,
    unicast_overflow=False,
    multicast_table=frozenset({"33:33:ff:00:00:01"}),
    unicast_table=frozenset(),
    vlan_table=frozenset({0}),
)
HOST = HostState(
    ifname="mvt0",
    ifindex=7,
    mode="bridge",
    mac="52:54:00:00:00:01",
    promiscuous=False,
    allmulti=False,
    multicast=frozenset({"33:33:ff:00:00:01"}),
    multicast_host=frozenset({"33:33:00:00:00:01"}),
    unicast=frozenset(),
    lower="veth0",
    lower_vlan_filter="none",
)


def guest(**kw: Any) -> GuestFilter:
    return dataclasses.replace(GUEST, **kw)


def host(**kw: Any) -> HostState:
    return dataclasses.replace(HOST, **kw)


def simulate(state: HostState, changes: tuple[Change, ...]) -> HostState:
    """What the kernel would hold after the changes (the host tier checks the real one)."""
    return host_after(state, changes)


def test_in_sync_means_no_changes() -> None:
    plan = make_plan(GUEST, HOST, SyncPolicy(), libvirt_syncs=False)
    assert plan.changes == () and plan.refusals == ()


def test_mac_change() -> None:
    plan = make_plan(guest(main_mac="52:54:00:aa:bb:cc"), HOST, SyncPolicy(), libvirt_syncs=False)
    assert plan.changes == (MacChange("52:54:00:00:00:01", "52:54:00:aa:bb:cc"),)


def test_multicast_add_and_remove() -> None:
    plan = make_plan(
        guest(multicast_table=frozenset({"01:00:5e:00:00:fb"})),
        HOST,
        SyncPolicy(),
        libvirt_syncs=False,
    )
    (change,) = plan.changes
    assert isinstance(change, AddressListChange)
    assert change.add == {"01:00:5e:00:00:fb"} and change.remove == {"33:33:ff:00:00:01"}


@pytest.mark.parametrize("libvirt_syncs", [False, True])
def test_vid_0_alone_never_makes_us_promiscuous_but_libvirt_does(libvirt_syncs: bool) -> None:
    plan = make_plan(
        guest(vlan_table=frozenset({0})), HOST, SyncPolicy(), libvirt_syncs=libvirt_syncs
    )
    flags = [c for c in plan.changes if isinstance(c, FlagChange)]
    # Where libvirt syncs, we write what libvirt writes, so the two never fight.
    assert flags == ([FlagChange("promiscuous", False, True)] if libvirt_syncs else [])


def test_real_vlan_makes_promiscuous_unless_ignored() -> None:
    g = guest(vlan_table=frozenset({0, 100}))
    assert make_plan(g, HOST, SyncPolicy(), libvirt_syncs=False).changes == (
        FlagChange("promiscuous", False, True),
    )
    assert make_plan(g, HOST, SyncPolicy(vlan="ignore"), libvirt_syncs=False).changes == ()


FILTER = SyncPolicy(vlan="filter")


def test_filter_mode_needs_no_promiscuous_where_the_lower_device_passes_every_vid() -> None:
    plan = make_plan(guest(vlan_table=frozenset({0, 100})), HOST, FILTER, libvirt_syncs=False)
    assert plan.changes == ()
    (note,) = plan.notes
    assert "without promiscuous" in note and "veth0" in note


@pytest.mark.parametrize(
    ("lower_filter", "says"),
    [("hardware", "rx-vlan-filter"), ("bridge", "vlan_filtering"), ("unknown", "cannot tell")],
)
def test_filter_mode_falls_back_to_promiscuous_and_says_why(lower_filter: str, says: str) -> None:
    h = host(lower_vlan_filter=lower_filter)
    plan = make_plan(guest(vlan_table=frozenset({0, 100})), h, FILTER, libvirt_syncs=False)
    assert plan.changes == (FlagChange("promiscuous", False, True),)
    (note,) = plan.notes
    assert "promiscuous instead" in note and says in note
    # The same text for other ids, so the daemon logs it once per NIC.
    other = make_plan(guest(vlan_table=frozenset({7})), h, FILTER, libvirt_syncs=False)
    assert other.notes == plan.notes


@pytest.mark.parametrize("vlan", ["promiscuous", "ignore", "filter"])
@pytest.mark.parametrize("lower_filter", ["none", "hardware", "bridge", "unknown"])
def test_vid_0_alone_never_forces_promiscuous_nor_a_note(
    vlan: VlanPolicy, lower_filter: str
) -> None:
    policy = SyncPolicy(vlan=vlan)
    h = host(lower_vlan_filter=lower_filter)
    plan = make_plan(guest(vlan_table=frozenset({0})), h, policy, libvirt_syncs=False)
    assert plan.changes == () and plan.notes == ()


def test_ignore_notes_the_ids_it_leaves_alone_and_promiscuous_does_not() -> None:
    g = guest(vlan_table=frozenset({0, 100}))
    ignored = make_plan(g, HOST, SyncPolicy(vlan="ignore"), libvirt_syncs=False)
    assert ignored.changes == () and "vlan = ignore" in ignored.notes[0]
    assert make_plan(g, HOST, SyncPolicy(), libvirt_syncs=False).notes == ()


@pytest.mark.parametrize("vlan", ["promiscuous", "ignore", "filter"])
def test_where_libvirt_syncs_any_vlan_entry_is_promiscuous_whatever_the_policy(
    vlan: VlanPolicy,
) -> None:
    policy = SyncPolicy(vlan=vlan)
    plan = make_plan(guest(vlan_table=frozenset({0})), HOST, policy, libvirt_syncs=True)
    assert plan.changes == (FlagChange("promiscuous", False, True),)
    assert "libvirt" in plan.notes[0]


def test_unicast_all_on_a_bridge_macvtap_is_noted_not_applied() -> None:
    plan = make_plan(guest(unicast="all"), HOST, SyncPolicy(), libvirt_syncs=False)
    assert plan.changes == ()
    assert plan.notes == (
        "unicast: table not applied: bridge macvtaps cannot filter unicast"
        " (only passthru takes extra unicast addresses)",
    )


def test_unicast_overflow_on_passthru_is_promiscuous_and_keeps_the_entries() -> None:
    h = host(mode="passthru", unicast=frozenset({"52:54:00:99:99:99"}))
    g = guest(unicast_overflow=True, unicast_table=frozenset())
    plan = make_plan(g, h, SyncPolicy(), libvirt_syncs=False)
    # An overflowed table arrives empty: removing the entries would gain nothing.
    assert plan.changes == (FlagChange("promiscuous", False, True),)


def test_handling_describes_vlan_and_unicast_per_nic() -> None:
    vlan, unicast = handling(HOST, FILTER, libvirt_syncs=False)
    assert vlan.startswith("vlan: ") and "without promiscuous" in vlan
    assert unicast.startswith("unicast: table not applied")
    vlan, unicast = handling(host(mode="passthru"), SyncPolicy(), libvirt_syncs=False)
    assert "other than 0" in vlan and "fdb entries" in unicast and "-> promiscuous" in unicast
    vlan, unicast = handling(host(mode="passthru"), FILTER, libvirt_syncs=True)
    assert "libvirt" in vlan and "libvirt owns promiscuous" in unicast


def test_guest_promiscuous_follows_both_ways() -> None:
    assert make_plan(guest(promiscuous=True), HOST, SyncPolicy(), libvirt_syncs=False).changes == (
        FlagChange("promiscuous", False, True),
    )
    assert make_plan(GUEST, host(promiscuous=True), SyncPolicy(), libvirt_syncs=False).changes == (
        FlagChange("promiscuous", True, False),
    )


@pytest.mark.parametrize("libvirt_syncs", [False, True])
def test_overflow_turns_on_allmulti_and_keeps_groups_unless_libvirt_strips_them(
    libvirt_syncs: bool,
) -> None:
    g = guest(multicast_overflow=True, multicast_table=frozenset())
    plan = make_plan(g, HOST, SyncPolicy(), libvirt_syncs=libvirt_syncs)
    assert FlagChange("allmulti", False, True) in plan.changes
    lists = [c for c in plan.changes if isinstance(c, AddressListChange)]
    assert bool(lists) == libvirt_syncs


@pytest.mark.parametrize(("mode", "allmulti"), [("all", True), ("none", False), ("normal", False)])
def test_allmulti_follows_mode(mode: str, allmulti: bool) -> None:
    plan = make_plan(
        guest(multicast=mode), host(allmulti=not allmulti), SyncPolicy(), libvirt_syncs=False
    )
    assert FlagChange("allmulti", not allmulti, allmulti) in plan.changes


def test_unicast_only_on_passthru() -> None:
    g = guest(unicast_table=frozenset({"52:54:00:99:99:99"}))
    bridge = make_plan(g, HOST, SyncPolicy(), libvirt_syncs=False)
    assert bridge.changes == () and bridge.notes
    passthru = make_plan(g, host(mode="passthru"), SyncPolicy(), libvirt_syncs=False)
    (change,) = passthru.changes
    assert isinstance(change, AddressListChange) and change.add == {"52:54:00:99:99:99"}
    wide = make_plan(guest(unicast="all"), host(mode="passthru"), SyncPolicy(), libvirt_syncs=False)
    assert wide.changes == (FlagChange("promiscuous", False, True),)


def test_fields_policy_refuses_what_it_does_not_allow() -> None:
    g = guest(
        main_mac="52:54:00:aa:bb:cc",
        promiscuous=True,
        multicast_table=frozenset({"33:33:ff:00:00:02"}),
    )
    plan = make_plan(g, HOST, SyncPolicy(fields=frozenset({"multicast"})), libvirt_syncs=False)
    assert [c.field for c in plan.changes] == ["multicast"]
    assert {(r.field, r.value) for r in plan.refusals} == {
        ("mac", "52:54:00:aa:bb:cc"),
        ("promiscuous", "promiscuous on"),
    }


def test_mac_allow() -> None:
    policy = SyncPolicy(mac_allow=("52:54:00",))
    ok = make_plan(guest(main_mac="52:54:00:aa:bb:cc"), HOST, policy, libvirt_syncs=False)
    assert ok.changes == (MacChange("52:54:00:00:00:01", "52:54:00:aa:bb:cc"),)
    bad = make_plan(guest(main_mac="02:00:00:aa:bb:cc"), HOST, policy, libvirt_syncs=False)
    assert bad.changes == () and bad.refusals[0].reason == "not in mac_allow"


macs = st.builds(lambda b: ":".join(f"{x:02x}" for x in b), st.binary(min_size=6, max_size=6))
unicast_macs = macs.map(lambda m: f"{int(m[:2], 16) & 0xFE:02x}{m[2:]}").filter(
    lambda m: m != "00:00:00:00:00:00"
)
multicast_macs = macs.map(lambda m: f"{int(m[:2], 16) | 1:02x}{m[2:]}")
modes = st.sampled_from(["normal", "none", "all"])
guests = st.builds(
    GuestFilter,
    name=st.just("net0"),
    main_mac=unicast_macs,
    promiscuous=st.booleans(),
    multicast=modes,
    unicast=modes,
    vlan=modes,
    broadcast_allowed=st.booleans(),
    multicast_overflow=st.booleans(),
    unicast_overflow=st.booleans(),
    multicast_table=st.frozensets(multicast_macs, max_size=8),
    unicast_table=st.frozensets(unicast_macs, max_size=4),
    vlan_table=st.frozensets(st.integers(0, 4095), max_size=4),
)
hosts = st.builds(
    HostState,
    ifname=st.just("mvt0"),
    ifindex=st.just(3),
    mode=st.sampled_from(["bridge", "passthru", "vepa", "private"]),
    mac=unicast_macs,
    promiscuous=st.booleans(),
    allmulti=st.booleans(),
    multicast=st.frozensets(multicast_macs, max_size=8),
    multicast_host=st.frozensets(multicast_macs, max_size=3),
    unicast=st.frozensets(unicast_macs, max_size=4),
    lower=st.just("eth0"),
    lower_vlan_filter=st.sampled_from(["none", "hardware", "bridge", "unknown"]),
).filter(lambda h: not h.multicast & h.multicast_host)
policies = st.builds(
    SyncPolicy,
    fields=st.frozensets(st.sampled_from(sorted(ALL_FIELDS))),
    vlan=st.sampled_from(["promiscuous", "ignore", "filter"]),
    mac_allow=st.none() | st.just(("52:54:00",)),
)


@settings(max_examples=400, deadline=None)
@given(guests, hosts, policies, st.booleans())
def test_applying_a_plan_twice_changes_nothing(
    g: GuestFilter, h: HostState, policy: SyncPolicy, libvirt_syncs: bool
) -> None:
    first = make_plan(g, h, policy, libvirt_syncs=libvirt_syncs)
    assert first == make_plan(g, h, policy, libvirt_syncs=libvirt_syncs)  # deterministic
    after = simulate(h, first.changes)
    assert make_plan(g, after, policy, libvirt_syncs=libvirt_syncs).changes == ()
    for change in first.changes:  # each change really changes something
        assert change.old != change.new


@settings(max_examples=200, deadline=None)
@given(guests, hosts, st.booleans())
def test_libvirt_synced_nics_end_where_libvirt_would(
    g: GuestFilter, h: HostState, _unused: bool
) -> None:
    after = simulate(h, make_plan(g, h, SyncPolicy(), libvirt_syncs=True).changes)
    # libvirt's rules (qemuDomainSyncRxFilter), written out independently.
    assert after.mac == g.main_mac
    assert after.promiscuous == (g.promiscuous or bool(g.vlan_table))
    assert after.allmulti == (g.multicast == "all" or g.multicast_overflow)
    assert after.multicast == g.multicast_table - h.multicast_host


def test_groups_the_host_already_joined_are_not_added() -> None:
    g = guest(multicast_table=frozenset({"33:33:ff:00:00:01", "33:33:00:00:00:01"}))
    assert make_plan(g, HOST, SyncPolicy(), libvirt_syncs=False).changes == ()
