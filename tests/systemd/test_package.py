"""The package's maintainer scripts on a host where systemd is PID 1.

tests/package installs the .deb where systemd does not run, so its scripts may only
enable the unit there. Here, in a container of its own booted from the same Debian 12
root as the rest of this tier: `apt install` enables and starts the unit (libvirt's
socket is reachable, so it gets to READY=1), an upgrade restarts it, `apt remove` stops
it, and `apt purge` leaves nothing of it. The tests run in file order on one container.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.container import CONFIG_PATH, PACKAGED_UNIT, SystemdContainer
from tests.support.deb_package import STATE, package_paths, repack, version_of
from tests.support.debian_root import DebianRoot
from tests.support.guest import prefixed
from tests.support.libvirtd import PrivateLibvirtd

pytestmark = pytest.mark.systemd

UNIT = "rxfilterd.service"
WANTS = "/etc/systemd/system/multi-user.target.wants/rxfilterd.service"


@dataclass
class Host:
    box: SystemdContainer
    deb: Path
    before: set[str]  # every path before the package came
    main_pid: str = ""  # the daemon's, as the last test left it


def files(box: SystemdContainer) -> set[str]:
    """Every path on the container's root filesystem (not /proc, /sys, /run, /tmp)."""
    return set(box.run("find", "/", "-xdev").stdout.splitlines())


def unit_state(box: SystemdContainer) -> dict[str, str]:
    return box.show(UNIT, "LoadState", "ActiveState", "SubState", "MainPID", "FragmentPath")


def alive(box: SystemdContainer, pid: str) -> bool:
    return box.run("test", "-d", f"/proc/{pid}", check=False).returncode == 0


@pytest.fixture(scope="module")
def host(libvirtd: PrivateLibvirtd, booted_root: DebianRoot, deb: Path) -> Iterator[Host]:
    box = SystemdContainer(prefixed("apt-host"), booted_root, libvirt_run=libvirtd.base / "run")
    try:
        box.start()
        yield Host(box, deb, files(box))
    finally:
        box.remove()


def test_install_enables_and_starts_the_unit(host: Host) -> None:
    box = host.box
    assert unit_state(box)["LoadState"] == "not-found"
    cursor = box.cursor()
    box.apt_install(host.deb)
    # postinst's start waits for READY=1, sent after the first reconcile with libvirt.
    now = unit_state(box)
    assert (now["ActiveState"], now["SubState"]) == ("active", "running"), now
    assert now["FragmentPath"] == str(PACKAGED_UNIT)
    assert box.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    assert box.run("readlink", WANTS).stdout.strip() == str(PACKAGED_UNIT)
    connected = box.wait_journal("EVENT=connected", after=cursor)
    assert connected["_PID"] == now["MainPID"]
    host.main_pid = now["MainPID"]


def test_upgrade_restarts_it(host: Host, tmp_path: Path) -> None:
    box = host.box
    old = host.main_pid
    assert old and alive(box, old)
    newer = f"{version_of(host.deb)}+test1"
    box.apt_install(repack(host.deb, newer, tmp_path))
    assert box.run("dpkg-query", "-W", "-f=${Version}", "rxfilterd").stdout == newer
    now = unit_state(box)
    assert now["ActiveState"] == "active" and now["MainPID"] not in ("0", old), (old, now)
    assert not alive(box, old)
    assert box.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    host.main_pid = now["MainPID"]


def test_remove_stops_it(host: Host) -> None:
    box = host.box
    pid = host.main_pid
    assert pid and alive(box, pid)
    cursor = box.cursor()
    box.run("apt", "remove", "-y", "rxfilterd")
    assert not alive(box, pid)
    now = unit_state(box)
    assert (now["LoadState"], now["ActiveState"]) == ("not-found", "inactive"), now
    # It was stopped (SIGTERM, its own clean shutdown), not left to die with the files.
    stopping = box.wait_journal("EVENT=stopping", after=cursor)
    assert stopping["_PID"] == pid
    assert box.run("test", "-e", "/usr/bin/rxfilterd", check=False).returncode != 0
    assert box.run("test", "-f", str(CONFIG_PATH), check=False).returncode == 0  # until purge


def test_purge_leaves_nothing(host: Host) -> None:
    box = host.box
    box.run("apt", "purge", "-y", "rxfilterd")
    after = files(box)
    assert [p for p in after if "rxfilterd" in p] == []
    assert package_paths(host.deb) & after == set()
    # What a running system changes by itself (its journal, apt's state and logs) aside.
    changed = sorted(p for p in after ^ host.before if not STATE.search(p))
    assert changed == []
    # systemd forgot it too (list-unit-files exits 1 when nothing matches).
    listed = box.systemctl("list-unit-files", "--no-legend", "rxfilterd*", check=False)
    assert "rxfilterd" not in listed.stdout, listed.stdout
