"""The process: logging, signals, SIGHUP reload, sd_notify and its watchdog, and the sinks
(MQTT, metrics, the status socket's live state).

cli.py parses the command line and calls `run`. Everything here wires together parts
that know nothing of each other; none of it decides anything about a NIC.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from rxfilterd import config as config_mod
from rxfilterd import logs
from rxfilterd.config import Config, ConfigError, split_listen
from rxfilterd.daemon import Daemon
from rxfilterd.live import LiveState
from rxfilterd.macvtap import HostNetwork, pinned_network
from rxfilterd.notify import Notifier, watchdog_interval
from rxfilterd.ports import DecisionSink, StateSink, Tracer
from rxfilterd.stats import Board
from rxfilterd.status_server import StatusServer
from rxfilterd.tracing import combine

if TYPE_CHECKING:
    from rxfilterd.metrics import DaemonMetrics
    from rxfilterd.pods import PodScanner
    from rxfilterd.publisher import Publisher

log = structlog.get_logger("rxfilterd")

# The daemon's own shutdown (syncs in flight get their grace inside it) may take this long.
DAEMON_SHUTDOWN = 4.0
# The publisher says "offline" within about a second; never hold the exit longer than this.
PUBLISHER_SHUTDOWN = 1.5
# A cheap netlink round trip must answer within this for the watchdog to be petted.
PROBE_TIMEOUT = 2.0
# Threads of the event loop's default executor, at most.
DEFAULT_WORKERS = 4


def run(config: Config, *, forced_dry_run: bool = False, tracer: Tracer | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT; TRACER (benchmarks) sees its hot path."""
    logs.configure(config.log.level, config.log.format)
    asyncio.run(serve(config, forced_dry_run=forced_dry_run, tracer=tracer))
    # A libvirt call stuck in a worker thread must not hold the process past SIGTERM.
    sys.stdout.flush()
    sys.stderr.flush()
    if threading.active_count() > 1:
        os._exit(0)


async def serve(
    config: Config, *, forced_dry_run: bool = False, tracer: Tracer | None = None
) -> None:
    loop = asyncio.get_running_loop()
    # Scans of /proc and waits for namespace threads: a few at a time (the default pool
    # grows to cpu + 4 threads and keeps them).
    loop.set_default_executor(ThreadPoolExecutor(DEFAULT_WORKERS, thread_name_prefix="rxfilterd"))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier()
    board = Board()
    live = LiveState(board)
    async with HostNetwork() as network:
        publisher = start_publisher(config)
        metrics = make_metrics(config, board, publisher)
        daemon = wire(
            config, network, notifier, publisher, combine(metrics, tracer), board, live, metrics
        )
        loop.add_signal_handler(signal.SIGHUP, reload, daemon, forced_dry_run)
        log.info(
            "starting",
            config=str(config.path),
            uri=config.libvirt.uri or None,
            pods=config.pods.enabled,
            dry_run=config.sync.dry_run,
        )
        add_sections(live, config, publisher, metrics)
        status_server = StatusServer(Path(config.status.socket), live.snapshot)
        await status_server.start()
        publisher_stop = asyncio.Event()
        publishing: asyncio.Task[None] | None = None
        if publisher is not None:
            publishing = asyncio.create_task(publisher.run(publisher_stop))
        task = asyncio.create_task(daemon.run(stop))
        watchdog = asyncio.create_task(supervise(notifier, daemon, network, stop))
        await stop.wait()
        notifier.stopping()
        log.info("stopping")
        if publisher is not None:
            publisher.freeze()  # NICs dropped at shutdown still exist: keep their state
        try:
            await asyncio.wait_for(task, timeout=DAEMON_SHUTDOWN)
        except TimeoutError:
            log.warning("shutdown timed out; in-flight work abandoned")
        watchdog.cancel()
        await status_server.close()
        if metrics is not None:
            # shutdown() waits for the server thread's next poll (up to 0.5 s): not on the loop.
            await asyncio.to_thread(metrics.close)
        if publishing is not None:
            publisher_stop.set()
            try:
                await asyncio.wait_for(publishing, timeout=PUBLISHER_SHUTDOWN)
            except TimeoutError:
                log.warning("mqtt: shutdown timed out; offline status not confirmed")


def start_publisher(config: Config) -> Publisher | None:
    """With [mqtt] enabled, the MQTT publisher; None otherwise."""
    if not config.mqtt.enabled:
        return None
    # Imported only when enabled: aiomqtt and paho add 3 MiB to the idle daemon's 52 MiB
    # RSS (measured), which the default configuration, without MQTT, need not carry.
    from rxfilterd.publisher import Publisher

    return Publisher(config.mqtt)


def make_metrics(config: Config, board: Board, publisher: Publisher | None) -> DaemonMetrics | None:
    """With [metrics] listen set, the daemon's metrics (not yet served); None otherwise."""
    if config.metrics.listen is None:
        return None
    # Imported only when enabled: with it the idle daemon has 4.3 MiB more RSS and 22 ms
    # more start-up (measured, docs/benchmarks.md), which the default need not carry.
    from rxfilterd.metrics import DaemonMetrics

    def mqtt_view() -> tuple[bool, int]:
        assert publisher is not None
        return publisher.connected, publisher.events.dropped

    metrics = DaemonMetrics(
        board,
        domain_label=config.metrics.domain_label,
        mqtt=mqtt_view if publisher is not None else None,
    )
    host, port = split_listen(config.metrics.listen)
    try:
        metrics.serve(host, port)
    except OSError as exc:
        # Syncing matters more than metrics: say so loudly and go on without them.
        log.error("metrics: cannot listen", listen=config.metrics.listen, error=str(exc))
        return metrics
    log.info("metrics: serving", url=f"http://{config.metrics.listen}/metrics")
    return metrics


def add_sections(
    live: LiveState, config: Config, publisher: Publisher | None, metrics: DaemonMetrics | None
) -> None:
    """What `status` says about MQTT and metrics, read when it is asked."""
    if publisher is not None:
        broker = f"{config.mqtt.host}:{config.mqtt.port}"
        live.sections["mqtt"] = lambda: {
            "broker": broker,
            "connected": publisher.connected,
            "dropped": publisher.events.dropped,
        }
    if metrics is not None:
        listen = config.metrics.listen
        live.sections["metrics"] = lambda: (
            {"url": f"http://{listen}/metrics"}
            if metrics.port is not None
            else {"error": f"cannot listen on {listen} (see the log)"}
        )


def wire(
    config: Config,
    network: HostNetwork,
    notifier: Notifier,
    publisher: Publisher | None,
    tracer: Tracer | None,
    board: Board | None = None,
    live: LiveState | None = None,
    metrics: DaemonMetrics | None = None,
) -> Daemon:
    """The daemon, its decisions, NIC states, readiness and status going to their sinks."""
    decisions: list[DecisionSink] = []
    states: list[StateSink] = []
    for sink in (live, metrics, publisher):
        if sink is not None:
            decisions.append(sink.decision)
            states.append(sink.nic_state)
    return Daemon(
        config,
        network,
        decisions=decisions,
        states=states,
        # Once every current NIC is published, the publisher may clear stale retained topics.
        on_ready=[publisher.ready, notifier.ready] if publisher else [notifier.ready],
        on_status=[notifier.status],
        tracer=tracer,
        board=board,
        pods=_pod_scanner(config),
        open_network=pinned_network,
    )


def _pod_scanner(config: Config) -> PodScanner | None:
    """With [pods] enabled, what finds the pods' libvirts; None otherwise."""
    if not config.pods.enabled:
        return None
    from rxfilterd.pods import PodScanner

    return PodScanner(config.pods)


def reload(daemon: Daemon, forced_dry_run: bool) -> None:
    """SIGHUP: re-read the config file; a bad file is rejected and the old settings stay."""
    old = daemon.config
    path = old.path or config_mod.DEFAULT_PATH
    try:
        new = config_mod.load(path)
    except ConfigError as exc:
        log.error("config reload rejected, old settings stay", error=str(exc))
        return
    if forced_dry_run:  # --dry-run on the command line outlives any reload
        new = new.with_dry_run()
    if new.log != old.log:
        logs.configure(new.log.level, new.log.format)
    for key, before, after in (
        ("libvirt.uri", old.libvirt.uri, new.libvirt.uri),
        ("pods", old.pods, new.pods),
        ("mqtt", old.mqtt, new.mqtt),
        ("metrics", old.metrics, new.metrics),
        ("status", old.status, new.status),
    ):
        if before != after:
            log.warning("config change takes effect at restart", key=key)
    daemon.reload(new)
    log.info("config reloaded", path=str(path), dry_run=new.sync.dry_run)


async def supervise(
    notifier: Notifier, daemon: Daemon, network: HostNetwork, stop: asyncio.Event
) -> None:
    """STATUS= when the summary changes; WATCHDOG=1 only while libvirt and netlink work."""
    if not notifier.enabled:
        return
    period = watchdog_interval()
    last_status = ""
    last_pet = 0.0
    while not stop.is_set():
        status = daemon.status()
        if status != last_status:
            notifier.status(status)
            last_status = status
        now = time.monotonic()
        due = period is not None and now - last_pet >= period and daemon.healthy()
        if due and await _netlink_answers(network):
            notifier.watchdog()
            last_pet = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def _netlink_answers(network: HostNetwork) -> bool:
    """A cheap netlink round trip proves the socket still answers."""
    try:
        await asyncio.wait_for(network.is_macvtap("lo"), timeout=PROBE_TIMEOUT)
    except Exception:  # any failure means unhealthy: systemd restarts us
        return False
    return True
