"""NICs as the live domain XML describes them, and whether rxfilterd syncs each."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from rxfilterd.libvirt_handler import LIBVIRT_WRITES, VIRTIO_MODELS, syncs_itself
from rxfilterd.trust import Trust, parse_tristate

Action = Literal["sync", "skip"]


@dataclass(frozen=True)
class Nic:
    """One <interface> of a running domain (live XML, so the actual type is shown)."""

    # The connection the domain was found on ("host", "pod/<name>"): where it lives.
    libvirt: str
    domain: str
    uuid: str
    alias: str
    type: str
    model: str | None
    ifname: str | None
    mac: str | None
    # The MAC the guest uses now, as libvirt >= 11.x records it for trusted NICs
    # (<mac currentAddress=...>); None where libvirt does not say.
    current_mac: str | None
    network: str | None
    portgroup: str | None
    portid: str | None
    # trustGuestRxFilters on the <interface> itself, None when absent.
    trust_attr: bool | None


class DomainXmlError(ValueError):
    """Domain XML that cannot be parsed."""


def parse_domain_nics(xml: str, libvirt: str) -> list[Nic]:
    """The NICs of a running domain's live XML, found on the connection named LIBVIRT."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainXmlError(f"domain XML: {exc}") from None
    name = root.findtext("name") or ""
    uuid = root.findtext("uuid") or ""
    nics = []
    for iface in root.findall("./devices/interface"):
        alias = iface.find("alias")
        if alias is None or not alias.get("name"):
            continue  # not (yet) known to QEMU: nothing can be asked about it
        model = iface.find("model")
        target = iface.find("target")
        mac = iface.find("mac")
        source = iface.find("source")
        nics.append(
            Nic(
                libvirt=libvirt,
                domain=name,
                uuid=uuid,
                alias=alias.get("name", ""),
                type=iface.get("type", ""),
                model=model.get("type") if model is not None else None,
                ifname=target.get("dev") if target is not None else None,
                mac=mac.get("address") if mac is not None else None,
                current_mac=mac.get("currentAddress") if mac is not None else None,
                network=source.get("network") if source is not None else None,
                portgroup=source.get("portgroup") if source is not None else None,
                portid=source.get("portid") if source is not None else None,
                trust_attr=parse_tristate(iface.get("trustGuestRxFilters")),
            )
        )
    return nics


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    # libvirt runs its own rx-filter sync for this NIC (trusted, actual type direct).
    libvirt_syncs: bool


def classify(nic: Nic, trust: Trust, ifname_is_macvtap: bool) -> Verdict:
    """Whether rxfilterd syncs NIC; the first reason that rules it out otherwise."""
    if nic.model not in VIRTIO_MODELS:
        return Verdict("skip", "not virtio", False)
    if nic.type not in ("direct", "ethernet") or not nic.ifname or not ifname_is_macvtap:
        return Verdict("skip", "not a macvtap", False)
    if not trust.value:
        return Verdict("skip", "untrusted", False)
    libvirt_syncs = syncs_itself(nic.type, nic.model, trust.value)
    # libvirt's handler writes these whatever our policy says: say so plainly.
    reason = "trusted"
    if libvirt_syncs:
        reason += f"; libvirt itself writes {', '.join(LIBVIRT_WRITES)}"
    return Verdict("sync", reason, libvirt_syncs)
