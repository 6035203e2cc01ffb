"""The counters and connection state of each libvirt connection, for status and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rxfilterd.libvirt_handler import version_text


@dataclass
class Stats:
    """One connection's state and counters (NAME: "host", "pod/<name>")."""

    name: str = "host"
    uri: str = ""
    connected: bool = False
    nics_synced: int = 0
    syncs: int = 0
    queries: int = 0
    writes: int = 0
    last_error: str = ""
    # Wall-clock time libvirt went away; None while connected (or never lost).
    away_since: float | None = None
    # The connected libvirt's version, packed (major * 1e6 + minor * 1e3 + micro); 0: never.
    libvirt_version: int = 0

    @property
    def libvirt_version_text(self) -> str:
        """The connected libvirt's version ("9.0.0"), "" before the first connection."""
        return version_text(self.libvirt_version) if self.libvirt_version > 0 else ""

    def state(self) -> str:
        if self.connected:
            return "connected"
        if self.away_since is not None:
            return f"libvirt away for {time.time() - self.away_since:.0f} s, reconnecting"
        return "not connected to libvirt"

    def error(self, message: str) -> None:
        self.last_error = message


@dataclass
class Board:
    """Every connection's Stats, by name: the host's libvirt and each pod's.

    Status, metrics and the watchdog read it; connections come and go with pods.
    """

    connections: dict[str, Stats] = field(default_factory=dict)

    def add(self, stats: Stats) -> None:
        self.connections[stats.name] = stats

    def remove(self, name: str) -> None:
        self.connections.pop(name, None)

    @property
    def host(self) -> Stats | None:
        return self.connections.get("host")

    def total(self) -> Stats:
        """The counters summed over every connection (connected: all of them are)."""
        out = Stats(name="all", connected=all(s.connected for s in self.connections.values()))
        for stats in self.connections.values():
            out.nics_synced += stats.nics_synced
            out.syncs += stats.syncs
            out.queries += stats.queries
            out.writes += stats.writes
        return out

    def pods(self) -> list[Stats]:
        return [s for name, s in sorted(self.connections.items()) if name != "host"]

    def summary(self) -> str:
        """The status line: the host's connection (if any), the pods, the counters."""
        total, host, pods = self.total(), self.host, self.pods()
        parts = [host.state()] if host is not None else []
        if pods:
            up = sum(p.connected for p in pods)
            parts.append(f"{len(pods)} pod{'s' * (len(pods) != 1)} ({up} connected)")
        parts.append(f"{total.nics_synced} NICs synced; {total.writes} changes applied")
        errors = [s for s in (host, *pods) if s is not None and s.last_error]
        if errors:
            parts.append(f"last error: {errors[0].last_error}")
        return "; ".join(parts)
