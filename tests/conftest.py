"""Shared pytest configuration for rxfilterd's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.deb_package import PackageBuilds, deb_cache, package_problem
from tests.support.debian_root import remove_leftover_overlays
from tests.support.guest import in_ci, skip_or_fail


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
