"""A host network seen by a Tracer (its reads and writes timed), and tracers combined.

The daemon wraps its host network in this only when a tracer is set, so without one
the sync path calls the adapter directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rxfilterd.events import HypervisorEvent, RxFilterChanged
from rxfilterd.host_state import HostState
from rxfilterd.plan import Change
from rxfilterd.ports import HostNetworkPort, Tracer, TraceStep
from rxfilterd.stats import Stats


class TracedHostNetwork:
    """NETWORK, telling TRACER when each read and write started and ended."""

    def __init__(self, network: HostNetworkPort, tracer: Tracer) -> None:
        self._network = network
        self._tracer = tracer

    async def read(self, ifname: str, *, quick: bool = False) -> HostState | None:
        started = time.time()
        try:
            return await self._network.read(ifname, quick=quick)
        finally:
            self._tracer.step("read", ifname, started, time.time())

    async def is_macvtap(self, ifname: str) -> bool:
        return await self._network.is_macvtap(ifname)

    async def apply(self, state: HostState, changes: Sequence[Change]) -> None:
        started = time.time()
        try:
            await self._network.apply(state, changes)
        finally:
            subject = ",".join(c.field for c in changes)
            self._tracer.step("write", subject, started, time.time())


class Tracers:
    """Several tracers seen as one (the metrics and a benchmark's, say), in order."""

    def __init__(self, *tracers: Tracer) -> None:
        self.tracers = tracers

    def started(self, stats: Stats) -> None:
        for tracer in self.tracers:
            tracer.started(stats)

    def stopped(self, stats: Stats) -> None:
        for tracer in self.tracers:
            tracer.stopped(stats)

    def event_received(self, event: RxFilterChanged, at: float) -> None:
        for tracer in self.tracers:
            tracer.event_received(event, at)

    def dispatched(self, event: HypervisorEvent, at: float) -> None:
        for tracer in self.tracers:
            tracer.dispatched(event, at)

    def step(self, step: TraceStep, subject: str, started: float, ended: float) -> None:
        for tracer in self.tracers:
            tracer.step(step, subject, started, ended)


def combine(*tracers: Tracer | None) -> Tracer | None:
    """One tracer for every one of TRACERS that is set; None when none is."""
    present = [t for t in tracers if t is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else Tracers(*present)
