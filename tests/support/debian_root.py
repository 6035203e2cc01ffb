"""Cached Debian roots (debootstrap minbase plus packages) and throwaway overlays on them.

A :class:`DebianRoot` is a directory tree made once by ``debootstrap --variant=minbase`` for
a suite, copied and given extra packages, and kept under a cache directory; the next run
reuses it (its package lists are refreshed once a day). An :class:`Overlay` runs commands
chrooted in a writable overlayfs on top of it, so every run starts from the same clean
root and leaves the cache untouched.

Each command runs in a private mount namespace of its own (``unshare --mount``): the
overlay, /proc, /sys, /dev, a tmpfs /run and any binds exist only while it runs, so an
interrupted run leaves no mount behind, only its upper directory, which
:func:`remove_leftover_overlays` deletes.

Usage from a shell (prints the root's path; builds it when missing)::

    python -m tests.support.debian_root CACHE SUITE NAME [PACKAGE...]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TextIO

from tests.support.guest import prefix

DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Package lists older than this are refreshed before a root is handed out (the mirror
# drops superseded versions, and apt would then fail to download them).
LISTS_MAX_AGE = 24 * 3600.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OVERLAY_PARENT = Path("/var/tmp")
# Keeps maintainer scripts from starting daemons while a cached root is being made.
POLICY_RC_D = "#!/bin/sh\nexit 101\n"


class RootError(RuntimeError):
    """A root could not be made, or a command in it failed."""


def host_mirror(sources: Sequence[Path] = ()) -> str:
    """The Debian mirror this host's apt uses (its first ``.../debian`` URI), else the CDN."""
    files = list(sources) or [
        Path("/etc/apt/sources.list"),
        *sorted(Path("/etc/apt/sources.list.d").glob("*")),
    ]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        # One-line ("deb URI suite ...") and deb822 ("URIs: URI ...") formats.
        for match in re.finditer(r"^\s*(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            uri = match.group(1).rstrip("/")
            if uri.startswith(("http://", "https://")) and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def _run(argv: Sequence[str], *, timeout: float, what: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RootError(f"{what} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def _lock_file(lock: Path, mode: int) -> TextIO | None:
    """LOCK, opened and flock()ed in MODE; None when MODE has LOCK_NB and it is taken."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = lock.open("a")
    try:
        fcntl.flock(f, mode)
    except BlockingIOError:
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    return f


@contextlib.contextmanager
def _locked(lock: Path, mode: int = fcntl.LOCK_EX) -> Iterator[bool]:
    """Hold LOCK in MODE; yields False (not held) when MODE has LOCK_NB and it is taken."""
    f = _lock_file(lock, mode)
    try:
        yield f is not None
    finally:
        if f is not None:
            f.close()


@dataclass(frozen=True)
class Bind:
    """A host directory or file seen at ``target`` inside the root."""

    source: Path
    target: str
    read_only: bool = False


def chroot_script(
    root: Path,
    argv: Sequence[str],
    *,
    overlay: tuple[Path, Path] | None = None,
    lower: Path | None = None,
    binds: Sequence[Bind] = (),
    env: Mapping[str, str] | None = None,
) -> str:
    """The shell script that mounts the root's world and execs ``argv`` chrooted in it.

    Meant for ``unshare --mount --propagation private``: every mount dies with it.
    """
    q = shlex.quote
    lines = ["set -e"]
    if overlay is not None:
        assert lower is not None
        upper, work = overlay
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        lines.append(f"mount -t overlay overlay -o {q(opts)} {q(str(root))}")
    r = q(str(root))
    lines += [
        f"mount -t proc proc {r}/proc",
        f"mount --rbind /sys {r}/sys",
        f"mount --rbind /dev {r}/dev",
        f"mount -t tmpfs -o mode=0755 tmpfs {r}/run",
    ]
    for bind in binds:
        target = q(str(root) + "/" + bind.target.lstrip("/"))
        make = "mkdir -p" if bind.source.is_dir() else "touch"
        lines.append(f"[ -e {target} ] || {make} {target}")
        lines.append(f"mount --bind {q(str(bind.source))} {target}")
        if bind.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    variables = {
        "PATH": PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        **(env or {}),
    }
    assignments = " ".join(q(f"{k}={v}") for k, v in variables.items())
    command = " ".join(q(a) for a in argv)
    lines.append(f"exec chroot {r} /usr/bin/env -i {assignments} {command}")
    return "\n".join(lines) + "\n"


def run_chrooted(
    root: Path,
    argv: Sequence[str],
    *,
    overlay: tuple[Path, Path] | None = None,
    lower: Path | None = None,
    binds: Sequence[Bind] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 900.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` chrooted in ``root`` (an overlay on ``lower`` if given); never raises on
    the command's exit status."""
    script = chroot_script(root, argv, overlay=overlay, lower=lower, binds=binds, env=env)
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _checked(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        raise RootError(f"{what} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@dataclass(frozen=True)
class DebianRoot:
    """A cached root: ``debootstrap --variant=minbase SUITE`` plus ``packages``.

    Kept at ``cache/SUITE/NAME``; the suite's bare minbase at ``cache/SUITE/minbase``,
    downloaded packages under ``cache/SUITE/archives`` (shared with overlays, so that
    installs in them do not download again).
    """

    cache: Path
    suite: str
    name: str
    packages: tuple[str, ...] = ()
    mirror: str = field(default_factory=host_mirror)

    def __post_init__(self) -> None:
        for part in (self.suite, self.name):
            if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", part) or part == "minbase":
                raise ValueError(f"bad suite or root name: {part!r}")

    @property
    def path(self) -> Path:
        return self.cache / self.suite / self.name

    @property
    def archives(self) -> Path:
        return self.cache / self.suite / "archives"

    def archives_bind(self) -> Bind:
        """apt's download cache, kept across runs."""
        (self.archives / "partial").mkdir(parents=True, exist_ok=True)
        return Bind(self.archives, "/var/cache/apt/archives")

    def _spec(self) -> dict[str, object]:
        return {"suite": self.suite, "mirror": self.mirror, "packages": sorted(self.packages)}

    def _stamp(self, root: Path) -> Path:
        # Beside the root, not in it: the root holds only what debootstrap and apt put there.
        return root.with_name(f".{root.name}.json")

    @property
    def _lock(self) -> Path:
        # Held exclusively to build or refresh the root, shared while anything uses it as
        # an overlay's lower layer (changing that under a mounted overlay is undefined).
        return self.cache / self.suite / f".{self.name}.lock"

    def _state(self) -> str:
        """'fresh', 'stale' (package lists older than a day) or 'missing' (or outdated)."""
        try:
            stamp = json.loads(self._stamp(self.path).read_text())
        except (OSError, ValueError):
            return "missing"
        if stamp.get("spec") != self._spec():
            return "missing"
        if time.time() - float(stamp.get("lists", 0)) > LISTS_MAX_AGE:
            return "stale"
        return "fresh"

    def ensure(self) -> Path:
        """The root's path, made (or refreshed) first if needed. Takes minutes when cold."""
        with _locked(self._lock, fcntl.LOCK_SH):
            state = self._state()
        if state == "stale":
            # Not while an overlay or a container sits on it (possibly this very process's):
            # it keeps yesterday's lists until the next run finds it unused.
            with _locked(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
                if held and self._state() == "stale":
                    self._apt(self.path, ["apt-get", "update", "-qq"])
                    self._write_stamp(self.path)
        elif state == "missing":
            with _locked(self._lock):
                if self._state() == "missing":
                    self._build()
        return self.path

    def built(self) -> bool:
        """True when a finished build of this spec is there (its lists may be stale)."""
        return self._state() != "missing"

    def hold(self) -> TextIO:
        """A shared lock on the root, to close when no overlay uses it any more: a rebuild
        by another run waits for it. Call after :meth:`ensure`."""
        f = _lock_file(self._lock, fcntl.LOCK_SH)
        assert f is not None
        return f

    def _write_stamp(self, root: Path) -> None:
        self._stamp(root).write_text(json.dumps({"spec": self._spec(), "lists": time.time()}))

    def _apt(self, root: Path, argv: list[str]) -> str:
        proc = run_chrooted(root, argv, binds=[self.archives_bind()])
        return _checked(proc, f"{' '.join(argv)} in {root}")

    def _minbase(self) -> Path:
        base = self.cache / self.suite / "minbase"
        with _locked(self.cache / self.suite / ".minbase.lock"):
            if (base / "etc" / "debian_version").exists() and (base / ".complete").exists():
                return base
            shutil.rmtree(base, ignore_errors=True)
            downloads = self.cache / self.suite / "debootstrap"
            downloads.mkdir(parents=True, exist_ok=True)
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--cache-dir={downloads}",
                    self.suite,
                    str(base),
                    self.mirror,
                ],
                timeout=1800,
                what=f"debootstrap {self.suite}",
            )
            (base / ".complete").touch()
        return base

    def _build(self) -> None:
        base = self._minbase()
        tmp = self.path.with_name(f".{self.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["cp", "-a", str(base), str(tmp)], timeout=600, what="copying the minbase")
        (tmp / ".complete").unlink()
        shutil.copyfile("/etc/resolv.conf", tmp / "etc" / "resolv.conf")
        policy = tmp / "usr" / "sbin" / "policy-rc.d"
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        self._apt(tmp, ["apt-get", "update", "-qq"])
        if self.packages:
            self._apt(
                tmp,
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *self.packages],
            )
        policy.unlink()
        # A template, as cloud images are: each system booted from it (tests/systemd's
        # containers) makes its own machine id at first boot.
        machine_id = tmp / "etc" / "machine-id"
        if machine_id.exists():
            machine_id.write_text("")
        self._stamp(self.path).unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        tmp.rename(self.path)
        self._write_stamp(self.path)

    def overlay(self) -> Overlay:
        """A fresh writable overlay on this root (call :meth:`ensure` first)."""
        return Overlay(self)


class Overlay:
    """A writable, throwaway overlayfs on a cached root; a context manager.

    Named ``<prefix>root-*`` under /var/tmp: :func:`remove_leftover_overlays` clears those
    an interrupted run left.
    """

    def __init__(self, root: DebianRoot) -> None:
        self.root = root
        self._hold = root.hold()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{prefix()}root-", dir=OVERLAY_PARENT))
        self.upper = self.dir / "upper"
        self._work = self.dir / "work"
        self._merged = self.dir / "merged"
        for d in (self.upper, self._work, self._merged):
            d.mkdir()

    def __enter__(self) -> Overlay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._hold.close()

    def run(
        self,
        argv: Sequence[str],
        *,
        binds: Sequence[Bind] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 900.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the overlay; the exit status is the caller's to judge."""
        return run_chrooted(
            self._merged,
            argv,
            overlay=(self.upper, self._work),
            lower=self.root.path,
            binds=[self.root.archives_bind(), *binds],
            env=env,
            timeout=timeout,
        )

    def check(
        self,
        argv: Sequence[str],
        *,
        binds: Sequence[Bind] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 900.0,
    ) -> str:
        """Run ``argv`` in the overlay and return its stdout; RootError when it fails."""
        proc = self.run(argv, binds=binds, env=env, timeout=timeout)
        return _checked(proc, " ".join(argv))


def remove_leftover_overlays() -> None:
    """Delete the overlay directories of this prefix that an interrupted run left."""
    for d in OVERLAY_PARENT.glob(f"{prefix()}root-*"):
        shutil.rmtree(d, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    cache, suite, name, *packages = argv
    print(DebianRoot(Path(cache), suite, name, tuple(packages)).ensure())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
