"""A second libvirt: Debian 13's libvirtd 11.x and QEMU 10.x, from a root of its own.

``scripts/build-libvirt-root`` builds the root once into the cache (a
:class:`~tests.support.debian_root.DebianRoot`). :class:`RootLibvirtd`
runs its libvirtd chrooted in a mount namespace of its own, over an overlay so that the
cached root is never written and every run starts clean::

    /run/<prefix>libvirt11/             a tmpfs on the host (private propagation)
        mntns                           the namespace, kept by a bind of its ns file
        upper/ work/                    the overlay's writable half (logs, configs, state)
        run/                            the root's /run: the socket is run/libvirt/libvirt-sock

Inside the namespace the overlay is mounted on ``merged/`` and becomes the daemon's
root, with /dev and /sys bound recursively, its own /proc, and the directories that
hold the guest kernel (/var/cache/rxfilterd-test) and the guests' serial sockets
(/run/rxfilterd-test) bound at the same paths, so a domain XML means the same on both
libvirts. It shares the host's network namespace: macvtaps are host links. Restarting
the daemon (kill, then start) enters the same namespace, so its QEMUs live on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TextIO

from tests.support.debian_root import DebianRoot
from tests.support.guest import DEFAULT_GUEST_DIR, RUN_DIR, prefix
from tests.support.libvirtd import LIBVIRTD_CONF, SETUP_HOST_QEMU_CONF, STDIO_TO_FILE, LabLibvirtd

CACHE = Path(os.environ.get("RXFT_CACHE", "/var/cache/rxfilterd-test")) / "libvirt11"
PACKAGES = (
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-daemon-driver-network",
    "libvirt-clients",
    "qemu-system-x86",
)
# Made by scripts/build-libvirt-root (this module's main), kept at CACHE/trixie/libvirt.
LIBVIRT_ROOT = DebianRoot(CACHE, "trixie", "libvirt", PACKAGES)
ROOT = LIBVIRT_ROOT.path
BUILD_HINT = "run scripts/build-libvirt-root (scripts/setup-host does)"


def root_problem() -> str | None:
    """None when the cached root is complete, else why it cannot be used."""
    if not LIBVIRT_ROOT.built() or not (ROOT / "usr/sbin/libvirtd").is_file():
        return f"no complete libvirt 11 root at {ROOT}: {BUILD_HINT}"
    return None


class RootLibvirtd(LabLibvirtd):
    """libvirtd from the cached Debian 13 root. (Debian 13 ships no modular daemons:
    no virtqemud in any of its libvirt packages.)"""

    def __init__(self, base: Path | None = None) -> None:
        base = base or Path(f"/run/{prefix()}libvirt11")
        super().__init__(
            base, base / "run" / "libvirt" / "libvirt-sock", base / "run" / "libvirtd.pid"
        )
        self.ns_file = base / "mntns"
        self._lock: TextIO | None = None  # held shared while the overlay uses the root
        # The overlay's mount point, as the namespace sees it (also its processes' root).
        self.merged = base / "merged"

    @property
    def run_dir(self) -> Path:
        return self.base / "run" / "libvirt"

    @property
    def log_dir(self) -> Path:
        # What the daemon writes lands in the overlay's upper half, readable from here.
        return self.base / "upper" / "var" / "log" / "libvirt" / "qemu"

    # ------------------------------------------------------------------ namespace

    def _namespace_alive(self) -> bool:
        return self.ns_file.exists() and os.path.ismount(self.ns_file)

    def _make_namespace(self, timeout: float) -> None:
        problem = root_problem()
        if problem is not None:
            raise RuntimeError(problem)
        # A rebuild or a refresh of the root's package lists by another run waits for
        # us: the root is our overlay's lower half.
        if self._lock is None:
            self._lock = LIBVIRT_ROOT.hold()
        self.base.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(self.base):
            _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "rxft-libvirt11", str(self.base)])
        # A namespace can be kept by a bind of its ns file only on a private mount.
        _run(["mount", "--make-private", str(self.base)])
        for sub in ("upper", "work", "run", "merged"):
            (self.base / sub).mkdir(exist_ok=True)
        self.ns_file.touch()
        conf = self.base / "upper" / "etc" / "libvirt"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "qemu.conf").write_text(
            (ROOT / "etc/libvirt/qemu.conf").read_text() + SETUP_HOST_QEMU_CONF + STDIO_TO_FILE
        )
        (conf / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        m, b = self.merged, self.base
        guest_dir = DEFAULT_GUEST_DIR.parent
        script = f"""set -e
mount -t overlay rxft-libvirt11 -o lowerdir={ROOT},upperdir={b}/upper,workdir={b}/work {m}
mount --rbind /dev {m}/dev
mount --rbind /sys {m}/sys
mount -t proc proc {m}/proc
mount --bind {b}/run {m}/run
mkdir -p {m}{RUN_DIR} {m}{guest_dir} {m}/run/libvirt
mount --bind {RUN_DIR} {m}{RUN_DIR}
mount --bind {guest_dir} {m}{guest_dir}
"""
        _run(
            ["unshare", f"--mount={self.ns_file}", "--propagation", "private", "sh", "-c", script],
            timeout=timeout,
        )

    def _launch(self, timeout: float) -> None:
        if not self._namespace_alive():
            self._make_namespace(timeout)
        argv = [
            "/usr/sbin/libvirtd",
            "-d",
            "-p",
            "/run/libvirtd.pid",
            "-f",
            "/etc/libvirt/libvirtd.conf",
        ]
        _run(["nsenter", f"--mount={self.ns_file}", "chroot", str(self.merged), *argv], timeout)

    # ------------------------------------------------------------------ cleanup

    def processes(self) -> list[int]:
        """Every process in our mount namespace (the daemon, its QEMUs)."""
        try:
            ns = os.stat(self.ns_file).st_ino if self._namespace_alive() else None
        except OSError:
            ns = None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if ns is not None and os.stat(entry / "ns" / "mnt").st_ino == ns:
                    pids.append(int(entry.name))
                elif os.readlink(entry / "root") == str(self.merged):
                    pids.append(int(entry.name))  # our namespace's file is already gone
            except OSError:
                continue
        return pids

    def close(self) -> None:
        """Destroy our domains, stop the daemon and everything left in the namespace,
        and unmount it all (also what an interrupted run left)."""
        with contextlib.suppress(Exception):
            self.destroy_domains()
        with contextlib.suppress(RuntimeError):
            self.kill(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pids := self.processes():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of {self.base} outlived SIGKILL: {pids}")
            time.sleep(0.05)
        # The namespace (and every mount in it) ends with its last process and its file.
        if os.path.ismount(self.ns_file):
            _run(["umount", str(self.ns_file)])
        if os.path.ismount(self.base):
            _run(["umount", "-l", str(self.base)])
        with contextlib.suppress(OSError):
            self.base.rmdir()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _run(argv: list[str], timeout: float = 30.0) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")


def main() -> int:
    """Build the root when it is missing or stale (scripts/build-libvirt-root)."""
    path = LIBVIRT_ROOT.ensure()
    versions = subprocess.run(
        [
            "chroot",
            str(path),
            "dpkg-query",
            "-W",
            "-f=${Package} ${Version}\n",
            "libvirt-daemon",
            "qemu-system-x86",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    print(f"{path}: {', '.join(v for v in versions if v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
