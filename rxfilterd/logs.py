"""Logging: structlog to the console, JSON lines, or the journal's native protocol."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

from rxfilterd.config import LogFormat

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None) -> str:
    """Set up structlog; returns the format chosen (auto resolves here)."""
    from rxfilterd import journal

    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "journal" if journal.under_journal() else "console"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    if fmt == "journal":
        # The override lets tests receive the datagrams on a socket of their own.
        path = os.environ.get("RXFILTERD_JOURNAL_SOCKET", journal.JOURNAL_SOCKET)
        processors.append(journal.JournalRenderer(journal.JournalSender(path)))
    elif fmt == "json":
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return fmt
