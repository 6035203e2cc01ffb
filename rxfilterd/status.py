"""`rxfilterd status`: the running daemon's live state, asked over its unix socket.

The daemon's side is rxfilterd.status_server; what the answer holds is rxfilterd.live's.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

# The daemon answers at once; this covers a loaded host and thousands of NICs.
TIMEOUT = 10.0
# The largest answer read (the daemon bounds what it sends well below this).
MAX_ANSWER = 64 * 1024 * 1024

# A JSON object from the socket, nothing about it checked yet: every field is optional
# here (another version of the daemon may answer), and reads narrow what they use.
Answer = Mapping[str, object]

COLUMNS = (
    *("LIBVIRT", "DOMAIN", "ALIAS", "IFNAME", "MAC"),
    *("TRUST", "ACTION", "LAST SYNC", "CAUSE", "RESULT"),
)


class StatusError(Exception):
    """No answer from the daemon; str() says why and what to check."""


def ask(path: Path, timeout: float = TIMEOUT) -> Answer:
    """The daemon's live state, from its socket at PATH."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise StatusError(
                f"no rxfilterd is running: nothing answers on {path}"
                " (systemctl status rxfilterd; or [status] socket in the config)"
            ) from None
        except PermissionError:
            raise StatusError(f"{path}: permission denied (the status socket is root's)") from None
        sock.sendall(b"status\n")
        chunks, size = [], 0
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise StatusError(f"{path}: answer larger than {MAX_ANSWER} bytes")
    except TimeoutError:
        raise StatusError(f"{path}: rxfilterd did not answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise StatusError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"{path}: the answer is not JSON (is this rxfilterd's socket?)") from None
    if not isinstance(answer, dict):
        raise StatusError(f"{path}: unexpected answer")
    return answer


def run(path: Path, *, as_json: bool) -> bool:
    try:
        answer = ask(path)
    except StatusError as exc:
        print(f"rxfilterd status: {exc}", file=sys.stderr)
        return False
    if as_json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(render(answer), end="")
    return True


def render(answer: Answer) -> str:
    """The text form: a header, one row per NIC, then recent refusals and errors."""
    lines = [
        f"rxfilterd {answer.get('version', '?')}, pid {answer.get('pid', '?')},"
        f" up {_duration(_number(answer.get('uptime_seconds')))}"
    ]
    for conn in _objects(answer.get("connections")):
        away_since = _number(conn.get("away_since"))
        if conn.get("connected"):
            state = f"connected (libvirt {conn.get('libvirt_version') or '?'})"
        elif away_since:
            state = f"away for {_duration(time.time() - away_since)}, reconnecting"
        else:
            state = "not connected"
        name, nics = conn.get("libvirt") or "host", conn.get("nics_synced", 0)
        lines.append(f"libvirt {name} {conn.get('uri')}: {state}; {nics} NICs synced")
        if conn.get("last_error"):
            lines.append(f"  last error: {conn['last_error']}")
    mqtt = _object(answer.get("mqtt"))
    if mqtt:
        state = "connected" if mqtt.get("connected") else "not connected"
        lines.append(f"mqtt {mqtt.get('broker')}: {state}, {mqtt.get('dropped', 0)} events dropped")
    metrics = _object(answer.get("metrics"))
    if metrics:
        where = metrics.get("url") or f"not served: {metrics.get('error', '?')}"
        lines.append(f"metrics: {where}")
    c = _object(answer.get("counters"))
    lines.append(
        f"{_count(int(_number(c.get('nics_synced'))), 'NIC')} synced; {c.get('queries', 0)}"
        f" queries, {c.get('syncs', 0)} syncs, {c.get('changes_applied', 0)} changes applied"
    )
    rows = [_row(nic) for nic in _objects(answer.get("nics"))]
    lines.append("")
    lines += _table([COLUMNS, *rows]) if rows else ["no NICs in running domains"]
    if answer.get("nics_left_out"):
        lines.append(f"... and {answer['nics_left_out']} more NICs (--json has the same limit)")
    for title, key in (("recent refusals", "recent_refusals"), ("recent errors", "recent_errors")):
        items = _objects(answer.get(key))
        if items:
            lines += ["", f"{title}:"]
            lines += [f"  {_recent(item)}" for item in items]
    return "\n".join(lines) + "\n"


def _row(nic: Answer) -> tuple[str, ...]:
    host = _object(nic.get("host"))
    when = _number(nic.get("last_sync"))
    return (
        str(nic.get("libvirt", "host")),
        str(nic.get("domain", "")),
        str(nic.get("alias", "")),
        str(nic.get("ifname") or "-"),
        str(host.get("mac") or nic.get("current_mac") or "-"),
        str(nic.get("trust", "")),
        str(nic.get("action", "")),
        time.strftime("%H:%M:%S", time.localtime(when)) if when else "-",
        str(nic.get("cause") or "-"),
        str(nic.get("result", "")),
    )


def _recent(item: Answer) -> str:
    when = _number(item.get("time"))
    stamp = time.strftime("%H:%M:%S", time.localtime(when)) if when else "?"
    where = f"{item.get('domain', '?')}/{item.get('alias', '?')}"
    rest = " ".join(
        f"{key}={item[key]}"
        for key in ("field", "value", "stage", "reason", "error", "cause", "attempt")
        if key in item
    )
    return f"{stamp} {item.get('event', '?')} {where} {rest}"


def _object(value: object) -> Answer:
    """VALUE if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _objects(value: object) -> list[Answer]:
    """The JSON objects in VALUE if it is a list (anything else in it left out)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _number(value: object) -> float:
    """VALUE if it is a JSON number, else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} days {hours % 24} h"
