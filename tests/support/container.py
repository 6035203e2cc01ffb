"""A real systemd as PID 1: a Debian 12 container booted with systemd-nspawn.

The root is a cached :class:`~tests.support.debian_root.DebianRoot` with systemd in it
(tests/support/deb_package.py's ``systemd_root``); each :class:`SystemdContainer` boots a
fresh overlay of it, so a run starts from a clean system and leaves the cache untouched.
rxfilterd gets into it as operators install it: ``apt install ./rxfilterd_*.deb``.
It shares the host's network namespace and ``/run/libvirt``: the daemon inside talks to
the host's libvirtd and changes the host's macvtaps, as on a hypervisor. Commands run
inside with ``nsenter`` into its systemd's namespaces.

Everything is named with the test prefix; :func:`cleanup_containers` removes what an
interrupted run left (its nspawn and systemd processes, overlay mount, run directory
``/var/tmp/<name>.container``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from tests.support.debian_root import DebianRoot
from tests.support.guest import prefix

RUN_PARENT = Path("/var/tmp")  # not /tmp: the container mounts its own there
# nspawn keeps per-machine state there and refuses to clean it on a disk /run.
NSPAWN_STATE = Path("/run/systemd/nspawn")
MARK = "RXFT_CONTAINER"  # set in the container's PID 1 environment, to find it again
INSIDE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "DEBIAN_FRONTEND": "noninteractive",
}
# Where Debian 12's debhelper installs a package's unit, and the package's config.
PACKAGED_UNIT = Path("/lib/systemd/system/rxfilterd.service")
CONFIG_PATH = Path("/etc/rxfilterd/rxfilterd.toml")
DROPIN_DIR = Path("/etc/systemd/system/rxfilterd.service.d")
DEB_DIR = Path("/var/tmp/debs")  # where a .deb is put to be installed from


class ContainerError(RuntimeError):
    """The container did not boot or a command in it failed."""


def container_problem() -> str | None:
    """None when a systemd container can boot here, else why not."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, overlay mounts)"
    missing = [t for t in ("systemd-nspawn", "nsenter", "mount") if shutil.which(t) is None]
    if missing:
        return f"missing host tools: {', '.join(missing)} (scripts/setup-host installs them)"
    return None


# --------------------------------------------------------------------------- processes


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, comm) for every process."""
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        stat = _read(d / "stat").decode(errors="replace")
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        head, _, rest = stat.rpartition(")")
        if not rest:
            continue
        out[int(d.name)] = (int(rest.split()[1]), head.partition("(")[2])
    return out


def _marked(name: str) -> list[int]:
    """Top-most processes whose environment carries this container's mark (its PID 1)."""
    mark = f"{MARK}={name}".encode()
    procs = _processes()
    hits = {pid for pid in procs if mark in _read(Path(f"/proc/{pid}/environ")).split(b"\0")}
    return sorted(pid for pid in hits if procs[pid][0] not in hits)


def _nspawns(name: str) -> list[int]:
    """systemd-nspawn processes started for machine NAME."""
    want = f"--machine={name}".encode()
    found = []
    for pid, (_ppid, comm) in _processes().items():
        if comm == "systemd-nspawn" and want in _read(Path(f"/proc/{pid}/cmdline")).split(b"\0"):
            found.append(pid)
    return found


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in pids if Path(f"/proc/{p}").exists()]:
            return True
        time.sleep(0.1)
    return False


def _kill(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _mounted(path: Path) -> bool:
    target = str(path).encode()
    return any(
        line.split()[4] == target for line in _read(Path("/proc/self/mountinfo")).splitlines()
    )


def _on_tmpfs(path: Path) -> bool:
    res = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return res.stdout.strip() == "tmpfs"


def _seqnum(cursor: str) -> int:
    """The entry's sequence number in the journal's cursor (``...;i=<hex>;...``)."""
    found = re.search(r"(?:^|;)i=([0-9a-f]+)", cursor)
    if found is None:
        raise ValueError(f"not a journal cursor: {cursor!r}")
    return int(found.group(1), 16)


def run_dir(name: str) -> Path:
    return RUN_PARENT / f"{name}.container"


def cleanup_containers(name_prefix: str | None = None) -> list[str]:
    """Remove every container of ours (named with the prefix): processes, overlay, files."""
    p = prefix() if name_prefix is None else name_prefix
    if not p:
        raise ValueError("refusing to clean up with an empty prefix")
    removed = []
    for d in sorted(RUN_PARENT.glob(f"{p}*.container")):
        name = d.name.removesuffix(".container")
        nspawns, inits = _nspawns(name), _marked(name)
        # SIGKILL on the container's PID 1 ends its whole PID namespace.
        _kill(inits + nspawns, signal.SIGKILL)
        _wait_gone(inits + nspawns, 10)
        if _mounted(d / "merged"):
            subprocess.run(["umount", "-l", str(d / "merged")], check=False)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"container {name}")
    return removed


# --------------------------------------------------------------------------- container


class SystemdContainer:
    """A booted Debian 12 with systemd 252 as its PID 1, on an overlay of the cached root."""

    def __init__(
        self, name: str, root: DebianRoot, libvirt_run: Path = Path("/run/libvirt")
    ) -> None:
        self.name = name
        self.root = root  # ensured by the caller
        self.libvirt_run = libvirt_run  # the host directory the container sees as /run/libvirt
        self.dir = run_dir(name)
        self.merged = self.dir / "merged"
        self.pid: int | None = None  # the container's systemd, as seen from the host
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._lock: TextIO | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 90.0) -> SystemdContainer:
        cleanup_containers(self.name)
        try:
            self._boot(timeout)
        except BaseException:
            self.remove()
            raise
        return self

    def _boot(self, timeout: float) -> None:
        # A rebuild of the root by another run waits until this container is gone.
        self._lock = self.root.hold()
        upper, work = self.dir / "upper", self.dir / "work"
        for d in (upper, work, self.merged):
            d.mkdir(parents=True)
        opts = f"lowerdir={self.root.path},upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "rxfilterd-test", "-o", opts, str(self.merged)],
            check=True,
            capture_output=True,
        )
        NSPAWN_STATE.mkdir(parents=True, exist_ok=True)
        if not _on_tmpfs(NSPAWN_STATE):
            # Only where /run is a disk (no systemd as PID 1: a systemd host's /run is a
            # tmpfs already). Left mounted afterwards: empty, shared by any nspawn here.
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "mode=0755", "nspawn-state", str(NSPAWN_STATE)],
                check=True,
            )
        with (self.dir / "console.log").open("ab") as console:
            self._nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "-q",
                    # Without these two it waits for a host bus that is not there.
                    "--register=no",
                    "--keep-unit",
                    "-D",
                    str(self.merged),
                    f"--machine={self.name}",
                    f"--setenv={MARK}={self.name}",
                    # The host network namespace: nspawn's default set lacks NET_ADMIN.
                    "--capability=CAP_NET_ADMIN",
                    f"--bind={self.libvirt_run}:/run/libvirt",
                    "--console=read-only",
                    "-b",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.pid is None:
            if self._nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited: {self.console_tail()}")
            marked = _marked(self.name)
            if marked and _processes().get(marked[0], (0, ""))[1] == "systemd":
                self.pid = marked[0]
            elif time.monotonic() > deadline:
                raise ContainerError(f"no systemd in the container: {self.console_tail()}")
            else:
                time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded"):
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if time.monotonic() > deadline:
                raise ContainerError(f"system state {state!r}: {self.console_tail()}")
            time.sleep(0.2)
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise ContainerError(f"container booted degraded:\n{failed}")

    def console_tail(self) -> str:
        return _read(self.dir / "console.log").decode(errors="replace")[-3000:]

    def remove(self) -> None:
        """Power off (SIGTERM to nspawn), else kill; unmount and delete the overlay."""
        nspawn, self._nspawn = self._nspawn, None
        pids = ([nspawn.pid] if nspawn is not None else []) + _marked(self.name)
        if nspawn is not None and nspawn.poll() is None:
            nspawn.terminate()  # nspawn asks the container's systemd to halt
            with contextlib.suppress(subprocess.TimeoutExpired):
                nspawn.wait(timeout=30)
        _kill(pids, signal.SIGKILL)
        _wait_gone(pids, 10)
        if nspawn is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                nspawn.wait(timeout=5)
        self.pid = None
        cleanup_containers(self.name)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> SystemdContainer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    # ------------------------------------------------------------------ inside

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        if self.pid is None:
            raise ContainerError("container is not running")
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid), "-a", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=INSIDE_ENV,
        )

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGV inside the container (all its namespaces, its root)."""
        if self.pid is None:
            raise ContainerError("container is not running")
        res = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=INSIDE_ENV,
        )
        if check and res.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}{res.stderr}"
            )
        return res

    def path(self, inside: Path | str) -> Path:
        """The host path of a file in the container's root (its overlay)."""
        return self.merged / Path(inside).relative_to("/")

    def write(self, inside: Path | str, text: str, mode: int = 0o644) -> None:
        p = self.path(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(mode)

    def apt_install(self, deb: Path, *options: str) -> str:
        """``apt install ./DEB`` run inside, in the directory holding it, as the README
        says; DEB is deleted from the container afterwards. apt's output."""
        self.write(DEB_DIR / deb.name, "")
        shutil.copyfile(deb, self.path(DEB_DIR / deb.name))
        try:
            command = f"cd {DEB_DIR} && apt install -y {' '.join(options)} ./{deb.name}"
            res = self.run("sh", "-c", command, timeout=600)
        finally:
            shutil.rmtree(self.path(DEB_DIR))
        return res.stdout + res.stderr

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)

    def cursor(self) -> str:
        """The journal's current end, for :meth:`journal` ``after=``."""
        out = self.run("journalctl", "-n", "0", "--show-cursor", "-q").stdout
        for line in out.splitlines():
            if line.startswith("-- cursor: "):
                return line.removeprefix("-- cursor: ").strip()
        # An empty journal has no cursor yet: everything is "after".
        return ""

    def journal(self, *matches: str, after: str = "", unit: str = "rxfilterd") -> list[Any]:
        """``journalctl -u UNIT MATCHES -o json`` entries (after cursor AFTER)."""
        # Not --after-cursor: with matches, journalctl 252 skips the first match after it.
        args = ["journalctl", "-u", unit, "-o", "json", "--no-pager", "-q"]
        out = self.run(*args, *matches).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        if after:
            entries = [e for e in entries if _seqnum(e["__CURSOR"]) > _seqnum(after)]
        return entries

    def wait_journal(
        self, *matches: str, after: str = "", timeout: float = 30.0, what: str = ""
    ) -> Any:
        """The first entry matching MATCHES (after AFTER), waiting up to TIMEOUT."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.journal(*matches, after=after)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                tail = "\n".join(e.get("MESSAGE", "") for e in self.journal(after=after)[-30:])
                raise AssertionError(
                    f"no journal entry {what or ' '.join(matches)} in {timeout} s; unit log:\n"
                    + tail
                )
            time.sleep(0.2)
