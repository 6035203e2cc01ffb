"""`rxfilterd fleet`: the table of every host's NICs and the live event lines. No I/O.

fleet_reader reads the broker and prints what this module makes of it. Payloads come
from other hosts' brokers and may be old, partial or not ours: every field is optional
here, and anything unreadable prints as "?" rather than failing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from rxfilterd.mqtt_topics import FleetMessage
from rxfilterd.records import FLEET_COLUMNS, format_table

# A decoded payload: a JSON object, nothing about it checked yet.
Payload = Mapping[str, object]


def decode(payload: bytes) -> Payload | None:
    """A JSON object payload, else None."""
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def status_word(payload: bytes) -> str:
    """ "online"/"offline" from our JSON status, or a plain-text one (older or foreign)."""
    data = decode(payload)
    if data is not None:
        return str(data.get("status", "?"))
    text = payload.decode("utf-8", "replace").strip()
    return text or "?"


def _clock(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def rows(messages: list[FleetMessage]) -> list[dict[str, str]]:
    """One row per NIC, plus one per host that has a status but no NIC."""
    status: dict[str, str] = {}
    nics: dict[tuple[str, str, str, str], Payload] = {}
    for message in messages:
        topic = message.topic
        if topic.kind == "status":
            status[topic.host] = status_word(message.payload)
        elif topic.kind == "nic" and message.payload:
            key = (topic.host, topic.libvirt, topic.domain, topic.alias)
            nics[key] = decode(message.payload) or {}
    out = []
    for (host, libvirt, domain, alias), state in nics.items():
        host_state = state.get("host")
        mac = host_state.get("mac") if isinstance(host_state, dict) else None
        row = {c: _text(state.get(c)) for c in FLEET_COLUMNS}
        out.append(
            row
            | {
                "host": host,
                "status": status.get(host, "?"),
                "libvirt": libvirt,
                "domain": domain,
                "alias": alias,
            }
            | {"mac": _text(mac), "last_sync": _clock(state.get("last_sync"))}
        )
    with_nics = {key[0] for key in nics}
    for host, word in status.items():
        if host not in with_nics:
            out.append({c: "" for c in FLEET_COLUMNS} | {"host": host, "status": word})
    out.sort(key=lambda r: (r["host"], r["libvirt"], r["domain"], r["alias"]))
    return out


def table(fleet_rows: list[dict[str, str]]) -> str:
    if not fleet_rows:
        return "no rxfilterd hosts on this broker under this topic prefix"
    return format_table(FLEET_COLUMNS, fleet_rows)


def _value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return _text(value) or "-"


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _details(event: Payload) -> str:
    kind = event.get("event")
    if kind in ("applied", "would-apply"):
        field = event.get("field", "?")
        if "added" in event or "removed" in event:
            added = " ".join(f"+{m}" for m in _list(event.get("added")))
            removed = " ".join(f"-{m}" for m in _list(event.get("removed")))
            change = " ".join(p for p in (added, removed) if p) or "(no entries)"
            return f"{field} {change}"
        return f"{field} {_value(event.get('old'))} -> {_value(event.get('new'))}"
    if kind in ("skipped", "syncing"):
        trust = f"trust={event.get('trust')} from {event.get('trust_source')}"
        return f"{event.get('reason', '')} ({trust})"
    if kind == "failed":
        return f"{event.get('stage', '?')}: {event.get('error', '')}"
    if kind == "refused":
        return f"{event.get('field', '?')} {event.get('value', '')}: {event.get('reason', '')}"
    if kind == "rejected":
        return str(event.get("error", ""))
    return ""


class LiveFormatter:
    """Lines for `fleet --follow`; notes when a host's drop counter grows."""

    def __init__(self) -> None:
        self._dropped: dict[str, int] = {}

    def line(self, message: FleetMessage) -> str | None:
        topic = message.topic
        if topic.kind == "status":
            data = decode(message.payload) or {}
            when = _clock(data.get("time")) or _clock(time.time())
            return f"{when}  {topic.host}  status  {status_word(message.payload)}"
        if topic.kind != "events":
            return None  # NIC state updates follow the events that caused them
        event = decode(message.payload)
        if event is None:
            return f"{_clock(time.time())}  {topic.host}  ?  unreadable event payload"
        nic = f"{event.get('domain', '?')}/{event.get('alias', '?')}"
        if event.get("libvirt", "host") != "host":  # a pod's: say which
            nic = f"{event.get('libvirt')}:{nic}"
        parts = [
            _clock(event.get("time")) or "?",
            topic.host,
            str(event.get("event", "?")),
            nic,
            _text(event.get("ifname")) or "-",
            _details(event),
        ]
        line = "  ".join(parts).rstrip()
        dropped = event.get("dropped")
        if isinstance(dropped, int) and dropped > self._dropped.get(topic.host, 0):
            line += f"  [{dropped} events dropped by this host's publisher so far]"
            self._dropped[topic.host] = dropped
        return line
