"""rxfilterd.macvtap against the kernel, checked with ip/bridge."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Literal

import pytest

from rxfilterd.host_state import HostState, MacvtapError
from rxfilterd.macvtap import HostNetwork
from rxfilterd.plan import AddressListChange, Change, FlagChange, MacChange

if TYPE_CHECKING:
    from tests.host.conftest import Netns

pytestmark = pytest.mark.host

# Groups the host's own stack joins on an up link (all-nodes IPv6, all-hosts IPv4).
HOST_GROUPS = {"33:33:00:00:00:01", "01:00:5e:00:00:01"}
MC1 = "01:00:5e:01:02:03"
MC2 = "33:33:00:00:12:34"
UC1 = "02:aa:bb:cc:dd:01"
UC2 = "02:aa:bb:cc:dd:02"


def mc_change(state: HostState, new: set[str]) -> AddressListChange:
    return _list("multicast", state.multicast, frozenset(new))


def uc_change(state: HostState, new: set[str]) -> AddressListChange:
    return _list("unicast", state.unicast, frozenset(new))


def _list(
    field: Literal["multicast", "unicast"], old: frozenset[str], new: frozenset[str]
) -> AddressListChange:
    return AddressListChange(field, add=new - old, remove=old - new, old=old, new=new)


async def read(hn: HostNetwork, ifname: str) -> HostState:
    state = await hn.read(ifname)
    assert state is not None
    return state


async def test_read_matches_kernel(ns: Netns) -> None:
    async with HostNetwork(ns.name) as hn:
        bridge = await read(hn, "mvb0")
        passthru = await read(hn, "mvp0")
    link = ns.link("mvb0")
    assert bridge.ifindex == link["ifindex"]
    assert (bridge.mode, bridge.mac) == ("bridge", link["address"])
    assert not bridge.promiscuous and not bridge.allmulti
    assert bridge.multicast == frozenset() and bridge.unicast == frozenset()
    assert passthru.mode == "passthru"
    assert passthru.mac == ns.mac("mvp0")
    # The host stack's groups are there, but not as ours to manage.
    assert set(ns.maddr("mvb0")) >= HOST_GROUPS


async def test_mac_change(ns: Netns) -> None:
    new = "52:54:00:12:34:56"
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, "mvb0")
        await hn.apply(state, [MacChange(state.mac, new.upper())])
        assert ns.mac("mvb0") == new
        assert (await read(hn, "mvb0")).mac == new


@pytest.mark.parametrize(
    ("field", "kernel_flag"), [("promiscuous", "PROMISC"), ("allmulti", "ALLMULTI")]
)
async def test_flag_on_off(
    ns: Netns, field: Literal["promiscuous", "allmulti"], kernel_flag: str
) -> None:
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, "mvb0")
        await hn.apply(state, [FlagChange(field, False, True)])
        assert kernel_flag in ns.flags("mvb0")
        assert getattr(await read(hn, "mvb0"), field) is True
        await hn.apply(state, [FlagChange(field, True, False)])
        assert kernel_flag not in ns.flags("mvb0")
        assert getattr(await read(hn, "mvb0"), field) is False
        # The other flag was left alone.
        other = "ALLMULTI" if kernel_flag == "PROMISC" else "PROMISC"
        assert other not in ns.flags("mvb0")


def static(maddr: dict[str, bool]) -> set[str]:
    return {mac for mac, is_static in maddr.items() if is_static}


@pytest.mark.parametrize("ifname", ["mvb0", "mvp0"])
async def test_multicast_add_remove(ns: Netns, ifname: str) -> None:
    # The host stack's groups (incl. a solicited-node one that turns up once IPv6 has
    # an address, so whenever it likes) must survive every step.
    joined = set(ns.maddr(ifname))
    assert joined >= HOST_GROUPS and not static(ns.maddr(ifname))
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, ifname)
        await hn.apply(state, [mc_change(state, {MC1, MC2})])
        assert static(ns.maddr(ifname)) == {MC1, MC2}
        state = await read(hn, ifname)
        assert state.multicast == {MC1, MC2}

        await hn.apply(state, [mc_change(state, {MC2})])
        assert static(ns.maddr(ifname)) == {MC2}
        assert joined <= set(ns.maddr(ifname))
        state = await read(hn, ifname)
        assert state.multicast == {MC2}

        # A sync that drops everything we manage leaves the host stack's groups be.
        await hn.apply(state, [mc_change(state, set())])
        assert static(ns.maddr(ifname)) == set()
        assert joined <= set(ns.maddr(ifname))
        assert (await read(hn, ifname)).multicast == frozenset()


async def test_unicast_passthru(ns: Netns) -> None:
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, "mvp0")
        await hn.apply(state, [uc_change(state, {UC1, UC2})])
        assert {UC1, UC2} <= ns.fdb("mvp0")
        state = await read(hn, "mvp0")
        assert state.unicast == {UC1, UC2}
        assert state.multicast == frozenset()

        await hn.apply(state, [uc_change(state, {UC2})])
        assert UC1 not in ns.fdb("mvp0") and UC2 in ns.fdb("mvp0")
        assert (await read(hn, "mvp0")).unicast == {UC2}


async def test_unicast_on_bridge_is_eopnotsupp(ns: Netns) -> None:
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, "mvb0")
        change = uc_change(state, {UC1})
        with pytest.raises(MacvtapError) as info:
            await hn.apply(state, [change])
    err = info.value
    assert (err.ifname, err.op, err.errno) == ("mvb0", "fdb add unicast", errno.EOPNOTSUPP)
    assert err.change == change
    assert "EOPNOTSUPP" in str(err) and UC1 in str(err)
    assert UC1 not in ns.fdb("mvb0")


async def test_duplicate_mac_is_eaddrinuse(ns: Netns) -> None:
    taken = ns.mac("mvb0")
    before = ns.mac("mvb1")
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, "mvb1")
        flag = FlagChange("promiscuous", False, True)
        mac = MacChange(state.mac, taken)
        with pytest.raises(MacvtapError) as info:
            await hn.apply(state, [flag, mac])
    err = info.value
    assert (err.ifname, err.op, err.errno, err.change) == ("mvb1", "set mac", errno.EADDRINUSE, mac)
    assert "EADDRINUSE" in str(err) and taken in str(err)
    assert "\n" not in str(err)
    assert ns.mac("mvb1") == before
    # Changes before the failing one were applied, in order.
    assert "PROMISC" in ns.flags("mvb1")


@pytest.mark.parametrize("ifname", ["mvb0", "mvp0"])
async def test_applying_twice_is_harmless(ns: Netns, ifname: str) -> None:
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, ifname)
        await hn.apply(state, [mc_change(state, {MC1})])
        state = await read(hn, ifname)
        changes: list[Change] = [
            MacChange(state.mac, "52:54:00:aa:bb:cc"),
            FlagChange("promiscuous", False, True),
            FlagChange("allmulti", False, True),
            mc_change(state, {MC2}),
        ]
        if ifname == "mvp0":
            changes.append(uc_change(state, {UC1}))
        await hn.apply(state, changes)
        first = await read(hn, ifname)
        kernel_first = (ns.link(ifname), ns.maddr(ifname), ns.fdb(ifname))
        await hn.apply(state, changes)
        assert await read(hn, ifname) == first
    assert (ns.link(ifname), ns.maddr(ifname), ns.fdb(ifname)) == kernel_first
    assert first.mac == "52:54:00:aa:bb:cc"
    assert first.promiscuous and first.allmulti
    assert first.multicast == {MC2}
    assert first.unicast == ({UC1} if ifname == "mvp0" else frozenset())


async def test_missing_link(ns: Netns) -> None:
    async with HostNetwork(ns.name) as hn:
        assert await hn.read("nosuch0") is None
        assert await hn.is_macvtap("nosuch0") is False


async def test_veth_is_not_a_macvtap(ns: Netns) -> None:
    async with HostNetwork(ns.name) as hn:
        assert await hn.is_macvtap("mvb0") is True
        assert await hn.is_macvtap("veth0") is False
        with pytest.raises(MacvtapError) as info:
            await hn.read("veth0")
    assert str(info.value) == "veth0: read failed: is a veth link, not a macvtap"


async def test_apply_after_recreate(ns: Netns) -> None:
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, "mvb0")
        ns.ip("link", "del", "mvb0")
        ns.add_macvtap("mvb0", "veth0", "bridge")
        recreated = ns.link("mvb0")
        assert recreated["ifindex"] != state.ifindex
        with pytest.raises(MacvtapError, match="vanished/recreated"):
            await hn.apply(state, [FlagChange("promiscuous", False, True)])
        assert "PROMISC" not in ns.flags("mvb0")

        ns.ip("link", "del", "mvb0")
        with pytest.raises(MacvtapError, match="vanished/recreated"):
            await hn.apply(state, [FlagChange("promiscuous", False, True)])


async def test_namespace_view_is_its_own(ns: Netns) -> None:
    # Two namespaces with same-named links: each HostNetwork sees only its own.
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, "mvb0")
        await hn.apply(state, [mc_change(state, {MC1})])
    async with HostNetwork(ns.name) as hn:
        assert (await read(hn, "mvb0")).multicast == {MC1}
    async with HostNetwork() as own:
        mine = await own.read("mvb0")
    assert mine is None or MC1 not in mine.multicast


async def test_adding_a_host_joined_group(ns: Netns) -> None:
    # The kernel answers EEXIST (taken as done) and leaves the group unmanaged: it never
    # shows up in HostState.multicast, so a later sync cannot remove it.
    async with HostNetwork(ns.name) as hn:
        state = await read(hn, "mvb0")
        await hn.apply(state, [mc_change(state, {"33:33:00:00:00:01"})])
        assert (await read(hn, "mvb0")).multicast == frozenset()
    assert ns.maddr("mvb0")["33:33:00:00:00:01"] is False


@pytest.mark.parametrize("ifname", ["mvb0", "mvp0"])
async def test_quick_read_sees_changes_made_behind_our_back(ns: Netns, ifname: str) -> None:
    # The ioctl path must report what a netlink read reports, whoever changed the link.
    async with HostNetwork(ns.name) as hn:
        await read(hn, ifname)  # a full read first: it leaves the link facts behind
        ns.ip("link", "set", ifname, "address", "52:54:00:0a:0b:0c", "promisc", "on")
        ns.ip("link", "set", ifname, "allmulticast", "on")
        ns.ip("maddress", "add", MC1, "dev", ifname)
        if ifname == "mvp0":
            ns.bridge("fdb", "add", UC1, "dev", ifname, "self")
        quick = await hn.read(ifname, quick=True)
        full = await hn.read(ifname)
    assert quick is not None
    assert quick == full
    assert (quick.mac, quick.promiscuous, quick.allmulti) == ("52:54:00:0a:0b:0c", True, True)
    assert quick.multicast == {MC1}
    assert quick.unicast == ({UC1} if ifname == "mvp0" else frozenset())


async def test_a_read_right_after_a_survey_sees_what_changed_since(ns: Netns) -> None:
    # The survey's link message stands in for the first sync's netlink read: the MAC
    # and flags must still come fresh (ioctls), and a recreated link be read anew.
    async with HostNetwork(ns.name) as hn:
        assert await hn.is_macvtap("mvb0")
        ns.ip("link", "set", "mvb0", "address", "52:54:00:0a:0b:0d", "promisc", "on")
        ns.ip("maddress", "add", MC1, "dev", "mvb0")
        after_survey = await hn.read("mvb0")
        ns.ip("link", "del", "mvb0")
        ns.add_macvtap("mvb0", "veth0", "vepa")
        assert await hn.is_macvtap("mvb0")
        recreated = await hn.read("mvb0")
    assert after_survey is not None and recreated is not None
    assert (after_survey.mac, after_survey.promiscuous) == ("52:54:00:0a:0b:0d", True)
    assert after_survey.multicast == {MC1}
    assert (recreated.mode, recreated.ifindex) == ("vepa", ns.link("mvb0")["ifindex"])


async def test_quick_read_after_recreate_reads_everything(ns: Netns) -> None:
    async with HostNetwork(ns.name) as hn:
        before = await read(hn, "mvb0")
        ns.ip("link", "del", "mvb0")
        ns.add_macvtap("mvb0", "veth0", "vepa")
        index = ns.link("mvb0")["ifindex"]
        after = await hn.read("mvb0", quick=True)
        ns.ip("link", "del", "mvb0")
        gone = await hn.read("mvb0", quick=True)
    assert after is not None
    # A new ifindex: the remembered mode (bridge) must not be used for it.
    assert after.ifindex == index != before.ifindex
    assert after.mode == "vepa"
    assert gone is None


async def test_quick_read_without_a_full_read_first(ns: Netns) -> None:
    async with HostNetwork(ns.name) as hn:
        quick = await hn.read("mvb0", quick=True)
        assert await hn.read("nosuch0", quick=True) is None
    assert quick is not None
    assert (quick.mode, quick.mac, quick.ifindex) == (
        "bridge",
        ns.mac("mvb0"),
        ns.link("mvb0")["ifindex"],
    )
