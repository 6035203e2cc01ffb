"""`rxfilterd explain`: why each NIC of each running domain is or is not synced.

It reads domain XML and links only; it never queries a guest (a query taints the
domain and re-arms an untrusted NIC's events).
"""

from __future__ import annotations

import asyncio
import json
import sys

from rxfilterd.config import Config
from rxfilterd.hypervisor import Hypervisor, HypervisorError
from rxfilterd.inventory import EXPLAIN_KEYS, NicReport, handling_notes, survey
from rxfilterd.macvtap import HostNetwork
from rxfilterd.policy import ALL_FIELDS

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
            {**row, "notes": list(n)} if notes else {**row}
            for row, n in zip(rows, handling, strict=True)
        ]
        print(json.dumps(out, indent=2))
    else:
        print(format_table(rows, handling))
    return True


async def _survey(config: Config, only: str | None) -> tuple[list[NicReport], list[Notes]]:
    hypervisor = Hypervisor(config.libvirt.uri, lambda _event: None, subscribe=False)
    try:
        await hypervisor.connect()
        async with HostNetwork() as network:
            reports = [
                r for r in await survey(hypervisor, network) if only is None or r.nic.domain == only
            ]
            handling = [await _notes(config, r, network) for r in reports]
    finally:
        await hypervisor.close()
        hypervisor.shutdown()
    return reports, handling


async def _notes(config: Config, report: NicReport, network: HostNetwork) -> Notes:
    nic = report.nic
    policy, source = config.policy_for(nic.domain, nic.network, nic.portgroup)
    lines = await handling_notes(report, network, policy)
    if report.verdict.action == "sync" and (source != "sync" or policy.fields != ALL_FIELDS):
        # Least privilege in force: say which policy and what it lets through.
        lines = (f"policy {source}: {', '.join(sorted(policy.fields))}", *lines)
    return lines


def format_table(rows: list[dict[str, str]], notes: list[Notes] | None = None) -> str:
    """The explain table; NOTES (one tuple per row) becomes a last column."""
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
