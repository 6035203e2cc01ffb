"""The inventory: every NIC of the running domains, with its trust and verdict.

Shared by the daemon (which syncs the NICs marked "sync") and `rxfilterd explain`
(which prints them), so both always agree on why a NIC is or is not synced.
"""

from __future__ import annotations

from dataclasses import dataclass

from rxfilterd.hypervisor import Hypervisor, RunningDomain
from rxfilterd.macvtap import HostNetwork, MacvtapError
from rxfilterd.nic import DomainXmlError, Nic, Verdict, classify, parse_domain_nics
from rxfilterd.plan import handling
from rxfilterd.policy import SyncPolicy
from rxfilterd.trust import NetworkTrust, Trust, parse_network, resolve_trust

# The `explain` columns, in order: exactly the keys of NicReport.row().
EXPLAIN_KEYS = (
    "domain",
    "alias",
    "ifname",
    "model",
    "type",
    "trust",
    "trust_source",
    "action",
    "reason",
)


@dataclass(frozen=True)
class NicReport:
    nic: Nic
    trust: Trust
    verdict: Verdict

    def row(self) -> dict[str, str]:
        """The `explain` record: exactly these keys."""
        return {
            "domain": self.nic.domain,
            "alias": self.nic.alias,
            "ifname": self.nic.ifname or "",
            "model": self.nic.model or "",
            "type": self.nic.type,
            "trust": self.trust.word,
            "trust_source": self.trust.source,
            "action": self.verdict.action,
            "reason": self.verdict.reason,
        }


class NetworkCache:
    """Network definitions for one inventory pass (networks change rarely)."""

    def __init__(self, hypervisor: Hypervisor) -> None:
        self._hypervisor = hypervisor
        self._networks: dict[str, NetworkTrust | None] = {}

    async def get(self, name: str) -> NetworkTrust | None:
        if name not in self._networks:
            xml = await self._hypervisor.network_xml(name)
            try:
                self._networks[name] = parse_network(xml) if xml else None
            except ValueError:
                self._networks[name] = None
        return self._networks[name]


async def survey_domain(
    domain: RunningDomain, network: HostNetwork, networks: NetworkCache
) -> list[NicReport]:
    try:
        nics = parse_domain_nics(domain.xml)
    except DomainXmlError:
        return []
    reports = []
    for nic in nics:
        net = await networks.get(nic.network) if nic.network else None
        trust = resolve_trust(nic.trust_attr, net, nic.portgroup)
        # Only a candidate's device is looked at, and only by the name its domain gave.
        candidate = nic.model == "virtio" and nic.type in ("direct", "ethernet") and nic.ifname
        is_macvtap = bool(candidate) and await network.is_macvtap(nic.ifname or "")
        reports.append(NicReport(nic, trust, classify(nic, trust, is_macvtap)))
    return reports


async def survey(hypervisor: Hypervisor, network: HostNetwork) -> list[NicReport]:
    networks = NetworkCache(hypervisor)
    reports = []
    for domain in sorted(await hypervisor.running_domains(), key=lambda d: d.name):
        reports += await survey_domain(domain, network, networks)
    return reports


async def handling_notes(
    report: NicReport, network: HostNetwork, policy: SyncPolicy
) -> tuple[str, ...]:
    """How a synced NIC's VLAN ids and unicast table land on its macvtap (for `explain`).

    Read from the host and the policy only: explain never queries a guest (a query
    taints the domain and re-arms an untrusted NIC's events).
    """
    if report.verdict.action != "sync" or not report.nic.ifname:
        return ()
    try:
        host = await network.read(report.nic.ifname)
    except MacvtapError as exc:
        return (f"cannot read the macvtap: {exc}",)
    if host is None:
        return ("the macvtap is gone",)
    return handling(host, policy, libvirt_syncs=report.verdict.libvirt_syncs)
