"""libvirt's own rx-filter handler: what a given libvirt syncs by itself, per NIC.

No I/O. The one place that knows it, so `explain`, the plan and the daemon agree.
Measured on the real stack (tests/libvirt, docs/compatibility.md):

- libvirt queries a trusted NIC after each NIC_RX_FILTER_CHANGED and writes MAC,
  promiscuous (guest promiscuous OR any VLAN entry), allmulti and the multicast list,
  but only where the NIC's actual type is direct (a macvtap libvirt made itself, also
  for a network NIC on a macvtap network). An unmanaged macvtap on type='ethernet'
  is never written by libvirt (9.0 and 11.3).
- From 10.0 the interface's trust can change on a running domain.
- From 10.1 libvirt refreshes only virtio NICs.
"""

from __future__ import annotations

from typing import Final

# What libvirt's handler writes on the NICs it syncs, whatever rxfilterd's policy says.
LIBVIRT_WRITES: Final = ("mac", "promiscuous", "allmulti", "multicast")

# The NIC models libvirt counts as virtio (virDomainNetIsVirtioModel): its trust and
# its own handler cover all three, and KubeVirt gives its NICs virtio-non-transitional.
VIRTIO_MODELS: Final = frozenset({"virtio", "virtio-transitional", "virtio-non-transitional"})

# The oldest libvirt rxfilterd supports, and why: network ports (5.5) carry the trust
# of a running network NIC, and 9.0 is the oldest this project tests.
OLDEST: Final = 9_000_000
# update-device may change trustGuestRxFilters of a running domain from this version.
LIVE_TRUST: Final = 10_000_000


def version_text(version: int) -> str:
    """libvirt's packed version number (major * 1e6 + minor * 1e3 + micro) as text."""
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"


def syncs_itself(nic_type: str, model: str | None, trusted: bool) -> bool:
    """Whether libvirt's own handler writes this NIC's macvtap (its live XML type)."""
    return trusted and nic_type == "direct" and model in VIRTIO_MODELS


def trust_changes_live(version: int) -> bool:
    """Whether this libvirt can change a running interface's trust (update-device)."""
    return version >= LIVE_TRUST


def unsupported(version: int) -> str | None:
    """Why rxfilterd cannot work with this libvirt, or None when it can."""
    if version >= OLDEST:
        return None
    return (
        f"libvirt {version_text(version)} is older than {version_text(OLDEST)}, the oldest"
        " rxfilterd supports (it needs network ports for a running NIC's trust)"
    )
