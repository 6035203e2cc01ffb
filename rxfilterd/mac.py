"""Ethernet MAC addresses as normalised strings ("52:54:00:ab:cd:ef")."""

from __future__ import annotations

import re

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")


class MacError(ValueError):
    """A value that is not an Ethernet MAC address."""


def parse_mac(value: object) -> str:
    """Return VALUE as a lower-case colon-separated MAC, or raise MacError."""
    if not isinstance(value, str) or not _MAC_RE.match(value):
        raise MacError(f"{value!r:.40} is not a MAC address")
    return value.lower()


def parse_mac_prefix(value: str) -> str:
    """A full MAC or an OUI prefix of one to five octets ("52:54:00"), lower-cased."""
    octets = value.split(":")
    padded = ":".join(octets + ["00"] * (6 - len(octets)))
    if not _MAC_RE.match(padded):
        raise MacError(f"{value!r} is not a MAC address or prefix")
    return value.lower()


def is_multicast(mac: str) -> bool:
    """The group bit (least significant bit of the first octet)."""
    return int(mac[:2], 16) & 1 == 1


def is_zero(mac: str) -> bool:
    return mac == "00:00:00:00:00:00"


def to_bytes(mac: str) -> bytes:
    """The six octets of a MAC from parse_mac."""
    return bytes.fromhex(mac.replace(":", ""))


def from_bytes(raw: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in raw)
