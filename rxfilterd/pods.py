"""Pods: libvirt daemons running in other mount namespaces (KubeVirt's virt-launcher).

Found by scanning /proc: a process named as [pods] daemons says, in a mount namespace
other than ours, with one of [pods] sockets under its root. Its socket is reached as
/proc/PID/root/<path>, its NICs live in /proc/PID/ns/net. Reads /proc only; blocking
(the daemon runs a scan in a worker thread).
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from rxfilterd.config import PodSettings
from rxfilterd.connection import Endpoint

# A hostname (the pod's name, in Kubernetes) longer than this is no hostname.
HOST_NAME_MAX = 64


@dataclass(frozen=True)
class _Process:
    pid: int
    uid: int
    started: int
    mount_ns: str


class PodScanner:
    """The pods' libvirts as /proc shows them now (PROC: tests point it elsewhere)."""

    def __init__(self, settings: PodSettings, proc: Path = Path("/proc")) -> None:
        self.settings = settings
        self.proc = proc
        self._own_mount_ns = _readlink(proc / "self" / "ns" / "mnt")

    def scan(self) -> list[Endpoint]:
        """One endpoint per pod libvirt (per mount namespace and socket), sorted by name."""
        found: dict[tuple[str, str], Endpoint] = {}
        for process in self._daemons():
            socket = self._socket(process.pid)
            if socket is None or (process.mount_ns, socket) in found:
                continue
            found[(process.mount_ns, socket)] = self._endpoint(process, socket)
        return _unique_names(sorted(found.values(), key=lambda e: (e.name, e.pid or 0)))

    def _daemons(self) -> list[_Process]:
        out = []
        for entry in _pids(self.proc):
            base = self.proc / str(entry)
            try:
                if (base / "comm").read_text().strip() not in self.settings.daemons:
                    continue
                mount_ns = _readlink(base / "ns" / "mnt")
                if not mount_ns or mount_ns == self._own_mount_ns:
                    continue  # ours: the host's libvirt is [libvirt] uri
                out.append(
                    _Process(entry, _uid(base / "status"), _started(base / "stat"), mount_ns)
                )
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to read
        return out

    def _socket(self, pid: int) -> str | None:
        root = self.proc / str(pid) / "root"
        for path in self.settings.sockets:
            candidate = f"{root}{path}"
            try:
                if stat.S_ISSOCK(os.stat(candidate).st_mode):
                    return candidate
            except OSError:
                continue
        return None

    def _endpoint(self, process: _Process, socket: str) -> Endpoint:
        # A non-root daemon is a session daemon: it serves qemu:///session only.
        mode = "system" if process.uid == 0 else "session"
        return Endpoint(
            name=f"pod/{self._pod_name(process.pid)}",
            uri=f"qemu+unix:///{mode}?socket={socket}",
            netns=str(self.proc / str(process.pid) / "ns" / "net"),
            pid=process.pid,
            started=process.started,
        )

    def _pod_name(self, pid: int) -> str:
        """The pod's hostname (Kubernetes sets it to the pod's name), else pid-PID."""
        try:
            with open(self.proc / str(pid) / "root" / "etc" / "hostname", "rb") as file:
                raw = file.read(HOST_NAME_MAX + 1)
            name = raw.decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if not name or len(name) > HOST_NAME_MAX or not _is_hostname(name):
            return f"pid-{pid}"
        return name

    def wanted(self, endpoint: Endpoint) -> bool:
        """Whether [pods] match lets this pod be served."""
        return fnmatch.fnmatchcase(endpoint.name.removeprefix("pod/"), self.settings.match)

    def alive(self, endpoint: Endpoint) -> bool:
        """Whether ENDPOINT's daemon is still the process it was (its pid not reused)."""
        if endpoint.pid is None:
            return True
        try:
            return _started(self.proc / str(endpoint.pid) / "stat") == endpoint.started
        except (OSError, ValueError):
            return False


def _pids(proc: Path) -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        return []


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _uid(status: Path) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid
    raise ValueError(f"{status}: no Uid line")


def _started(stat_path: Path) -> int:
    """The process's start time (clock ticks after boot): with the pid, one process."""
    text = stat_path.read_text()
    # comm (field 2) may hold spaces and parentheses: fields count from the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[19])


def _is_hostname(name: str) -> bool:
    return all(c.isalnum() or c in "-." for c in name) and name[0].isalnum()


def _unique_names(endpoints: list[Endpoint]) -> list[Endpoint]:
    """Two pods of one hostname (hostNetwork pods share the node's) get their pids added."""
    names = [e.name for e in endpoints]
    return [
        e
        if names.count(e.name) == 1
        else Endpoint(f"{e.name}@{e.pid}", e.uri, e.netns, e.pid, e.started)
        for e in endpoints
    ]
