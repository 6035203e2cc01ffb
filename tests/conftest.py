"""Shared pytest configuration and the real-stack fixtures of rxfilterd's tests.

Tests that use ``libvirt_stack`` (or ``stack``) run once per libvirt in
tests/support/libvirts.py, with ids such as ``test_x[libvirt-11.3]``. An unavailable
stack makes them skip, or fail when CI=true. Leftovers of earlier runs (anything named
with the RXFT_PREFIX prefix) are removed at session start, and everything a test
creates is removed at its teardown, also when it fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.deb_package import PackageBuilds, deb_cache, package_problem
from tests.support.debian_root import remove_leftover_overlays
from tests.support.guest import (
    HOST_LIBVIRT,
    GuestImage,
    LibvirtTarget,
    Resources,
    cleanup_leftovers,
    in_ci,
    skip_or_fail,
    use_libvirt,
)
from tests.support.libvirts import LABELS, running_libvirt


def pytest_report_header(config: pytest.Config) -> str:
    return f"rxfilterd: CI={'true' if in_ci() else 'false'} (missing real stack => fail)"


@pytest.fixture(scope="session")
def debian_roots() -> Iterator[Path]:
    """The cache of Debian roots (tests/support/debian_root.py), once they can be made here;
    overlays an interrupted run left are removed first and at the end."""
    problem = package_problem()
    if problem is not None:
        skip_or_fail(problem)
    remove_leftover_overlays()
    try:
        yield deb_cache()
    finally:
        remove_leftover_overlays()


@pytest.fixture(scope="session")
def package_builds(debian_roots: Path, tmp_path_factory: pytest.TempPathFactory) -> PackageBuilds:
    """rxfilterd's .deb per suite, built once for every tier of the session."""
    return PackageBuilds(debian_roots, tmp_path_factory.mktemp("debs"))


@pytest.fixture(scope="session", params=LABELS, ids=[f"libvirt-{v}" for v in LABELS])
def libvirt_under_test(request: pytest.FixtureRequest) -> Iterator[LibvirtTarget]:
    """Each libvirt in turn; the helpers and daemon configs point at it meanwhile."""
    with running_libvirt(request.param, skip_or_fail) as target:
        yield target


@pytest.fixture(autouse=True)
def _helpers_use_the_libvirt_under_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Points the helpers at the test's libvirt while it runs; any other test (e.g. a
    container sharing the host's libvirtd) gets the host's."""
    if "libvirt_under_test" in request.fixturenames:
        use_libvirt(request.getfixturevalue("libvirt_under_test"))
    try:
        yield
    finally:
        use_libvirt(HOST_LIBVIRT)


@pytest.fixture(scope="session")
def libvirt_stack(libvirt_under_test: LibvirtTarget) -> Iterator[GuestImage]:
    """The guest image, once the stack is known to work; cleans leftovers around the session."""
    cleanup_leftovers(uri=libvirt_under_test.uri)
    try:
        yield GuestImage.locate()
    finally:
        cleanup_leftovers(uri=libvirt_under_test.uri)


@pytest.fixture
def stack(libvirt_stack: GuestImage) -> Iterator[Resources]:
    """Creates links, networks and guests for one test and removes them afterwards."""
    res = Resources()
    try:
        yield res
    finally:
        res.close()
