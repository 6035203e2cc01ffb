"""The daemon's failure paths, driven through its real sync code with fake edges.

Only the two edges are fakes (the libvirt connection and the netlink adapter), so
these cover what a real guest cannot produce (a hostile query-rx-filter reply) and
pin down the bookkeeping; tests/libvirt/test_faults.py injects the real faults.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from rxfilterd.config import Config, LibvirtSettings, SyncSettings
from rxfilterd.daemon import Daemon
from rxfilterd.events import DomainChanged, HypervisorError, RxFilterChanged
from rxfilterd.host_state import HostState
from rxfilterd.inventory import NicReport, TrustResolver
from rxfilterd.nic_sync import NicSync, NicSyncer, SyncOutcome
from rxfilterd.reconciler import Timings
from rxfilterd.sinks import Sinks
from rxfilterd.stats import Stats
from rxfilterd.testing import FakeHostNetwork, FakeLibvirt, RecordingTracer
from tests.support.qmp import rx_filter_entry, rx_filter_reply
from tests.support.reports import trusted_report

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


def interface(alias: str = "net0", trust: str | None = "yes", ifname: str = "mvt0") -> str:
    attr = f" trustGuestRxFilters='{trust}'" if trust else ""
    return (
        f"<interface type='ethernet'{attr}><mac address='{MAC0}'/>"
        f"<target dev='{ifname}' managed='no'/><model type='virtio'/>"
        f"<alias name='{alias}'/></interface>"
    )


def domain_xml(
    trust: str | None = "yes", ifname: str = "mvt0", aliases: tuple[str, ...] = ("net0",)
) -> str:
    """Live XML of domain d1 with ethernet virtio NICs (ALIASES) on IFNAME."""
    nics = "".join(interface(alias, trust, ifname) for alias in aliases)
    return f"<domain><name>d1</name><uuid>u1</uuid><devices>{nics}</devices></domain>"


# A libvirt that changes a running NIC's trust live (>= 10.0): syncs re-read the XML.
LIVE_TRUST = 11_003_000


def libvirt_with_d1(*aliases: str, version: int = 9_000_000) -> FakeLibvirt:
    libvirt = FakeLibvirt(version)
    libvirt.reply = reply()
    libvirt.domains["u1"] = domain_xml(aliases=aliases or ("net0",))
    return libvirt


def nic_report(alias: str = "net0", domain: str = "d1", uuid: str = "u1") -> NicReport:
    return trusted_report(alias, domain=domain, uuid=uuid, mac=MAC0)


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


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == name]


class OneSync:
    """NicSyncer with fake ports: one sync at a time, as a NIC's worker runs them."""

    def __init__(self, network: FakeHostNetwork, libvirt: FakeLibvirt, **sync: Any) -> None:
        self.config = Config(sync=SyncSettings(**sync))
        self.connection = libvirt.connect("test:///", lambda _event: None)
        self.connection.version = libvirt.version  # as connect() would have it
        self.syncer = NicSyncer(network, Stats(), Sinks().decide, query_settle=0.01)
        self.shutting_down = False

    async def once(self, nic: NicSync, cause: str) -> SyncOutcome:
        return await self.syncer.once(
            self.connection, self.config, nic, cause, self.stopping, self.trusts()
        )

    async def sync(self, nic: NicSync, cause: str) -> SyncOutcome:
        return await self.syncer.sync(
            self.connection, self.config, nic, cause, self.stopping, self.trusts()
        )

    def trusts(self) -> TrustResolver:
        return TrustResolver(self.connection, replug=False)

    def stopping(self) -> bool:
        return self.shutting_down


def one_sync(network: FakeHostNetwork, libvirt: FakeLibvirt | None = None, **sync: Any) -> OneSync:
    return OneSync(network, libvirt or libvirt_with_d1(), **sync)


async def until(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Wait for CONDITION (a generous LIMIT: it fails a test only if never met)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.005)


class Running:
    """A Daemon on fake ports, running until the test leaves the block."""

    def __init__(
        self,
        libvirt: FakeLibvirt,
        network: FakeHostNetwork,
        *,
        config: Config | None = None,
        timings: Timings | None = None,
        tracer: RecordingTracer | None = None,
    ) -> None:
        self.statuses: list[str] = []
        self.daemon = Daemon(
            config or Config(),
            network,
            connect=libvirt.connect,
            on_status=[self.statuses.append],
            timings=timings,
            tracer=tracer,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Daemon:
        self.task = asyncio.ensure_future(self.daemon.run(self.stop))
        return self.daemon

    async def __aexit__(self, *_exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


def test_hostile_reply_is_rejected_and_nothing_is_applied(
    records: list[dict[str, Any]],
) -> None:
    network = FakeHostNetwork(host_state())
    libvirt = libvirt_with_d1()
    # A broadcast "main MAC" and a table far past QEMU's 64 entries.
    libvirt.reply = reply(
        **{
            "main-mac": "ff:ff:ff:ff:ff:ff",
            "multicast-table": [f"01:00:5e:00:00:{i:02x}" for i in range(200)],
        }
    )

    async def scenario() -> str:
        return await one_sync(network, libvirt).once(NicSync(nic_report()), "event")

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
    network = FakeHostNetwork(host_state())
    network.refuse["mac"] = code
    libvirt = libvirt_with_d1()
    libvirt.reply = reply(**{"main-mac": MAC1, "promiscuous": True})

    async def scenario() -> int:
        syncs = one_sync(network, libvirt, retry_max=4.0)
        nic = NicSync(nic_report())
        for _ in range(4):
            await syncs.sync(nic, "event")
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
    network = FakeHostNetwork(host_state())
    network.refuse["mac"] = errno.EADDRINUSE
    libvirt = libvirt_with_d1()
    libvirt.reply = reply(**{"main-mac": MAC1})
    config = Config(sync=SyncSettings(retry_max=0.1))

    async def scenario() -> tuple[int, int]:
        async with Running(libvirt, network, config=config) as daemon:
            # The first try, then retries every 0.1 s (capped).
            await until(lambda: libvirt.queries >= 3, "three tries")
            del libvirt.domains["u1"]
            libvirt.emit(DomainChanged("u1", "d1", "stopped", "destroyed"))
            await until(lambda: daemon.tracking().workers == 0, "the domain's workers stop")
            queries = libvirt.queries
            await asyncio.sleep(0.3)  # would be three more retries
            return queries, libvirt.queries

    before, after = asyncio.run(scenario())
    assert before >= 3  # kept retrying with the capped backoff
    assert after == before  # dropping the domain stopped its retries


def test_drift_found_by_the_resync_is_logged_as_drift(records: list[dict[str, Any]]) -> None:
    network = FakeHostNetwork(host_state(promiscuous=True))  # ip link set mvt0 promisc on

    async def scenario() -> None:
        syncs = one_sync(network)
        await syncs.once(NicSync(nic_report()), "resync")
        await syncs.once(NicSync(nic_report()), "resync")  # in sync now: quiet

    asyncio.run(scenario())
    [drift] = events(records, "drift")
    assert drift["fields"] == ["promiscuous"] and drift["level"] == "warning"
    assert drift["found"] == {"promiscuous": True}
    assert drift["expected"] == {"promiscuous": False}
    [applied] = events(records, "applied")
    assert applied["cause"] == "resync" and applied["new"] is False


def test_guest_changes_are_not_called_drift(records: list[dict[str, Any]]) -> None:
    network = FakeHostNetwork(host_state(promiscuous=True))

    async def scenario() -> None:
        await one_sync(network).once(NicSync(nic_report()), "event")

    asyncio.run(scenario())
    assert events(records, "drift") == []
    assert len(events(records, "applied")) == 1


def test_only_a_guest_event_takes_the_quick_host_read(records: list[dict[str, Any]]) -> None:
    # An event changes what ioctls read; anything else (start, resync, retry, a guest
    # reset) may come with a recreated or reconfigured link and reads everything.
    network = FakeHostNetwork(host_state())

    async def scenario() -> None:
        syncs = one_sync(network)
        for cause in ("start", "event", "resync", "retry", "reset", "event"):
            await syncs.once(NicSync(nic_report()), cause)

    asyncio.run(scenario())
    assert network.reads == [False, True, False, False, False, True]


def test_a_sync_cut_off_mid_plan_says_what_it_left(records: list[dict[str, Any]]) -> None:
    network = FakeHostNetwork(host_state())
    libvirt = libvirt_with_d1()
    libvirt.reply = reply(**{"main-mac": MAC1, "promiscuous": True})

    async def scenario() -> None:
        syncs = one_sync(network, libvirt)
        network.hang = "promiscuous"  # the MAC lands, then this write hangs
        task = asyncio.ensure_future(syncs.once(NicSync(nic_report()), "event"))
        await until(lambda: len(network.applied) == 1, "the MAC write")
        await asyncio.sleep(0.01)  # the next write is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    [line] = events(records, "abandoned")
    assert line["stage"] == "apply" and line["level"] == "warning"
    assert line["applied"] == ["mac"]
    assert line["in_flight"] == "promiscuous" and line["pending"] == []


def test_shutdown_lets_a_sync_in_flight_finish(records: list[dict[str, Any]]) -> None:
    network = FakeHostNetwork(host_state())
    libvirt = libvirt_with_d1()
    libvirt.reply = reply(**{"main-mac": MAC1})

    async def scenario() -> None:
        block = libvirt.block = asyncio.Event()
        async with Running(libvirt, network):
            await until(lambda: libvirt.queries == 1, "the query is in flight")
            # Answers well within the grace, after the stop.
            asyncio.get_running_loop().call_later(0.2, block.set)

    asyncio.run(scenario())
    assert [c.field for c in network.applied] == ["mac"]
    assert events(records, "abandoned") == []


def test_shutdown_abandons_a_stuck_query_with_a_line(records: list[dict[str, Any]]) -> None:
    network = FakeHostNetwork(host_state())
    libvirt = libvirt_with_d1()

    async def scenario() -> None:
        libvirt.block = asyncio.Event()  # a stuck domain: never answers
        async with Running(libvirt, network, timings=Timings(shutdown_grace=0.1)):
            await until(lambda: libvirt.queries == 1, "the query is in flight")

    asyncio.run(scenario())
    [line] = events(records, "abandoned")
    assert line["stage"] == "query" and line["applied"] == [] and line["level"] == "info"


def test_unplug_and_stop_leave_no_worker_behind(records: list[dict[str, Any]]) -> None:
    libvirt = libvirt_with_d1("net0", "net1")

    async def scenario() -> None:
        async with Running(libvirt, FakeHostNetwork(host_state())) as daemon:
            await until(lambda: libvirt.queries == 2, "both NICs synced")
            assert daemon.tracking().domains == {"d1": ("net0", "net1")}
            assert daemon.tracking().workers == 3  # the domain's and one per NIC
            libvirt.domains["u1"] = domain_xml(aliases=("net0",))
            libvirt.emit(DomainChanged("u1", "d1", "device-removed"))
            await until(lambda: daemon.tracking().workers == 2, "net1's worker stops")
            assert daemon.tracking().domains == {"d1": ("net0",)}
            del libvirt.domains["u1"]
            libvirt.emit(DomainChanged("u1", "d1", "stopped", "destroyed"))
            await until(lambda: not daemon.tracking().domains, "d1 is dropped")
            await until(lambda: daemon.tracking().stopping == 0, "its workers stopped")
            assert daemon.tracking().workers == 0 and daemon.tracking().orphans == 0

    asyncio.run(scenario())
    tracking = events(records, "tracking")
    assert {"domains": {}, "orphans": 0}.items() <= tracking[-1].items()
    assert all(t["orphans"] == 0 for t in tracking)
    assert [r["alias"] for r in events(records, "nic gone")] == ["net1"]
    assert libvirt.forgotten == ["u1"]


def test_a_start_right_behind_a_stop_is_not_lost(records: list[dict[str, Any]]) -> None:
    """STOPPED then STARTED back to back (a restore, a migration back): re-surveyed."""
    libvirt = libvirt_with_d1()

    async def scenario() -> None:
        async with Running(libvirt, FakeHostNetwork(host_state())) as daemon:
            await until(lambda: libvirt.queries == 1, "net0 synced")
            libvirt.emit(DomainChanged("u1", "d1", "stopped", "saved"))
            libvirt.emit(DomainChanged("u1", "d1", "started", "restored"))
            await until(lambda: libvirt.queries == 2, "net0 synced again")
            assert daemon.tracking().domains == {"d1": ("net0",)}

    asyncio.run(scenario())
    assert libvirt.looked_up == ["u1"]
    lines = events(records, "domain event")
    assert [(r["change"], r["detail"]) for r in lines] == [
        ("stopped", "saved"),
        ("started", "restored"),
    ]
    # Dropped at the stop, surveyed afresh at the start (and dropped at shutdown).
    gone = [r["why"] for r in events(records, "domain gone")]
    assert gone == ["stopped (saved)", "stopping"]


def test_filter_events_skip_the_queue_only_with_nothing_queued_ahead() -> None:
    tracer = RecordingTracer()
    libvirt = libvirt_with_d1("net0")

    def order() -> list[str]:
        return [
            e.alias if isinstance(e, RxFilterChanged) else type(e).__name__
            for e in tracer.dispatched_events
        ]

    async def scenario() -> None:
        listing = libvirt.listing = asyncio.Event()
        async with Running(libvirt, FakeHostNetwork(host_state()), tracer=tracer):
            await until(lambda: bool(libvirt.connections), "connected")
            # Subscribed as by an earlier survey: this test is about the queue behind it.
            libvirt.subscribed.add("u1")
            # Queued while the first survey runs: nothing follows the stream yet.
            libvirt.emit(RxFilterChanged("u1", "d1", "early", 0.0))
            await asyncio.sleep(0.01)
            assert order() == []
            listing.set()
            await until(lambda: order() == ["early"], "the queued event is dispatched")
            libvirt.emit(DomainChanged("u1", "d1", "reboot"))
            libvirt.emit(RxFilterChanged("u1", "d1", "behind", 0.0))
            assert order() == ["early"]  # both wait their turn: one is queued ahead
            await until(lambda: len(order()) == 3, "the queue drained")
            libvirt.emit(RxFilterChanged("u1", "d1", "direct", 0.0))
            assert order()[-1] == "direct"  # dispatched within the callback

    asyncio.run(scenario())
    assert order() == ["early", "DomainChanged", "behind", "direct"]


def test_libvirt_away_and_back_are_said_once_each(records: list[dict[str, Any]]) -> None:
    libvirt = FakeLibvirt()
    libvirt.script = ["lose", "fail", "fail", "fail", "fail", "ok"]
    config = Config(libvirt=LibvirtSettings(reconnect_max=0.05))

    async def scenario() -> list[str]:
        running = Running(libvirt, FakeHostNetwork(host_state()), config=config)
        async with running:
            await until(lambda: not libvirt.script, "every connect tried")
            await until(lambda: bool(events(records, "libvirt back")), "libvirt back")
        return running.statuses

    statuses = asyncio.run(scenario())
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
    assert len(libvirt.connections) == 6


@pytest.mark.parametrize("running", [True, False])
def test_a_query_failing_as_the_domain_dies_is_no_failure(
    records: list[dict[str, Any]], running: bool
) -> None:
    libvirt = libvirt_with_d1()
    libvirt.error = HypervisorError("Unable to read from monitor: Connection reset by peer")
    if not running:
        del libvirt.domains["u1"]

    async def scenario() -> str:
        return await one_sync(FakeHostNetwork(host_state()), libvirt).once(
            NicSync(nic_report()), "event"
        )

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
    network = FakeHostNetwork(host_state())
    libvirt = libvirt_with_d1(version=LIVE_TRUST)
    libvirt.reply = reply(**{"main-mac": MAC1, "promiscuous": True})
    libvirt.domains["u1"] = xml
    nic = NicSync(nic_report())

    async def scenario() -> str:
        return await one_sync(network, libvirt).once(nic, "event")

    assert asyncio.run(scenario()) == "stale"
    assert network.applied == []
    assert events(records, "applied") == []
    [line] = events(records, "not ours any more")
    assert (line["domain"], line["alias"], line["why"]) == ("d1", "net0", why)
    assert nic.result == f"stopped: {why}"


def test_a_failed_trust_read_after_the_query_writes_nothing_and_is_retried(
    records: list[dict[str, Any]],
) -> None:
    network = FakeHostNetwork(host_state())
    libvirt = libvirt_with_d1(version=LIVE_TRUST)
    libvirt.reply = reply(**{"main-mac": MAC1})
    libvirt.xml_error = HypervisorError("cannot acquire state change lock")

    async def scenario() -> str:
        return await one_sync(network, libvirt).once(NicSync(nic_report()), "event")

    assert asyncio.run(scenario()) == "retry"
    assert network.applied == [] and libvirt.queries == 1
    [failed] = events(records, "failed")
    assert (failed["stage"], failed["reason"]) == ("trust", "libvirt")
    assert "state change lock" in failed["error"]


@pytest.mark.parametrize("version", [9_000_000, LIVE_TRUST])
def test_a_trusted_nic_is_written_after_its_xml_is_read_again(version: int) -> None:
    # Only where trust can change live: on 9.0 the XML read would buy nothing.
    network = FakeHostNetwork(host_state())
    libvirt = libvirt_with_d1(version=version)
    libvirt.reply = reply(**{"main-mac": MAC1})

    async def scenario() -> str:
        return await one_sync(network, libvirt).once(NicSync(nic_report()), "event")

    assert asyncio.run(scenario()) == "ok"
    assert [c.field for c in network.applied] == ["mac"]
    assert libvirt.xml_reads == (1 if version == LIVE_TRUST else 0)


def test_a_revoked_trust_stops_the_worker_with_no_write(records: list[dict[str, Any]]) -> None:
    # Through the daemon: the stale outcome re-reads the domain, which stops the NIC.
    network = FakeHostNetwork(host_state())
    libvirt = libvirt_with_d1(version=LIVE_TRUST)

    async def scenario() -> None:
        async with Running(libvirt, network) as daemon:
            await until(lambda: libvirt.queries == 1, "net0 synced")
            libvirt.reply = reply(**{"main-mac": MAC1})
            libvirt.domains["u1"] = domain_xml(trust="no")
            libvirt.emit(RxFilterChanged("u1", "d1", "net0", 0.0))
            await until(lambda: daemon.tracking().domains == {"d1": ()}, "net0 not synced")

    asyncio.run(scenario())
    assert network.applied == []
    assert [r["reason"] for r in events(records, "skipped")] == ["untrusted"]


def test_a_noisy_nic_mutes_its_domain_and_its_sibling_is_synced_after(
    records: list[dict[str, Any]],
) -> None:
    tracer = RecordingTracer()
    libvirt = libvirt_with_d1("net0", "net1")
    libvirt.reply = rx_filter_reply(guest_entry(), guest_entry(name="net1"))

    def delivered() -> int:
        return sum(isinstance(e, RxFilterChanged) for e in tracer.dispatched_events)

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        async with Running(libvirt, FakeHostNetwork(host_state()), tracer=tracer):
            await until(lambda: len(events(records, "synced")) == 2, "the first syncs")
            assert libvirt.subscriptions == ["+u1"]  # before the first query
            # net0's guest changes its filter non-stop for 1.5 s (libvirt re-arming it).
            emitted, end = 0, loop.time() + 1.5
            while loop.time() < end:
                libvirt.emit(RxFilterChanged("u1", "d1", "net0", 0.0))
                emitted += 1
                await asyncio.sleep(0.003)
            await until(lambda: bool(events(records, "filter events unmuted")), "calm")
            assert "u1" in libvirt.subscribed
        return emitted, delivered()

    emitted, handed = asyncio.run(scenario())
    assert handed < emitted / 2, (handed, emitted)
    subscriptions = libvirt.subscriptions
    assert subscriptions[0] == "+u1" and len(subscriptions) >= 3, subscriptions
    assert subscriptions == ["+u1", "-u1"] * (len(subscriptions) // 2) + ["+u1"], subscriptions
    [muted] = events(records, "filter events muted")
    assert (muted["domain"], muted["alias"], muted["ifname"]) == ("d1", "net0", "mvt0")
    assert len(events(records, "filter events unmuted")) == 1
    # net1's own events would have gone unsent while muted: it is synced after each.
    causes = [r["cause"] for r in events(records, "synced") if r["alias"] == "net1"]
    assert causes.count("unmuted") == subscriptions.count("-u1"), causes
