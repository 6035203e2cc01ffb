"""Fixtures for the systemd tier: one booted container per session with the Debian 12
package installed by apt, one guest per module.

Skips without root, systemd-nspawn, debootstrap or the real stack, and fails instead
when CI=true. The package and the container's root are tests/package's (built once per
session, tests/support/deb_package.py). Leftover containers and stack objects of an
interrupted run (named with RXFT_PREFIX) are removed at session start and everything is
removed at the end.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from tests.support.container import (
    CONFIG_PATH,
    DROPIN_DIR,
    SystemdContainer,
    cleanup_containers,
    container_problem,
)
from tests.support.deb_package import REPO, PackageBuilds, systemd_root
from tests.support.debian_root import DebianRoot
from tests.support.guest import (
    EthernetNic,
    Guest,
    Macvtap,
    Resources,
    cleanup_leftovers,
    prefix,
    prefixed,
    skip_or_fail,
    stack_problem,
)
from tests.support.libvirtd import PrivateLibvirtd

MAC0 = "52:54:00:51:00:01"
SUITE = "bookworm"  # systemd 252, as on the Debian 12 hypervisors the package is for


def shipped_config(**settings: str | float) -> str:
    """etc/rxfilterd.toml with SETTINGS changed: a key's first line, commented or not,
    in the whole file, or as ``SECTION.KEY`` in that section (``enabled`` is in several)."""
    text = (REPO / "etc/rxfilterd.toml").read_text()
    for key, value in settings.items():
        section, _, name = key.rpartition(".")
        start, end = 0, len(text)
        if section:
            header = re.search(rf"(?m)^\[{re.escape(section)}\]$", text)
            assert header, key
            start = header.end()
            following = re.search(r"(?m)^\[", text[start:])
            end = start + following.start() if following else end
        literal = f'"{value}"' if isinstance(value, str) and value not in TOML_BOOLS else value
        part, found = re.subn(
            rf"(?m)^(# )?{re.escape(name)} = .*$", f"{name} = {literal}", text[start:end], count=1
        )
        assert found, key
        text = text[:start] + part + text[end:]
    return text


TOML_BOOLS = ("true", "false")


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[PrivateLibvirtd]:
    """A libvirtd of this tier's own (the host's binary and qemu.conf).

    The host's libvirtd is shared: every rxfilterd another test run starts on it would
    sync our guest too (seen: a MAC written while the container's daemon was denied
    CAP_NET_ADMIN), and ours theirs. The container sees this one as its /run/libvirt.
    """
    problem = container_problem() or stack_problem()
    if problem is not None:
        skip_or_fail(problem)
    cleanup_containers()
    cleanup_leftovers()
    private = PrivateLibvirtd(Path(f"/run/{prefix()}sd-libvirtd"))
    private.close()
    try:
        yield private.start()
    finally:
        private.close()
        cleanup_leftovers()


@pytest.fixture(scope="session")
def booted_root(debian_roots: Path) -> DebianRoot:
    """Debian 12 with systemd and the package's dependencies, cached."""
    root = systemd_root(debian_roots, SUITE)
    root.ensure()
    return root


@pytest.fixture(scope="session")
def deb(package_builds: PackageBuilds) -> Path:
    """The Debian 12 package, built once per session (shared with tests/package)."""
    return package_builds.deb(SUITE)


@pytest.fixture(scope="session")
def container(
    libvirtd: PrivateLibvirtd, booted_root: DebianRoot, deb: Path
) -> Iterator[SystemdContainer]:
    """A booted Debian 12 with the package installed by apt, as the README says."""
    box = SystemdContainer(prefixed("nspawn"), booted_root, libvirt_run=libvirtd.base / "run")
    try:
        box.start()
        box.apt_install(deb)
        yield box
    finally:
        box.remove()


@dataclass(frozen=True)
class Lab:
    guest: Guest
    macvtap: Macvtap


@pytest.fixture(scope="module")
def lab(libvirtd: PrivateLibvirtd, container: SystemdContainer) -> Iterator[Lab]:
    """A guest whose trusted NIC sits on a type='ethernet' macvtap libvirt never syncs."""
    res = Resources()
    conn = libvirtd.connect()
    try:
        mvt = res.veth_macvtap("su", mac=MAC0)
        nic = EthernetNic(mvt.name, mac=MAC0, trust=True)
        guest = res.guest(prefixed("su"), [nic], conn=conn)
        yield Lab(guest, mvt)
    finally:
        res.close()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


@pytest.fixture
def unit(container: SystemdContainer) -> SystemdContainer:
    """rxfilterd stopped, no drop-ins, the shipped config: every test starts here."""
    container.systemctl("stop", "rxfilterd", check=False)
    container.systemctl("reset-failed", "rxfilterd", check=False)
    shutil.rmtree(container.path(DROPIN_DIR), ignore_errors=True)
    container.write(CONFIG_PATH, shipped_config(), 0o640)
    container.systemctl("daemon-reload")
    return container
