"""The daemon's counters and connection state, for `rxfilterd status` and the fleet."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rxfilterd.libvirt_handler import version_text


@dataclass
class Stats:
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

    def summary(self, nics: int) -> str:
        if self.connected:
            state = "connected"
        elif self.away_since is not None:
            state = f"libvirt away for {time.time() - self.away_since:.0f} s, reconnecting"
        else:
            state = "not connected to libvirt"
        line = f"{state}; {nics} NICs synced; {self.writes} changes applied"
        if self.last_error:
            line += f"; last error: {self.last_error}"
        return line

    def error(self, message: str) -> None:
        self.last_error = message
