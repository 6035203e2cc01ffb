"""One benchmark run's set-up and clean-up, which every bench main would otherwise repeat.

    with BenchSession("burst", args.out, events=True, links=True) as s:
        mvt = s.stack.veth_macvtap("bu", mac=MAC0)
        ...

On enter: py-spy checked (when profiling, before any guest starts), the prefix checked,
the real stack required, the output directory made, the monitors started (the QEMU
event monitor first: it starts libvirt's event loop before any connection), leftovers
of an interrupted run removed, the machine's facts taken and printed. On exit, also
after errors: /sys/kernel/rcu_expedited put back, everything made through `stack`
removed, leftovers cleared again, the monitors closed.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from bench.machine import RcuMode, machine
from bench.monitors import EventMonitor, LinkMonitor
from bench.naming import check_prefix, out_dir, require_stack
from bench.profiling import py_spy
from tests.support.guest import HOST_LIBVIRT, Resources, cleanup_leftovers, use_libvirt
from tests.support.libvirts import LABELS, running_libvirt


def add_libvirt_argument(parser: argparse.ArgumentParser) -> None:
    """--libvirt: which libvirt a bench runs against (BenchSession's LIBVIRT)."""
    parser.add_argument(
        "--libvirt",
        default=HOST_LIBVIRT.label,
        choices=LABELS,
        help="the host's libvirt (9.0) or the cached Debian 13 root's (11.3), started for the run",
    )


class BenchSession:
    """The run's output directory, stack, monitors and machine facts.

    EVENTS, LINKS: start an EventMonitor, a LinkMonitor. RCU: keep the RCU mode to put
    back. PROFILE: py-spy must be there. CLEANUPS: more leftovers to clear before and
    after (e.g. a peer's namespaces).
    """

    def __init__(
        self,
        name: str,
        out: str | None = None,
        *,
        events: bool = False,
        links: bool = False,
        rcu: bool = False,
        profile: bool = False,
        cleanups: Sequence[Callable[[], object]] = (),
        libvirt: str = HOST_LIBVIRT.label,
    ) -> None:
        if libvirt not in LABELS:
            raise ValueError(f"libvirt {libvirt!r}: not one of {', '.join(LABELS)}")
        self.name = name
        self.libvirt = libvirt
        self._libvirt = contextlib.ExitStack()
        self._given = out
        self._want_events = events
        self._want_links = links
        self._want_rcu = rcu
        self._profile = profile
        self._cleanups = [*cleanups, cleanup_leftovers]
        self._events: EventMonitor | None = None
        self._links: LinkMonitor | None = None
        self._rcu: RcuMode | None = None
        self.out = Path()
        self.stack = Resources()
        self.info: dict[str, Any] = {}

    @property
    def events(self) -> EventMonitor:
        if self._events is None:
            raise RuntimeError("this session has no event monitor (events=True)")
        return self._events

    @property
    def links(self) -> LinkMonitor:
        if self._links is None:
            raise RuntimeError("this session has no link monitor (links=True)")
        return self._links

    @property
    def rcu(self) -> RcuMode:
        if self._rcu is None:
            raise RuntimeError("this session does not keep the RCU mode (rcu=True)")
        return self._rcu

    def __enter__(self) -> BenchSession:
        if self._profile:
            py_spy()  # before any guest starts: say now if it is missing
        check_prefix()
        require_stack()
        self.out = out_dir(self.name, self._given)
        try:
            self._use_libvirt()
            if self._want_events:
                self._events = EventMonitor()
            if self._want_links:
                self._links = LinkMonitor()
            if self._want_rcu:
                self._rcu = RcuMode()
            for cleanup in self._cleanups:
                cleanup()
            self.info = machine()
        except BaseException:
            self._close()
            raise
        print(f"machine: {self.info}")
        return self

    def _use_libvirt(self) -> None:
        use_libvirt(self._libvirt.enter_context(running_libvirt(self.libvirt, _refuse)))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        try:
            if self._rcu is not None:
                self._rcu.restore()
            self.stack.close()
        finally:
            for cleanup in self._cleanups:
                with contextlib.suppress(Exception):
                    cleanup()
            if self._events is not None:
                self._events.close()
            if self._links is not None:
                self._links.close()
            self._libvirt.close()
            use_libvirt(HOST_LIBVIRT)


def _refuse(why: str) -> NoReturn:
    raise SystemExit(why)
