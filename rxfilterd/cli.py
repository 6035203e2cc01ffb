"""The command line: parse it, then run the daemon, check a config, explain, status or fleet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import rxfilterd
from rxfilterd import config as config_mod
from rxfilterd.config import Config, ConfigError

if TYPE_CHECKING:
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
    # Not argparse's "version" action: it wants the string up front, and reading it costs
    # half of --help's start-up (rxfilterd.__version__ says why).
    parser.add_argument("--version", action="store_true", help="print the version and exit")
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
    status = sub.add_parser(
        "status",
        parents=[common],
        help="ask the running daemon for its live state (NICs, last syncs, counters, errors)",
    )
    status.add_argument("--json", action="store_true", help="the daemon's JSON answer as is")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    path: Path = getattr(args, "config", config_mod.DEFAULT_PATH)
    if args.command == "status" and not hasattr(args, "config") and not path.exists():
        return Config()  # only the socket's path is needed: the default one
    config = config_mod.load(path)
    return config.with_dry_run() if getattr(args, "dry_run", False) else config


def main(argv: list[str] | None = None, *, tracer: Tracer | None = None) -> int:
    """The command line; TRACER (benchmarks) sees the running daemon's hot path."""
    args = _parser().parse_args(argv)
    if args.version:
        print(f"rxfilterd {rxfilterd.__version__}")
        return EXIT_OK
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"rxfilterd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Each command's module is imported only when it runs: importing the daemon's
    # (libvirt, pyroute2) up front would triple `--help` and `check-config` start-up.
    if args.command == "check-config":
        print(f"{config.path}: OK")
        return EXIT_OK
    if args.command == "explain":
        from rxfilterd import explain

        ok = explain.run(config, as_json=args.json, only=args.domain, notes=args.notes)
        return EXIT_OK if ok else EXIT_FAILURE
    if args.command == "status":
        from rxfilterd import status

        ok = status.run(Path(config.status.socket), as_json=args.json)
        return EXIT_OK if ok else EXIT_FAILURE
    if args.command == "fleet":
        from rxfilterd import fleet_reader

        return EXIT_OK if fleet_reader.run(config.mqtt, follow=args.follow) else EXIT_FAILURE
    from rxfilterd import app

    app.run(config, forced_dry_run=getattr(args, "dry_run", False), tracer=tracer)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
