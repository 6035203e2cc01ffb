"""Fixtures for tests that need the real stack: libvirtd, a QEMU guest and macvtaps.

Unavailable stack: such tests skip, or fail when CI=true. Leftovers from earlier runs
(anything named with the RXFT_PREFIX prefix) are removed at session start, and everything
a test creates is removed at its teardown, also when it fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.guest import (
    GuestImage,
    Resources,
    cleanup_leftovers,
    skip_or_fail,
    stack_problem,
)


@pytest.fixture(scope="session")
def libvirt_stack() -> Iterator[GuestImage]:
    """The guest image, once the stack is known to work; cleans leftovers around the session."""
    problem = stack_problem()
    if problem is not None:
        skip_or_fail(problem)
    cleanup_leftovers()
    try:
        yield GuestImage.locate()
    finally:
        cleanup_leftovers()


@pytest.fixture
def stack(libvirt_stack: GuestImage) -> Iterator[Resources]:
    """Creates links, networks and guests for one test and removes them afterwards."""
    res = Resources()
    try:
        yield res
    finally:
        res.close()
