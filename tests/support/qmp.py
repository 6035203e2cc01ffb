"""query-rx-filter answers for tests, shaped as QEMU sends them."""

from __future__ import annotations

import json
from typing import Any


def rx_filter_entry(**overrides: Any) -> dict[str, Any]:
    """One NIC's entry: a quiet guest (no tables), with OVERRIDES by QMP key."""
    entry: dict[str, Any] = {
        "name": "net0",
        "promiscuous": False,
        "multicast": "normal",
        "unicast": "normal",
        "vlan": "normal",
        "broadcast-allowed": False,
        "multicast-overflow": False,
        "unicast-overflow": False,
        "main-mac": "52:54:00:10:00:01",
        "vlan-table": [],
        "unicast-table": [],
        "multicast-table": [],
    }
    entry.update(overrides)
    return entry


def rx_filter_reply(*entries: dict[str, Any]) -> str:
    """The QMP reply text libvirt hands back for those entries."""
    return json.dumps({"return": list(entries), "id": "libvirt-42"})
