"""The command line: run the daemon, check a config, explain what it would do."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from rxfilterd import config as config_mod
from rxfilterd.config import Config, ConfigError

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
    sub.add_parser("run", parents=[common], help="run the daemon (the default)")
    sub.add_parser("check-config", parents=[common], help="validate the config file and exit")
    explain = sub.add_parser(
        "explain",
        parents=[common],
        help="show, per NIC of each running domain, whether it is synced",
    )
    explain.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    explain.add_argument("domain", nargs="?", help="only this domain")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    path: Path = getattr(args, "config", config_mod.DEFAULT_PATH)
    config = config_mod.load(path)
    if getattr(args, "dry_run", False):
        config = dataclasses.replace(config, sync=dataclasses.replace(config.sync, dry_run=True))
    return config


def main(argv: list[str] | None = None) -> int:
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
        return asyncio.run(_explain(config, args.json, args.domain))
    return _run(config)


def _run(config: Config) -> int:
    from rxfilterd import logs

    logs.configure(config.log.level, config.log.format)
    code = asyncio.run(_serve(config))
    # A libvirt call stuck in a worker thread must not hold the process past SIGTERM.
    sys.stdout.flush()
    sys.stderr.flush()
    if threading.active_count() > 1:
        os._exit(code)
    return code


async def _serve(config: Config) -> int:
    import structlog

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
        daemon = Daemon(config, network)
        daemon.on_ready = notifier.ready
        daemon.on_status = notifier.status

        def reload() -> None:
            path = config.path or config_mod.DEFAULT_PATH
            try:
                new = config_mod.load(path)
            except ConfigError as exc:
                log.error("config reload rejected, old settings stay", error=str(exc))
                return
            if daemon.config.sync.dry_run and not new.sync.dry_run:
                new = dataclasses.replace(new, sync=dataclasses.replace(new.sync, dry_run=True))
            daemon.reload(new)
            log.info("config reloaded", path=str(path))

        loop.add_signal_handler(signal.SIGHUP, reload)
        log.info(
            "starting", config=str(config.path), uri=config.libvirt.uri, dry_run=config.sync.dry_run
        )
        task = asyncio.create_task(daemon.run(stop))
        watchdog = asyncio.create_task(_watchdog(notifier, daemon, stop))
        await stop.wait()
        notifier.stopping()
        log.info("stopping")
        try:
            await asyncio.wait_for(task, timeout=4)
        except TimeoutError:
            log.warning("shutdown timed out; in-flight work abandoned")
        watchdog.cancel()
    return EXIT_OK


async def _watchdog(notifier: Any, daemon: Any, stop: asyncio.Event) -> None:
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while not stop.is_set():
        # Only a healthy daemon pets the watchdog: connected to libvirt, netlink open.
        if daemon.stats.connected:
            notifier.watchdog()
        notifier.status(daemon.status())
        await asyncio.sleep(interval)


async def _explain(config: Config, as_json: bool, only: str | None) -> int:
    from rxfilterd.hypervisor import Hypervisor, HypervisorError
    from rxfilterd.inventory import survey
    from rxfilterd.macvtap import HostNetwork

    hypervisor = Hypervisor(config.libvirt.uri, lambda _event: None, subscribe=False)
    try:
        await hypervisor.connect()
        async with HostNetwork() as network:
            reports = await survey(hypervisor, network)
    except HypervisorError as exc:
        print(f"rxfilterd: cannot query {config.libvirt.uri}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await hypervisor.close()
        hypervisor.shutdown()
    rows = [r.row() for r in reports if only is None or r.nic.domain == only]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return EXIT_OK


def format_table(rows: list[dict[str, str]]) -> str:
    columns = [
        "domain",
        "alias",
        "ifname",
        "model",
        "type",
        "trust",
        "trust_source",
        "action",
        "reason",
    ]
    if not rows:
        return "no NICs on running domains"
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for row in rows:
        lines.append("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
