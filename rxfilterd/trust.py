"""Trust: a NIC's trustGuestRxFilters, exactly as libvirt holds it for the running NIC.

No I/O: callers fetch the XML, this module reads it.

- A NIC on a libvirt network has a network port (its `portid` in the live domain XML).
  libvirt resolved the NIC's trust when it plugged the port (interface, else portgroup,
  else network, else no) and holds that value, `<rxfilters trustGuest=.../>`, until the
  NIC is plugged again: later edits of the network do not reach a running NIC. So the
  port's value is the NIC's trust.
- Any other NIC's trust is the interface's own attribute (libvirt >= 10.0 can change it
  on a running domain), else no.
- Only where libvirt has no port for a network NIC is trust resolved from the network's
  current XML, and the source says so.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

# Where the value came from: the port (libvirt's own record for a plugged network NIC),
# the interface attribute, or the network's current XML (portgroup or network, only
# where there is no port), else the default.
TrustSource = Literal["port", "interface", "portgroup", "network", "default"]


@dataclass(frozen=True)
class Trust:
    value: bool
    source: TrustSource
    # For a plugged network NIC: what the network's XML resolves to now, when that
    # differs from the port's value (it applies when the NIC is plugged again).
    replug: bool | None = None
    # Why trust could not be read where libvirt keeps it (then the value is no).
    problem: str = ""

    @property
    def word(self) -> str:
        return "yes" if self.value else "no"

    @property
    def note(self) -> str:
        """What an operator should know beyond value and source ("" when nothing)."""
        if self.problem:
            return self.problem
        if self.replug is None:
            return ""
        return (
            f"the network now says {'yes' if self.replug else 'no'}: "
            "applies when the NIC is plugged again"
        )


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


def parse_port(xml: str) -> bool:
    """A network port's trust: `<rxfilters trustGuest='yes'/>`; absent means no."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"network port XML: {exc}") from None
    rxfilters = root.find("rxfilters")
    return rxfilters is not None and rxfilters.get("trustGuest") == "yes"


def resolve_trust(
    interface_trust: bool | None, network: NetworkTrust | None, portgroup: str | None
) -> Trust:
    """libvirt's rule over the current definitions (what a plug would resolve now)."""
    if interface_trust is not None:
        return Trust(interface_trust, "interface")
    if network is not None:
        group = network.portgroup(portgroup)
        if group is not None and group.trust is not None:
            return Trust(group.trust, "portgroup")
        if network.trust is not None:
            return Trust(network.trust, "network")
    return Trust(False, "default")


def port_trust(port: bool, now: Trust) -> Trust:
    """A plugged NIC's trust: its port's value; NOW is what a plug would resolve today."""
    return Trust(port, "port", replug=now.value if now.value != port else None)
