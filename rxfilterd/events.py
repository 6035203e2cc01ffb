"""What a hypervisor connection reports: its events, domains and errors.

Plain records, no libvirt: the reconciler, its ports and the fakes in
rxfilterd.testing use them without importing the libvirt bindings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DomainChange = Literal[
    "started", "resumed", "stopped", "defined", "reboot", "device-added", "device-removed"
]


@dataclass(frozen=True)
class RxFilterChanged:
    uuid: str
    domain: str
    alias: str
    # QEMU's own timestamp of the event, seconds since the epoch.
    timestamp: float


@dataclass(frozen=True)
class DomainChanged:
    uuid: str
    domain: str
    change: DomainChange
    # libvirt's detail, e.g. "migrated" for a domain arriving from another host.
    detail: str = ""


@dataclass(frozen=True)
class ConnectionLost:
    reason: str


HypervisorEvent = RxFilterChanged | DomainChanged | ConnectionLost


@dataclass(frozen=True)
class RunningDomain:
    uuid: str
    name: str
    xml: str


class HypervisorError(Exception):
    """A libvirt call that failed; `gone` when the domain or object no longer exists."""

    def __init__(self, message: str, *, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone
