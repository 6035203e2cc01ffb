"""The daemon: one libvirt connection, supervised, and the reconciler behind it.

A libvirt in a pod would be one more ConnectionSupervisor with a Reconciler of its
own, on that pod's host network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from rxfilterd.config import Config
from rxfilterd.domains import Tracking
from rxfilterd.hypervisor import Hypervisor
from rxfilterd.ports import (
    DecisionSink,
    HostNetworkPort,
    HypervisorFactory,
    StateSink,
    Tracer,
)
from rxfilterd.reconciler import Reconciler, Timings
from rxfilterd.sinks import Sinks
from rxfilterd.stats import Stats
from rxfilterd.supervisor import ConnectionSupervisor


class Daemon:
    """Syncs the NICs of config.libvirt.uri's domains through NETWORK's macvtaps.

    Decisions go to every DECISIONS sink, NIC state to every STATES sink; ON_READY is
    called once every NIC had its first sync, ON_STATUS with each new status line.
    CONNECT opens libvirt connections (fakes in tests); TRACER sees the hot path's
    steps (metrics, benchmarks); STATS, when given, is where it counts.
    """

    def __init__(
        self,
        config: Config,
        network: HostNetworkPort,
        *,
        decisions: Sequence[DecisionSink] = (),
        states: Sequence[StateSink] = (),
        on_ready: Sequence[Callable[[], object]] = (),
        on_status: Sequence[Callable[[str], object]] = (),
        connect: HypervisorFactory = Hypervisor,
        timings: Timings | None = None,
        tracer: Tracer | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.stats = stats or Stats()
        self._on_ready = tuple(on_ready)
        self._on_status = tuple(on_status)
        self._tracer = tracer
        self.reconciler = Reconciler(
            config,
            network,
            stats=self.stats,
            sinks=Sinks(decisions, states),
            on_ready=self._ready,
            on_status=self._status,
            timings=timings,
            tracer=tracer,
        )
        self.supervisor = ConnectionSupervisor(
            config.libvirt.uri,
            self.reconciler,
            connect=connect,
            reconnect_max=config.libvirt.reconnect_max,
            stats=self.stats,
            on_status=self._status,
            tracer=tracer,
        )

    @property
    def config(self) -> Config:
        return self.reconciler.config

    def reload(self, config: Config) -> None:
        """New settings take effect from the next sync of each NIC (the URI at restart)."""
        self.reconciler.reload(config)
        self.supervisor.reconnect_max = config.libvirt.reconnect_max

    def status(self) -> str:
        return self.stats.summary(self.stats.nics_synced)

    def tracking(self) -> Tracking:
        return self.reconciler.tracking()

    async def run(self, stop: asyncio.Event) -> None:
        if self._tracer is not None:
            self._tracer.started(self.stats)
        try:
            await self.supervisor.run(stop)
        finally:
            self.reconciler.close()
            self._status()
            if self._tracer is not None:
                self._tracer.stopped(self.stats)

    def _ready(self) -> None:
        for ready in self._on_ready:
            ready()

    def _status(self) -> None:
        line = self.status()
        for status in self._on_status:
            status(line)
