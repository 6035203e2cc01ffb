"""The inventory: every NIC of the running domains, with its trust and verdict.

Shared by the daemon (which syncs the NICs marked "sync") and `rxfilterd explain`
(which prints them), so both always agree on why a NIC is or is not synced.
"""

from __future__ import annotations

from dataclasses import dataclass

from rxfilterd.events import RunningDomain
from rxfilterd.host_state import MacvtapError
from rxfilterd.libvirt_handler import VIRTIO_MODELS
from rxfilterd.nic import DomainXmlError, Nic, Verdict, classify, parse_domain_nics
from rxfilterd.plan import handling
from rxfilterd.policy import SyncPolicy
from rxfilterd.ports import HostNetworkPort, HypervisorPort, TrustLookups
from rxfilterd.records import NicRow
from rxfilterd.trust import (
    NetworkTrust,
    Trust,
    parse_network,
    parse_port,
    port_trust,
    resolve_trust,
)


@dataclass(frozen=True)
class NicReport:
    nic: Nic
    trust: Trust
    verdict: Verdict

    def row(self) -> NicRow:
        """The NIC as `explain` lists it."""
        return NicRow(
            libvirt=self.nic.libvirt,
            domain=self.nic.domain,
            alias=self.nic.alias,
            ifname=self.nic.ifname or "",
            current_mac=self.nic.current_mac or "",
            model=self.nic.model or "",
            type=self.nic.type,
            trust=self.trust.word,
            trust_source=self.trust.source,
            action=self.verdict.action,
            reason="; ".join(filter(None, (self.verdict.reason, self.trust.note))),
        )


class TrustResolver:
    """Resolves NICs' trust as libvirt holds it (rxfilterd.trust says how).

    Network XML is read once per resolver (one survey pass). A port's trust is fixed
    from plug to unplug, so port values are kept in PORTS, which the caller may keep
    for as long as the NICs run; its keys are port UUIDs, unique per plug.
    """

    def __init__(
        self,
        hypervisor: TrustLookups,
        ports: dict[str, bool] | None = None,
        *,
        replug: bool = True,
    ) -> None:
        self._hypervisor = hypervisor
        self._networks: dict[str, NetworkTrust | None] = {}
        self._ports = {} if ports is None else ports
        # Also say what a plug would resolve today (costs the network's XML).
        self._replug = replug

    async def network(self, name: str) -> NetworkTrust | None:
        if name not in self._networks:
            xml = await self._hypervisor.network_xml(name)
            try:
                self._networks[name] = parse_network(xml) if xml else None
            except ValueError:
                self._networks[name] = None
        return self._networks[name]

    async def trust(self, nic: Nic) -> Trust:
        if not nic.network or not nic.portid:
            # No port: not a network NIC, or a libvirt without ports (< 5.5).
            net = await self.network(nic.network) if nic.network else None
            return resolve_trust(nic.trust_attr, net, nic.portgroup)
        port = self._ports.get(nic.portid)
        if port is None:
            xml = await self._hypervisor.network_port_xml(nic.network, nic.portid)
            if xml is None:
                # libvirt names a port it cannot show: never more trust than "no".
                return Trust(False, "port", problem="its network port cannot be found")
            try:
                port = parse_port(xml)
            except ValueError:
                return Trust(False, "port", problem="its network port XML is unreadable")
            self._ports[nic.portid] = port
        if not self._replug:
            return Trust(port, "port")
        net = await self.network(nic.network)
        return port_trust(port, resolve_trust(nic.trust_attr, net, nic.portgroup))


async def survey_nic(nic: Nic, network: HostNetworkPort, trusts: TrustResolver) -> NicReport:
    trust = await trusts.trust(nic)
    # Only a candidate's device is looked at, and only by the name its domain gave.
    candidate = nic.model in VIRTIO_MODELS and nic.type in ("direct", "ethernet") and nic.ifname
    is_macvtap = bool(candidate) and await network.is_macvtap(nic.ifname or "")
    return NicReport(nic, trust, classify(nic, trust, is_macvtap))


async def survey_domain(
    libvirt: str, domain: RunningDomain, network: HostNetworkPort, trusts: TrustResolver
) -> list[NicReport]:
    """DOMAIN's NICs, found on the connection named LIBVIRT, each with trust and verdict."""
    try:
        nics = parse_domain_nics(domain.xml, libvirt)
    except DomainXmlError:
        return []
    return [await survey_nic(nic, network, trusts) for nic in nics]


async def survey(
    libvirt: str, hypervisor: HypervisorPort, network: HostNetworkPort
) -> list[NicReport]:
    trusts = TrustResolver(hypervisor)
    reports = []
    for domain in sorted(await hypervisor.running_domains(), key=lambda d: d.name):
        reports += await survey_domain(libvirt, domain, network, trusts)
    return reports


async def handling_notes(
    report: NicReport, network: HostNetworkPort, policy: SyncPolicy
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
