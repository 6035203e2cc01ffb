"""`rxfilterd explain`: why each NIC of each running domain is or is not synced.

It reads domain XML and links only; it never queries a guest (a query taints the
domain and re-arms an untrusted NIC's events).
"""

from __future__ import annotations

import asyncio
import json
import sys

from rxfilterd.config import Config
from rxfilterd.connection import Endpoint
from rxfilterd.hypervisor import Hypervisor, HypervisorError
from rxfilterd.inventory import NicReport, handling_notes, survey
from rxfilterd.macvtap import HostNetwork, pinned_network
from rxfilterd.pods import PodScanner, distinct
from rxfilterd.policy import ALL_FIELDS
from rxfilterd.records import EXPLAIN_COLUMNS, NicRow, format_table

# One row's notes: how its VLAN ids and unicast table are handled, and the policy in force.
Notes = tuple[str, ...]


def run(config: Config, *, as_json: bool, only: str | None, notes: bool = False) -> bool:
    """Print the table (or JSON); False after printing why libvirt could not be asked."""
    try:
        reports, handling = asyncio.run(_survey(config, only))
    except HypervisorError as exc:
        print(f"rxfilterd: cannot query {config.libvirt.uri}: {exc}", file=sys.stderr)
        return False
    rows = [r.row() for r in reports]
    if as_json:
        # The row keys are fixed; the handling notes only go in on request.
        out: list[dict[str, str | list[str]]] = [
            {**row.fields(), "notes": list(n)} if notes else {**row.fields()}
            for row, n in zip(rows, handling, strict=True)
        ]
        print(json.dumps(out, indent=2))
    else:
        print(table(rows, handling))
    return True


async def _survey(config: Config, only: str | None) -> tuple[list[NicReport], list[Notes]]:
    """Every connection's NICs: the host's libvirt's, then each pod's ([pods] enabled)."""
    reports: list[NicReport] = []
    handling: list[Notes] = []
    endpoints = [Endpoint("host", config.libvirt.uri)] if config.libvirt.uri else []
    if config.pods.enabled:
        scanner = PodScanner(config.pods)
        endpoints += distinct([e for e in scanner.scan() if scanner.wanted(e)])
    for endpoint in endpoints:
        try:
            found = await _survey_one(config, endpoint, only)
        except HypervisorError as exc:
            if endpoint.name == "host":
                raise
            # A pod may end while we look: say so, and go on with the others.
            print(f"rxfilterd: cannot query {endpoint.name}: {exc}", file=sys.stderr)
            continue
        reports += [r for r, _ in found]
        handling += [n for _, n in found]
    return reports, handling


async def _survey_one(
    config: Config, endpoint: Endpoint, only: str | None
) -> list[tuple[NicReport, Notes]]:
    hypervisor = Hypervisor(endpoint.uri, lambda _event: None, subscribe=False)
    try:
        await hypervisor.connect()
        network_cm = HostNetwork() if endpoint.netns is None else pinned_network(endpoint.netns)
        async with network_cm as network:
            reports = await survey(endpoint.name, hypervisor, network)
            return [
                (r, await _notes(config, r, network))
                for r in reports
                if only is None or r.nic.domain == only
            ]
    finally:
        await hypervisor.close()
        hypervisor.shutdown()


async def _notes(config: Config, report: NicReport, network: HostNetwork) -> Notes:
    nic = report.nic
    policy, source = config.policy_for(nic.domain, nic.network, nic.portgroup)
    lines = await handling_notes(report, network, policy)
    if report.verdict.action == "sync" and (source != "sync" or policy.fields != ALL_FIELDS):
        # Least privilege in force: say which policy and what it lets through.
        lines = (f"policy {source}: {', '.join(sorted(policy.fields))}", *lines)
    return lines


def table(rows: list[NicRow], notes: list[Notes] | None = None) -> str:
    """The explain table; NOTES (one tuple per row) becomes a last column."""
    if not rows:
        return "no NICs on running domains"
    cells = [row.fields() for row in rows]
    if notes is None:
        return format_table(EXPLAIN_COLUMNS, cells)
    notes_cells = [{**c, "notes": "; ".join(n)} for c, n in zip(cells, notes, strict=True)]
    return format_table((*EXPLAIN_COLUMNS, "notes"), notes_cells)
