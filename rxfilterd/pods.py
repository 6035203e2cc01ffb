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
        # Ours, and the host's (PID 1's): a libvirtd there is the host's, [libvirt] uri,
        # also when a unit's PrivateMounts= gives us a mount namespace of our own.
        self._not_pods = {
            _readlink(proc / "self" / "ns" / "mnt"),
            _readlink(proc / "1" / "ns" / "mnt"),
        }

    def scan(self) -> list[Endpoint]:
        """One endpoint per pod libvirt (per mount namespace and socket), sorted by name.

        Names are not made unique here: two pods may share a hostname (the daemon adds
        a pid to the second one it serves, and keeps each name while the pod lives).
        """
        found: dict[str, tuple[_Process, str]] = {}
        for process in self._daemons():
            socket = self._socket(process.pid)
            if socket is None:
                continue
            # A daemon that forks (daemonizing, or to exec QEMU) shows up twice for a
            # moment: one pod still, reached through its newest process.
            identity = f"{process.mount_ns} {socket}"
            if identity not in found or found[identity][0].started < process.started:
                found[identity] = (process, socket)
        endpoints = [self._endpoint(p, s, identity) for identity, (p, s) in found.items()]
        return sorted(endpoints, key=lambda e: (e.name, e.pid or 0))

    def _daemons(self) -> list[_Process]:
        out = []
        for entry in _pids(self.proc):
            base = self.proc / str(entry)
            try:
                if (base / "comm").read_text().strip() not in self.settings.daemons:
                    continue
                mount_ns = _readlink(base / "ns" / "mnt")
                if not mount_ns or mount_ns in self._not_pods:
                    continue
                out.append(
                    _Process(entry, _uid(base / "status"), _started(base / "stat"), mount_ns)
                )
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to read
        return out

    def _socket(self, pid: int) -> str | None:
        """The first of [pods] sockets that is a socket inside PID's root."""
        root = self.proc / str(pid) / "root"
        for path in self.settings.sockets:
            try:
                if stat.S_ISSOCK(os.stat(f"{root}{path}").st_mode):
                    return path
            except OSError:
                continue
        return None

    def _endpoint(self, process: _Process, socket: str, identity: str) -> Endpoint:
        # A non-root daemon is a session daemon: it serves qemu:///session only.
        mode = "system" if process.uid == 0 else "session"
        base = self.proc / str(process.pid)
        return Endpoint(
            name=f"pod/{self._pod_name(process.pid)}",
            uri=f"qemu+unix:///{mode}?socket={base}/root{socket}",
            netns=str(base / "ns" / "net"),
            pid=process.pid,
            started=process.started,
            identity=identity,
            # A virt-launcher pod runs one VM: one query connection serves it.
            queries=1,
        )

    def _pod_name(self, pid: int) -> str:
        """The pod's hostname, else pid-PID.

        KubeVirt sets a virt-launcher pod's hostname to its VMI's name (or spec.hostname):
        VMIs of one name in two namespaces share it, and _unique_names adds their pids.
        """
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

    def missing(self) -> list[str]:
        return missing_capabilities(self.proc / "self" / "status")

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


def distinct(endpoints: list[Endpoint]) -> list[Endpoint]:
    """ENDPOINTS (sorted by name and pid) with a pid added to every repeated name.

    The daemon names pods the same way as it finds them: the first of a hostname
    keeps it, later ones get their pid.
    """
    seen: set[str] = set()
    out = []
    for endpoint in endpoints:
        out.append(
            endpoint
            if endpoint.name not in seen
            else endpoint.renamed(f"{endpoint.name}@{endpoint.pid}")
        )
        seen.add(endpoint.name)
    return out


# What reaching a pod's libvirt takes (docs/kubernetes.md, docs/service.md): capability
# bits as /proc/PID/status CapEff numbers them.
NEEDED_CAPABILITIES = {
    "CAP_DAC_OVERRIDE": 1,  # a non-root (session) daemon's 0700 socket
    "CAP_SYS_PTRACE": 19,  # /proc/PID/root and /proc/PID/ns of other users' processes
    "CAP_SYS_ADMIN": 21,  # setns() into the pod's network namespace
    "CAP_NET_ADMIN": 12,  # writing its macvtaps
}


def missing_capabilities(status: Path = Path("/proc/self/status")) -> list[str]:
    """The capabilities pods mode needs that this process lacks (effective set)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return [name for name, bit in NEEDED_CAPABILITIES.items() if not effective >> bit & 1]
    return []
