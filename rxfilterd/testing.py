"""Fakes of the ports, for tests and benchmarks: libvirt and a host network in memory.

    libvirt = FakeLibvirt()
    libvirt.domains["u1"] = "<domain><name>d1</name>...</domain>"
    daemon = Daemon(config, FakeHostNetwork(), connect=libvirt.connect)

Public API, like rxfilterd.daemon: tests need nothing private of rxfilterd.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from rxfilterd.connection import Endpoint
from rxfilterd.events import (
    ConnectionLost,
    HypervisorError,
    HypervisorEvent,
    RunningDomain,
    RxFilterChanged,
)
from rxfilterd.host_state import HostState, MacvtapError
from rxfilterd.plan import Change, MacChange
from rxfilterd.ports import EventHandler, LiveXml, Tracer, TraceStep
from rxfilterd.stats import Stats

__all__ = [
    "FakeConnection",
    "FakeHostNetwork",
    "FakeLibvirt",
    "FakeNode",
    "RecordingTracer",
]


class FakeLibvirt:
    """One libvirt daemon in memory; `connect` is its HypervisorFactory.

    Every connection sees the same domains. `script` says how each next connect goes:
    "ok", "fail" (refused), or "lose" (connects, then the connection drops); once it
    is empty every connect is "ok".
    """

    def __init__(self, version: int = 9_000_000) -> None:
        self.version = version
        # Running domains: UUID -> live XML.
        self.domains: dict[str, str] = {}
        self.networks: dict[str, str] = {}
        # Network port XML by port UUID.
        self.ports: dict[str, str] = {}
        # What every query-rx-filter answers; `error` makes it fail instead, and while
        # `block` is set and not yet fired the query waits for it (a stuck domain).
        self.reply = ""
        self.error: HypervisorError | None = None
        self.block: asyncio.Event | None = None
        self.queries = 0
        # While set and not yet fired, listing the running domains waits (a slow libvirt).
        self.listing: asyncio.Event | None = None
        self.script: list[str] = []
        self.connections: list[FakeConnection] = []
        # The QUERIES argument of each connect.
        self.queries_asked: list[int] = []
        # UUIDs looked up one by one (domain()), and forgotten, in order.
        self.looked_up: list[str] = []
        self.forgotten: list[str] = []
        # Live XML reads of one domain (domain_xml()), in all; `xml_error` fails them.
        self.xml_reads = 0
        self.xml_error: HypervisorError | None = None
        # Domains whose filter events are subscribed (others' are not delivered), and
        # every subscribe ("+uuid") and unsubscribe ("-uuid") in order.
        self.subscribed: set[str] = set()
        self.subscriptions: list[str] = []

    def connect(
        self, uri: str, on_event: EventHandler, *, tracer: Tracer | None = None, queries: int = 3
    ) -> FakeConnection:
        self.queries_asked.append(queries)
        connection = FakeConnection(self, uri, on_event)
        self.connections.append(connection)
        return connection

    def emit(self, event: HypervisorEvent) -> None:
        """An event on the newest connection (on the event loop, as libvirt's arrive).

        A filter event of a domain not subscribed is not delivered, as with libvirt.
        """
        if isinstance(event, RxFilterChanged) and event.uuid not in self.subscribed:
            return
        self.connections[-1].on_event(event)


class FakeConnection:
    """One connection to a FakeLibvirt (a HypervisorPort)."""

    def __init__(self, libvirt: FakeLibvirt, uri: str, on_event: EventHandler) -> None:
        self.libvirt = libvirt
        self.uri = uri
        self.on_event = on_event
        self.version = 0
        self.closed = False

    async def connect(self) -> None:
        step = self.libvirt.script.pop(0) if self.libvirt.script else "ok"
        if step == "fail":
            raise HypervisorError("Failed to connect socket: No such file or directory")
        self.version = self.libvirt.version
        self.libvirt.subscribed.clear()  # subscriptions are the old connection's
        if step == "lose":
            asyncio.get_running_loop().call_later(0.01, self.lose)

    def lose(self, reason: str = "libvirtd closed the connection") -> None:
        self.on_event(ConnectionLost(reason))

    async def close(self) -> None:
        self.closed = True

    def shutdown(self) -> None:
        pass

    async def subscribe(self, uuid: str) -> None:
        if uuid not in self.libvirt.subscribed:
            self.libvirt.subscribed.add(uuid)
            self.libvirt.subscriptions.append(f"+{uuid}")

    async def unsubscribe(self, uuid: str) -> None:
        if uuid in self.libvirt.subscribed:
            self.libvirt.subscribed.discard(uuid)
            self.libvirt.subscriptions.append(f"-{uuid}")

    async def running_domains(self) -> list[RunningDomain]:
        if self.libvirt.listing is not None:
            await self.libvirt.listing.wait()
        return [RunningDomain(uuid, _name(xml), xml) for uuid, xml in self.libvirt.domains.items()]

    async def domain(self, uuid: str) -> RunningDomain | None:
        self.libvirt.looked_up.append(uuid)
        xml = self.libvirt.domains.get(uuid)
        return None if xml is None else RunningDomain(uuid, _name(xml), xml)

    async def domain_xml(self, uuid: str) -> str | None:
        self.libvirt.xml_reads += 1
        if self.libvirt.xml_error is not None:
            raise self.libvirt.xml_error
        return self.libvirt.domains.get(uuid)

    async def network_xml(self, name: str) -> str | None:
        return self.libvirt.networks.get(name)

    async def network_port_xml(self, network: str, portid: str) -> str | None:
        return self.libvirt.ports.get(portid)

    async def query_rx_filter(self, uuid: str, alias: str) -> str:
        self.libvirt.queries += 1
        if self.libvirt.block is not None:
            await self.libvirt.block.wait()
        if self.libvirt.error is not None:
            raise self.libvirt.error
        return self.libvirt.reply

    async def query_rx_filter_then_xml(self, uuid: str, alias: str) -> tuple[str, LiveXml]:
        reply = await self.query_rx_filter(uuid, alias)
        try:
            return reply, await self.domain_xml(uuid)
        except HypervisorError as exc:
            return reply, exc

    def forget(self, uuid: str) -> None:
        self.libvirt.forgotten.append(uuid)
        self.libvirt.subscribed.discard(uuid)


def _name(xml: str) -> str:
    try:
        return ET.fromstring(xml).findtext("name") or ""
    except ET.ParseError:
        return ""


class FakeHostNetwork:
    """Macvtaps in memory (a HostNetworkPort): one link's state, as `state` says."""

    def __init__(self, state: HostState | None = None) -> None:
        self.state = state
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

    async def apply(self, state: HostState, changes: Sequence[Change]) -> None:
        for change in changes:
            if change.field in self.refuse:
                code = self.refuse[change.field]
                op = "apply" if code is None else f"set {change.field}"
                raise MacvtapError(state.ifname, op, code, change=change)
            if change.field == self.hang:
                await asyncio.Event().wait()
            self.applied.append(change)
            if self.state is None:
                continue
            if isinstance(change, MacChange):
                self.state = replace(self.state, mac=change.new)
            elif change.field == "promiscuous":
                self.state = replace(self.state, promiscuous=bool(change.new))


class FakeNode:
    """A node with pods, in memory: each pod a FakeLibvirt and a FakeHostNetwork.

    `connect` is a HypervisorFactory routing each URI to its libvirt, `open_network`
    a NetworkOpener handing out each pod's network, and the node itself a PodSource.
    """

    def __init__(self) -> None:
        self.libvirts: dict[str, FakeLibvirt] = {}
        self.networks: dict[str, FakeHostNetwork] = {}
        # By key; two pods may share a name (hostname), as in KubeVirt.
        self.pods: dict[str, Endpoint] = {}
        self.started = 0
        # Pods whose daemon was replaced by another process of the same pid.
        self.replaced: set[str] = set()
        # Networks open now, by namespace (each open must be closed).
        self.open: list[str] = []
        self.scans = 0

    def add_pod(
        self, name: str, libvirt: FakeLibvirt, network: FakeHostNetwork, key: str = ""
    ) -> Endpoint:
        """A pod named NAME (its hostname), under KEY (default NAME) for remove_pod."""
        pid = 1000 + self.started
        self.started += 1
        endpoint = Endpoint(
            f"pod/{name}",
            f"fake:///{pid}",
            netns=f"/proc/{pid}/ns/net",
            pid=pid,
            started=pid,
            identity=f"mnt:[{pid}] /run/libvirt/libvirt-sock",
            queries=1,  # as PodScanner gives a pod
        )
        self.pods[key or name] = endpoint
        self.libvirts[endpoint.uri] = libvirt
        assert endpoint.netns is not None
        self.networks[endpoint.netns] = network
        return endpoint

    def remove_pod(self, key: str) -> None:
        del self.pods[key]

    def connect(
        self, uri: str, on_event: EventHandler, *, tracer: Tracer | None = None, queries: int = 3
    ) -> FakeConnection:
        return self.libvirts[uri].connect(uri, on_event, tracer=tracer, queries=queries)

    @contextlib.asynccontextmanager
    async def open_network(self, netns: str) -> AsyncIterator[FakeHostNetwork]:
        network = self.networks[netns]
        self.open.append(netns)
        try:
            yield network
        finally:
            self.open.remove(netns)

    # The PodSource.
    def scan(self) -> list[Endpoint]:
        self.scans += 1
        return sorted(self.pods.values(), key=lambda e: e.name)

    def wanted(self, endpoint: Endpoint) -> bool:
        return True

    def alive(self, endpoint: Endpoint) -> bool:
        return endpoint.name.removeprefix("pod/") not in self.replaced

    def missing(self) -> list[str]:
        return []


@dataclass
class RecordingTracer:
    """A Tracer that keeps what it sees, in order."""

    dispatched_events: list[HypervisorEvent] = field(default_factory=list)
    received: list[RxFilterChanged] = field(default_factory=list)
    steps: list[tuple[TraceStep, str]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    def started(self, stats: Stats) -> None:
        self.runs.append("started")

    def stopped(self, stats: Stats) -> None:
        self.runs.append("stopped")

    def event_received(self, event: RxFilterChanged, at: float) -> None:
        self.received.append(event)

    def dispatched(self, event: HypervisorEvent, at: float) -> None:
        self.dispatched_events.append(event)

    def step(self, step: TraceStep, subject: str, started: float, ended: float) -> None:
        assert started <= ended <= time.time()
        self.steps.append((step, subject))
