"""libvirtds of the tests' own, which a test may kill and restart.

Restarting the host's libvirtd would break every other real-stack test running on the
machine, so fault tests run their own. :class:`LabLibvirtd` holds what every such daemon
shares: a base directory named with the test prefix, a socket reachable from the host
(:attr:`LabLibvirtd.uri`), start/kill/close, and cleanup of domains that are all the
tests'. QEMU keeps running across its daemon's restarts exactly as it does for the
system one (its monitor socket and status XML live in the daemon's own directories).

:class:`PrivateLibvirtd` is the host's libvirtd binary (9.0) in a private mount
namespace whose /etc/libvirt, /run/libvirt and /var/lib/libvirt are directories under
``/run/<prefix>libvirtd``. ``tests/support/libvirt_root.py`` runs another libvirt
(Debian 13's 11.x) the same way, from a root of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import libvirt

from tests.support.guest import LibvirtTarget, prefix

# The qemu.conf settings scripts/setup-host gives the host's libvirtd (no systemd, no
# cgroups, root-owned QEMU): keep the two lists alike.
SETUP_HOST_QEMU_CONF = """
user = "root"
group = "root"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
remember_owner = 0
"""
# QEMU logs to a file itself, so a lab daemon needs no virtlogd.
STDIO_TO_FILE = '\nstdio_handler = "file"\n'

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""


def wait_answers(uri: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Until a libvirt connection to URI opens; fails at once when ALIVE() says it died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            if not alive():
                raise RuntimeError(f"libvirtd for {uri} exited: {exc}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd at {uri} did not answer in {timeout} s") from None
            time.sleep(0.05)
            continue
        conn.close()
        return


class LabLibvirtd:
    """A libvirtd the tests own: subclasses say where it lives and how it starts."""

    daemon = "libvirtd"  # its /proc/PID/comm

    def __init__(self, base: Path, socket_path: Path, pid_file: Path) -> None:
        self.base = base
        self.socket_path = socket_path
        self.pid_file = pid_file
        self.uri = f"qemu:///system?socket={socket_path}"

    # ------------------------------------------------------------------ paths

    @property
    def run_dir(self) -> Path:
        """What the daemon sees as /run/libvirt."""
        raise NotImplementedError

    @property
    def log_dir(self) -> Path:
        """What the daemon sees as /var/log/libvirt/qemu (the domains' logs)."""
        raise NotImplementedError

    def qemu_pid(self, domain: str) -> int:
        return int((self.run_dir / "qemu" / f"{domain}.pid").read_text().strip())

    def target(self, label: str) -> LibvirtTarget:
        """This daemon as the libvirt under test (see tests.support.guest.use_libvirt)."""
        return LibvirtTarget(label, self.uri, self.log_dir)

    # ------------------------------------------------------------------ process

    @property
    def pid(self) -> int | None:
        """The running daemon's pid (None when it is not running)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        return pid if comm == self.daemon else None

    def _launch(self, timeout: float) -> None:
        """Start the daemon process (it daemonizes and writes pid_file)."""
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> Self:
        self._launch(timeout)
        # `-d` returns once the daemon has written its pid file.
        wait_answers(self.uri, timeout, lambda: self.pid is not None)
        return self

    def kill(self, signum: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Send SIGNUM to our daemon and wait until it is gone."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.daemon} {pid} still running {timeout} s after {signum}")
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def connect(self) -> Any:
        return libvirt.open(self.uri)

    def version(self) -> tuple[int, int, int]:
        """The daemon's libvirt version (major, minor, micro)."""
        conn = self.connect()
        try:
            v = int(conn.getLibVersion())
        finally:
            conn.close()
        return v // 1_000_000, v // 1000 % 1000, v % 1000

    # ------------------------------------------------------------------ cleanup

    def destroy_domains(self) -> list[str]:
        """Destroy and undefine every domain and network (all of them are the tests')."""
        removed: list[str] = []
        if self.pid is None:
            return removed
        conn = self.connect()
        try:
            for dom in conn.listAllDomains(0):
                name = str(dom.name())
                with contextlib.suppress(libvirt.libvirtError):
                    with contextlib.suppress(ProcessLookupError, OSError, ValueError):
                        os.kill(self.qemu_pid(name), signal.SIGCONT)  # a test may stop it
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
                removed.append(name)
            for net in conn.listAllNetworks(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if net.isActive():
                        net.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    net.undefine()
                removed.append(str(net.name()))
        finally:
            conn.close()
        return removed

    def close(self) -> None:
        """Destroy our domains and stop our daemon (also one an aborted run left)."""
        self.destroy_domains()
        self.kill(signal.SIGTERM)
        shutil.rmtree(self.base, ignore_errors=True)


_BINDS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt"}


class PrivateLibvirtd(LabLibvirtd):
    """The host's libvirtd binary on directories of its own, in a private mount namespace.

    stdio_handler = "file" lets QEMU log without the host's virtlogd; its logs go to the
    host's /var/log/libvirt/qemu.
    """

    def __init__(self, base: Path | None = None) -> None:
        base = base or Path(f"/run/{prefix()}libvirtd")
        super().__init__(base, base / "run" / "libvirt-sock", base / "libvirtd.pid")

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def log_dir(self) -> Path:
        return Path("/var/log/libvirt/qemu")

    def _launch(self, timeout: float) -> None:
        for sub in _BINDS:
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        etc = self.base / "etc"
        qemu_conf = Path("/etc/libvirt/qemu.conf").read_text()
        (etc / "qemu.conf").write_text(qemu_conf + STDIO_TO_FILE)
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        mounts = " && ".join(
            f"mount --bind {self.base / sub} {target}" for sub, target in _BINDS.items()
        )
        script = f"{mounts} && exec libvirtd -d -p {self.pid_file} -f {etc / 'libvirtd.conf'}"
        subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
