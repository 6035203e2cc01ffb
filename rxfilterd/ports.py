"""The ports: what the reconciler needs from the world, as small Protocols.

One adapter each in production (rxfilterd.hypervisor, rxfilterd.macvtap, the sinks
the app wires), fakes in rxfilterd.testing. Nothing here does I/O or imports libvirt,
pyroute2 or aiomqtt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from rxfilterd.events import HypervisorError, HypervisorEvent, RunningDomain, RxFilterChanged
from rxfilterd.host_state import HostState
from rxfilterd.plan import Change
from rxfilterd.records import Decision, NicKey, NicState
from rxfilterd.stats import Stats

# Where a connection hands its events (on the event loop's thread).
EventHandler = Callable[[HypervisorEvent], None]

# A domain's live XML as read right after a query: None if it is not running any
# more, the error if the read failed (the query's answer stands either way).
LiveXml = str | None | HypervisorError


class TrustLookups(Protocol):
    """Protocol: the libvirt look-ups trust needs."""

    async def network_xml(self, name: str) -> str | None: ...

    async def network_port_xml(self, network: str, portid: str) -> str | None: ...


class HypervisorPort(TrustLookups, Protocol):
    """Protocol: one libvirt connection, as the reconciler and its supervisor use it.

    Calls raise rxfilterd.events.HypervisorError; look-ups of something that is gone
    answer None instead.
    """

    # libvirt's version, packed (major * 1e6 + minor * 1e3 + micro); 0 until connected.
    @property
    def version(self) -> int: ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    def shutdown(self) -> None: ...

    async def subscribe(self, uuid: str) -> None:
        """Receive the running domain's filter events from now on; idempotent."""

    async def unsubscribe(self, uuid: str) -> None:
        """Receive none of the domain's filter events until subscribe()."""

    async def running_domains(self) -> list[RunningDomain]: ...

    async def domain(self, uuid: str) -> RunningDomain | None: ...

    async def domain_xml(self, uuid: str) -> str | None: ...

    async def query_rx_filter(self, uuid: str, alias: str) -> str: ...

    async def query_rx_filter_then_xml(self, uuid: str, alias: str) -> tuple[str, LiveXml]:
        """The query, then the domain's live XML read right after it in the same call."""

    def forget(self, uuid: str) -> None: ...


class HypervisorFactory(Protocol):
    """Protocol: a new, not yet connected, connection to URI handing its events to ON_EVENT.

    QUERIES: how many connections of its own the guest queries go over.
    """

    def __call__(
        self, uri: str, on_event: EventHandler, *, tracer: Tracer | None = None, queries: int = 3
    ) -> HypervisorPort: ...


class HostNetworkPort(Protocol):
    """Protocol: the macvtaps of one network namespace (raises host_state.MacvtapError)."""

    async def read(self, ifname: str, *, quick: bool = False) -> HostState | None: ...

    async def is_macvtap(self, ifname: str) -> bool: ...

    async def apply(self, state: HostState, changes: Sequence[Change]) -> None: ...


class DecisionSink(Protocol):
    """Protocol: takes every decision (the log has it already); must not block."""

    def __call__(self, decision: Decision, /) -> None: ...


class StateSink(Protocol):
    """Protocol: takes each NIC's latest state, None once the NIC is gone; must not block."""

    def __call__(self, key: NicKey, state: NicState | None, /) -> None: ...


# The steps of a sync a Tracer sees: the query (as the reconciler awaits it), the
# libvirt call inside it (in a pool thread), the host read and each host write.
TraceStep = Literal["query", "call", "read", "write"]


class Tracer(Protocol):
    """Protocol: sees the hot path's steps, for benchmarks; None (the default) costs nothing.

    Times are time.time(). Methods must return at once: they run on the path measured.
    """

    def started(self, stats: Stats) -> None:
        """The daemon runs (on the event loop, before connecting)."""

    def stopped(self, stats: Stats) -> None:
        """The daemon has stopped (on the event loop)."""

    def event_received(self, event: RxFilterChanged, at: float) -> None:
        """libvirt delivered a filter event (on libvirt's event thread)."""

    def dispatched(self, event: HypervisorEvent, at: float) -> None:
        """The reconciler takes an event on (on the event loop)."""

    def step(self, step: TraceStep, subject: str, started: float, ended: float) -> None:
        """One step done; SUBJECT is the alias (query, call), ifname (read) or field (write)."""
