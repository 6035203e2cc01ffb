"""sd_notify(3) without libsystemd.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=value`` lines sent to
the socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
The unit uses ``NotifyAccess=main``; systemd identifies the sender by the kernel-attached
credentials, so nothing else is needed on our side.

Every method is best effort and returns whether the datagram left: a daemon must not
fail (or log-spam) because the service manager is away, e.g. when run by hand.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

FieldValue = str | int


def _socket_address(raw: str | None) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into an address ``socket.sendto`` accepts."""
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace: systemd spells the leading NUL as '@'.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # vsock: and relative paths are not for a host daemon; treat as "not under systemd".
    return None


def _clean(value: FieldValue) -> str:
    # A newline would start a new assignment, letting a status text forge READY=1 etc.
    return str(value).replace("\r", " ").replace("\n", " ")


class Notifier:
    """Sends sd_notify messages to the socket named in ``environ['NOTIFY_SOCKET']``.

    ``environ`` defaults to ``os.environ``. Without ``NOTIFY_SOCKET`` every call is a
    no-op returning False.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to talk to."""
        return self._address is not None

    def send(self, **fields: FieldValue) -> bool:
        """Send one datagram with the given assignments, in argument order.

        Returns True if the datagram was handed to the kernel; False when disabled,
        when ``fields`` is empty, or on any OS error. Never raises.
        """
        if self._address is None or not fields:
            return False
        payload = "".join(f"{key}={_clean(value)}\n" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # MSG_DONTWAIT: a stuck PID 1 must not stall the asyncio loop.
                sock.sendto(payload.encode(), socket.MSG_DONTWAIT, self._address)
        except (OSError, UnicodeError, ValueError):
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (optionally with STATUS=) -- after the first full reconcile."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """STATUS=<one line> shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1 keep-alive; only call while the daemon is actually healthy."""
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1 at the start of shutdown."""
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is armed for us.

    Reads ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which when set must equal ``pid``,
    default ``os.getpid()``). Returns half the timeout, the period systemd recommends,
    so that one late ping does not get the service killed.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            target = int(raw_pid)
        except ValueError:
            return None
        # The variables are inherited by children; only the named process is watched.
        if target != (os.getpid() if pid is None else pid):
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000
