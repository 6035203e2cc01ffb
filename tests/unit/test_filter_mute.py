"""A domain's filter events muted while its noisy NICs wait, and what unmuting owes."""

from __future__ import annotations

import asyncio

from rxfilterd.events import HypervisorError
from rxfilterd.filter_mute import MAX_NICS, DomainMute


class Libvirt:
    """Subscriptions as libvirtd keeps them, and the kicks the mute asks for."""

    def __init__(self, nics: list[str]) -> None:
        self.nics = nics
        self.calls: list[str] = []
        self.kicked: list[tuple[str, str]] = []
        self.refused = 0
        self.fail_subscribe = False

    async def subscribe(self, uuid: str) -> None:
        await asyncio.sleep(0)  # an RPC
        if self.fail_subscribe:
            raise HypervisorError("connection reset by peer")
        self.calls.append(f"+{uuid}")

    async def unsubscribe(self, uuid: str) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"-{uuid}")

    def mute(self) -> DomainMute:
        def refused() -> None:
            self.refused += 1

        return DomainMute(
            "u1",
            subscribe=self.subscribe,
            unsubscribe=self.unsubscribe,
            nics=lambda: list(self.nics),
            resync=lambda alias, cause: self.kicked.append((alias, cause)),
            refused=refused,
        )


def test_muted_while_any_nic_holds_and_the_others_synced_after() -> None:
    async def scenario() -> Libvirt:
        libvirt = Libvirt(["net0", "net1", "net2"])
        mute = libvirt.mute()
        net0, net1 = mute.for_nic("d1", "net0", "mvt0"), mute.for_nic("d1", "net1", "mvt1")
        await net0.hold()
        await net1.hold()
        assert mute.muted and libvirt.calls == ["-u1"]
        await net0.release()
        assert mute.muted and libvirt.calls == ["-u1"] and libvirt.kicked == []
        await net1.release()
        await net1.release()  # a second release is harmless
        assert not mute.muted
        return libvirt

    libvirt = asyncio.run(scenario())
    assert libvirt.calls == ["-u1", "+u1"]
    # Everybody's events went unsent meanwhile, but the last holder's sync is next anyway.
    assert libvirt.kicked == [("net0", "unmuted"), ("net2", "unmuted")]


def test_a_domain_with_many_nics_is_never_muted() -> None:
    async def scenario() -> Libvirt:
        libvirt = Libvirt([f"net{i}" for i in range(MAX_NICS + 1)])
        mute = libvirt.mute()
        nic = mute.for_nic("d1", "net0", "mvt0")
        await nic.hold()
        assert not mute.muted
        await nic.release()
        return libvirt

    libvirt = asyncio.run(scenario())
    assert libvirt.calls == [] and libvirt.kicked == []


def test_a_failed_resubscribe_asks_for_the_domain_to_be_read_again() -> None:
    async def scenario() -> tuple[Libvirt, bool]:
        libvirt = Libvirt(["net0", "net1"])
        mute = libvirt.mute()
        nic = mute.for_nic("d1", "net0", "mvt0")
        await nic.hold()
        libvirt.fail_subscribe = True
        await nic.release()
        return libvirt, mute.muted

    libvirt, muted = asyncio.run(scenario())
    # Not muted any more: the domain's re-read subscribes (and syncs every NIC) again.
    assert not muted and libvirt.refused == 1 and libvirt.kicked == []


def test_a_dropped_domain_is_neither_muted_nor_subscribed_again() -> None:
    async def scenario() -> Libvirt:
        libvirt = Libvirt(["net0"])
        mute = libvirt.mute()
        nic = mute.for_nic("d1", "net0", "mvt0")
        await nic.hold()
        mute.close()  # the domain stopped
        await nic.release()
        await nic.hold()
        return libvirt

    assert asyncio.run(scenario()).calls == ["-u1"]
