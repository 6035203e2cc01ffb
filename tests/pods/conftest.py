"""The pods tier: simulated KubeVirt virt-launcher pods (tests/support/pods.py) on the real
stack. Needs root and the cached Debian 13 libvirt root; skips with the reason elsewhere,
fails when CI=true. Pods, peer namespaces and links an interrupted run left (named with
RXFT_PREFIX) are removed at session start and end."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.guest import cleanup_leftovers, create_veth, delete_link, prefixed, skip_or_fail
from tests.support.peer import Peer, cleanup_namespaces
from tests.support.pods import SimulatedPod, cleanup_pods, pod_problem


def _clean() -> None:
    cleanup_pods()  # first: their processes hold namespaces and macvtaps
    cleanup_namespaces()
    cleanup_leftovers()


@pytest.fixture(scope="session")
def pod_lab() -> Iterator[None]:
    problem = pod_problem()
    if problem is not None:
        skip_or_fail(problem)
    _clean()
    try:
        yield
    finally:
        _clean()


@pytest.fixture
def lower(pod_lab: None) -> Iterator[str]:
    """A host link for macvtaps (the node's NIC, to macvtap-cni): a veth whose far end is
    in a peer namespace standing for the LAN."""
    near, far = prefixed("pla"), prefixed("plb")
    with Peer(prefixed("ppeer")) as peer:
        create_veth(near, far)
        try:
            peer.take(far)
            yield near
        finally:
            delete_link(near)


@pytest.fixture
def pods(pod_lab: None) -> Iterator[Callable[..., SimulatedPod]]:
    """``pods("a", session=False)``: a started pod, closed after the test."""
    with contextlib.ExitStack() as stack:

        def make(name: str, **kwargs: Any) -> SimulatedPod:
            return stack.enter_context(SimulatedPod(name, **kwargs))

        yield make
