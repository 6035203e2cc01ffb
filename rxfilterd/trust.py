"""Trust: resolve a NIC's trustGuestRxFilters the way libvirt does.

The interface's own attribute wins; else its portgroup (the one it names, else the
network's default portgroup); else the network; else no.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

TrustSource = Literal["interface", "portgroup", "network", "default"]


@dataclass(frozen=True)
class Trust:
    value: bool
    source: TrustSource

    @property
    def word(self) -> str:
        return "yes" if self.value else "no"


@dataclass(frozen=True)
class Portgroup:
    name: str
    default: bool
    trust: bool | None


@dataclass(frozen=True)
class NetworkTrust:
    """The trust-related part of a libvirt network definition."""

    name: str
    trust: bool | None
    portgroups: tuple[Portgroup, ...]

    def portgroup(self, name: str | None) -> Portgroup | None:
        for group in self.portgroups:
            if (group.name == name) if name else group.default:
                return group
        return None


def parse_tristate(value: str | None) -> bool | None:
    if value == "yes":
        return True
    if value == "no":
        return False
    return None


def parse_network(xml: str) -> NetworkTrust:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"network XML: {exc}") from None
    groups = tuple(
        Portgroup(
            name=group.get("name", ""),
            default=group.get("default") == "yes",
            trust=parse_tristate(group.get("trustGuestRxFilters")),
        )
        for group in root.findall("portgroup")
    )
    return NetworkTrust(
        name=root.findtext("name") or "",
        trust=parse_tristate(root.get("trustGuestRxFilters")),
        portgroups=groups,
    )


def resolve_trust(
    interface_trust: bool | None, network: NetworkTrust | None, portgroup: str | None
) -> Trust:
    if interface_trust is not None:
        return Trust(interface_trust, "interface")
    if network is not None:
        group = network.portgroup(portgroup)
        if group is not None and group.trust is not None:
            return Trust(group.trust, "portgroup")
        if network.trust is not None:
            return Trust(network.trust, "network")
    return Trust(False, "default")
