"""Fixtures for the traffic tier: the libvirt tier's stack plus a peer host.

The real stack, its skip-or-fail rule and its clean-up come from the real-stack fixtures
in tests/conftest.py (so the traffic tests run on each libvirt too). On top, a peer: a network
namespace holding the far ends of the test veths. Namespaces left by an interrupted run
(named with RXFT_PREFIX) are removed at session start and end.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.guest import GuestImage, delete_link, prefixed
from tests.support.peer import Peer, cleanup_namespaces


@pytest.fixture(scope="session")
def traffic_stack(libvirt_stack: GuestImage) -> Iterator[GuestImage]:
    cleanup_namespaces()
    try:
        yield libvirt_stack
    finally:
        cleanup_namespaces()


@pytest.fixture
def peer(traffic_stack: GuestImage) -> Iterator[Peer]:
    """The peer host, removed (with the veth ends it holds) after the test."""
    with Peer(prefixed("peer")) as p:
        yield p


@pytest.fixture
def links(traffic_stack: GuestImage) -> Iterator[list[str]]:
    """Names of host links a test makes by hand (bridges): deleted after the test."""
    made: list[str] = []
    try:
        yield made
    finally:
        for name in reversed(made):
            delete_link(name)
