"""The daemon's failure paths, driven through its real sync code with fake edges.

Only the two edges are fakes (the libvirt connection and the netlink adapter), so
these cover what a real guest cannot produce (a hostile query-rx-filter reply) and
pin down the bookkeeping; tests/libvirt/test_faults.py injects the real faults.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

import pytest
import structlog

from rxfilterd import daemon as daemon_mod
from rxfilterd import nic_sync
from rxfilterd.config import Config, LibvirtSettings, SyncSettings
from rxfilterd.daemon import Daemon, DomainSync
from rxfilterd.host_state import HostState
from rxfilterd.hypervisor import (
    ConnectionLost,
    DomainChanged,
    HypervisorError,
    HypervisorEvent,
    RunningDomain,
    RxFilterChanged,
)
from rxfilterd.inventory import NicReport
from rxfilterd.macvtap import MacvtapError
from rxfilterd.nic import Nic, Verdict
from rxfilterd.nic_sync import NicSync
from rxfilterd.plan import Change, MacChange
from rxfilterd.trust import Trust
from tests.support.qmp import rx_filter_entry, rx_filter_reply

MAC0 = "52:54:00:10:00:01"
MAC1 = "52:54:00:10:00:02"


def guest_entry(**overrides: Any) -> dict[str, Any]:
    return rx_filter_entry(**{"main-mac": MAC0, **overrides})


def reply(**overrides: Any) -> str:
    return rx_filter_reply(guest_entry(**overrides))


def host_state(mac: str = MAC0, promiscuous: bool = False, ifindex: int = 7) -> HostState:
    return HostState(
        ifname="mvt0",
        ifindex=ifindex,
        mode="bridge",
        mac=mac,
        promiscuous=promiscuous,
        allmulti=False,
        multicast=frozenset(),
        multicast_host=frozenset(),
        unicast=frozenset(),
    )


def domain_xml(trust: str | None = "yes", ifname: str = "mvt0") -> str:
    """Live XML of domain d1 with one ethernet virtio NIC net0 on IFNAME."""
    attr = f" trustGuestRxFilters='{trust}'" if trust else ""
    return (
        f"<domain><name>d1</name><uuid>u1</uuid><devices><interface type='ethernet'{attr}>"
        f"<mac address='{MAC0}'/><target dev='{ifname}' managed='no'/>"
        "<model type='virtio'/><alias name='net0'/></interface></devices></domain>"
    )


class FakeHypervisor:
    def __init__(self) -> None:
        self.reply = reply()
        # The live domain XML each sync re-reads trust from (None: not running).
        self.xml: str | None = domain_xml()
        self.queries = 0
        self.block: asyncio.Event | None = None
        self.forgotten: list[str] = []
        self.error: HypervisorError | None = None
        self.running = True

    async def query_rx_filter(self, uuid: str, alias: str) -> str:
        self.queries += 1
        if self.block is not None:
            await self.block.wait()
        if self.error is not None:
            raise self.error
        return self.reply

    async def domain(self, uuid: str) -> RunningDomain | None:
        return RunningDomain(uuid, "d1", "<domain/>") if self.running else None

    async def domain_xml(self, uuid: str) -> str | None:
        return self.xml if self.running else None

    async def network_xml(self, name: str) -> str | None:
        return None

    async def network_port_xml(self, network: str, portid: str) -> str | None:
        return None

    def forget(self, uuid: str) -> None:
        self.forgotten.append(uuid)


class FakeNetwork:
    def __init__(self) -> None:
        self.state: HostState | None = host_state()
        self.applied: list[Change] = []
        # field -> errno (None: the link vanished) raised when that field is applied.
        self.refuse: dict[str, int | None] = {}
        # A field whose write never completes (the sync is cut off there).
        self.hang: str | None = None
        self.reads: list[bool] = []  # quick= of each read

    async def read(self, ifname: str, *, quick: bool = False) -> HostState | None:
        self.reads.append(quick)
        return self.state

    async def is_macvtap(self, ifname: str) -> bool:
        return True

    async def apply(self, state: HostState, changes: list[Change]) -> None:
        for change in changes:
            if change.field in self.refuse:
                code = self.refuse[change.field]
                op = "apply" if code is None else f"set {change.field}"
                raise MacvtapError(state.ifname, op, code, change=change)
            if change.field == self.hang:
                await asyncio.Event().wait()
            self.applied.append(change)
            assert self.state is not None
            if isinstance(change, MacChange):
                self.state = replace(self.state, mac=change.new)
            elif change.field == "promiscuous":
                self.state = replace(self.state, promiscuous=bool(change.new))


def nic_report(alias: str = "net0", domain: str = "d1", uuid: str = "u1") -> NicReport:
    nic = Nic(
        domain=domain,
        uuid=uuid,
        alias=alias,
        type="ethernet",
        model="virtio",
        ifname="mvt0",
        mac=MAC0,
        current_mac=None,
        network=None,
        portgroup=None,
        portid=None,
        trust_attr=True,
    )
    return NicReport(nic, Trust(True, "interface"), Verdict("sync", "trusted", False))


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    """Every log record the daemon emits, as dicts."""
    captured: list[dict[str, Any]] = []

    def keep(_logger: Any, _name: str, event_dict: Any) -> Any:
        captured.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.processors.add_log_level, keep])
    try:
        yield captured
    finally:
        structlog.reset_defaults()


def make_daemon(
    network: FakeNetwork, hypervisor: FakeHypervisor | None = None, **sync: Any
) -> Daemon:
    config = Config(sync=SyncSettings(**sync))
    daemon = Daemon(config, network)  # type: ignore[arg-type]
    daemon._hypervisor = hypervisor or FakeHypervisor()  # type: ignore[assignment]
    return daemon


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == name]


def test_hostile_reply_is_rejected_and_nothing_is_applied(
    records: list[dict[str, Any]],
) -> None:
    network = FakeNetwork()
    hypervisor = FakeHypervisor()
    # A broadcast "main MAC" and a table far past QEMU's 64 entries.
    hypervisor.reply = reply(
        **{
            "main-mac": "ff:ff:ff:ff:ff:ff",
            "multicast-table": [f"01:00:5e:00:00:{i:02x}" for i in range(200)],
        }
    )

    async def scenario() -> str:
        daemon = make_daemon(network, hypervisor)
        return await daemon._sync_once(NicSync(nic_report()), "event")

    assert asyncio.run(scenario()) == "ok"  # not retried: only a guest change re-arms it
    assert network.applied == []
    [line] = events(records, "rejected")
    assert line["domain"] == "d1" and line["alias"] == "net0" and line["level"] == "warning"
    assert "main-mac" in line["error"]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EADDRINUSE, "EADDRINUSE"),
        (errno.EOPNOTSUPP, "EOPNOTSUPP"),
        (errno.EPERM, "EPERM"),
        (None, "vanished"),
    ],
)
def test_apply_failure_names_the_reason_and_retries_with_backoff(
    records: list[dict[str, Any]], code: int | None, reason: str
) -> None:
    network = FakeNetwork()
    network.refuse["mac"] = code
    hypervisor = FakeHypervisor()
    hypervisor.reply = reply(**{"main-mac": MAC1, "promiscuous": True})

    async def scenario() -> int:
        daemon = make_daemon(network, hypervisor, retry_max=4.0)
        nic = NicSync(nic_report())
        for _ in range(4):
            await daemon._sync_nic(nic, "event")
        return nic.failures

    assert asyncio.run(scenario()) == 4
    failed = events(records, "failed")
    assert [f["reason"] for f in failed] == [reason] * 4
    assert [f["attempt"] for f in failed] == [1, 2, 3, 4]
    assert [f["retry_in"] for f in failed] == [1.0, 2.0, 4.0, 4.0]  # capped by retry_max
    assert all(f["stage"] == "apply" and f["field"] == "mac" for f in failed)
    # The first failure is an error line; the same failure on each retry is debug only.
    assert [f["level"] for f in failed] == ["error", "debug", "debug", "debug"]
    assert all(f["new"] == MAC1 for f in failed)
    if code is None:
        # A vanished link takes nothing more: the next try re-reads it by name.
        assert network.applied == []
        assert failed[0]["pending"] == ["promiscuous"]
    else:
        # A refused MAC does not hold back the rest of the plan.
        assert [c.field for c in network.applied] == ["promiscuous"]
        assert failed[0]["pending"] == ["promiscuous"]


def test_a_failing_nic_is_retried_on_its_own_worker_only(
    records: list[dict[str, Any]],
) -> None:
    network = FakeNetwork()
    network.refuse["mac"] = errno.EADDRINUSE
    hypervisor = FakeHypervisor()
    hypervisor.reply = reply(**{"main-mac": MAC1})

    async def scenario() -> tuple[int, int]:
        daemon = make_daemon(network, hypervisor, retry_max=0.1)
        domain = DomainSync("u1", "d1")
        daemon._domains["u1"] = domain
        daemon._update_domain(domain, "d1", [nic_report("net0")], "start")
        await asyncio.sleep(0.45)  # first try, then retries every 0.1 s (capped)
        queries = hypervisor.queries
        daemon._drop_domain("u1", "test")
        await asyncio.sleep(0.3)
        return queries, hypervisor.queries

    before, after = asyncio.run(scenario())
    assert before >= 3  # kept retrying with the capped backoff
    assert after == before  # dropping the domain stopped its retries


def test_drift_found_by_the_resync_is_logged_as_drift(records: list[dict[str, Any]]) -> None:
    network = FakeNetwork()
    network.state = host_state(promiscuous=True)  # someone: ip link set mvt0 promisc on

    async def scenario() -> None:
        daemon = make_daemon(network)
        await daemon._sync_once(NicSync(nic_report()), "resync")
        await daemon._sync_once(NicSync(nic_report()), "resync")  # in sync now: quiet

    asyncio.run(scenario())
    [drift] = events(records, "drift")
    assert drift["fields"] == ["promiscuous"] and drift["level"] == "warning"
    assert drift["found"] == {"promiscuous": True}
    assert drift["expected"] == {"promiscuous": False}
    [applied] = events(records, "applied")
    assert applied["cause"] == "resync" and applied["new"] is False


def test_guest_changes_are_not_called_drift(records: list[dict[str, Any]]) -> None:
    network = FakeNetwork()
    network.state = host_state(promiscuous=True)

    async def scenario() -> None:
        await make_daemon(network)._sync_once(NicSync(nic_report()), "event")

    asyncio.run(scenario())
    assert events(records, "drift") == []
    assert len(events(records, "applied")) == 1


def test_only_a_guest_event_takes_the_quick_host_read(records: list[dict[str, Any]]) -> None:
    # An event changes what ioctls read; anything else (start, resync, retry, a guest
    # reset) may come with a recreated or reconfigured link and reads everything.
    network = FakeNetwork()

    async def scenario() -> None:
        daemon = make_daemon(network)
        for cause in ("start", "event", "resync", "retry", "reset", "event"):
            await daemon._sync_once(NicSync(nic_report()), cause)

    asyncio.run(scenario())
    assert network.reads == [False, True, False, False, False, True]


def test_a_sync_cut_off_mid_plan_says_what_it_left(records: list[dict[str, Any]]) -> None:
    network = FakeNetwork()
    hypervisor = FakeHypervisor()
    hypervisor.reply = reply(**{"main-mac": MAC1, "promiscuous": True})

    async def scenario() -> None:
        daemon = make_daemon(network, hypervisor)
        nic = NicSync(nic_report())
        network.hang = "promiscuous"  # the MAC lands, then this write hangs
        task = asyncio.ensure_future(daemon._sync_once(nic, "event"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    [line] = events(records, "abandoned")
    assert line["stage"] == "apply" and line["level"] == "warning"
    assert line["applied"] == ["mac"]
    assert line["in_flight"] == "promiscuous" and line["pending"] == []


def test_shutdown_lets_a_sync_in_flight_finish(records: list[dict[str, Any]]) -> None:
    network = FakeNetwork()
    hypervisor = FakeHypervisor()
    hypervisor.reply = reply(**{"main-mac": MAC1})
    block = hypervisor.block = asyncio.Event()

    async def scenario() -> None:
        daemon = make_daemon(network, hypervisor)
        domain = DomainSync("u1", "d1")
        daemon._domains["u1"] = domain
        daemon._update_domain(domain, "d1", [nic_report()], "start")
        await asyncio.sleep(0.01)  # the query is in flight
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, block.set)  # answers well within the grace
        await daemon._drop_all("stopping")

    asyncio.run(scenario())
    assert [c.field for c in network.applied] == ["mac"]
    assert events(records, "abandoned") == []


def test_shutdown_abandons_a_stuck_query_with_a_line(
    records: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_mod, "SHUTDOWN_GRACE", 0.1)
    network = FakeNetwork()
    hypervisor = FakeHypervisor()
    hypervisor.block = asyncio.Event()  # a stuck domain: never answers

    async def scenario() -> None:
        daemon = make_daemon(network, hypervisor)
        domain = DomainSync("u1", "d1")
        daemon._domains["u1"] = domain
        daemon._update_domain(domain, "d1", [nic_report()], "start")
        await asyncio.sleep(0.01)
        daemon._shutting_down = True  # as run() does once stop is set
        await asyncio.wait_for(daemon._drop_all("stopping"), 2)

    asyncio.run(scenario())
    [line] = events(records, "abandoned")
    assert line["stage"] == "query" and line["applied"] == [] and line["level"] == "info"


def test_unplug_and_stop_leave_no_worker_behind(records: list[dict[str, Any]]) -> None:
    async def scenario() -> Daemon:
        daemon = make_daemon(FakeNetwork())
        domain = DomainSync("u1", "d1")
        daemon._domains["u1"] = domain
        daemon._domain_worker("u1", "d1")
        daemon._update_domain(domain, "d1", [nic_report("net0"), nic_report("net1")], "start")
        assert len(daemon._workers) == 3
        daemon._update_domain(domain, "d1", [nic_report("net0")], "device-removed")
        await asyncio.sleep(0.01)
        assert set(domain.nics) == {"net0"} and len(daemon._workers) == 2
        task = daemon._drop_domain("u1", "stopped")
        assert task is not None
        await task
        return daemon

    daemon = asyncio.run(scenario())
    assert daemon._domains == {} and daemon._workers == set() and daemon._stopping == set()
    tracking = events(records, "tracking")
    assert tracking[-1]["domains"] == {} and tracking[-1]["orphans"] == 0
    assert all(t["orphans"] == 0 for t in tracking)
    assert [r["alias"] for r in events(records, "nic gone")] == ["net1"]
    assert daemon._hypervisor.forgotten == ["u1"]  # type: ignore[union-attr]


def test_a_start_right_behind_a_stop_is_not_lost(records: list[dict[str, Any]]) -> None:
    """STOPPED then STARTED back to back (a restore, a migration back): re-surveyed."""
    network = FakeNetwork()
    hypervisor = FakeHypervisor()
    surveyed: list[str] = []

    async def domain(uuid: str) -> RunningDomain:
        surveyed.append(uuid)
        return RunningDomain(uuid, "d1", "<domain/>")

    hypervisor.domain = domain  # type: ignore[method-assign]

    async def scenario() -> None:
        daemon = make_daemon(network, hypervisor)
        domain_sync = DomainSync("u1", "d1")
        daemon._domains["u1"] = domain_sync
        daemon._dispatch(DomainChanged("u1", "d1", "stopped", "saved"))
        daemon._dispatch(DomainChanged("u1", "d1", "started", "restored"))
        await asyncio.sleep(0.05)
        assert "u1" in daemon._domains and daemon._domains["u1"] is not domain_sync
        await daemon._drop_all("stopping")

    asyncio.run(scenario())
    assert surveyed == ["u1"]
    lines = events(records, "domain event")
    assert [(r["change"], r["detail"]) for r in lines] == [
        ("stopped", "saved"),
        ("started", "restored"),
    ]


def test_filter_events_skip_the_queue_only_with_nothing_queued_ahead() -> None:
    order: list[str] = []

    def dispatch(event: HypervisorEvent) -> None:
        order.append(event.alias if isinstance(event, RxFilterChanged) else str(event))

    async def scenario() -> None:
        daemon = make_daemon(FakeNetwork())
        daemon._dispatch = dispatch  # type: ignore[method-assign]
        hypervisor = daemon._hypervisor
        assert hypervisor is not None

        async def no_domains() -> list[RunningDomain]:
            return []

        hypervisor.running_domains = no_domains  # type: ignore[method-assign]
        gen = daemon._generation
        daemon._on_event(gen, RxFilterChanged("u1", "d1", "early", 0.0))  # before serving
        assert order == []
        stop = asyncio.Event()
        serve = asyncio.ensure_future(daemon._serve(hypervisor, stop, "start"))
        await asyncio.sleep(0.01)
        assert order == ["early"]
        daemon._on_event(gen, DomainChanged("u1", "d1", "reboot"))
        daemon._on_event(gen, RxFilterChanged("u1", "d1", "behind", 0.0))
        assert order == ["early"]  # both wait for _serve: one is queued ahead
        await asyncio.sleep(0.01)
        daemon._on_event(gen, RxFilterChanged("u1", "d1", "direct", 0.0))
        assert order[-1] == "direct"  # dispatched within the callback
        stop.set()
        await serve

    asyncio.run(scenario())
    assert order[0] == "early" and order[2:] == ["behind", "direct"]
    assert "reboot" in order[1]


class ScriptedHypervisor:
    """Stands in for Hypervisor in Daemon.run: connects per a script, then loses it."""

    script: ClassVar[list[str]] = []
    instances: ClassVar[list[ScriptedHypervisor]] = []

    def __init__(self, uri: str, on_event: Any, **_kw: Any) -> None:
        self.on_event = on_event
        ScriptedHypervisor.instances.append(self)

    async def connect(self) -> None:
        step = ScriptedHypervisor.script.pop(0)
        if step == "fail":
            raise HypervisorError("Failed to connect socket: No such file or directory")
        if step == "lose":
            asyncio.get_running_loop().call_later(0.01, self.lost)

    def lost(self) -> None:
        event: HypervisorEvent = ConnectionLost("libvirtd closed the connection")
        self.on_event(event)

    async def running_domains(self) -> list[RunningDomain]:
        return []

    async def close(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def forget(self, uuid: str) -> None:
        pass


def test_libvirt_away_and_back_are_said_once_each(
    records: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_mod, "Hypervisor", ScriptedHypervisor)
    ScriptedHypervisor.script = ["lose", "fail", "fail", "fail", "fail", "stay"]
    ScriptedHypervisor.instances = []
    statuses: list[str] = []

    async def scenario() -> None:
        config = Config(libvirt=LibvirtSettings(reconnect_max=0.05))
        daemon = Daemon(config, FakeNetwork())  # type: ignore[arg-type]
        daemon.on_status = statuses.append
        stop = asyncio.Event()
        task = asyncio.ensure_future(daemon.run(stop))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not ScriptedHypervisor.script:
                break
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    names = [r["event"] for r in records]
    assert names.count("libvirt away") == 1
    assert names.count("libvirt back") == 1
    assert names.count("libvirt still away") == 4  # each retry, at debug only
    assert all(r["level"] == "debug" for r in events(records, "libvirt still away"))
    away = events(records, "libvirt away")[0]
    assert away["level"] == "warning" and "closed" in away["reason"]
    back = events(records, "libvirt back")[0]
    assert back["attempts"] == 4 and back["level"] == "info"
    assert names.index("libvirt away") < names.index("libvirt back")
    # The retries backed off (capped at reconnect_max), and the status said so.
    retries = [r["retry_in"] for r in events(records, "libvirt still away")]
    assert retries == sorted(retries) and max(retries) <= 0.05
    assert any("libvirt away" in s for s in statuses)
    assert len(ScriptedHypervisor.instances) == 6


@pytest.mark.parametrize("running", [True, False])
def test_a_query_failing_as_the_domain_dies_is_no_failure(
    records: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, running: bool
) -> None:
    monkeypatch.setattr(nic_sync, "QUERY_SETTLE", 0.01)
    hypervisor = FakeHypervisor()
    hypervisor.error = HypervisorError("Unable to read from monitor: Connection reset by peer")
    hypervisor.running = running

    async def scenario() -> str:
        daemon = make_daemon(FakeNetwork(), hypervisor)
        return await daemon._sync_once(NicSync(nic_report()), "event")

    outcome = asyncio.run(scenario())
    failed = events(records, "failed")
    if running:  # a live domain whose query fails: said, and retried
        assert outcome == "retry" and [f["reason"] for f in failed] == ["libvirt"]
        assert failed[0]["stage"] == "query"
    else:  # it was being destroyed: its stop event cleans up, nothing to say
        assert outcome == "ok" and failed == []


@pytest.mark.parametrize(
    ("xml", "why"),
    [
        (domain_xml(trust="no"), "untrusted now (interface)"),
        (domain_xml(trust=None), "untrusted now (default)"),
        (domain_xml(ifname="mvt9"), "the NIC's device changed"),
        ("<domain><name>d1</name><uuid>u1</uuid><devices/></domain>", "the NIC is gone"),
    ],
)
def test_a_nic_whose_current_xml_is_not_trusted_gets_no_write(
    records: list[dict[str, Any]], xml: str, why: str
) -> None:
    # Trust revoked live (libvirt >= 10.0), or the device swapped under the same alias:
    # the guest asks for a new MAC and promiscuous mode, and nothing reaches the host.
    network = FakeNetwork()
    hypervisor = FakeHypervisor()
    hypervisor.reply = reply(**{"main-mac": MAC1, "promiscuous": True})
    hypervisor.xml = xml
    nic = NicSync(nic_report())

    async def scenario() -> str:
        return await make_daemon(network, hypervisor)._sync_once(nic, "event")

    assert asyncio.run(scenario()) == "stale"
    assert network.applied == []
    assert events(records, "applied") == []
    [line] = events(records, "not ours any more")
    assert (line["domain"], line["alias"], line["why"]) == ("d1", "net0", why)
    assert nic.result == f"stopped: {why}"


def test_a_trusted_nic_is_written_after_its_xml_is_read_again() -> None:
    network = FakeNetwork()
    hypervisor = FakeHypervisor()
    hypervisor.reply = reply(**{"main-mac": MAC1})

    async def scenario() -> str:
        return await make_daemon(network, hypervisor)._sync_once(NicSync(nic_report()), "event")

    assert asyncio.run(scenario()) == "ok"
    assert [c.field for c in network.applied] == ["mac"]
