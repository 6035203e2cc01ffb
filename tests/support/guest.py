"""Real-stack test support: host links, libvirt networks and a tiny QEMU guest.

Everything this module creates is named with a prefix (``rxft-`` unless ``RXFT_PREFIX`` says
otherwise) so that :func:`cleanup_leftovers` can remove what an aborted run left behind.

The guest is the image built by ``scripts/build-guest``: the Debian cloud kernel and a
busybox initramfs whose ``/init`` loads virtio-net, 8021q and macvlan, brings every NIC up
and runs an interactive shell on ttyS0. :class:`Guest` drives that shell through the serial
port's unix socket.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn
from xml.sax.saxutils import quoteattr

import libvirt
import libvirt_qemu
import pytest

LIBVIRT_URI = "qemu:///system"
DEFAULT_PREFIX = "rxft-"
PREFIX_ENV = "RXFT_PREFIX"
GUEST_DIR_ENV = "RXFT_GUEST_DIR"
DEFAULT_GUEST_DIR = Path("/var/cache/rxfilterd-test/guest")
RUN_DIR = Path("/run/rxfilterd-test")
IFNAMSIZ_MAX = 15

MacvtapMode = Literal["bridge", "passthru", "private", "vepa"]  # as `ip link` spells them
DirectMode = Literal["bridge", "passthrough", "private", "vepa"]  # as libvirt spells them


class GuestError(RuntimeError):
    """The guest or its console did not behave."""


class GuestTimeout(GuestError, TimeoutError):
    """Waiting for the guest took longer than allowed."""


class GuestCommandError(GuestError):
    """A command run in the guest exited with a non-zero status."""

    def __init__(self, cmd: str, status: int, output: str) -> None:
        super().__init__(f"guest command exited {status}: {cmd!r}\n{output}")
        self.cmd = cmd
        self.status = status
        self.output = output


class GuestImageMissing(FileNotFoundError):
    """scripts/build-guest has not been run (or its output is incomplete)."""


# --------------------------------------------------------------------------- naming


def prefix() -> str:
    """The name prefix of everything the tests create (env ``RXFT_PREFIX``)."""
    return os.environ.get(PREFIX_ENV, DEFAULT_PREFIX)


def prefixed(suffix: str) -> str:
    """``prefix() + suffix``."""
    return prefix() + suffix


def _check_name(name: str, *, link: bool = False) -> None:
    if not name.startswith(prefix()):
        raise ValueError(f"{name!r} does not start with the test prefix {prefix()!r}")
    if link and len(name) > IFNAMSIZ_MAX:
        raise ValueError(f"link name {name!r} is longer than {IFNAMSIZ_MAX} characters")


# --------------------------------------------------------------------------- libvirt


@dataclass(frozen=True)
class LibvirtTarget:
    """A libvirt the real-stack tests run against: its version label (the test ids say
    ``[libvirt-LABEL]``), its URI, and where its domains' logs are."""

    label: str
    uri: str
    log_dir: Path

    def domain_log(self, domain: str) -> str:
        path = self.log_dir / f"{domain}.log"
        return path.read_text(errors="replace") if path.exists() else ""


HOST_LIBVIRT = LibvirtTarget("9.0", LIBVIRT_URI, Path("/var/log/libvirt/qemu"))
_current = [HOST_LIBVIRT]


def current_libvirt() -> LibvirtTarget:
    """The libvirt under test: the default of every helper here and of the daemon's config."""
    return _current[0]


def use_libvirt(target: LibvirtTarget) -> None:
    """Point the helpers (and daemon configs written from now on) at TARGET."""
    _current[0] = target


def connect(uri: str | None = None) -> Any:
    """A read-write libvirt connection (``libvirt.virConnect``), by default to the
    libvirt under test."""
    return libvirt.open(uri or current_libvirt().uri)


def libvirt_available(uri: str | None = None) -> str | None:
    """None when libvirtd answers on *uri*, else a reason why not."""
    uri = uri or current_libvirt().uri
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        return f"libvirtd unreachable at {uri}: {exc}"
    try:
        conn.getVersion()
    finally:
        conn.close()
    return None


@dataclass(frozen=True)
class GuestImage:
    """Kernel, initrd and kernel command line made by scripts/build-guest."""

    kernel: Path
    initrd: Path
    cmdline: str

    @classmethod
    def locate(cls, directory: Path | None = None) -> GuestImage:
        """Find the image in *directory*, env ``RXFT_GUEST_DIR`` or the default cache."""
        d = directory or Path(os.environ.get(GUEST_DIR_ENV, str(DEFAULT_GUEST_DIR)))
        kernel, initrd, cmdline = d / "vmlinuz", d / "initrd.gz", d / "cmdline"
        for f in (kernel, initrd, cmdline):
            if not f.is_file() or f.stat().st_size == 0:
                raise GuestImageMissing(f"{f} missing: run scripts/build-guest")
        return cls(kernel.resolve(), initrd.resolve(), cmdline.read_text().strip())


# --------------------------------------------------------------------------- host links


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS`` and return its stdout; raise CalledProcessError on failure."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, ["ip", *args], res.stdout, res.stderr)
    return res.stdout


def link_show(name: str) -> dict[str, Any] | None:
    """``ip -j -d link show NAME`` as a dict, or None when there is no such link."""
    out = subprocess.run(
        ["ip", "-j", "-d", "link", "show", "dev", name], capture_output=True, text=True
    )
    if out.returncode != 0:
        return None
    data = json.loads(out.stdout)
    if not data:
        return None
    first: dict[str, Any] = data[0]
    return first


def link_exists(name: str) -> bool:
    return link_show(name) is not None


def create_veth(name: str, peer: str) -> None:
    """Create a veth pair *name* <-> *peer* in the root namespace, both up."""
    _check_name(name, link=True)
    _check_name(peer, link=True)
    ip("link", "add", name, "type", "veth", "peer", "name", peer)
    ip("link", "set", name, "up")
    ip("link", "set", peer, "up")


@dataclass(frozen=True)
class Macvtap:
    name: str
    ifindex: int
    tap_path: Path
    mac: str


def create_macvtap(
    name: str, lower: str, mode: MacvtapMode = "bridge", mac: str | None = None
) -> Macvtap:
    """Create macvtap *name* on *lower*, up; return its ifindex and /dev/tapN."""
    _check_name(name, link=True)
    args = ["link", "add", "link", lower, "name", name]
    if mac:
        args += ["address", mac]
    ip(*args, "type", "macvtap", "mode", mode)
    ip("link", "set", name, "up")
    info = link_show(name)
    if info is None:
        raise RuntimeError(f"macvtap {name} vanished after creation")
    ifindex = int(info["ifindex"])
    tap = Path(f"/dev/tap{ifindex}")
    deadline = time.monotonic() + 5
    while not tap.exists():  # udev-less hosts: devtmpfs creates it, but not instantly
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tap} did not appear for macvtap {name}")
        time.sleep(0.05)
    return Macvtap(name, ifindex, tap, str(info["address"]))


def delete_link(name: str, missing_ok: bool = True) -> None:
    """``ip link del NAME`` (deleting one veth end removes its peer and its macvtaps)."""
    res = subprocess.run(["ip", "link", "del", "dev", name], capture_output=True, text=True)
    if res.returncode != 0 and not (missing_ok and not link_exists(name)):
        raise RuntimeError(f"ip link del {name}: {res.stderr.strip()}")


def host_links(name_prefix: str | None = None) -> list[dict[str, Any]]:
    """All root-namespace links whose name starts with *name_prefix* (default prefix())."""
    p = prefix() if name_prefix is None else name_prefix
    out = subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True, text=True)
    links: list[dict[str, Any]] = json.loads(out.stdout or "[]")
    return [link for link in links if str(link.get("ifname", "")).startswith(p)]


# --------------------------------------------------------------------------- cleanup


def cleanup_leftovers(name_prefix: str | None = None, uri: str | None = None) -> list[str]:
    """Remove domains, networks, host links and console sockets named with the prefix.

    Returns what was removed. libvirt being unreachable is not an error here (links are
    still cleaned).
    """
    p = prefix() if name_prefix is None else name_prefix
    if not p:
        raise ValueError("refusing to clean up with an empty prefix")
    removed: list[str] = []
    conn: Any = None
    with contextlib.suppress(libvirt.libvirtError):
        conn = connect(uri)
    if conn is not None:
        try:
            for dom in conn.listAllDomains(0):
                name = str(dom.name())
                if not name.startswith(p):
                    continue
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
                removed.append(f"domain {name}")
            for net in conn.listAllNetworks(0):
                name = str(net.name())
                if not name.startswith(p):
                    continue
                with contextlib.suppress(libvirt.libvirtError):
                    if net.isActive():
                        net.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    if net.isPersistent():
                        net.undefine()
                removed.append(f"network {name}")
        finally:
            conn.close()
    # Macvtaps (and other stacked links) first, then veths.
    links = host_links(p)
    stacked = {"macvtap", "macvlan", "vlan"}
    links.sort(key=lambda link: 0 if link.get("linkinfo", {}).get("info_kind") in stacked else 1)
    for link in links:
        name = str(link["ifname"])
        if link_exists(name):
            delete_link(name)
            removed.append(f"link {name}")
    if RUN_DIR.is_dir():
        for f in RUN_DIR.glob(p + "*"):
            with contextlib.suppress(OSError):
                f.unlink()
    return removed


# --------------------------------------------------------------------------- NIC specs


def _trust_attr(trust: bool | None) -> str:
    if trust is None:
        return ""
    return f" trustGuestRxFilters='{'yes' if trust else 'no'}'"


def _mac_el(mac: str | None) -> str:
    return f"<mac address={quoteattr(mac)}/>" if mac else ""


@dataclass(frozen=True)
class EthernetNic:
    """``type='ethernet'`` on an existing macvtap: libvirt does not sync its rx filters."""

    target_dev: str
    mac: str | None = None
    trust: bool | None = None
    model: str = "virtio"

    def xml(self) -> str:
        return (
            f"<interface type='ethernet'{_trust_attr(self.trust)}>{_mac_el(self.mac)}"
            f"<target dev={quoteattr(self.target_dev)} managed='no'/>"
            f"<model type={quoteattr(self.model)}/><rom enabled='no'/></interface>"
        )


@dataclass(frozen=True)
class DirectNic:
    """``type='direct'``: libvirt makes a macvtap on *source_dev*."""

    source_dev: str
    mac: str | None = None
    mode: DirectMode = "bridge"
    trust: bool | None = None
    model: str = "virtio"

    def xml(self) -> str:
        return (
            f"<interface type='direct'{_trust_attr(self.trust)}>{_mac_el(self.mac)}"
            f"<source dev={quoteattr(self.source_dev)} mode={quoteattr(self.mode)}/>"
            f"<model type={quoteattr(self.model)}/><rom enabled='no'/></interface>"
        )


@dataclass(frozen=True)
class NetworkNic:
    """``type='network'`` on a libvirt network (see :class:`Network`)."""

    network: str
    mac: str | None = None
    portgroup: str | None = None
    trust: bool | None = None
    model: str = "virtio"

    def xml(self) -> str:
        pg = f" portgroup={quoteattr(self.portgroup)}" if self.portgroup else ""
        return (
            f"<interface type='network'{_trust_attr(self.trust)}>{_mac_el(self.mac)}"
            f"<source network={quoteattr(self.network)}{pg}/>"
            f"<model type={quoteattr(self.model)}/><rom enabled='no'/></interface>"
        )


NicSpec = EthernetNic | DirectNic | NetworkNic


# --------------------------------------------------------------------------- networks


@dataclass(frozen=True)
class Portgroup:
    name: str
    default: bool = False
    trust: bool | None = None

    def xml(self) -> str:
        d = " default='yes'" if self.default else ""
        return f"<portgroup name={quoteattr(self.name)}{d}{_trust_attr(self.trust)}/>"


class Network:
    """A macvtap-backed libvirt network: ``<forward mode='bridge'><interface dev=.../>``.

    Use as a context manager (define+start on enter, destroy+undefine on exit) or call
    :meth:`start` / :meth:`remove`.
    """

    def __init__(
        self,
        name: str,
        forward_dev: str,
        *,
        trust: bool | None = None,
        portgroups: Sequence[Portgroup] = (),
        mode: Literal["bridge", "private", "vepa", "passthrough"] = "bridge",
        conn: Any = None,
    ) -> None:
        _check_name(name)
        self.name = name
        self.forward_dev = forward_dev
        self.trust = trust
        self.portgroups = tuple(portgroups)
        self.mode = mode
        self._conn: Any = conn
        self._own_conn = conn is None
        self.net: Any = None

    def xml(self) -> str:
        pgs = "".join(pg.xml() for pg in self.portgroups)
        return (
            f"<network{_trust_attr(self.trust)}><name>{self.name}</name>"
            f"<forward mode='{self.mode}'><interface dev={quoteattr(self.forward_dev)}/>"
            f"</forward>{pgs}</network>"
        )

    def start(self) -> Network:
        if self._conn is None:
            self._conn = connect()
        try:
            self.net = self._conn.networkDefineXML(self.xml())
            self.net.create()
        except BaseException:
            self.remove()
            raise
        return self

    def ports_xml(self) -> list[str]:
        """XML of the network's ports (they carry the resolved ``<rxfilters trustGuest>``)."""
        if self.net is None:
            return []
        return [str(port.XMLDesc(0)) for port in self.net.listAllPorts(0)]

    def remove(self) -> None:
        """Destroy and undefine; safe to call twice or after a failed start."""
        conn = self._conn
        if conn is not None:
            try:
                net = conn.networkLookupByName(self.name)
            except libvirt.libvirtError:
                net = None
            if net is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    if net.isActive():
                        net.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    net.undefine()
            if self._own_conn:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
                self._conn = None
        self.net = None

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


# --------------------------------------------------------------------------- guest


@dataclass(frozen=True)
class LiveNic:
    """One ``<interface>`` of the running domain's live XML."""

    alias: str
    type: str
    mac: str
    model: str
    target_dev: str | None
    source: dict[str, str]


_CTRL_C = b"\x03"
_GUEST_PROFILE = "/etc/rxft-profile"
_B64_LINE = 76


class Guest:
    """A tiny TCG guest with the given NICs, driven through its serial console.

    ``with Guest(prefixed("g1"), [EthernetNic(...)]) as g: g.run("ip link")``. On enter it
    defines and starts the domain and waits for the shell; on exit (also after errors) it
    destroys and undefines the domain.
    """

    def __init__(
        self,
        name: str,
        nics: Sequence[NicSpec],
        *,
        memory_mib: int = 160,
        image: GuestImage | None = None,
        on_reboot: Literal["restart", "destroy"] = "restart",
        extra_cmdline: str = "",
        conn: Any = None,
    ) -> None:
        _check_name(name)
        self.name = name
        self.nics = tuple(nics)
        self.memory_mib = memory_mib
        self.image = image or GuestImage.locate()
        self.on_reboot = on_reboot
        self.extra_cmdline = extra_cmdline
        self.console_path = RUN_DIR / f"{name}.console"
        if len(str(self.console_path)) > 100:
            raise ValueError(f"console socket path too long: {self.console_path}")
        self._conn: Any = conn
        self._own_conn = conn is None
        self.dom: Any = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._log = bytearray()
        self.boot_id: str | None = None
        self.boot_seconds: float | None = None

    # ------------------------------------------------------------------ XML / lifecycle

    def xml(self) -> str:
        cmdline = f"{self.image.cmdline} {self.extra_cmdline}".strip()
        sock = quoteattr(str(self.console_path))
        nics = "".join(nic.xml() for nic in self.nics)
        return f"""<domain type='qemu'>
  <name>{self.name}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{self.image.kernel}</kernel>
    <initrd>{self.image.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>{self.on_reboot}</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {nics}
    <serial type='unix'><source mode='bind' path={sock}/><target port='0'/></serial>
    <console type='unix'><source mode='bind' path={sock}/><target type='serial' port='0'/>
    </console>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""

    def start(self, timeout: float = 90.0) -> Guest:
        """Define, start, connect to the console and wait for the shell."""
        if self._conn is None:
            self._conn = connect()
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.console_path.unlink()
        t0 = time.monotonic()
        try:
            self.dom = self._conn.defineXML(self.xml())
            self.dom.create()
            self._connect_console(deadline=t0 + timeout)
            self.wait_ready(timeout=max(1.0, t0 + timeout - time.monotonic()))
        except BaseException:
            self.remove()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self

    def remove(self) -> None:
        """Close the console, destroy and undefine the domain (idempotent)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        conn = self._conn
        if conn is not None:
            try:
                dom = conn.lookupByName(self.name)
            except libvirt.libvirtError:
                dom = None
            if dom is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
            if self._own_conn:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
                self._conn = None
        self.dom = None
        with contextlib.suppress(OSError):
            self.console_path.unlink()

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def reset(self, timeout: float = 90.0) -> None:
        """Hard-reset the guest (``virsh reset``) and wait for the new shell."""
        if self.dom is None:
            raise GuestError("guest is not running")
        old = self.boot_id
        self.dom.reset(0)
        t0 = time.monotonic()
        self.wait_ready(timeout=timeout, not_boot_id=old)
        self.boot_seconds = time.monotonic() - t0

    # ------------------------------------------------------------------ console

    def _connect_console(self, deadline: float) -> None:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.console_path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestTimeout(
                        f"console socket {self.console_path} never accepted"
                    ) from exc
                time.sleep(0.05)
                continue
            self._sock = s
            return

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise GuestError("console not connected")
        self._sock.sendall(data)

    def _recv_some(self, until: float) -> bool:
        """Read what is available until *until*; False on timeout."""
        if self._sock is None:
            raise GuestError("console not connected")
        remaining = until - time.monotonic()
        if remaining <= 0:
            return False
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            return False
        if not chunk:
            raise GuestError("console closed by QEMU (guest gone?)")
        self._buf += chunk
        self._log += chunk
        return True

    def _expect(self, pattern: re.Pattern[bytes], until: float) -> re.Match[bytes] | None:
        while True:
            m = pattern.search(self._buf)
            if m:
                self._buf = self._buf[m.end() :]
                return m
            if not self._recv_some(until):
                return None

    def console_log(self) -> str:
        """Everything read from the serial console so far (for failure messages)."""
        return self._log.decode(errors="replace").replace("\r", "")

    def wait_ready(self, timeout: float = 90.0, not_boot_id: str | None = None) -> str:
        """Probe until the shell answers; returns (and records) the guest's boot id.

        The probe has no quotes, so a fragment of it (bytes lost while the UART was not
        yet open) cannot leave the shell waiting for a closing quote.
        """
        tok = secrets.token_hex(6)
        probe = f"echo @@R$((0)){tok}:$(cat /proc/sys/kernel/random/boot_id)\n".encode()
        answer = re.compile(rb"@@R0" + tok.encode() + rb":([0-9a-f-]{36})")
        # /init prints this banner right before it starts the shell. Probing only then (or
        # every few seconds, in case the banner went out before we connected) keeps probes
        # from piling up in the UART while the guest boots.
        banner = re.compile(rb"rxft-guest: up in [0-9.]+s, boot_id ([0-9a-f-]{36})")
        deadline = time.monotonic() + timeout
        next_probe = time.monotonic()
        seen_banner = False
        while True:
            now = time.monotonic()
            if now >= next_probe:
                self._send(probe)
                next_probe = now + 3.0
            got = self._recv_some(min(deadline, next_probe))
            for m in answer.finditer(self._buf):
                boot_id = m.group(1).decode()
                if boot_id != not_boot_id:
                    self._buf = self._buf[m.end() :]
                    self.boot_id = boot_id
                    # Let backlogged probes run and prove the command protocol works.
                    self.run("true", timeout=max(5.0, deadline - time.monotonic()))
                    return boot_id
            if not seen_banner:
                b = banner.search(self._buf)
                if b is not None and b.group(1).decode() != not_boot_id:
                    seen_banner = True
                    next_probe = time.monotonic()
            if len(self._buf) > 8192:
                self._buf = self._buf[-512:]
            if not got and time.monotonic() >= deadline:
                raise GuestTimeout(
                    f"guest {self.name} shell not ready after {timeout}s; console:\n"
                    + self.console_log()[-2000:]
                )

    def run_status(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run *cmd* with ``sh`` in the guest (stdin /dev/null, stderr merged).

        Returns (exit status, output). The command travels base64-encoded, so any bytes
        and any length are fine; it runs in a child shell, so ``cd``/``export`` do not
        persist between calls.
        """
        tok = secrets.token_hex(6)
        script = f"/tmp/.rxft-{tok}.sh"
        # /etc/rxft-profile makes ip/bridge run iproute2 rather than busybox's applets.
        full = f"[ -r {_GUEST_PROFILE} ] && . {_GUEST_PROFILE}\n{cmd}\n"
        encoded = base64.b64encode(full.encode()).decode()
        lines = [encoded[i : i + _B64_LINE] for i in range(0, len(encoded), _B64_LINE)]
        payload = (
            f"base64 -d >{script} <<RXFT{tok}\n"
            + "".join(line + "\n" for line in lines)
            + f"RXFT{tok}\n"
            + f"echo @@S$((0)){tok}; sh {script} </dev/null 2>&1;"
            f" echo @@E$((0)){tok}:$?; rm -f {script}\n"
        )
        start = re.compile(rb"@@S0" + tok.encode() + rb"\r?\n")
        end = re.compile(rb"@@E0" + tok.encode() + rb":(\d+)")
        deadline = time.monotonic() + timeout
        self._send(payload.encode())
        if self._expect(start, deadline) is None:
            self._interrupt()
            raise GuestTimeout(f"command did not start within {timeout}s: {cmd!r}")
        m = None
        while m is None:
            m = end.search(self._buf)
            if m is None and not self._recv_some(deadline):
                self._interrupt()
                raise GuestTimeout(
                    f"command did not finish within {timeout}s: {cmd!r}; output so far:\n"
                    + self._buf.decode(errors="replace")
                )
        output = self._buf[: m.start()].decode(errors="replace").replace("\r", "")
        self._buf = self._buf[m.end() :]
        return int(m.group(1)), output

    def run(self, cmd: str, timeout: float = 30.0, check: bool = True) -> str:
        """Run *cmd* in the guest and return its output (stdout+stderr).

        Raises :class:`GuestCommandError` on a non-zero exit status when *check* is true,
        and :class:`GuestTimeout` (after sending Ctrl-C) when it does not finish in time.
        """
        status, output = self.run_status(cmd, timeout)
        if check and status != 0:
            raise GuestCommandError(cmd, status, output)
        return output

    def _interrupt(self) -> None:
        with contextlib.suppress(OSError, GuestError):
            self._send(_CTRL_C)
        self._buf = b""

    # ------------------------------------------------------------------ guest helpers

    def set_mac(self, mac: str, dev: str = "eth0") -> None:
        self.run(f"ip link set {dev} address {mac}")

    def set_promisc(self, on: bool, dev: str = "eth0") -> None:
        self.run(f"ip link set {dev} promisc {'on' if on else 'off'}")

    def set_allmulti(self, on: bool, dev: str = "eth0") -> None:
        self.run(f"ip link set {dev} allmulticast {'on' if on else 'off'}")

    def add_ipv6(self, addr: str, dev: str = "eth0") -> None:
        """Add ADDR/64 (nodad): the guest joins ADDR's solicited-node group."""
        self.run(f"ip -6 addr add {addr}/64 dev {dev} nodad")

    def add_ipv6_many(self, count: int, dev: str = "eth0", net: str = "2001:db8:1::") -> None:
        """Add *count* addresses NET(1..count) whose solicited-node groups all differ.

        NET is a documentation prefix (2001:db8::/32), like every address the tests use.
        """
        self.run(
            f"i=1; while [ $i -le {count} ]; do"
            f" ip -6 addr add {net}$(printf %x $i)/64 dev {dev} nodad || exit 1;"
            f" i=$((i+1)); done",
            timeout=30.0 + count * 0.5,
        )

    def join_multicast(self, group_mac: str, dev: str = "eth0") -> None:
        """Join a link-layer multicast group directly (``ip maddr add``)."""
        self.run(f"ip maddr add {group_mac} dev {dev}")

    def add_vlan(self, vid: int, dev: str = "eth0") -> str:
        name = f"{dev}.{vid}"
        self.run(f"ip link add link {dev} name {name} type vlan id {vid} && ip link set {name} up")
        return name

    def add_macvlan(self, name: str, mac: str, dev: str = "eth0") -> None:
        self.run(
            f"ip link add link {dev} name {name} address {mac} type macvlan mode bridge"
            f" && ip link set {name} up"
        )

    # ------------------------------------------------------------------ libvirt views

    def live_xml(self) -> str:
        if self.dom is None:
            raise GuestError("guest is not running")
        return str(self.dom.XMLDesc(0))

    def interface_xml(self, alias: str) -> str:
        """The live XML of the NIC with ALIAS (what update-device takes back)."""
        for el in re.findall(r"<interface.*?</interface>", self.live_xml(), re.S):
            if f"<alias name='{alias}'/>" in el:
                return str(el)
        raise GuestError(f"no {alias} in the live XML of {self.name}")

    def set_trust_live(self, alias: str, trust: bool) -> None:
        """`virsh update-device --live` with another trustGuestRxFilters (libvirt >= 10)."""
        if self.dom is None:
            raise GuestError("guest is not running")
        nic = re.sub(r" trustGuestRxFilters='\w+'", "", self.interface_xml(alias), count=1)
        word = "yes" if trust else "no"
        nic = nic.replace("<interface ", f"<interface trustGuestRxFilters='{word}' ", 1)
        self.dom.updateDeviceFlags(nic, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def interfaces(self) -> list[LiveNic]:
        """The NICs of the live domain XML, in order (alias net0, net1, ...)."""
        root = ET.fromstring(self.live_xml())
        nics: list[LiveNic] = []
        for el in root.findall("./devices/interface"):
            alias = el.find("alias")
            mac = el.find("mac")
            model = el.find("model")
            target = el.find("target")
            source = el.find("source")
            nics.append(
                LiveNic(
                    alias=alias.get("name", "") if alias is not None else "",
                    type=el.get("type", ""),
                    mac=mac.get("address", "") if mac is not None else "",
                    model=model.get("type", "") if model is not None else "",
                    target_dev=target.get("dev") if target is not None else None,
                    source=dict(source.attrib) if source is not None else {},
                )
            )
        return nics

    def monitor(self, command: dict[str, Any]) -> Any:
        """A QMP command through libvirt (taints the domain as custom-monitor)."""
        if self.dom is None:
            raise GuestError("guest is not running")
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(self.dom, json.dumps(command), 0))
        if "error" in reply:
            raise GuestError(f"QMP {command}: {reply['error']}")
        return reply["return"]

    def query_rx_filter(self, nic: str | None = None) -> list[dict[str, Any]]:
        """``query-rx-filter`` for one NIC alias (e.g. ``net0``) or all of them."""
        cmd: dict[str, Any] = {"execute": "query-rx-filter"}
        if nic is not None:
            cmd["arguments"] = {"name": nic}
        result: list[dict[str, Any]] = self.monitor(cmd)
        return result


@contextlib.contextmanager
def veth_macvtap(
    veth: str, peer: str, macvtap: str, mode: MacvtapMode = "bridge", mac: str | None = None
) -> Iterator[Macvtap]:
    """A veth pair with a macvtap on *veth*; everything deleted on exit."""
    try:
        create_veth(veth, peer)
        yield create_macvtap(macvtap, veth, mode=mode, mac=mac)
    finally:
        delete_link(macvtap)
        delete_link(veth)


# --------------------------------------------------------------------------- pytest glue


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``CI=true`` (CI must run the real stack)."""
    if in_ci():
        pytest.fail(f"real stack unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def stack_problem(uri: str | None = None) -> str | None:
    """None when the real stack can run here, else why not (first problem found)."""
    if os.geteuid() != 0:
        return "needs root (macvtap, libvirt qemu:///system)"
    missing = [t for t in ("ip", "bridge") if shutil.which(t) is None]
    if missing:
        return f"missing host tools: {', '.join(missing)}"
    try:
        GuestImage.locate()
    except GuestImageMissing as exc:
        return str(exc)
    return libvirt_available(uri)


class Resources:
    """Creates stack objects and removes all of them (newest first) on :meth:`close`.

    Link helpers take short tags and build prefixed names that fit IFNAMSIZ.
    """

    def __init__(self) -> None:
        self._undo: list[tuple[str, Any]] = []

    def veth(self, name: str, peer: str) -> None:
        create_veth(name, peer)
        self._undo.append(("link", name))

    def macvtap(
        self, name: str, lower: str, mode: MacvtapMode = "bridge", mac: str | None = None
    ) -> Macvtap:
        mvt = create_macvtap(name, lower, mode=mode, mac=mac)
        self._undo.append(("link", name))
        return mvt

    def veth_macvtap(
        self, tag: str, mode: MacvtapMode = "bridge", mac: str | None = None
    ) -> Macvtap:
        """veth ``<prefix><tag>a`` <-> ``<prefix><tag>b`` and macvtap ``<prefix><tag>m`` on a."""
        self.veth(prefixed(tag + "a"), prefixed(tag + "b"))
        return self.macvtap(prefixed(tag + "m"), prefixed(tag + "a"), mode=mode, mac=mac)

    def network(
        self,
        name: str,
        forward_dev: str,
        *,
        trust: bool | None = None,
        portgroups: Sequence[Portgroup] = (),
        mode: Literal["bridge", "private", "vepa", "passthrough"] = "bridge",
        conn: Any = None,
    ) -> Network:
        net = Network(name, forward_dev, trust=trust, portgroups=portgroups, mode=mode, conn=conn)
        self._undo.append(("network", net))
        return net.start()

    def guest(self, name: str, nics: Sequence[NicSpec], **kwargs: Any) -> Guest:
        """A started :class:`Guest` (kwargs as for Guest: memory_mib, on_reboot, ...)."""
        g = Guest(name, nics, **kwargs)
        self._undo.append(("guest", g))
        return g.start()

    def close(self) -> None:
        errors: list[BaseException] = []
        while self._undo:
            kind, obj = self._undo.pop()
            try:
                if kind == "link":
                    delete_link(obj)
                else:
                    obj.remove()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
