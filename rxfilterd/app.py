"""The process: logging, signals, SIGHUP reload, sd_notify and its watchdog, the MQTT sink.

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
from typing import TYPE_CHECKING

import structlog

from rxfilterd import config as config_mod
from rxfilterd import logs
from rxfilterd.config import Config, ConfigError
from rxfilterd.daemon import Daemon
from rxfilterd.macvtap import HostNetwork
from rxfilterd.notify import Notifier, watchdog_interval
from rxfilterd.ports import Tracer

if TYPE_CHECKING:
    from rxfilterd.publisher import Publisher

log = structlog.get_logger("rxfilterd")

# The daemon's own shutdown (syncs in flight get their grace inside it) may take this long.
DAEMON_SHUTDOWN = 4.0
# The publisher says "offline" within about a second; never hold the exit longer than this.
PUBLISHER_SHUTDOWN = 1.5
# A cheap netlink round trip must answer within this for the watchdog to be petted.
PROBE_TIMEOUT = 2.0


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
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier()
    async with HostNetwork() as network:
        publisher = start_publisher(config)
        daemon = wire(config, network, notifier, publisher, tracer)
        loop.add_signal_handler(signal.SIGHUP, reload, daemon, forced_dry_run)
        log.info(
            "starting", config=str(config.path), uri=config.libvirt.uri, dry_run=config.sync.dry_run
        )
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


def wire(
    config: Config,
    network: HostNetwork,
    notifier: Notifier,
    publisher: Publisher | None,
    tracer: Tracer | None,
) -> Daemon:
    """The daemon, its decisions, NIC states, readiness and status going to their sinks."""
    return Daemon(
        config,
        network,
        decisions=[publisher.decision] if publisher else [],
        states=[publisher.nic_state] if publisher else [],
        # Once every current NIC is published, the publisher may clear stale retained topics.
        on_ready=[publisher.ready, notifier.ready] if publisher else [notifier.ready],
        on_status=[notifier.status],
        tracer=tracer,
    )


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
        ("mqtt", old.mqtt, new.mqtt),
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
        due = period is not None and now - last_pet >= period and daemon.stats.connected
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
