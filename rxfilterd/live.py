"""The daemon's live state for `rxfilterd status`: every NIC, counters, recent trouble.

A decision sink and a state sink, kept on the event loop and read there (the status
socket is served by the same loop), so nothing here needs a lock. Everything it holds
is bounded: one entry per NIC of a running domain, and the last RECENT refusals and
errors.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable

import rxfilterd
from rxfilterd.records import Decision, JsonObject, NicKey, NicState
from rxfilterd.stats import Board

# How many refusals and errors `status` shows, newest last.
RECENT = 20
# A status answer lists at most this many NICs (and says how many it left out).
MAX_NICS = 1000

# The keys of a decision worth showing in a recent refusal or error (Decision.payload's).
_KEYS = (
    "time",
    "event",
    "libvirt",
    "domain",
    "alias",
    "ifname",
    "field",
    "value",
    "stage",
    "reason",
    "error",
    "cause",
    "attempt",
)
_ERRORS = ("failed", "rejected")


class LiveState:
    """What the daemon knows now, as `status` shows it."""

    def __init__(self, board: Board, *, started: float | None = None) -> None:
        self.board = board
        self.started = time.time() if started is None else started
        self.nics: dict[NicKey, NicState] = {}
        # Kept as they came (frozen); rendered only when status is asked.
        self.refusals: collections.deque[Decision] = collections.deque(maxlen=RECENT)
        self.errors: collections.deque[Decision] = collections.deque(maxlen=RECENT)
        self.decisions: collections.Counter[str] = collections.Counter()
        # Sections the app adds (mqtt, metrics), each read when status is asked.
        self.sections: dict[str, Callable[[], JsonObject]] = {}

    def decision(self, decision: Decision) -> None:
        self.decisions[decision.event] += 1
        if decision.event == "refused":
            self.refusals.append(decision)
        elif decision.event in _ERRORS:
            self.errors.append(decision)

    def nic_state(self, key: NicKey, state: NicState | None) -> None:
        if state is None:
            self.nics.pop(key, None)
        else:
            self.nics[key] = state

    def snapshot(self) -> JsonObject:
        """The status answer: plain JSON values, bounded in size."""
        total, now = self.board.total(), time.time()
        keys = sorted(self.nics)
        return {
            "version": rxfilterd.__version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime_seconds": round(now - self.started, 1),
            "connections": [
                {
                    "libvirt": stats.name,
                    "uri": stats.uri,
                    "connected": stats.connected,
                    "libvirt_version": stats.libvirt_version_text,
                    "away_since": stats.away_since,
                    "last_error": stats.last_error,
                    "nics_synced": stats.nics_synced,
                }
                for stats in self.board.connections.values()
            ],
            "counters": {
                "nics_synced": total.nics_synced,
                "queries": total.queries,
                "syncs": total.syncs,
                "changes_applied": total.writes,
                "decisions": dict(sorted(self.decisions.items())),
            },
            **{name: section() for name, section in self.sections.items()},
            # Each as its retained MQTT payload has it (docs/mqtt.md).
            "nics": [self.nics[key].payload() for key in keys[:MAX_NICS]],
            "nics_left_out": max(0, len(keys) - MAX_NICS),
            "recent_refusals": [_brief(d) for d in self.refusals],
            "recent_errors": [_brief(d) for d in self.errors],
        }


def _brief(decision: Decision) -> JsonObject:
    payload = decision.payload()
    return {key: payload[key] for key in _KEYS if key in payload}
