"""The libvirts the real-stack tests run against, by version label.

- ``9.0``: the host's libvirtd (Debian 12), shared by everyone on the machine. Fault
  tests get a private one from the same binary (:class:`PrivateLibvirtd`).
- ``11.3``: Debian 13's libvirtd from the cached root (:class:`RootLibvirtd`), ours alone.
  Fault tests get a second instance, so killing it spares the rest of the session.

Each label is checked against the version the daemon reports, so a test id never names
a libvirt that did not run it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from tests.support.guest import HOST_LIBVIRT, LibvirtTarget, connect, prefix, stack_problem
from tests.support.libvirt_root import RootLibvirtd, root_problem
from tests.support.libvirtd import LabLibvirtd, PrivateLibvirtd

LABELS = ("9.0", "11.3")


def libvirt_problem(label: str) -> str | None:
    """None when the libvirt LABEL can run here, else why not."""
    found = stack_problem(HOST_LIBVIRT.uri)
    if found is None and label == "11.3":
        found = root_problem()
    return found


def version_problem(label: str, version: tuple[int, int, int]) -> str | None:
    want = tuple(int(x) for x in label.split("."))
    if version[:2] != want:
        return f"libvirt labelled {label} reports {'.'.join(map(str, version))}"
    return None


def host_version() -> tuple[int, int, int]:
    conn = connect(HOST_LIBVIRT.uri)
    try:
        v = int(conn.getLibVersion())
    finally:
        conn.close()
    return v // 1_000_000, v // 1000 % 1000, v % 1000


def session_lab(label: str) -> LabLibvirtd | None:
    """The daemon a session starts for LABEL (None: the host's own serves it)."""
    return RootLibvirtd() if label == "11.3" else None


@contextlib.contextmanager
def running_libvirt(label: str, refuse: Callable[[str], NoReturn]) -> Iterator[LibvirtTarget]:
    """The libvirt LABEL for the block: the host's, or a lab daemon started for it (after
    clearing what an interrupted run left) and stopped after. REFUSE(why) when it cannot
    run here or reports another version than LABEL."""
    found = libvirt_problem(label)
    if found is not None:
        refuse(f"libvirt {label}: {found}")
    lab = session_lab(label)
    if lab is None:
        found = version_problem(label, host_version())
        if found is not None:
            refuse(found)
        yield HOST_LIBVIRT
        return
    lab.close()
    try:
        lab.start()
        found = version_problem(label, lab.version())
        if found is not None:
            refuse(found)
        yield lab.target(label)
    finally:
        lab.close()


def private_libvirtd(label: str) -> LabLibvirtd:
    """A libvirtd of LABEL's version that a test may kill and restart."""
    if label == "11.3":
        return RootLibvirtd(Path(f"/run/{prefix()}libvirt11f"))
    return PrivateLibvirtd()
