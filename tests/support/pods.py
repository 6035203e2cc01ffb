"""Simulated KubeVirt virt-launcher pods: per-VM libvirt daemons in namespaces of their own.

A :class:`SimulatedPod` is what rxfilterd's pod discovery meets on a KubeVirt node: a
libvirt daemon (Debian 13's 11.3, from the cached root of tests/support/libvirt_root.py)
chrooted in mount, network and PID namespaces of its own (its PID 1 a reaper, as a
pod's pause process; pids in its pid files are the pod's own), with its own /run,
/var/lib/libvirt, /var/log/libvirt (the overlay's upper half) and /etc/hostname, and a
virtlogd of its own as in virt-launcher. From the host it is reached only the way
rxfilterd reaches it: ``/proc/PID/root/run/libvirt/<sock>`` and ``/proc/PID/ns/net``::

    /run/<prefix>pod-<name>/            a tmpfs on the host (private propagation)
        mntns                           the mount namespace, kept by a bind of its ns file
        upper/ work/ merged/            the overlay on the cached root
        run/                            the pod's /run (tmpfs): run/libvirt/libvirt-sock
        hostname                        bound over the pod's /etc/hostname
        init.pid                        the host's pid of the pod's PID 1
    /run/netns/<prefix>pod-<name>       its network namespace (``ip netns``)
    /run/rxfilterd-test/<prefix>pod-<name>/   its guests' serial sockets, bound at the
                                        same path inside (two pods may hold the same
                                        domain name, as KubeVirt's ``<namespace>_<vmi>``)

Debian 13 ships no modular daemons (no virtqemud in any libvirt package; the root's
/usr/sbin has libvirtd and virtlogd only), so the pod runs ``libvirtd``, which
rxfilterd's discovery looks for as well. ``session=True`` runs it as an unprivileged
user in session mode, as KubeVirt's non-root virt-launcher does
(``qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock`` there).

Macvtaps are made as macvtap-cni makes them (:meth:`SimulatedPod.add_macvtap`): on a host
lower device, then moved into the pod's namespace and renamed there. The guest NIC is
shaped as KubeVirt's tap binding generates it (:class:`KubevirtNic`).

Everything is named with the test prefix; :func:`cleanup_pods` removes what an
interrupted run left (processes, mounts, namespaces, console directories).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from xml.sax.saxutils import quoteattr

import libvirt

from tests.support.guest import (
    DEFAULT_GUEST_DIR,
    IFNAMSIZ_MAX,
    RUN_DIR,
    EthernetNic,
    Guest,
    GuestImage,
    MacvtapMode,
    _check_name,
    _mac_el,
    _trust_attr,
    create_macvtap,
    delete_link,
    ip,
    prefix,
)
from tests.support.libvirt_root import LIBVIRT_ROOT, ROOT, RootLibvirtd, root_problem
from tests.support.libvirtd import LIBVIRTD_CONF, SETUP_HOST_QEMU_CONF
from tests.support.peer import NETNS_DIR, netns_run

# The unprivileged user of session pods: KubeVirt's non-root virt-launcher runs as 107.
SESSION_UID = 107
SESSION_HOME = "/var/lib/session"
POD_BASE_GLOB = "pod-"


def pod_problem() -> str | None:
    """None when simulated pods can run here, else why not."""
    if os.geteuid() != 0:
        return "simulated pods need root (namespaces, mounts, macvtap)"
    problem = root_problem()
    if problem is not None:
        return problem
    try:
        GuestImage.locate()
    except FileNotFoundError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- NIC XML


@dataclass(frozen=True)
class KubevirtNic(EthernetNic):
    """A NIC as KubeVirt's tap binding (``domainAttachmentType: tap``, the macvtap binding
    plugin) writes it, plus the hook's trustGuestRxFilters. The shape follows
    kubevirt/kubevirt pkg/virt-launcher/virtwrap/converter/network/configurator.go
    (tapBindingOptions: type 'ethernet', ``<rom enabled='no'/>``),
    pkg/network/domainspec/generators.go (TapLibvirtSpecGenerator: MAC, MTU and
    ``<target dev=POD-IFACE managed='no'/>``), converter/arch/converter.go (model
    virtio-non-transitional on x86) and converter/testdata/domain_x86_64.xml (alias
    ``ua-<network name>``, e.g. ua-default)."""

    model: str = "virtio-non-transitional"
    alias: str = "ua-default"
    mtu: int = 1500

    def xml(self) -> str:
        return (
            f"<interface type='ethernet'{_trust_attr(self.trust)}>{_mac_el(self.mac)}"
            f"<mtu size='{self.mtu}'/>"
            f"<target dev={quoteattr(self.target_dev)} managed='no'/>"
            f"<model type={quoteattr(self.model)}/>"
            f"<alias name={quoteattr(self.alias)}/><rom enabled='no'/></interface>"
        )


def kubevirt_domain_name(namespace: str, vmi: str) -> str:
    """KubeVirt's domain name for a VMI: ``<namespace>_<vmi>``."""
    return f"{namespace}_{vmi}"


@dataclass(frozen=True)
class PodMacvtap:
    """A macvtap moved into a pod: its name and ifindex there, its /dev/tapN (named after
    the ifindex in the pod), and the ifindex it had on the host before the move."""

    name: str
    ifindex: int
    tap_path: Path
    mac: str
    host_ifindex: int
    rdev: int  # the device number of its /dev/tapN


# --------------------------------------------------------------------------- the pod


class SimulatedPod(RootLibvirtd):
    """One virt-launcher pod: ``with SimulatedPod("a") as pod: pod.guest(...)``.

    HOSTNAME is its /etc/hostname, by default ``<prefix>pod-<name>`` (so that rxfilterd's
    [pods] match can keep a test to its own pods). KubeVirt gives a virt-launcher pod the
    VMI's name (pkg/util/net/dns/sanitize.go SanitizeHostname: the name's first label,
    or spec.hostname), so pods of same-named VMIs in two namespaces share one.

    Enter starts it (clearing what an interrupted run left under the same name); close
    destroys its domains, ends every process in it, removes its network namespace (the
    macvtaps moved there go with it) and unmounts everything; it is idempotent.
    """

    def __init__(self, name: str, *, hostname: str | None = None, session: bool = False) -> None:
        self.name = name
        self.full_name = f"{prefix()}pod-{name}"
        _check_name(self.full_name)
        super().__init__(Path("/run") / self.full_name)
        self.hostname = hostname or self.full_name
        self.session = session
        self.netns = self.full_name
        self.console_dir = RUN_DIR / self.full_name
        self._conn: Any = None
        self._guests: list[Guest] = []
        self._macvtaps = 0
        self._init: subprocess.Popen[bytes] | None = None
        self.macvtaps: list[PodMacvtap] = []
        self.netns_inode: int | None = None  # of the pod's network namespace, once made
        if session:
            # A session daemon's socket is $XDG_RUNTIME_DIR/libvirt/libvirt-sock (KubeVirt
            # sets XDG_RUNTIME_DIR=/var/run for its non-root virtqemud).
            self.uri = f"qemu+unix:///session?socket={self.socket_path}"
            self.pid_file = self.base / "run" / "libvirt" / "libvirtd.pid"

    @property
    def log_dir(self) -> Path:
        """The pod's domain logs (a session daemon keeps them under its home)."""
        if self.session:
            return self.base / "upper" / SESSION_HOME.lstrip("/") / ".cache/libvirt/qemu/log"
        return super().log_dir

    # ------------------------------------------------------------------ what rxfilterd sees

    @property
    def pid(self) -> int | None:
        """The running libvirtd's pid on the host (its pid file holds the pod's own)."""
        for pid in self.processes():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == self.daemon and _alive(pid):
                    return pid
        return None

    def host_pid(self, pod_pid: int) -> int:
        """The host's pid of the pod's process POD_PID (e.g. from a pid file in the pod)."""
        for pid in self.processes():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                if nspid and int(nspid.group(1).split()[-1]) == pod_pid:
                    return pid
        raise ProcessLookupError(f"pod {self.name} has no process {pod_pid}")

    def qemu_pid(self, domain: str) -> int:
        return self.host_pid(super().qemu_pid(domain))

    @property
    def daemon_pid(self) -> int:
        """The daemon's pid as the host sees it (raises when it is not running)."""
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"pod {self.name}: no libvirtd running")
        return pid

    @property
    def proc_socket(self) -> Path:
        """The daemon's socket, through its root: how rxfilterd reaches it."""
        return Path(f"/proc/{self.daemon_pid}/root/run/libvirt/libvirt-sock")

    @property
    def proc_uri(self) -> str:
        mode = "session" if self.session else "system"
        return f"qemu+unix:///{mode}?socket={self.proc_socket}"

    @property
    def netns_path(self) -> Path:
        """The daemon's network namespace, as rxfilterd finds it (/proc/PID/ns/net)."""
        return Path(f"/proc/{self.daemon_pid}/ns/net")

    @property
    def named_netns(self) -> Path:
        return NETNS_DIR / self.netns

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.close()  # what an interrupted run left under this name
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _make_namespace(self, timeout: float) -> None:
        problem = root_problem()
        if problem is not None:
            raise RuntimeError(problem)
        if not self.named_netns.exists():
            ip("netns", "add", self.netns)
            ip("-n", self.netns, "link", "set", "lo", "up")
        self.netns_inode = self.named_netns.stat().st_ino
        self.console_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = LIBVIRT_ROOT.hold()
        b, m = self.base, self.merged
        b.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(b):
            _run(["mount", "-t", "tmpfs", "-o", "mode=0755", "rxft-pod", str(b)])
        _run(["mount", "--make-private", str(b)])
        for sub in ("upper", "work", "run", "merged"):
            (b / sub).mkdir(exist_ok=True)
        self.ns_file.touch()
        (b / "hostname").write_text(self.hostname + "\n")
        self._write_config()
        guest_dir = DEFAULT_GUEST_DIR.parent
        # The pod's own sysfs, mounted from inside its network namespace, shows its links
        # under /sys/class/net as a container's does.
        script = f"""set -e
mount -t overlay rxft-pod -o lowerdir={ROOT},upperdir={b}/upper,workdir={b}/work {m}
mount --rbind /dev {m}/dev
mount -t sysfs sysfs {m}/sys
mount --bind {b}/run {m}/run
mount --bind {b}/hostname {m}/etc/hostname
mkdir -p {m}{self.console_dir} {m}{guest_dir}
mount --bind {self.console_dir} {m}{self.console_dir}
mount --bind {guest_dir} {m}{guest_dir}
"""
        _run(
            [
                "nsenter",
                f"--net={self.named_netns}",
                "unshare",
                f"--mount={self.ns_file}",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            timeout=timeout,
        )
        self._start_init(timeout)
        # A proc of the pod's PID namespace: libvirtd finds its QEMUs there by their pids.
        self._in_pod("mount", "-t", "proc", "proc", "/proc", timeout=timeout)

    def _start_init(self, timeout: float) -> None:
        """The pod's PID 1 (as a pod's pause process): it reaps the daemonized libvirtd's
        and QEMU's exits at once. Without it they are reparented to this machine's
        PID 1, which reaps every ~2 s, and libvirt waits for that on every destroy."""
        self._init = subprocess.Popen(
            [
                "nsenter",
                f"--net={self.named_netns}",
                f"--mount={self.ns_file}",
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                sys.executable,
                "-c",
                _REAPER,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        children = Path(f"/proc/{self._init.pid}/task/{self._init.pid}/children")
        deadline = time.monotonic() + timeout
        while not (found := children.read_text().split()):
            if self._init.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pod {self.name}: its PID 1 did not start")
            time.sleep(0.01)
        (self.base / "init.pid").write_text(found[0])

    @property
    def init_pid(self) -> int | None:
        """The pod's PID 1, as the host sees it (None when it is gone)."""
        try:
            pid = int((self.base / "init.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _write_config(self) -> None:
        etc = self.base / "upper" / "etc" / "libvirt"
        etc.mkdir(parents=True, exist_ok=True)
        qemu_conf = (ROOT / "etc/libvirt/qemu.conf").read_text() + SETUP_HOST_QEMU_CONF
        (etc / "qemu.conf").write_text(qemu_conf)
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF)

    def _in_pod(self, *argv: str, timeout: float = 30.0) -> None:
        """ARGV run chrooted in the pod, in its mount, network and PID namespaces."""
        init = self.init_pid
        if init is None:
            raise RuntimeError(f"pod {self.name}: its PID 1 is gone")
        _run(
            [
                "nsenter",
                f"--target={init}",
                "--mount",
                "--net",
                "--pid",
                "chroot",
                str(self.merged),
                *argv,
            ],
            timeout,
        )

    def _launch(self, timeout: float) -> None:
        if not self._namespace_alive() or self.init_pid is None:
            self.close()  # a pod whose PID 1 died is dead: start it anew
            self._make_namespace(timeout)
        if not self.session:
            # virtlogd first, as virt-launcher starts it: QEMU's output goes through it.
            if not (self.base / "run" / "virtlogd.pid").exists():
                self._in_pod("/usr/sbin/virtlogd", "-d", timeout=timeout)
            self._in_pod(
                "/usr/sbin/libvirtd",
                "-d",
                "-p",
                "/run/libvirtd.pid",
                "-f",
                "/etc/libvirt/libvirtd.conf",
                timeout=timeout,
            )
            return
        self._launch_session(timeout)

    def _launch_session(self, timeout: float) -> None:
        """libvirtd as SESSION_UID in session mode; its virtlogd it starts itself."""
        home = SESSION_HOME
        # libvirt needs a user record (it crashes without one): KubeVirt's image has qemu 107.
        etc = self.base / "upper" / "etc"
        for db, line in (
            ("passwd", f"qemu:x:{SESSION_UID}:{SESSION_UID}:qemu:{home}:/usr/sbin/nologin\n"),
            ("group", f"qemu:x:{SESSION_UID}:\n"),
        ):
            (etc / db).write_text((ROOT / "etc" / db).read_text() + line)
        for path in (self.base / "upper" / home.lstrip("/"), self.base / "run" / "libvirt"):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, SESSION_UID, SESSION_UID)
        os.chown(self.console_dir, SESSION_UID, SESSION_UID)
        conf = self.base / "upper" / home.lstrip("/") / ".config" / "libvirt"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        for d in (conf.parent, conf):
            os.chown(d, SESSION_UID, SESSION_UID)
        self._in_pod(
            "env",
            "-i",
            f"HOME={home}",
            "XDG_RUNTIME_DIR=/run",
            f"XDG_CONFIG_HOME={home}/.config",
            f"XDG_CACHE_HOME={home}/.cache",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "setpriv",
            f"--reuid={SESSION_UID}",
            f"--regid={SESSION_UID}",
            "--clear-groups",
            "/usr/sbin/libvirtd",
            "-d",
            "-p",
            "/run/libvirt/libvirtd.pid",
            timeout=timeout,
        )

    def close(self, graceful: bool = True) -> None:
        """Stop everything of the pod and remove it (idempotent; also an earlier run's).

        Graceful: the guests are destroyed through libvirt and libvirtd gets SIGTERM
        (about 0.3 s with one guest); else everything is SIGKILLed at once, as when a node
        loses a pod (under 0.1 s)."""
        errors: list[BaseException] = []
        if not graceful:
            self.kill_daemon(signal.SIGKILL)
            for g in self._guests:
                g._conn = None  # nothing to destroy through: QEMU is killed below
        while self._guests:
            g = self._guests.pop()
            try:
                g.remove()
            except Exception as exc:
                errors.append(exc)
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None
        try:
            super().close()  # domains, daemons, QEMUs, PID 1, mounts, the root's lock
        except Exception as exc:
            errors.append(exc)
        if self._init is not None:
            self._init.wait()  # killed with the rest: our child, reaped here
            self._init = None
        # No process is left in the network namespace: deleting its name ends it, and
        # the macvtaps moved into it are deleted with it.
        if self.named_netns.exists():
            res = subprocess.run(
                ["ip", "netns", "del", self.netns], capture_output=True, text=True, check=False
            )
            if res.returncode != 0:
                errors.append(RuntimeError(f"ip netns del {self.netns}: {res.stderr.strip()}"))
        shutil.rmtree(self.console_dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def leftovers(self) -> list[str]:
        """What of this pod still exists (empty after close, once the kernel has deleted
        the macvtaps of its network namespace, which it does asynchronously when the
        namespace ends: their /dev/tapN going is the sign that it has ended)."""
        left = [f"process {pid}" for pid in self.processes()]
        paths = (str(self.base), str(self.console_dir), str(self.named_netns))
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point.startswith(paths):
                left.append(f"mount {point}")
        for path in (self.base, self.console_dir, self.named_netns):
            if path.exists():
                left.append(f"path {path}")
        for mvt in self.macvtaps:
            with contextlib.suppress(OSError):
                if mvt.tap_path.stat().st_rdev == mvt.rdev:
                    left.append(f"macvtap {mvt.name} ({mvt.tap_path})")
        return left

    # ------------------------------------------------------------------ in the pod

    def connect(self) -> Any:
        return libvirt.open(self.uri)

    @property
    def conn(self) -> Any:
        """The pod's connection that its guests use (closed with the pod)."""
        if self._conn is None:
            self._conn = self.connect()
        return self._conn

    def run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """ARGV on the host's binaries, in the pod's network namespace (never raises)."""
        return netns_run(self.netns, *argv, timeout=timeout)

    def link(self, name: str) -> dict[str, Any] | None:
        """``ip -j -d link show NAME`` in the pod's namespace, or None."""
        res = subprocess.run(
            ["ip", "-n", self.netns, "-j", "-d", "link", "show", "dev", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            return None
        data: list[dict[str, Any]] = json.loads(res.stdout or "[]")
        return data[0] if data else None

    def add_macvtap(
        self,
        lower: str,
        name: str,
        *,
        mac: str | None = None,
        mode: MacvtapMode = "bridge",
        clash_ifindex: bool = False,
        timeout: float = 10.0,
    ) -> PodMacvtap:
        """A macvtap on host link LOWER, moved into the pod and renamed NAME there, up,
        as macvtap-cni does.

        The kernel keeps a link's ifindex across the move unless the pod's namespace
        already uses it; then the link is renumbered and its /dev/tapN is made anew under
        the new number (the minor stays). CLASH_IFINDEX makes the pod hold the number
        first (a veth pair at that index) to force that. The node is checked against the
        pod's sysfs: /dev is shared by every namespace, so tapN names can collide."""
        self._macvtaps += 1
        temp = f"{prefix()}mv{self._macvtaps}{self.name}"[:IFNAMSIZ_MAX]
        host = create_macvtap(temp, lower, mode=mode, mac=mac)
        try:
            if clash_ifindex:
                ip(
                    "-n",
                    self.netns,
                    "link",
                    "add",
                    f"{name[:12]}-c",
                    "index",
                    str(host.ifindex),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"{name[:12]}-p",
                )
            ip("link", "set", "dev", temp, "down")
            ip("link", "set", "dev", temp, "netns", self.netns)
        except BaseException:
            delete_link(temp)
            raise
        ip("-n", self.netns, "link", "set", "dev", temp, "name", name)
        ip("-n", self.netns, "link", "set", "dev", name, "up")
        info = self.link(name)
        if info is None:
            raise RuntimeError(f"macvtap {name} not found in {self.netns} after the move")
        ifindex = int(info["ifindex"])
        tap = Path(f"/dev/tap{ifindex}")
        sysfs_dev = self._pod_root() / f"sys/class/net/{name}/macvtap/tap{ifindex}/dev"
        major, minor = (int(n) for n in sysfs_dev.read_text().split(":"))
        want = os.makedev(major, minor)
        deadline = time.monotonic() + timeout
        while not (tap.exists() and tap.stat().st_rdev == want):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{tap} is not {major}:{minor}, the macvtap {name} of pod {self.name}"
                )
            time.sleep(0.05)
        if self.session:
            os.chown(tap, SESSION_UID, SESSION_UID)  # as virt-handler hands it to qemu 107
        mvt = PodMacvtap(name, ifindex, tap, str(info["address"]), host.ifindex, want)
        self.macvtaps.append(mvt)
        return mvt

    def _pod_root(self) -> Path:
        """The pod's / seen from the host, through a process chrooted in it."""
        for pid in self.processes():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/root") == str(self.merged):
                    return Path(f"/proc/{pid}/root")
        raise RuntimeError(f"pod {self.name}: no process in it")

    def guest(
        self,
        namespace: str,
        vmi: str,
        nics: Sequence[EthernetNic],
        *,
        start: bool = True,
        **kwargs: Any,
    ) -> Guest:
        """A guest named as KubeVirt names it (``<namespace>_<vmi>``), its serial socket
        in the pod's own directory; removed with the pod."""
        g = Guest(kubevirt_domain_name(namespace, vmi), nics, conn=self.conn, **kwargs)
        g.console_path = self.console_dir / f"{g.name}.console"
        if len(str(g.console_path)) > 100:
            raise ValueError(f"console socket path too long: {g.console_path}")
        self._guests.append(g)
        return g.start() if start else g

    def kill(self, signum: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Signal the daemon and wait until it has exited. A zombie counts as exited: it
        holds no namespace, socket or file any more, and this machine's PID 1 reaps
        orphans only every ~2 s (LabLibvirtd.kill waits for that)."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd {pid} still running {timeout} s after {signum}")
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def kill_daemon(self, signum: int = signal.SIGKILL) -> None:
        """Kill the pod's libvirtd (its QEMUs and virtlogd live on); start() brings it back."""
        self.kill(signum)
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def start(self, timeout: float = 60.0) -> Self:
        """Start the pod, or its daemon again after kill_daemon (same namespaces); the
        pod's guests are handed the new connection."""
        super().start(timeout)
        for g in self._guests:
            if g.dom is not None:
                g._conn = self.conn  # Guest keeps the connection it was made with
                g.dom = self.conn.lookupByName(g.name)
        return self


# --------------------------------------------------------------------------- leftovers


def cleanup_pods() -> list[str]:
    """Remove every simulated pod of our prefix an interrupted run left: processes,
    mounts, network namespaces and console directories."""
    if not prefix():
        raise ValueError("refusing to clean up with an empty prefix")
    p = prefix() + POD_BASE_GLOB
    names: set[str] = set()
    for d in (Path("/run"), NETNS_DIR, RUN_DIR):
        if d.is_dir():
            names.update(f.name[len(p) :] for f in d.iterdir() if f.name.startswith(p))
    removed = []
    for name in sorted(names):
        SimulatedPod(name).close()
        removed.append(f"pod {name}")
    return removed


_REAPER = """
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.02)
"""


def _alive(pid: int) -> bool:
    """PID exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _run(argv: list[str], timeout: float = 30.0) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
