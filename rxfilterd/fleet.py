"""`rxfilterd fleet`: the table of every host's NICs and the live event lines.

`run` reads them from the broker; everything else here is pure. Payloads come from
other hosts' brokers and may be old, partial or not ours: every field is optional here,
and anything unreadable prints as "?" rather than failing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any

from rxfilterd.config import MqttSettings
from rxfilterd.publisher import BrokerError, FleetMessage, read_fleet

COLUMNS = [
    "host",
    "status",
    "domain",
    "alias",
    "ifname",
    "trust",
    "trust_source",
    "action",
    "mac",
    "result",
    "last_sync",
]


def run(settings: MqttSettings, *, follow: bool) -> bool:
    """Print the table (then, with FOLLOW, live lines until Ctrl-C); False if the broker fails."""
    try:
        return asyncio.run(_show(settings, follow))
    except KeyboardInterrupt:  # Ctrl-C before the handler is in place
        return True


async def _show(settings: MqttSettings, follow: bool) -> bool:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    live = LiveFormatter()

    def snapshot(messages: list[FleetMessage]) -> None:
        print(format_table(rows(messages)), flush=True)

    def event(message: FleetMessage) -> None:
        line = live.line(message)
        if line is not None:
            print(line, flush=True)

    try:
        await read_fleet(settings, follow=follow, on_snapshot=snapshot, on_live=event, stop=stop)
    except BrokerError as exc:
        print(f"rxfilterd: fleet: {exc}", file=sys.stderr)
        return False
    return True


def decode(payload: bytes) -> dict[str, Any] | None:
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


def _clock(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def rows(messages: list[FleetMessage]) -> list[dict[str, str]]:
    """One row per NIC, plus one per host that has a status but no NIC."""
    status: dict[str, str] = {}
    nics: dict[tuple[str, str, str], dict[str, Any]] = {}
    for message in messages:
        topic = message.topic
        if topic.kind == "status":
            status[topic.host] = status_word(message.payload)
        elif topic.kind == "nic" and message.payload:
            nics[(topic.host, topic.domain, topic.alias)] = decode(message.payload) or {}
    out = []
    for (host, domain, alias), state in nics.items():
        host_state = state.get("host")
        mac = host_state.get("mac") if isinstance(host_state, dict) else None
        out.append(
            {
                "host": host,
                "status": status.get(host, "?"),
                "domain": domain,
                "alias": alias,
                "ifname": _text(state.get("ifname")),
                "trust": _text(state.get("trust")),
                "trust_source": _text(state.get("trust_source")),
                "action": _text(state.get("action")),
                "mac": _text(mac),
                "result": _text(state.get("result")),
                "last_sync": _clock(state.get("last_sync")),
            }
        )
    with_nics = {key[0] for key in nics}
    for host, word in status.items():
        if host not in with_nics:
            out.append({c: "" for c in COLUMNS} | {"host": host, "status": word})
    out.sort(key=lambda r: (r["host"], r["domain"], r["alias"]))
    return out


def format_table(table: list[dict[str, str]]) -> str:
    if not table:
        return "no rxfilterd hosts on this broker under this topic prefix"
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    for row in table:
        lines.append("  ".join(row[c].ljust(widths[c]) for c in COLUMNS).rstrip())
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return _text(value) or "-"


def _details(event: dict[str, Any]) -> str:
    kind = event.get("event")
    if kind in ("applied", "would-apply"):
        field = event.get("field", "?")
        if "added" in event or "removed" in event:
            added = " ".join(f"+{m}" for m in event.get("added") or [])
            removed = " ".join(f"-{m}" for m in event.get("removed") or [])
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
