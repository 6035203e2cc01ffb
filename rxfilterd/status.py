"""`rxfilterd status`: the running daemon's live state, asked over its unix socket.

The daemon's side is rxfilterd.status_server; what the answer holds is rxfilterd.live's.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

# The daemon answers at once; this covers a loaded host and thousands of NICs.
TIMEOUT = 10.0
# The largest answer read (the daemon bounds what it sends well below this).
MAX_ANSWER = 64 * 1024 * 1024

COLUMNS = ("DOMAIN", "ALIAS", "IFNAME", "MAC", "TRUST", "ACTION", "LAST SYNC", "CAUSE", "RESULT")


class StatusError(Exception):
    """No answer from the daemon; str() says why and what to check."""


def ask(path: Path, timeout: float = TIMEOUT) -> dict[str, Any]:
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


def render(answer: dict[str, Any]) -> str:
    """The text form: a header, one row per NIC, then recent refusals and errors."""
    lines = [
        f"rxfilterd {answer.get('version', '?')}, pid {answer.get('pid', '?')},"
        f" up {_duration(answer.get('uptime_seconds', 0))}"
    ]
    for conn in answer.get("connections", []):
        if conn.get("connected"):
            state = f"connected (libvirt {conn.get('libvirt_version') or '?'})"
        elif conn.get("away_since"):
            state = f"away for {_duration(time.time() - conn['away_since'])}, reconnecting"
        else:
            state = "not connected"
        lines.append(f"libvirt {conn.get('uri')}: {state}")
        if conn.get("last_error"):
            lines.append(f"  last error: {conn['last_error']}")
    mqtt = answer.get("mqtt")
    if mqtt:
        state = "connected" if mqtt.get("connected") else "not connected"
        lines.append(f"mqtt {mqtt.get('broker')}: {state}, {mqtt.get('dropped', 0)} events dropped")
    metrics = answer.get("metrics")
    if metrics:
        where = metrics.get("url") or f"not served: {metrics.get('error', '?')}"
        lines.append(f"metrics: {where}")
    c = answer.get("counters", {})
    lines.append(
        f"{_count(c.get('nics_synced', 0), 'NIC')} synced; {c.get('queries', 0)} queries,"
        f" {c.get('syncs', 0)} syncs, {c.get('changes_applied', 0)} changes applied"
    )
    rows = [_row(nic) for nic in answer.get("nics", [])]
    lines.append("")
    lines += _table([COLUMNS, *rows]) if rows else ["no NICs in running domains"]
    if answer.get("nics_left_out"):
        lines.append(f"... and {answer['nics_left_out']} more NICs (--json has the same limit)")
    for title, key in (("recent refusals", "recent_refusals"), ("recent errors", "recent_errors")):
        items = answer.get(key) or []
        if items:
            lines += ["", f"{title}:"]
            lines += [f"  {_recent(item)}" for item in items]
    return "\n".join(lines) + "\n"


def _row(nic: dict[str, Any]) -> tuple[str, ...]:
    host = nic.get("host") or {}
    when = nic.get("last_sync")
    return (
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


def _recent(item: dict[str, Any]) -> str:
    when = item.get("time")
    stamp = time.strftime("%H:%M:%S", time.localtime(when)) if when else "?"
    where = f"{item.get('domain', '?')}/{item.get('alias', '?')}"
    rest = " ".join(
        f"{key}={item[key]}"
        for key in ("field", "value", "stage", "reason", "error", "cause", "attempt")
        if key in item
    )
    return f"{stamp} {item.get('event', '?')} {where} {rest}"


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
