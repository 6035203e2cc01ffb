"""A libvirtd of the tests' own, which a test may kill and restart.

Restarting the host's libvirtd would break every other real-stack test running on the
machine, so fault tests run their own: the same libvirtd binary and qemu.conf, in a
private mount namespace whose /etc/libvirt, /run/libvirt and /var/lib/libvirt are
directories under ``/run/<prefix>libvirtd``. Its socket is reachable from the host at
``<base>/run/libvirt-sock`` (see :attr:`PrivateLibvirtd.uri`), it sees only the domains
the tests start on it, and QEMU keeps running across its restarts exactly as it does
for the system one (the monitor sockets and status XML live in the bound directories).
stdio_handler = "file" lets QEMU log without the host's virtlogd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt

from tests.support.guest import prefix

_BINDS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt"}
_LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""


class PrivateLibvirtd:
    def __init__(self, base: Path | None = None) -> None:
        self.base = base or Path(f"/run/{prefix()}libvirtd")
        self.pid_file = self.base / "libvirtd.pid"
        self.uri = f"qemu:///system?socket={self.base / 'run' / 'libvirt-sock'}"

    # ------------------------------------------------------------------ process

    @property
    def pid(self) -> int | None:
        """The running libvirtd's pid (None when it is not running)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        return pid if comm == "libvirtd" else None

    def qemu_pid(self, domain: str) -> int:
        return int((self.base / "run" / "qemu" / f"{domain}.pid").read_text().strip())

    def start(self, timeout: float = 30.0) -> PrivateLibvirtd:
        for sub in _BINDS:
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        etc = self.base / "etc"
        qemu_conf = Path("/etc/libvirt/qemu.conf").read_text()
        (etc / "qemu.conf").write_text(qemu_conf + '\nstdio_handler = "file"\n')
        (etc / "libvirtd.conf").write_text(_LIBVIRTD_CONF)
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
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"private libvirtd at {self.uri} did not answer") from None
                time.sleep(0.05)
                continue
            conn.close()
            return self

    def kill(self, signum: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Send SIGNUM to our libvirtd and wait until it is gone."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd {pid} still running {timeout} s after {signum}")
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def connect(self) -> Any:
        return libvirt.open(self.uri)

    # ------------------------------------------------------------------ cleanup

    def destroy_domains(self) -> list[str]:
        """Destroy and undefine every domain (all of them are the tests')."""
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
        finally:
            conn.close()
        return removed

    def close(self) -> None:
        """Destroy our domains and stop our libvirtd (also one an aborted run left)."""
        self.destroy_domains()
        self.kill(signal.SIGTERM)
        shutil.rmtree(self.base, ignore_errors=True)
