"""The command line: run the daemon, check a config, explain what it would do."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rxfilterd import config as config_mod
from rxfilterd.config import Config, ConfigError

if TYPE_CHECKING:  # the daemon's modules load only when it runs
    from rxfilterd.ports import Tracer

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad command line or config


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"config file (default {config_mod.DEFAULT_PATH})",
    )
    parser = argparse.ArgumentParser(
        prog="rxfilterd",
        description="Propagate trusted guests' NIC receive filters to their host macvtaps.",
        parents=[common],
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="decide and log everything, change nothing"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", parents=[common], help="run the daemon (the default)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        default=argparse.SUPPRESS,
        help="decide and log everything, change nothing",
    )
    sub.add_parser("check-config", parents=[common], help="validate the config file and exit")
    explain = sub.add_parser(
        "explain",
        parents=[common],
        help="show, per NIC of each running domain, whether it is synced",
    )
    explain.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    explain.add_argument(
        "--notes",
        action="store_true",
        help="with --json: add each synced NIC's VLAN and unicast handling as a 'notes' list"
        " (the table always shows it)",
    )
    explain.add_argument("domain", nargs="?", help="only this domain")
    fleet = sub.add_parser(
        "fleet",
        parents=[common],
        help="show every host's NICs from the MQTT broker's retained state",
    )
    fleet.add_argument("--follow", action="store_true", help="then print live events until Ctrl-C")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    path: Path = getattr(args, "config", config_mod.DEFAULT_PATH)
    config = config_mod.load(path)
    if getattr(args, "dry_run", False):
        config = dataclasses.replace(config, sync=dataclasses.replace(config.sync, dry_run=True))
    return config


def main(argv: list[str] | None = None, *, tracer: Tracer | None = None) -> int:
    """The command line; TRACER (benchmarks) sees the running daemon's hot path."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"rxfilterd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(f"{config.path}: OK")
        return EXIT_OK
    if args.command == "explain":
        return asyncio.run(_explain(config, args.json, args.domain, notes=args.notes))
    if args.command == "fleet":
        try:
            return asyncio.run(_fleet(config, args.follow))
        except KeyboardInterrupt:  # Ctrl-C before the handler is in place
            return EXIT_OK
    return _run(config, forced_dry_run=getattr(args, "dry_run", False), tracer=tracer)


def _run(config: Config, *, forced_dry_run: bool = False, tracer: Tracer | None = None) -> int:
    from rxfilterd import logs

    logs.configure(config.log.level, config.log.format)
    code = asyncio.run(_serve(config, forced_dry_run, tracer))
    # A libvirt call stuck in a worker thread must not hold the process past SIGTERM.
    sys.stdout.flush()
    sys.stderr.flush()
    if threading.active_count() > 1:
        os._exit(code)
    return code


async def _serve(config: Config, forced_dry_run: bool = False, tracer: Tracer | None = None) -> int:
    import structlog

    from rxfilterd import logs
    from rxfilterd.daemon import Daemon
    from rxfilterd.macvtap import HostNetwork
    from rxfilterd.notify import Notifier

    log = structlog.get_logger("rxfilterd")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    notifier = Notifier()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with HostNetwork() as network:
        publisher = None
        if config.mqtt.enabled:
            from rxfilterd.publisher import Publisher

            publisher = Publisher(config.mqtt)
        daemon = Daemon(
            config,
            network,
            decisions=[publisher.decision] if publisher else [],
            states=[publisher.nic_state] if publisher else [],
            on_ready=[publisher.ready, notifier.ready] if publisher else [notifier.ready],
            on_status=[notifier.status],
            tracer=tracer,
        )
        publisher_stop = asyncio.Event()
        publishing = asyncio.create_task(publisher.run(publisher_stop)) if publisher else None

        def reload() -> None:
            path = config.path or config_mod.DEFAULT_PATH
            try:
                new = config_mod.load(path)
            except ConfigError as exc:
                log.error("config reload rejected, old settings stay", error=str(exc))
                return
            if forced_dry_run:  # --dry-run on the command line outlives any reload
                new = dataclasses.replace(new, sync=dataclasses.replace(new.sync, dry_run=True))
            old = daemon.config
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

        loop.add_signal_handler(signal.SIGHUP, reload)
        log.info(
            "starting", config=str(config.path), uri=config.libvirt.uri, dry_run=config.sync.dry_run
        )
        task = asyncio.create_task(daemon.run(stop))
        watchdog = asyncio.create_task(_supervise(notifier, daemon, network, stop))
        await stop.wait()
        notifier.stopping()
        log.info("stopping")
        if publisher is not None:
            publisher.freeze()  # NICs dropped at shutdown still exist: keep their state
        try:
            await asyncio.wait_for(task, timeout=4)
        except TimeoutError:
            log.warning("shutdown timed out; in-flight work abandoned")
        watchdog.cancel()
        if publishing is not None:
            publisher_stop.set()
            try:
                # It publishes "offline" within about a second; never hold the exit longer.
                await asyncio.wait_for(publishing, timeout=1.5)
            except TimeoutError:
                log.warning("mqtt: shutdown timed out; offline status not confirmed")
    return EXIT_OK


async def _fleet(config: Config, follow: bool) -> int:
    from rxfilterd import fleet
    from rxfilterd.publisher import BrokerError, FleetMessage, read_fleet

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    live = fleet.LiveFormatter()

    def snapshot(messages: list[FleetMessage]) -> None:
        print(fleet.format_table(fleet.rows(messages)), flush=True)

    def event(message: FleetMessage) -> None:
        line = live.line(message)
        if line is not None:
            print(line, flush=True)

    try:
        await read_fleet(config.mqtt, follow=follow, on_snapshot=snapshot, on_live=event, stop=stop)
    except BrokerError as exc:
        print(f"rxfilterd: fleet: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _supervise(notifier: Any, daemon: Any, network: Any, stop: asyncio.Event) -> None:
    """STATUS= when the summary changes; WATCHDOG=1 only while libvirt and netlink work."""
    from rxfilterd.notify import watchdog_interval

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
        if period is not None and now - last_pet >= period and daemon.stats.connected:
            try:
                # A cheap netlink round trip proves the socket still answers.
                await asyncio.wait_for(network.is_macvtap("lo"), timeout=2)
            except Exception:  # any failure means unhealthy: systemd restarts us
                pass
            else:
                notifier.watchdog()
                last_pet = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def _explain(config: Config, as_json: bool, only: str | None, *, notes: bool = False) -> int:
    from rxfilterd.hypervisor import Hypervisor, HypervisorError
    from rxfilterd.inventory import handling_notes, survey
    from rxfilterd.macvtap import HostNetwork
    from rxfilterd.policy import ALL_FIELDS

    hypervisor = Hypervisor(config.libvirt.uri, lambda _event: None, subscribe=False)
    try:
        await hypervisor.connect()
        async with HostNetwork() as network:
            reports = [
                r for r in await survey(hypervisor, network) if only is None or r.nic.domain == only
            ]
            handling = []
            for r in reports:
                policy, source = config.policy_for(r.nic.domain, r.nic.network, r.nic.portgroup)
                lines = await handling_notes(r, network, policy)
                if r.verdict.action == "sync" and (source != "sync" or policy.fields != ALL_FIELDS):
                    # Least privilege in force: say which policy and what it lets through.
                    lines = (f"policy {source}: {', '.join(sorted(policy.fields))}", *lines)
                handling.append(lines)
    except HypervisorError as exc:
        print(f"rxfilterd: cannot query {config.libvirt.uri}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await hypervisor.close()
        hypervisor.shutdown()
    rows = [r.row() for r in reports]
    if as_json:
        # The row keys are fixed; the handling notes only go in on request.
        out: list[dict[str, Any]] = [
            {**row, "notes": list(n)} if notes else row
            for row, n in zip(rows, handling, strict=True)
        ]
        print(json.dumps(out, indent=2))
    else:
        print(format_table(rows, handling))
    return EXIT_OK


def format_table(rows: list[dict[str, str]], notes: list[tuple[str, ...]] | None = None) -> str:
    """The explain table; NOTES (one tuple per row) becomes a last column."""
    from rxfilterd.inventory import EXPLAIN_KEYS

    columns = list(EXPLAIN_KEYS)
    if not rows:
        return "no NICs on running domains"
    if notes is not None:
        columns.append("notes")
        rows = [{**row, "notes": "; ".join(n)} for row, n in zip(rows, notes, strict=True)]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for row in rows:
        lines.append("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
