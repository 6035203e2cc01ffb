"""The libvirt tier: fixtures (libvirt_under_test, libvirt_stack, stack) are in
tests/conftest.py, shared with the mqtt tier's real-guest tests; here are the ones for
tests that need a libvirtd of their own (to kill it, or to run without rxfilterd)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from tests.support.guest import GuestImage, LibvirtTarget
from tests.support.libvirtd import LabLibvirtd
from tests.support.libvirts import private_libvirtd


@pytest.fixture(scope="module")
def lv(libvirt_stack: GuestImage, libvirt_under_test: LibvirtTarget) -> Iterator[LabLibvirtd]:
    """Our own libvirtd of the version under test for this module (one an aborted run
    left is replaced)."""
    private = private_libvirtd(libvirt_under_test.label)
    private.close()
    private.start()
    try:
        yield private
    finally:
        private.close()


@pytest.fixture
def conn(lv: LabLibvirtd) -> Iterator[Any]:
    """A connection to our libvirtd; domains left running after the test are destroyed."""
    c = lv.connect()
    try:
        yield c
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            c.close()
        lv.destroy_domains()
