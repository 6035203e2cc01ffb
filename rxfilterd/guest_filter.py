"""The guest filter: QEMU's `query-rx-filter` answer for one NIC, validated.

Everything in the answer is under the guest's control (and QEMU's, which we do not
trust either), so every field is type-checked and bounded before anything uses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

from rxfilterd.mac import MacError, is_multicast, is_zero, parse_mac

RxMode = Literal["normal", "none", "all"]
_RX_MODES: frozenset[str] = frozenset({"normal", "none", "all"})

# QEMU's virtio-net MAC filter holds 64 entries (unicast and multicast together);
# past that it drops the list and sets the overflow flag. VIDs are 12 bits.
MAC_TABLE_ENTRIES = 64
VLAN_ID_MAX = 4095
# A reply is a few KiB at most (4096 VIDs is the worst legitimate case).
MAX_REPLY_BYTES = 256 * 1024

_T = TypeVar("_T")
# A JSON object as QEMU (and so the guest) sent it: nothing about it checked yet.
Raw = Mapping[str, object]


class GuestFilterError(ValueError):
    """A query-rx-filter answer that cannot be trusted or understood."""


@dataclass(frozen=True)
class GuestFilter:
    """What the guest asked its NIC to receive."""

    name: str
    main_mac: str
    promiscuous: bool
    multicast: RxMode
    unicast: RxMode
    vlan: RxMode
    # QEMU reports broadcast-allowed inverted; kept as reported, never acted on.
    broadcast_allowed: bool
    multicast_overflow: bool
    unicast_overflow: bool
    multicast_table: frozenset[str]
    unicast_table: frozenset[str]
    vlan_table: frozenset[int]

    def summary(self) -> dict[str, str | bool | list[str] | list[int]]:
        """A JSON-friendly view, sorted so equal filters print equally."""
        return {
            "main_mac": self.main_mac,
            "promiscuous": self.promiscuous,
            "multicast": self.multicast,
            "unicast": self.unicast,
            "vlan": self.vlan,
            "multicast_overflow": self.multicast_overflow,
            "unicast_overflow": self.unicast_overflow,
            "multicast_table": sorted(self.multicast_table),
            "unicast_table": sorted(self.unicast_table),
            "vlan_table": sorted(self.vlan_table),
        }


def parse_reply(text: str | bytes, alias: str) -> GuestFilter:
    """Parse a raw QMP reply to `query-rx-filter name=ALIAS`."""
    if len(text) > MAX_REPLY_BYTES:
        raise GuestFilterError(f"reply is {len(text)} bytes, over {MAX_REPLY_BYTES}")
    try:
        reply = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GuestFilterError(f"reply is not JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise GuestFilterError("reply is not a JSON object")
    if "error" in reply:
        error = reply["error"]
        desc = error.get("desc") if isinstance(error, dict) else error
        raise GuestFilterError(f"QEMU error: {str(desc)[:200]}")
    entries = reply.get("return")
    if not isinstance(entries, list):
        raise GuestFilterError("reply has no 'return' list")
    matching = [e for e in entries if isinstance(e, dict) and e.get("name") == alias]
    if len(matching) != 1:
        raise GuestFilterError(f"reply holds {len(matching)} entries for {alias!r}, expected 1")
    return parse_entry(matching[0])


def parse_entry(entry: object) -> GuestFilter:
    """Validate one element of query-rx-filter's list."""
    if not isinstance(entry, dict):
        raise GuestFilterError("entry is not a JSON object")
    raw = cast(Raw, entry)
    name = _field(raw, "name", str)
    if not 0 < len(name) <= 64:
        raise GuestFilterError("name: length must be 1..64")
    main_mac = _mac(raw, "main-mac")
    if is_multicast(main_mac) or is_zero(main_mac):
        raise GuestFilterError(f"main-mac: {main_mac} is not a unicast address")
    multicast_table = _mac_table(raw, "multicast-table")
    unicast_table = _mac_table(raw, "unicast-table")
    if len(multicast_table) + len(unicast_table) > MAC_TABLE_ENTRIES:
        raise GuestFilterError(
            f"unicast-table and multicast-table hold "
            f"{len(multicast_table) + len(unicast_table)} entries, over {MAC_TABLE_ENTRIES}"
        )
    for mac in multicast_table:
        if not is_multicast(mac):
            raise GuestFilterError(f"multicast-table: {mac} is not a multicast address")
    for mac in unicast_table:
        if is_multicast(mac):
            raise GuestFilterError(f"unicast-table: {mac} is not a unicast address")
    return GuestFilter(
        name=name,
        main_mac=main_mac,
        promiscuous=_field(raw, "promiscuous", bool),
        multicast=_mode(raw, "multicast"),
        unicast=_mode(raw, "unicast"),
        vlan=_mode(raw, "vlan"),
        broadcast_allowed=_field(raw, "broadcast-allowed", bool),
        multicast_overflow=_field(raw, "multicast-overflow", bool),
        unicast_overflow=_field(raw, "unicast-overflow", bool),
        multicast_table=frozenset(multicast_table),
        unicast_table=frozenset(unicast_table),
        vlan_table=_vlan_table(raw),
    )


def _field(raw: Raw, key: str, kind: type[_T]) -> _T:
    if key not in raw:
        raise GuestFilterError(f"{key}: missing")
    value = raw[key]
    # bool is a subclass of int: reject True where a number is expected and vice versa.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GuestFilterError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _mode(raw: Raw, key: str) -> RxMode:
    value = _field(raw, key, str)
    if value not in _RX_MODES:
        raise GuestFilterError(f"{key}: {value!r:.20} is not one of normal, none, all")
    return cast(RxMode, value)


def _mac(raw: Raw, key: str) -> str:
    try:
        return parse_mac(_field(raw, key, str))
    except MacError as exc:
        raise GuestFilterError(f"{key}: {exc}") from None


def _list(raw: Raw, key: str, limit: int) -> list[object]:
    value = _field(raw, key, list)
    if len(value) > limit:
        raise GuestFilterError(f"{key}: {len(value)} entries, over {limit}")
    return value


def _mac_table(raw: Raw, key: str) -> list[str]:
    macs = []
    for index, item in enumerate(_list(raw, key, MAC_TABLE_ENTRIES)):
        try:
            macs.append(parse_mac(item))
        except MacError as exc:
            raise GuestFilterError(f"{key}[{index}]: {exc}") from None
    return macs


def _vlan_table(raw: Raw) -> frozenset[int]:
    vids = set()
    for index, item in enumerate(_list(raw, "vlan-table", VLAN_ID_MAX + 1)):
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item <= VLAN_ID_MAX:
            raise GuestFilterError(f"vlan-table[{index}]: {item!r:.20} is not a VLAN id 0..4095")
        vids.add(item)
    return frozenset(vids)
