"""The daemon's side of `rxfilterd status`: a root-only unix socket on the event loop.

Each client gets one JSON document (the live state, bounded) and the connection is
closed. Building it is a walk over the NICs on the loop, well under a millisecond
per hundred NICs; a client that does not read is dropped after WRITE_TIMEOUT rather
than holding anything, and at most MAX_CLIENTS are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import structlog

from rxfilterd.records import JsonObject

log = structlog.get_logger("rxfilterd")

READ_TIMEOUT = 2.0
WRITE_TIMEOUT = 5.0
MAX_CLIENTS = 4
# A request is one short line ("status"); anything longer is not a client of ours.
MAX_REQUEST = 256


class StatusServer:
    """Answers on PATH with SNAPSHOT() as JSON."""

    def __init__(self, path: Path, snapshot: Callable[[], JsonObject]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

    async def start(self) -> bool:
        """Listen; False (and a log line saying why) when the socket cannot be had."""
        try:
            # systemd makes the directory (RuntimeDirectory=); run by hand, we do.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if await _answers(self.path):
                log.error(
                    "status: another rxfilterd answers here; not serving", path=str(self.path)
                )
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # left by a daemon that did not stop cleanly
            old_umask = os.umask(0o077)  # root only, from the moment it exists
            try:
                self._server = await asyncio.start_unix_server(
                    self._serve, path=str(self.path), limit=MAX_REQUEST
                )
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
        except OSError as exc:
            log.error("status: cannot listen", path=str(self.path), error=str(exc))
            return False
        log.debug("status: listening", path=str(self.path))
        return True

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
        self._server = None
        _remove_stale(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            # The request line is read but not needed: there is one question so far.
            with contextlib.suppress(TimeoutError, ValueError, ConnectionError):
                await asyncio.wait_for(reader.readline(), timeout=READ_TIMEOUT)
            body = json.dumps(self._snapshot(), default=str).encode() + b"\n"
            writer.write(body)
            await asyncio.wait_for(writer.drain(), timeout=WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            log.debug("status: client dropped", error=repr(exc))
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)


async def _answers(path: Path) -> bool:
    """Whether something listens on the unix socket PATH."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, str(path)), 1.0)
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
    return True


def _make_directory(path: Path) -> None:
    # systemd makes the directory (RuntimeDirectory=); run by hand, we do.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _remove_stale(path: Path) -> None:
    """PATH gone: a socket left by a daemon that did not stop cleanly, or ours at exit."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
