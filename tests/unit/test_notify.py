"""sd_notify against a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from rxfilterd.notify import Notifier, watchdog_interval


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    # Short /tmp dir: sun_path is limited to 108 bytes and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="rxf-") as tmp:
        path = os.path.join(tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        try:
            yield sock, path
        finally:
            sock.close()


def _recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def _assert_nothing_queued(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_ready_status_watchdog_stopping(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert _recv(sock) == b"READY=1\n"
    assert n.status("connected; 3/3 NICs synced")
    assert _recv(sock) == b"STATUS=connected; 3/3 NICs synced\n"
    assert n.watchdog()
    assert _recv(sock) == b"WATCHDOG=1\n"
    assert n.stopping()
    assert _recv(sock) == b"STOPPING=1\n"
    _assert_nothing_queued(sock)


def test_ready_with_status_is_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert Notifier({"NOTIFY_SOCKET": path}).ready(status="ready")
    assert _recv(sock) == b"READY=1\nSTATUS=ready\n"


def test_send_keeps_order_and_cannot_inject_lines(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.send(STATUS="a\nREADY=1", ERRNO=5)
    assert _recv(sock) == b"STATUS=a READY=1\nERRNO=5\n"


def test_abstract_socket() -> None:
    name = f"rxfilterd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1\n"


def test_absent_socket_is_noop() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.send() is False


def test_unsupported_address_is_noop() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_send_failure_returns_false_without_raising() -> None:
    with tempfile.TemporaryDirectory(prefix="rxf-") as tmp:
        n = Notifier({"NOTIFY_SOCKET": os.path.join(tmp, "nobody-listens")})
        assert n.enabled
        assert n.ready() is False
        assert Notifier({"NOTIFY_SOCKET": "/" + "x" * 200}).ready() is False


def test_reads_os_environ_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().ready()
    assert _recv(sock) == b"READY=1\n"


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, pid=42) is None
    own = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(own) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "junk"}) is None
