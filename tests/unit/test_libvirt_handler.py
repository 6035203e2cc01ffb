"""What libvirt's own handler does, per version and NIC: the one table."""

from __future__ import annotations

import pytest

from rxfilterd.libvirt_handler import (
    OLDEST,
    syncs_itself,
    trust_changes_live,
    unsupported,
    version_text,
)


@pytest.mark.parametrize(
    ("nic_type", "model", "trusted", "syncs"),
    [
        ("direct", "virtio", True, True),  # type='direct' and macvtap networks
        ("direct", "virtio", False, False),
        ("ethernet", "virtio", True, False),  # an unmanaged macvtap: never libvirt's
        ("direct", "e1000", True, False),
        ("bridge", "virtio", True, False),
    ],
)
def test_libvirt_writes_only_trusted_virtio_macvtaps_it_made(
    nic_type: str, model: str, trusted: bool, syncs: bool
) -> None:
    assert syncs_itself(nic_type, model, trusted) is syncs


def test_versions_read_as_libvirt_prints_them() -> None:
    assert version_text(9_000_000) == "9.0.0"
    assert version_text(11_003_000) == "11.3.0"
    assert version_text(10_010_002) == "10.10.2"


def test_live_trust_changes_from_10_0() -> None:
    assert not trust_changes_live(9_000_000)
    assert trust_changes_live(10_000_000) and trust_changes_live(11_003_000)


def test_an_old_libvirt_is_refused_naming_its_version_and_what_is_missing() -> None:
    assert unsupported(OLDEST) is None and unsupported(11_003_000) is None
    problem = unsupported(8_000_000)
    assert problem is not None
    assert "libvirt 8.0.0" in problem and "9.0.0" in problem and "network ports" in problem
