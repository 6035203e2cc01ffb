"""rxfilterd's Debian package for the tests: the roots it is built and installed in, its
build (once per suite and session), and a copy repacked at a higher version.

Used by tests/package (a clean Debian 12 and 13, no systemd running) and tests/systemd
(Debian 12 booted with systemd as PID 1), so both judge the very same .deb. Roots are
:class:`~tests.support.debian_root.DebianRoot` s under ``/var/cache/rxfilterd-test/deb``
(``RXFT_DEB_CACHE`` overrides).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.support.debian_root import Bind, DebianRoot, Overlay

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path("/var/cache/rxfilterd-test/deb")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Passed on to pip in the build root, so it reaches PyPI the way this host does.
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "PIP_INDEX_URL")
# A host that boots (systemd-nspawn -b) and has what the package depends on, so that
# installing it there only unpacks it: pulling the dependencies is the clean root's test.
SYSTEMD_HOST = ("systemd", "systemd-sysv", "dbus", "python3", "libvirt0")
# What apt, dpkg and a running system keep on their own: not files of the package.
STATE = re.compile(r"^/(var/lib/(dpkg|apt)|var/cache/(apt|debconf|ldconfig)|var/log)(/|$)")


def deb_cache() -> Path:
    return Path(os.environ.get("RXFT_DEB_CACHE", DEFAULT_CACHE))


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


def build_root(cache: Path, suite: str) -> DebianRoot:
    """minbase plus debian/control's build dependencies: where scripts/build-deb runs."""
    return DebianRoot(cache, suite, "build", build_depends(REPO / "debian" / "control"))


def clean_root(cache: Path, suite: str) -> DebianRoot:
    """Nothing but debootstrap's minbase: apt must pull every dependency."""
    return DebianRoot(cache, suite, "clean")


def systemd_root(cache: Path, suite: str) -> DebianRoot:
    """The release's systemd, bootable as PID 1, and the package's dependencies."""
    return DebianRoot(cache, suite, "systemd", SYSTEMD_HOST)


def build_deb(cache: Path, suite: str, out: Path) -> Path:
    """rxfilterd_*.deb for SUITE, made by scripts/build-deb in a fresh overlay on its build
    root (the repository bound read-only), copied into OUT."""
    root = build_root(cache, suite)
    root.ensure()
    pip_cache = cache / suite / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    binds = [
        Bind(REPO, "/mnt/src", read_only=True),
        Bind(out, "/mnt/out"),
        Bind(pip_cache, "/var/cache/pip"),
    ]
    env = {"PIP_CACHE_DIR": "/var/cache/pip"}
    env |= {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    if CA_BUNDLE.is_file():  # a host behind a TLS-inspecting proxy trusts its CA here
        binds.append(Bind(CA_BUNDLE, str(CA_BUNDLE), read_only=True))
        env["PIP_CERT"] = str(CA_BUNDLE)
    with Overlay(root) as overlay:
        proc = overlay.run(["/mnt/src/scripts/build-deb", "/mnt/out"], binds=binds, env=env)
    assert proc.returncode == 0, f"build-deb failed:\n{proc.stdout[-8000:]}\n{proc.stderr}"
    debs = sorted(out.glob("rxfilterd_*.deb"))
    assert [d.name for d in debs] == [proc.stdout.strip().rsplit("/", 1)[-1]], proc.stdout
    return debs[0]


class PackageBuilds:
    """Each suite's .deb, built at most once per session, whichever tier asks first."""

    def __init__(self, cache: Path, out: Path) -> None:
        self.cache = cache
        self._out = out
        self._debs: dict[str, Path] = {}

    def deb(self, suite: str) -> Path:
        if suite not in self._debs:
            self._debs[suite] = build_deb(self.cache, suite, self._out / suite)
        return self._debs[suite]


def version_of(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()


def repack(deb: Path, version: str, out: Path) -> Path:
    """DEB's very files under another VERSION, in OUT: an upgrade to install over it."""
    old = version_of(deb)
    unpacked = out / f"unpacked-{version}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(unpacked)], check=True)
    control = unpacked / "DEBIAN" / "control"
    text = control.read_text()
    assert f"Version: {old}\n" in text, text
    control.write_text(text.replace(f"Version: {old}\n", f"Version: {version}\n"))
    bumped = out / deb.name.replace(f"_{old}_", f"_{version}_")
    assert bumped != deb
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(unpacked), str(bumped)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(unpacked)
    return bumped


def package_paths(deb: Path) -> set[str]:
    """The non-directory paths the .deb ships."""
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    paths = set()
    for line in listing.splitlines():
        if line.startswith("d"):
            continue
        name = line.split(None, 5)[5].split(" -> ")[0]
        paths.add(name.removeprefix("."))
    return paths
