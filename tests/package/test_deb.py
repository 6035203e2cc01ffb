"""The Debian package, as an operator meets it: built, installed with apt on a clean
Debian 12 and 13 root, run, verified, upgraded and purged.

Each suite's tests share one overlay on its clean root and run in file order: install,
use, upgrade, purge. No systemd runs as PID 1 there, which is the case the maintainer
scripts must survive; the unit is judged by the release's own systemd-analyze in a second
root that has systemd installed.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.package.conftest import Roots
from tests.support.deb_package import STATE, package_paths, repack
from tests.support.debian_root import Bind, Overlay

pytestmark = pytest.mark.package

CONFIG = "/etc/rxfilterd/rxfilterd.toml"
WANTS = "/etc/systemd/system/multi-user.target.wants/rxfilterd.service"
MAX_EXPOSURE = 2.0
# The libvirt each release ships: libvirt-python must be built against it.
LIBVIRT_MAJOR = {"bookworm": 9, "trixie": 11}


@dataclass
class Root:
    """An overlay with a directory of .deb files seen at /mnt/deb."""

    overlay: Overlay
    debs: Path

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.overlay.run(argv, binds=[Bind(self.debs, "/mnt/deb", read_only=True)])

    def check(self, *argv: str) -> str:
        proc = self.run(*argv)
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def files(self) -> set[str]:
        """Every path on the root's own filesystem (not /proc, /dev, /run or binds)."""
        return set(self.check("find", "/", "-xdev").splitlines())

    def apt_install(self, deb: str, *options: str) -> str:
        """`apt install ./DEB` in the directory holding it, as the README says."""
        return self.check("sh", "-c", f"cd /mnt/deb && apt install -y {' '.join(options)} ./{deb}")

    def version(self) -> str:
        return self.check("dpkg-query", "-W", "-f=${Version}", "rxfilterd")


@dataclass
class Installed:
    root: Root
    deb: Path
    before: set[str]
    log: str


@pytest.fixture(scope="module")
def installed(roots: Roots, deb: Path) -> Iterator[Installed]:
    """The package installed with apt on a clean root; the file list from before."""
    with Overlay(roots.clean) as overlay:
        root = Root(overlay, deb.parent)
        before = root.files()
        yield Installed(root, deb, before, root.apt_install(deb.name))


def test_file_name_and_version(roots: Roots, deb: Path) -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version
    release = {"bookworm": "deb12", "trixie": "deb13"}[roots.suite]
    assert deb.name == f"rxfilterd_{version.group(1)}-1~{release}_amd64.deb"


def test_apt_pulls_every_dependency(installed: Installed) -> None:
    root = installed.root
    status = root.check("dpkg-query", "-W", "-f=${Status}", "rxfilterd")
    assert status == "install ok installed"
    depends = root.check("dpkg-query", "-W", "-f=${Depends}", "rxfilterd")
    names = [d.split("(")[0].strip() for d in depends.split(",")]
    assert "libvirt0" in names
    assert any(re.fullmatch(r"python3\.\d+", n) for n in names), depends
    for name in names:
        assert root.check("dpkg-query", "-W", "-f=${Status}", name) == "install ok installed"


def test_unit_enabled_without_systemd_running(installed: Installed) -> None:
    # No systemd as PID 1 here: postinst must only enable (a symlink), never start.
    root = installed.root
    (unit,) = [
        p for p in root.check("dpkg", "-L", "rxfilterd").splitlines() if p.endswith(".service")
    ]
    assert root.check("readlink", "-f", WANTS) == root.check("readlink", "-f", unit)


def test_help_on_path(installed: Installed) -> None:
    assert installed.root.check("sh", "-c", "command -v rxfilterd").strip() == "/usr/bin/rxfilterd"
    out = installed.root.check("rxfilterd", "--help")
    assert "check-config" in out


def test_venv_on_release_python_and_libvirt(roots: Roots, installed: Installed) -> None:
    out = installed.root.check(
        "/opt/rxfilterd/bin/python",
        "-c",
        "import sys, libvirt, libvirt_qemu, libvirtaio, pyroute2, structlog, aiomqtt,"
        " prometheus_client, rxfilterd;"
        "print(sys.executable, '%d.%d' % sys.version_info[:2], libvirt.getVersion())",
    )
    executable, python, libvirt_version = out.split()
    assert executable == "/opt/rxfilterd/bin/python"
    depends = installed.root.check("dpkg-query", "-W", "-f=${Depends}", "rxfilterd")
    assert f"python{python}" in re.split(r"[,\s]+", depends)
    assert int(libvirt_version) // 1_000_000 == LIBVIRT_MAJOR[roots.suite]


def test_check_config_on_shipped_file(installed: Installed) -> None:
    installed.root.check("rxfilterd", "check-config", "--config", CONFIG)
    mode = installed.root.check("stat", "-c", "%a %U %G", CONFIG).strip()
    assert mode == "640 root root"


def test_running_it_writes_nothing_into_the_venv(installed: Installed) -> None:
    # Bytecode is shipped and valid, so the runs above wrote no __pycache__ of their own.
    shipped = set(installed.root.check("dpkg", "-L", "rxfilterd").splitlines())
    present = set(installed.root.check("find", "/opt/rxfilterd").splitlines())
    assert present - shipped == set()


def test_upgrade_keeps_edited_config(installed: Installed) -> None:
    root = installed.root
    root.check("sed", "-i", 's/^level = "info"/level = "debug"/', CONFIG)
    root.check("sh", "-c", f"echo '# edited by the operator' >>{CONFIG}")
    edited = root.check("cat", CONFIG)
    assert 'level = "debug"' in edited

    # Over itself: the same version again.
    old = root.version()
    root.apt_install(installed.deb.name, "--reinstall")
    assert root.version() == old
    assert root.check("cat", CONFIG) == edited

    # And to a newer version: the same files repacked under a higher version number.
    newer = f"{old}+test1"
    bumped = repack(installed.deb, newer, installed.deb.parent)
    try:
        root.apt_install(bumped.name)
        assert root.version() == newer
    finally:
        bumped.unlink()
    assert root.check("cat", CONFIG) == edited
    assert "/etc/rxfilterd/" not in root.check("find", "/etc/rxfilterd", "-name", "*.dpkg-*")
    root.check("rxfilterd", "check-config", "--config", CONFIG)
    root.check("readlink", WANTS)


def test_purge_leaves_nothing_of_the_package(installed: Installed) -> None:
    root = installed.root
    root.check("apt", "purge", "-y", "rxfilterd")
    proc = root.run("dpkg-query", "-W", "-f=${Status}", "rxfilterd")
    assert proc.returncode != 0 or proc.stdout.startswith("unknown ok not-installed"), proc.stdout
    after = root.files()
    assert [p for p in after if "rxfilterd" in p] == []
    assert package_paths(installed.deb) & after == set()


def test_install_and_purge_change_nothing_else(roots: Roots, deb: Path) -> None:
    """With its dependencies already there, install, use and purge leave the root as it was."""
    with Overlay(roots.clean) as overlay:
        root = Root(overlay, deb.parent)
        depends = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True
        ).stdout.strip()
        root.check("apt-get", "satisfy", "-y", depends)
        before = root.files()
        root.apt_install(deb.name)
        root.check("rxfilterd", "check-config", "--config", CONFIG)
        root.check("apt", "purge", "-y", "rxfilterd")
        after = root.files()
    changed = sorted(p for p in after ^ before if not STATE.search(p))
    assert changed == []
    assert [p for p in after if "rxfilterd" in p] == []


@pytest.fixture(scope="module")
def unit(roots: Roots, deb: Path) -> Iterator[tuple[Root, str]]:
    """The package installed where the release's systemd is; the unit's installed path."""
    with Overlay(roots.systemd) as overlay:
        root = Root(overlay, deb.parent)
        root.apt_install(deb.name)
        units = [
            p
            for p in root.check("dpkg", "-L", "rxfilterd").splitlines()
            if p.endswith("/rxfilterd.service")
        ]
        assert len(units) == 1, units
        yield root, units[0]


def test_unit_where_the_release_puts_units(unit: tuple[Root, str]) -> None:
    root, path = unit
    journald = [
        p
        for p in root.check("dpkg", "-L", "systemd").splitlines()
        if p.endswith("/systemd/system/systemd-journald.service")
    ]
    assert journald, "systemd ships no systemd-journald.service?"
    assert Path(path).parent == Path(journald[0]).parent


def test_unit_runs_the_packaged_daemon(unit: tuple[Root, str]) -> None:
    root, path = unit
    text = root.check("cat", path)
    assert re.findall(r"^ExecStart=(\S+)", text, re.M) == ["/usr/bin/rxfilterd"]
    # The source's /usr/local/bin (the venv install) is rewritten on every Exec line.
    assert re.findall(r"^[^#]*/usr/local.*", text, re.M) == []
    assert root.check("systemctl", "is-enabled", "rxfilterd.service").strip() == "enabled"


def test_systemd_analyze_verify(unit: tuple[Root, str]) -> None:
    root, path = unit
    proc = root.run("systemd-analyze", "verify", path)
    output = proc.stdout + proc.stderr
    # Unknown keys and bad values are only warnings (exit 0): read the output.
    warnings = [line for line in output.splitlines() if "rxfilterd" in line]
    assert warnings == [], output
    assert proc.returncode == 0, output


def test_systemd_analyze_security(unit: tuple[Root, str]) -> None:
    root, path = unit
    out = root.check("systemd-analyze", "security", "--offline=true", "--no-pager", path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= MAX_EXPOSURE, out
