"""The daemon: the host's libvirt connection, and one more per pod's libvirt while it runs.

Each is a Connection (supervisor and reconciler) on the network namespace of its NICs;
the pods come and go as PodSource sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Protocol

import structlog

from rxfilterd.config import Config
from rxfilterd.connection import Connection, Endpoint
from rxfilterd.domains import Tracking
from rxfilterd.hypervisor import Hypervisor
from rxfilterd.ports import (
    DecisionSink,
    HostNetworkPort,
    HypervisorFactory,
    StateSink,
    Tracer,
)
from rxfilterd.reconciler import Timings
from rxfilterd.sinks import Sinks
from rxfilterd.stats import Board, Stats
from rxfilterd.supervisor import wait

log = structlog.get_logger("rxfilterd")

# A pod's connection gets this long to stop once its pod is gone (its syncs in flight
# get the reconciler's shutdown grace within it).
POD_STOP = 3.0


class PodSource(Protocol):
    """Protocol: the pods' libvirts now (rxfilterd.pods.PodScanner; fakes in tests)."""

    def scan(self) -> list[Endpoint]: ...

    def wanted(self, endpoint: Endpoint) -> bool: ...

    def alive(self, endpoint: Endpoint) -> bool: ...

    def missing(self) -> list[str]:
        """What this process lacks to reach every pod (capability names)."""
        ...


# Opens the macvtaps of the network namespace at a path (a pod's /proc/PID/ns/net).
NetworkOpener = Callable[[str], AbstractAsyncContextManager[HostNetworkPort]]


@dataclass
class _Pod:
    connection: Connection
    stop: asyncio.Event
    task: asyncio.Task[None]
    # Holds the pod's network namespace open while the connection serves.
    resources: AsyncExitStack


class Daemon:
    """Syncs the NICs of config.libvirt.uri's domains through NETWORK's macvtaps, and,
    given PODS, those of every pod's libvirt through its own namespace's (OPEN_NETWORK).

    Decisions go to every DECISIONS sink, NIC state to every STATES sink; ON_READY is
    called once every host NIC had its first sync, ON_STATUS with each new status line.
    CONNECT opens libvirt connections (fakes in tests); TRACER sees the hot path's
    steps (metrics, benchmarks); BOARD, when given, is where each connection counts.
    """

    def __init__(
        self,
        config: Config,
        network: HostNetworkPort | None,
        *,
        decisions: Sequence[DecisionSink] = (),
        states: Sequence[StateSink] = (),
        on_ready: Sequence[Callable[[], object]] = (),
        on_status: Sequence[Callable[[str], object]] = (),
        connect: HypervisorFactory = Hypervisor,
        timings: Timings | None = None,
        tracer: Tracer | None = None,
        board: Board | None = None,
        pods: PodSource | None = None,
        open_network: NetworkOpener | None = None,
    ) -> None:
        self.config = config
        self.board = board or Board()
        self._decisions = tuple(decisions)
        self._states = tuple(states)
        self._on_ready = tuple(on_ready)
        self._on_status = tuple(on_status)
        self._connect = connect
        self._timings = timings
        self._tracer = tracer
        self._pod_source = pods
        self._open_network = open_network
        self._pods: dict[str, _Pod] = {}
        self.host: Connection | None = None
        if config.libvirt.uri:
            assert network is not None, "the host's libvirt needs the host's network"
            self.host = self._connection(Endpoint("host", config.libvirt.uri), network)

    @property
    def stats(self) -> Stats:
        """The host connection's counters (a pods-only daemon: all pods' summed)."""
        return self.host.stats if self.host is not None else self.board.total()

    @property
    def connections(self) -> list[Connection]:
        pods = [p.connection for _, p in sorted(self._pods.items())]
        return ([self.host] if self.host is not None else []) + pods

    def _connection(
        self, endpoint: Endpoint, network: HostNetworkPort, on_ready: bool = True
    ) -> Connection:
        stats = Stats(name=endpoint.name, uri=endpoint.uri)
        self.board.add(stats)
        sinks = Sinks(libvirt=endpoint.name, decisions=self._decisions, states=self._states)
        return Connection(
            endpoint,
            self.config,
            network,
            sinks=sinks,
            stats=stats,
            connect=self._connect,
            on_ready=self._ready if on_ready else lambda: None,
            on_status=self._status,
            timings=self._timings,
            tracer=self._tracer,
        )

    def reload(self, config: Config) -> None:
        """New settings take effect from the next sync of each NIC (URIs and [pods] at restart)."""
        self.config = config
        for connection in self.connections:
            connection.reload(config)

    def status(self) -> str:
        return self.board.summary()

    def healthy(self) -> bool:
        """For the watchdog: the host's libvirt is connected (pods come and go)."""
        return self.host is None or self.host.stats.connected

    def tracking(self) -> Tracking:
        assert self.host is not None
        return self.host.reconciler.tracking()

    async def run(self, stop: asyncio.Event) -> None:
        if self._tracer is not None:
            self._tracer.started(self.stats)
        tasks = [self.host.start(stop)] if self.host is not None else []
        if self.host is None:
            self._ready()  # nothing of the host's to wait for; pods come when they come
        try:
            if self._pod_source is not None:
                tasks.append(asyncio.create_task(self._watch_pods(stop), name="pods"))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await self._drop_pods(list(self._pods), "stopping")
            self._status()
            if self._tracer is not None:
                self._tracer.stopped(self.stats)

    async def _watch_pods(self, stop: asyncio.Event) -> None:
        """Serve each pod's libvirt while it runs: a scan every [pods] scan_interval."""
        assert self._pod_source is not None
        source = self._pod_source
        missing = source.missing()
        if missing:
            # Said once: without these some pods stay unseen or unreachable, silently.
            log.warning("pods: capabilities missing", missing=missing)
        while not stop.is_set():
            started = time.monotonic()
            try:
                found = await asyncio.to_thread(source.scan)
            except OSError as exc:  # /proc unreadable: say so, keep what runs
                log.error("pods: cannot scan", error=str(exc))
                found = None
            if found is not None:
                await self._follow_pods([e for e in found if source.wanted(e)], stop)
            spent = time.monotonic() - started
            await wait(stop, max(0.0, self.config.pods.scan_interval - spent))

    async def _follow_pods(self, found: list[Endpoint], stop: asyncio.Event) -> None:
        """Drop the pods that went, serve the ones that came; the others keep their name."""
        assert self._pod_source is not None
        now = {e.identity for e in found}
        served = {pod.connection.endpoint.identity: n for n, pod in self._pods.items()}
        await self._drop_pods([n for i, n in served.items() if i not in now], "gone")
        # Its daemon restarted in the same pod (the pid it was reached through ended),
        # or its connection ended by itself (failed): served afresh below.
        await self._drop_pods(
            [
                n
                for n, pod in self._pods.items()
                if not self._pod_source.alive(pod.connection.endpoint)
            ],
            "restarted",
        )
        await self._drop_pods([n for n, pod in self._pods.items() if pod.task.done()], "failed")
        serving = {pod.connection.endpoint.identity for pod in self._pods.values()}
        for endpoint in found:
            if endpoint.identity not in serving and not stop.is_set():
                await self._add_pod(self._unique(endpoint), stop)

    def _unique(self, endpoint: Endpoint) -> Endpoint:
        """ENDPOINT under a name no served pod has (pods of one hostname: the pid added)."""
        if endpoint.name in self._pods:
            return endpoint.renamed(f"{endpoint.name}@{endpoint.pid}")
        return endpoint

    async def _add_pod(self, endpoint: Endpoint, stop: asyncio.Event) -> None:
        assert self._pod_source is not None and self._open_network is not None
        assert endpoint.netns is not None
        resources = AsyncExitStack()
        try:
            network = await resources.enter_async_context(self._open_network(endpoint.netns))
        except Exception as exc:  # gone meanwhile, or not ours to enter: next scan says
            await resources.aclose()
            log.warning("pod: cannot open its network", libvirt=endpoint.name, error=str(exc))
            return
        # The namespace is held open now: if the pid still names the same process,
        # it is the pod's, whatever happens to the pid later.
        if not self._pod_source.alive(endpoint):
            await resources.aclose()
            return
        connection = self._connection(endpoint, network, on_ready=False)
        pod_stop = asyncio.Event()
        task = connection.start(pod_stop)
        self._pods[endpoint.name] = _Pod(connection, pod_stop, task, resources)
        log.info("pod found", libvirt=endpoint.name, uri=endpoint.uri, pid=endpoint.pid)
        self._status()

    async def _drop_pods(self, names: list[str], why: str) -> None:
        pods = [(name, self._pods.pop(name)) for name in names if name in self._pods]
        for _, pod in pods:
            pod.stop.set()
        for name, pod in pods:
            try:
                await asyncio.wait_for(asyncio.shield(pod.task), POD_STOP)
            except TimeoutError:
                pod.task.cancel()
                log.warning("pod: stop timed out; in-flight work abandoned", libvirt=name)
            with contextlib.suppress(asyncio.CancelledError):
                if (error := await _ended(pod.task)) is not None:
                    log.error("pod: connection failed", libvirt=name, error=error)
            if why != "stopping":  # the pod's NICs are gone with it
                pod.connection.reconciler.withdraw()
            await pod.resources.aclose()
            self.board.remove(name)
            log.info("pod dropped", libvirt=name, why=why)
        if pods:
            self._status()

    def _ready(self) -> None:
        """Every host NIC had its first sync."""
        for ready in self._on_ready:
            ready()

    def _status(self) -> None:
        line = self.status()
        for status in self._on_status:
            status(line)


async def _ended(task: asyncio.Task[None]) -> str | None:
    """Await a finished or finishing TASK; what it raised, if anything."""
    try:
        await task
    except Exception as exc:  # reported, not raised: the other connections go on
        return f"{type(exc).__name__}: {exc}"
    return None
