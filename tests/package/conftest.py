"""Fixtures for the package tier: the .deb built and installed in cached Debian roots.

Needs root, debootstrap, unshare and overlayfs (scripts/setup-host installs debootstrap);
elsewhere the tests skip, and fail when CI=true. Roots are cached under
/var/cache/rxfilterd-test/deb/<suite>/ (``RXFT_DEB_CACHE`` overrides): a bare minbase per
suite, a build root with debian/control's build dependencies, the clean root the package
is installed into, and one with the release's systemd for ``systemd-analyze``. Each test
module works in overlays on them, so every run starts from the same clean roots.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.debian_root import Bind, DebianRoot, Overlay, remove_leftover_overlays
from tests.support.guest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
SUITES = ("bookworm", "trixie")
DEFAULT_CACHE = Path("/var/cache/rxfilterd-test/deb")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Passed on to pip in the build root, so it reaches PyPI the way this host does.
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "PIP_INDEX_URL")


def package_problem() -> str | None:
    """None when roots can be made and used here, else why not."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, overlayfs)"
    missing = [t for t in ("debootstrap", "unshare", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (run scripts/setup-host)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs in this kernel"
    return None


def build_depends(control: Path) -> tuple[str, ...]:
    """The package names of debian/control's Build-Depends (first of any alternatives)."""
    text = re.sub(r"^#.*\n", "", control.read_text(), flags=re.M)
    match = re.search(r"^Build-Depends:(.*(?:\n[ \t].*)*)", text, re.M)
    assert match, f"no Build-Depends in {control}"
    names = []
    for item in match.group(1).split(","):
        name = item.split("|")[0].split("(")[0].split("[")[0].split("<")[0].strip()
        if name:
            # A virtual package apt will not pick by itself; debhelper provides it.
            names.append("debhelper" if name == "debhelper-compat" else name)
    return ("build-essential", *names)


@dataclass(frozen=True)
class Roots:
    """The cached roots of one suite."""

    suite: str
    build: DebianRoot
    clean: DebianRoot
    systemd: DebianRoot

    @property
    def pip_cache(self) -> Path:
        path = self.build.cache / self.suite / "pip"
        path.mkdir(parents=True, exist_ok=True)
        return path


@pytest.fixture(scope="session")
def package_stack() -> Iterator[Path]:
    """The roots' cache directory, once roots can be made here."""
    problem = package_problem()
    if problem is not None:
        skip_or_fail(problem)
    remove_leftover_overlays()
    try:
        yield Path(os.environ.get("RXFT_DEB_CACHE", DEFAULT_CACHE))
    finally:
        remove_leftover_overlays()


@pytest.fixture(scope="module", params=SUITES)
def roots(request: pytest.FixtureRequest, package_stack: Path) -> Roots:
    suite: str = request.param
    made = Roots(
        suite,
        build=DebianRoot(package_stack, suite, "build", build_depends(REPO / "debian" / "control")),
        clean=DebianRoot(package_stack, suite, "clean"),
        # Its systemd-analyze judges the unit as that release's systemd would.
        systemd=DebianRoot(package_stack, suite, "systemd", ("systemd",)),
    )
    for root in (made.build, made.clean, made.systemd):
        root.ensure()
    return made


@pytest.fixture(scope="module")
def deb(roots: Roots, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rxfilterd_*.deb, built by scripts/build-deb in a fresh overlay on the build root."""
    out = tmp_path_factory.mktemp(f"deb-{roots.suite}")
    binds = [
        Bind(REPO, "/mnt/src", read_only=True),
        Bind(out, "/mnt/out"),
        Bind(roots.pip_cache, "/var/cache/pip"),
    ]
    env = {"PIP_CACHE_DIR": "/var/cache/pip"}
    env |= {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    if CA_BUNDLE.is_file():  # a host behind a TLS-inspecting proxy trusts its CA here
        binds.append(Bind(CA_BUNDLE, str(CA_BUNDLE), read_only=True))
        env["PIP_CERT"] = str(CA_BUNDLE)
    with Overlay(roots.build) as overlay:
        proc = overlay.run(["/mnt/src/scripts/build-deb", "/mnt/out"], binds=binds, env=env)
    assert proc.returncode == 0, f"build-deb failed:\n{proc.stdout[-8000:]}\n{proc.stderr}"
    debs = sorted(out.glob("rxfilterd_*.deb"))
    assert [d.name for d in debs] == [proc.stdout.strip().rsplit("/", 1)[-1]], proc.stdout
    return debs[0]
