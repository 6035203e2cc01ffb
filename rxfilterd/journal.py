"""journald native protocol sender and a structlog renderer on top of it.

Wire format (systemd "Native Journal Protocol"): one AF_UNIX datagram per entry, each
field either ``NAME=value\\n`` or, when the value contains a newline,
``NAME\\n<u64 little-endian length><value>\\n``. An entry too big for one datagram
(EMSGSIZE/ENOBUFS) is written to a sealed memfd whose descriptor is sent alone with
SCM_RIGHTS and an empty payload; journald reads the entry from it.

structlog integration -- put ``JournalRenderer`` last::

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            JournalRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
    )

The renderer sends the entry and then raises ``structlog.DropEvent``, so the logger from
``logger_factory`` is never called and nothing is printed twice. If the journal cannot be
reached it returns the one-line rendering instead, and that logger writes it (stderr is
itself connected to the journal under systemd, so the line is not lost, only unstructured).
Pick the renderer only when ``under_journal()`` is true; use a console/JSON renderer
otherwise.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import re
import socket
import struct
import sys
import traceback
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from rxfilterd.records import DECISION_EVENTS

__all__ = [
    "IDENTIFIER",
    "JOURNAL_SOCKET",
    "JournalRenderer",
    "JournalSender",
    "field_name",
    "priority_for",
    "render_line",
    "serialize",
    "under_journal",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "rxfilterd"

# syslog(3) levels; names cover stdlib logging and structlog spellings.
_PRIORITIES: dict[str, int] = {
    "emerg": 0,
    "emergency": 0,
    "alert": 1,
    "crit": 2,
    "critical": 2,
    "fatal": 2,
    "err": 3,
    "error": 3,
    "exception": 3,
    "warn": 4,
    "warning": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
    "trace": 7,
    "notset": 7,
}
_DEFAULT_PRIORITY = 6

# Event keys with a fixed journal name; everything else (a decision's domain, alias,
# ifname, field, old, new, ...: rxfilterd.records) is upper-cased and sanitised.
_KEY_FIELDS: dict[str, str] = {
    # Names structlog's CallsiteParameterAdder produces -> journald's well-known fields.
    "pathname": "CODE_FILE",
    "lineno": "CODE_LINE",
    "func_name": "CODE_FUNC",
}
# Fields the renderer owns; an event key that maps onto one is renamed, not duplicated.
_RESERVED = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "EVENT", "EXCEPTION"})
# Rendered into fields but kept out of the one-line MESSAGE (journald stamps time itself;
# tracebacks are multi-line).
_NOT_IN_LINE = frozenset({"timestamp", "exception", "exc_info", "stack", "stack_info"})

_INVALID_CHARS = re.compile(r"[^A-Z0-9_]")
_MAX_NAME = 64  # journald rejects longer field names
_BARE_VALUE = re.compile(r"[^\s\"'=\\]+")

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def field_name(key: str) -> str | None:
    """Journal field name for ``key``: upper case, ``[A-Z0-9_]``, not starting with ``_``.

    Leading underscores are stripped (those names are journald's trusted fields and
    would be dropped); a leading digit gets an ``F`` prefix. Returns None when nothing
    usable is left.
    """
    name = _INVALID_CHARS.sub("_", key.upper()).lstrip("_")
    if not name:
        return None
    if name[0].isdigit():
        name = "F" + name
    return name[:_MAX_NAME]


def priority_for(level: str | None) -> int:
    """syslog priority (0-7) for a log level name; unknown names map to info (6)."""
    if level is None:
        return _DEFAULT_PRIORITY
    return _PRIORITIES.get(level.lower(), _DEFAULT_PRIORITY)


def serialize(fields: Iterable[tuple[str, str | bytes]]) -> bytes:
    """Encode ``(NAME, value)`` pairs in the native protocol; names must already be valid."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


def _encode_value(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


def _line_value(value: object) -> str:
    if isinstance(value, str):
        # Quote only when needed so MAC addresses and names stay readable.
        return value if _BARE_VALUE.fullmatch(value) else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


def render_line(event_dict: Mapping[str, Any]) -> str:
    """One-line ``event key=value ...`` rendering (no level, no timestamp)."""
    parts = [str(event_dict.get("event", ""))]
    for key, value in event_dict.items():
        if key in ("event", "level") or key in _NOT_IN_LINE:
            continue
        parts.append(f"{key}={_line_value(value)}")
    return " ".join(parts).replace("\n", " ")


class JournalSender:
    """Sends entries to journald's native socket (or ``path``, for tests).

    Best effort: methods return False instead of raising, so logging cannot take the
    daemon down. The socket is non-blocking; a journald that is not draining its queue
    makes entries fail (and the renderer fall back to stderr) rather than stall asyncio.
    """

    def __init__(self, path: str = JOURNAL_SOCKET, *, identifier: str = IDENTIFIER) -> None:
        self.path = path
        self.identifier = identifier
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def send_fields(self, fields: Iterable[tuple[str, str | bytes]]) -> bool:
        """Send pre-validated ``(NAME, value)`` pairs as one entry."""
        payload = serialize(fields)
        try:
            sock = self._socket()
            try:
                sock.sendto(payload, self.path)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    return False
            return self._send_via_memfd(sock, payload)
        except OSError:
            return False

    def _send_via_memfd(self, sock: socket.socket, payload: bytes) -> bool:
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            # journald only trusts a memfd that cannot change under it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
            sock.sendmsg([], [rights], 0, self.path)
        finally:
            # The in-flight message holds its own reference to the file.
            os.close(fd)
        return True


def _exception_text(event_dict: Mapping[str, Any]) -> str | None:
    text = event_dict.get("exception")
    if isinstance(text, str):
        return text  # already rendered by structlog.processors.format_exc_info
    exc_info = event_dict.get("exc_info")
    if not exc_info:
        return None
    if isinstance(exc_info, BaseException):
        return "".join(traceback.format_exception(exc_info))
    if isinstance(exc_info, tuple):
        return "".join(traceback.format_exception(*exc_info))
    info = sys.exc_info()
    return "".join(traceback.format_exception(*info)) if info[0] is not None else None


class JournalRenderer:
    """Final structlog processor: event dict -> journal entry.

    ``event`` becomes MESSAGE (as ``render_line``) and EVENT; ``level`` becomes PRIORITY;
    known keys get their fixed names (domain -> DOMAIN, ...), other keys are upper-cased
    and sanitised, non-str values JSON-encoded; a traceback goes to EXCEPTION. Raises
    ``structlog.DropEvent`` after a successful send; returns the line if sending failed
    (when ``fallback`` is true, else drops it).
    """

    def __init__(self, sender: JournalSender | None = None, *, fallback: bool = True) -> None:
        self.sender = sender if sender is not None else JournalSender()
        self.fallback = fallback

    def fields(self, event_dict: Mapping[str, Any]) -> list[tuple[str, str | bytes]]:
        """The journal fields for ``event_dict``, in send order."""
        pairs: list[tuple[str, str | bytes]] = [
            ("MESSAGE", render_line(event_dict)),
            ("PRIORITY", str(priority_for(_level_name(event_dict.get("level"))))),
            ("SYSLOG_IDENTIFIER", self.sender.identifier),
        ]
        if "event" in event_dict:
            event = _encode_value(event_dict["event"])
            pairs.append(("EVENT", event))
            if event in DECISION_EVENTS:
                # A decision's name is also ACTION: `journalctl ACTION=applied` (README).
                pairs.append(("ACTION", event))
        for key, value in event_dict.items():
            if key in ("event", "level", "exception", "exc_info"):
                continue
            name = _KEY_FIELDS.get(key) or field_name(key)
            if name is None:
                continue
            if name in _RESERVED:
                name = "EXTRA_" + name
            pairs.append((name, _encode_value(value)))
        exc = _exception_text(event_dict)
        if exc:
            pairs.append(("EXCEPTION", exc))
        return pairs

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        if "level" not in event_dict:
            # add_log_level may be absent from the chain; the method name is the level.
            event_dict["level"] = method_name
        if self.sender.send_fields(self.fields(event_dict)):
            raise structlog.DropEvent
        if not self.fallback:
            raise structlog.DropEvent
        return render_line(event_dict)


def _level_name(level: object) -> str | None:
    if isinstance(level, str):
        return level
    if isinstance(level, int):
        # stdlib numeric levels: 10 debug .. 50 critical.
        for threshold, name in ((50, "critical"), (40, "error"), (30, "warning"), (20, "info")):
            if level >= threshold:
                return name
        return "debug"
    return None


def under_journal(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when stderr (or ``stream``) is the journal stream systemd set up for us.

    systemd sets ``JOURNAL_STREAM=<st_dev>:<st_ino>`` (decimal) of the stdout/stderr
    socket; comparing it with stderr's fstat() keeps the check false in children or
    after a redirect that inherited the variable.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    dev_s, sep, ino_s = value.partition(":")
    if not sep:
        return False
    target = sys.stderr if stream is None else stream
    try:
        dev, ino = int(dev_s), int(ino_s)
        st = os.fstat(target.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino
