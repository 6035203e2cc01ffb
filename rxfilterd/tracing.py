"""A host network seen by a Tracer: its reads and writes timed, nothing else changed.

The daemon wraps its host network in this only when a tracer is set, so without one
the sync path calls the adapter directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rxfilterd.host_state import HostState
from rxfilterd.plan import Change
from rxfilterd.ports import HostNetworkPort, Tracer


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
