"""`rxfilterd fleet` on the broker: the retained state of every host, then live messages.

What it prints is fleet.py's (pure); this module reads the broker and prints.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not re-exported by aiomqtt 2.x

from rxfilterd.config import MqttSettings
from rxfilterd.fleet import LiveFormatter, rows, table
from rxfilterd.mqtt_client import BrokerError, BrokerRefused, make_client, refusal
from rxfilterd.mqtt_topics import FleetMessage, parse_topic


def run(settings: MqttSettings, *, follow: bool) -> bool:
    """Print the table (then, with FOLLOW, live lines until Ctrl-C); False if the broker fails."""
    try:
        return asyncio.run(_show(settings, follow))
    except KeyboardInterrupt:  # Ctrl-C before the handler is in place
        return True


async def _show(settings: MqttSettings, follow: bool) -> bool:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    live = LiveFormatter()

    def snapshot(messages: list[FleetMessage]) -> None:
        print(table(rows(messages)), flush=True)

    def event(message: FleetMessage) -> None:
        line = live.line(message)
        if line is not None:
            print(line, flush=True)

    try:
        await read_fleet(settings, follow=follow, on_snapshot=snapshot, on_live=event, stop=stop)
    except BrokerError as exc:
        print(f"rxfilterd: fleet: {exc}", file=sys.stderr)
        return False
    return True


async def read_fleet(
    settings: MqttSettings,
    *,
    follow: bool,
    on_snapshot: Callable[[list[FleetMessage]], None],
    on_live: Callable[[FleetMessage], None],
    stop: asyncio.Event,
    quiet: float = 1.0,
    total: float = 3.0,
) -> None:
    """Collect the retained state of every host, then (with *follow*) live messages.

    Collection ends *quiet* seconds after the last retained message, or after *total*
    seconds. Raises BrokerRefused / BrokerError with a printable message.
    """
    prefix = settings.topic_prefix
    identifier = f"rxfilterd-fleet-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        client = make_client(settings, identifier)
        async with client:
            filters = [f"{prefix}/+/status", f"{prefix}/+/nic/#"]
            if follow:
                filters.append(f"{prefix}/+/events")
            await client.subscribe([(f, settings.qos) for f in filters])
            messages = client.messages.__aiter__()
            snapshot, live = await _collect(messages, prefix, quiet, total)
            on_snapshot(snapshot)
            if not follow:
                return
            for item in live:
                on_live(item)
            await _follow(messages, prefix, on_live, stop)
    except MqttConnectError as exc:
        raise BrokerRefused(refusal(settings, exc)) from None
    except aiomqtt.MqttError as exc:
        raise BrokerError(f"broker {settings.host}:{settings.port}: {exc}") from None
    except OSError as exc:
        raise BrokerError(f"broker {settings.host}:{settings.port}: {exc}") from None


async def _collect(
    messages: AsyncIterator[aiomqtt.Message], prefix: str, quiet: float, total: float
) -> tuple[list[FleetMessage], list[FleetMessage]]:
    """The retained messages (the snapshot), and live ones that came meanwhile."""
    snapshot: list[FleetMessage] = []
    live: list[FleetMessage] = []
    started = last = time.monotonic()
    while True:
        deadline = min(last + quiet, started + total)
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            break
        try:
            message = await asyncio.wait_for(_next(messages), timeout=timeout)
        except TimeoutError:
            break
        parsed = parse_topic(prefix, message.topic.value)
        if parsed is None:
            continue
        item = FleetMessage(parsed, _payload_bytes(message.payload), message.retain)
        if message.retain:
            snapshot.append(item)
            last = time.monotonic()
        else:
            live.append(item)
    return snapshot, live


async def _follow(
    messages: AsyncIterator[aiomqtt.Message],
    prefix: str,
    on_live: Callable[[FleetMessage], None],
    stop: asyncio.Event,
) -> None:
    """Every further message of ours to ON_LIVE, until STOP."""
    stop_wait = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            get = asyncio.create_task(_next(messages))
            done, _ = await asyncio.wait({get, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                break
            message = get.result()
            parsed = parse_topic(prefix, message.topic.value)
            if parsed is not None:
                on_live(FleetMessage(parsed, _payload_bytes(message.payload), message.retain))
    finally:
        stop_wait.cancel()


async def _next(messages: AsyncIterator[aiomqtt.Message]) -> aiomqtt.Message:
    return await anext(messages)


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()
