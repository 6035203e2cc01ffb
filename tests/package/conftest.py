"""Fixtures for the package tier: the .deb built and installed in cached Debian roots.

Needs root, debootstrap, unshare and overlayfs (scripts/setup-host installs debootstrap);
elsewhere the tests skip, and fail when CI=true. Roots are cached under
/var/cache/rxfilterd-test/deb/<suite>/ (``RXFT_DEB_CACHE`` overrides): a bare minbase per
suite, a build root with debian/control's build dependencies, the clean root the package
is installed into, and one with the release's systemd for ``systemd-analyze`` (the root
tests/systemd boots). The roots and the build are tests/support/deb_package.py's, shared
with tests/systemd. Each test module works in overlays on them, so every run starts from
the same clean roots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.deb_package import PackageBuilds, clean_root, systemd_root
from tests.support.debian_root import DebianRoot

SUITES = ("bookworm", "trixie")


@dataclass(frozen=True)
class Roots:
    """The cached roots of one suite the package is installed in."""

    suite: str
    clean: DebianRoot
    systemd: DebianRoot


@pytest.fixture(scope="module", params=SUITES)
def roots(request: pytest.FixtureRequest, debian_roots: Path) -> Roots:
    suite: str = request.param
    # Its systemd-analyze judges the unit as that release's systemd would.
    made = Roots(suite, clean_root(debian_roots, suite), systemd_root(debian_roots, suite))
    for root in (made.clean, made.systemd):
        root.ensure()
    return made


@pytest.fixture(scope="module")
def deb(roots: Roots, package_builds: PackageBuilds) -> Path:
    """rxfilterd_*.deb for the suite, built by scripts/build-deb in its build root."""
    return package_builds.deb(roots.suite)
