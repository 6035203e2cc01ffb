"""One libvirt served: its supervisor, its reconciler, and the network namespace of its NICs.

The host's libvirt is one; each pod's libvirt is another, made the same way on the
pod's network namespace. Nothing here knows which kind it is.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from rxfilterd.config import Config
from rxfilterd.ports import HostNetworkPort, HypervisorFactory, Tracer
from rxfilterd.reconciler import Reconciler, Timings
from rxfilterd.sinks import Sinks
from rxfilterd.stats import Stats
from rxfilterd.supervisor import ConnectionSupervisor


@dataclass(frozen=True)
class Endpoint:
    """Where one libvirt is, and where its NICs live.

    NAME is "host" or "pod/<name>"; NETNS the network namespace of its NICs (None:
    ours). For a pod's libvirt: IDENTITY, the same for as long as the pod's daemon
    serves that socket in that mount namespace, and PID, a process of the pod through
    whose /proc entry URI and NETNS reach it, with its start time (a pid may be reused:
    the two together name one process).
    """

    name: str
    uri: str
    netns: str | None = None
    pid: int | None = None
    started: int | None = None
    identity: str = ""
    # Connections of its own for guest queries (one per busy domain at a time, 5 calls
    # each in libvirtd): 3 for a host's many domains, 1 for a pod's one VM.
    queries: int = 3

    def renamed(self, name: str) -> Endpoint:
        return dataclasses.replace(self, name=name)


class Connection:
    """Syncs the NICs of one libvirt's domains through the macvtaps of NETWORK."""

    def __init__(
        self,
        endpoint: Endpoint,
        config: Config,
        network: HostNetworkPort,
        *,
        sinks: Sinks,
        stats: Stats,
        connect: HypervisorFactory,
        on_ready: Callable[[], None] = lambda: None,
        on_status: Callable[[], None] = lambda: None,
        timings: Timings | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.network = network
        self.stats = stats
        self.reconciler = Reconciler(
            config,
            network,
            stats=stats,
            sinks=sinks,
            on_ready=on_ready,
            on_status=on_status,
            timings=timings,
            tracer=tracer,
        )
        self.supervisor = ConnectionSupervisor(
            endpoint.uri,
            self.reconciler,
            connect=connect,
            reconnect_max=config.libvirt.reconnect_max,
            stats=stats,
            on_status=on_status,
            tracer=tracer,
            queries=endpoint.queries,
        )

    @property
    def name(self) -> str:
        return self.endpoint.name

    def reload(self, config: Config) -> None:
        self.reconciler.reload(config)
        self.supervisor.reconnect_max = config.libvirt.reconnect_max

    def start(self, stop: asyncio.Event) -> asyncio.Task[None]:
        """Serve until STOP; every line logged on its behalf names the connection."""
        context = contextvars.copy_context()
        context.run(structlog.contextvars.bind_contextvars, libvirt=self.name)
        return asyncio.get_running_loop().create_task(
            self._run(stop), name=f"libvirt {self.name}", context=context
        )

    async def _run(self, stop: asyncio.Event) -> None:
        try:
            await self.supervisor.run(stop)
        finally:
            self.reconciler.close()
