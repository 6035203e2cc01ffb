"""MQTT test support: the shared mosquitto, private brokers, and subscribers.

The shared broker (127.0.0.1:1883, started by scripts/setup-host) is used by other test
runs at the same time: tests use their own random topic prefix and never stop it. A test
that stops or reconfigures a broker starts its own :class:`Mosquitto` on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 1883


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


def broker_problem(host: str = SHARED_HOST, port: int = SHARED_PORT) -> str | None:
    """None when something accepts TCP connections on host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"no MQTT broker on {host}:{port} ({exc}): run scripts/setup-host"


def random_prefix() -> str:
    return f"rxftest-{secrets.token_hex(6)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """A private mosquitto on 127.0.0.1:PORT that a test may stop, restart, lock down."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None) -> None:
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed: run scripts/setup-host")
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"
        lines = [
            # Run as root, mosquitto would switch to user "mosquitto", which cannot read
            # the test's private temp directory (its log and password file live there).
            *(["user root"] if os.geteuid() == 0 else []),
            f"listener {self.port} 127.0.0.1",
            "persistence false",  # a restart loses every retained message
            f"log_dest file {self.log}",
            "log_type all",
        ]
        if users:
            passwords = workdir / "mosquitto.passwd"
            for i, (user, password) in enumerate(users.items()):
                create = ["-c"] if i == 0 else []
                subprocess.run(
                    ["mosquitto_passwd", "-b", *create, str(passwords), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while broker_problem(SHARED_HOST, self.port) is not None:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {err}{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not listen on {self.port} within 10 s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _client(port: int, username: str | None = None, password: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(
        SHARED_HOST,
        port,
        username=username,
        password=password,
        identifier=f"rxftest-sub-{secrets.token_hex(4)}",
        timeout=5,
    )


async def retained(
    port: int, topic_filter: str, *, quiet: float = 0.5, total: float = 3.0
) -> dict[str, Msg]:
    """The broker's retained messages under TOPIC_FILTER, by topic (a fresh subscription)."""
    found: dict[str, Msg] = {}
    async with _client(port) as client:
        await client.subscribe(topic_filter, qos=1)
        started = last = time.monotonic()
        it = client.messages.__aiter__()
        while True:
            left = min(last + quiet, started + total) - time.monotonic()
            if left <= 0:
                break
            try:
                message = await asyncio.wait_for(_next(it), timeout=left)
            except TimeoutError:
                break
            if message.retain:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                found[message.topic.value] = Msg(message.topic.value, payload, True)
                last = time.monotonic()
    return found


async def _next(it: Any) -> aiomqtt.Message:
    message: aiomqtt.Message = await anext(it)
    return message


async def clear_retained(port: int, prefix: str) -> None:
    """Remove what a test left retained under PREFIX on a shared broker."""
    with contextlib.suppress(aiomqtt.MqttError, OSError):
        topics = await retained(port, f"{prefix}/#", quiet=0.3, total=2.0)
        async with _client(port) as client:
            for topic in topics:
                await client.publish(topic, b"", qos=1, retain=True)


class Listener:
    """Subscribes in a background thread and keeps every message; reconnects on loss.

    Usable from synchronous tests that drive a guest while messages arrive.
    """

    def __init__(self, port: int, topic_filters: list[str]) -> None:
        self.port = port
        self.filters = topic_filters
        self._messages: list[Msg] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.connections = 0

    def messages(self) -> list[Msg]:
        with self._lock:
            return list(self._messages)

    def wait_for(self, match: Callable[[Msg], bool], timeout: float, what: str) -> Msg:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages():
                if match(message):
                    return message
            if time.monotonic() > deadline:
                seen = "\n".join(f"{m.topic} {m.payload[:300]!r}" for m in self.messages()[-20:])
                raise AssertionError(f"no {what} within {timeout} s; last messages:\n{seen}")
            time.sleep(0.05)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        while not self._stop.is_set():
            try:
                async with _client(self.port) as client:
                    await client.subscribe([(f, 1) for f in self.filters])
                    self.connections += 1
                    self._subscribed.set()
                    reader = asyncio.create_task(self._read(client))
                    stop = asyncio.create_task(self._stop.wait())
                    await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
                    reader.cancel()
                    stop.cancel()
            except aiomqtt.MqttError:
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.05)

    async def _read(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                with self._lock:
                    self._messages.append(Msg(message.topic.value, payload, message.retain))

    def __enter__(self) -> Listener:
        self._thread.start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"could not subscribe on 127.0.0.1:{self.port}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)
