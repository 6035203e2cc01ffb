"""A domain's filter events muted while its noisy NICs wait, and what unmuting owes."""

from __future__ import annotations

import asyncio

from rxfilterd.config import Config
from rxfilterd.domains import Domains, DomainSync
from rxfilterd.events import HypervisorError
from rxfilterd.filter_mute import MAX_NICS, DomainMute, NicMute
from rxfilterd.nic_sync import NicSync
from rxfilterd.sinks import Sinks
from rxfilterd.stats import Stats
from tests.support.reports import trusted_report


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

        def resync(holder: NicMute) -> None:
            self.kicked += [(alias, "unmuted") for alias in self.nics if alias != holder.alias]

        return DomainMute(
            "u1",
            subscribe=self.subscribe,
            unsubscribe=self.unsubscribe,
            nics=lambda: len(self.nics),
            resync=resync,
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


def test_a_nic_restarted_under_the_same_alias_while_muted_is_synced_at_the_unmute() -> None:
    # The holder's own worker runs next anyway; a new worker of its alias (the NIC
    # re-surveyed, e.g. its device changed) queried while the domain was muted.
    async def scenario() -> list[tuple[str, str]]:
        runs: list[tuple[str, str]] = []
        libvirt = Libvirt([])

        async def nic_job(nic: NicSync, cause: str) -> None:
            runs.append((nic.report.nic.ifname or "", cause))

        async def domain_job(_domain: DomainSync, _cause: str) -> None:
            pass

        domains = Domains(
            Sinks(),
            Stats(),
            domain_job=domain_job,
            nic_job=nic_job,
            settle=0.0,
            subscribe=libvirt.subscribe,
            unsubscribe=libvirt.unsubscribe,
        )
        domains.worker("u1", "d1")
        domain = domains.by_uuid["u1"]
        domains.update(
            domain,
            "d1",
            [trusted_report("net0", "mvt0"), trusted_report("net1", "mvt1")],
            "start",
            Config(),
        )
        await asyncio.sleep(0.01)
        old = domain.nics["net0"].worker
        assert old is not None and old.mute is not None
        await old.mute.hold()
        domains.update(
            domain,
            "d1",
            [trusted_report("net0", "mvt9"), trusted_report("net1", "mvt1")],
            "trust",
            Config(),
        )
        await asyncio.sleep(0.01)
        runs.clear()
        await old.mute.release()
        await asyncio.sleep(0.01)
        for uuid in list(domains.by_uuid):
            task = domains.drop(uuid, "stopping", None)
            if task is not None:
                await task
        return runs

    assert sorted(asyncio.run(scenario())) == [("mvt1", "unmuted"), ("mvt9", "unmuted")]
