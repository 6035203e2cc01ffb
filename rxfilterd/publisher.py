"""MQTT: decisions and NIC state for the fleet view (the only module importing aiomqtt).

The sync path only calls :meth:`Publisher.decision` and :meth:`Publisher.nic_state`,
which touch memory and return: a slow or absent broker never slows syncing. Events wait
in a bounded queue (the oldest go when it is full, and a counter says how many); NIC
state is kept as the latest value per NIC, so retained state survives any overflow and
is republished in full after every reconnect. Topics and payloads: docs/mqtt.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError  # not re-exported by aiomqtt 2.x

import rxfilterd
from rxfilterd.config import MqttSettings

log = structlog.get_logger("rxfilterd")

SCHEMA = 1
# paho connects in a worker thread; a short timeout keeps shutdown from waiting on it.
CONNECT_TIMEOUT = 2.0
# CONNACK, PUBACK and DISCONNECT waits.
OPERATION_TIMEOUT = 5.0
KEEPALIVE = 30
# After a (re)connect: how long retained NIC topics from an earlier run take to arrive.
SWEEP_COLLECT = 1.0
# Clean shutdown: flush what is pending, then "offline", within about a second.
CLOSE_FLUSH = 0.5
CLOSE_BUDGET = 1.0

# paho's own log lines would bypass structlog; this module logs what matters itself.
_paho_logger = logging.getLogger("rxfilterd.paho")
_paho_logger.setLevel(logging.CRITICAL)

NicKey = tuple[str, str]


class TopicError(ValueError):
    """A name that cannot be one topic level."""


class BrokerError(Exception):
    """The broker cannot be reached or was lost; str() is the message to print."""


class BrokerRefused(BrokerError):
    """The broker answered CONNACK with a refusal (credentials, authorisation)."""


# ----------------------------------------------------------------------------- topics

# "/" separates levels, "+" and "#" are wildcards, NUL is forbidden in topics, and "%"
# is the escape character itself.
_ESCAPED = frozenset("%/+#\0")


def topic_segment(name: str) -> str:
    """*name* as one topic level: %XX-escapes / + # NUL and %; rejects an empty name."""
    if not name:
        raise TopicError("empty name")
    return "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in name)


def unescape_segment(segment: str) -> str:
    return urllib.parse.unquote(segment)


@dataclass(frozen=True)
class Topics:
    prefix: str
    host: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.host}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def nic_filter(self) -> str:
        return f"{self.base}/nic/#"

    def nic(self, domain: str, alias: str) -> str:
        return f"{self.base}/nic/{topic_segment(domain)}/{topic_segment(alias)}"


TopicKind = Literal["status", "events", "nic"]


@dataclass(frozen=True)
class ParsedTopic:
    host: str
    kind: TopicKind
    domain: str = ""
    alias: str = ""


def parse_topic(prefix: str, topic: str) -> ParsedTopic | None:
    """The host (and NIC) of one of our topics under *prefix*; None for anything else."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) == 2 and parts[1] in ("status", "events") and parts[0]:
        kind: TopicKind = "status" if parts[1] == "status" else "events"
        return ParsedTopic(parts[0], kind)
    if len(parts) == 4 and parts[1] == "nic" and all(parts):
        return ParsedTopic(parts[0], "nic", unescape_segment(parts[2]), unescape_segment(parts[3]))
    return None


# ----------------------------------------------------------------------------- queue


class EventQueue:
    """Bounded FIFO that drops its oldest item when full and counts what it dropped."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("queue size must be at least 1")
        self.size = size
        self.dropped = 0
        self._items: deque[dict[str, Any]] = deque()

    def put(self, item: dict[str, Any]) -> None:
        if len(self._items) >= self.size:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)

    def get(self) -> dict[str, Any] | None:
        return self._items.popleft() if self._items else None

    def unget(self, item: dict[str, Any]) -> None:
        """Put back an item whose publish failed; dropped instead if newer ones filled it."""
        if len(self._items) >= self.size:
            self.dropped += 1
        else:
            self._items.appendleft(item)

    def __len__(self) -> int:
        return len(self._items)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str).encode()


def _make_client(
    settings: MqttSettings, identifier: str, will: aiomqtt.Will | None = None
) -> aiomqtt.Client:
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier,
        will=will,
        clean_session=True,
        timeout=OPERATION_TIMEOUT,
        keepalive=KEEPALIVE,
        tls_context=settings.ssl_context(),
        logger=_paho_logger,
    )
    # aiomqtt has no option for it; paho's default (5 s) would outlast the exit budget.
    client._client.connect_timeout = CONNECT_TIMEOUT
    return client


def _refusal(settings: MqttSettings, exc: aiomqtt.MqttError) -> str:
    reason = str(exc)
    text = f"broker {settings.host}:{settings.port} refused the connection: {reason}"
    lowered = reason.lower()
    if "password" in lowered or "authori" in lowered:
        text += " (check mqtt.username and mqtt.password_file)"
    return text


# ----------------------------------------------------------------------------- publisher


class Publisher:
    """Publishes decision events and retained NIC state; see docs/mqtt.md."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix, settings.client_id)
        self.events = EventQueue(settings.queue_size)
        self.connected = False
        self.published = 0
        # Read here, at start-up, not on the event loop once the daemon syncs NICs.
        self._version = rxfilterd.__version__
        # Latest state per NIC; None = gone, kept until its clear has been published.
        self._latest: dict[NicKey, dict[str, Any] | None] = {}
        self._dirty: set[NicKey] = set()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._seq = 0
        self._frozen = False
        self._swept = False
        self._retained_seen: set[str] | None = None
        self._status_dropped = -1
        self._watcher: asyncio.Task[None] | None = None
        self._down_logged = False
        self._down_since: float | None = None
        self._ever_connected = False
        self._bad_names: set[NicKey] = set()

    # -- the sync path: never blocks, never raises for broker trouble

    def decision(self, record: dict[str, Any]) -> None:
        """A Daemon sink: queue one decision record as an event message."""
        self._seq += 1
        self.events.put({**record, "schema": SCHEMA, "seq": self._seq})
        self._wake.set()

    def nic_state(self, domain: str, alias: str, state: dict[str, Any] | None) -> None:
        """A Daemon state sink: remember the NIC's latest state (None: gone)."""
        if self._frozen:
            return
        key = (domain, alias)
        try:
            self.topics.nic(domain, alias)
        except TopicError as exc:
            if key not in self._bad_names:
                self._bad_names.add(key)
                log.warning("mqtt: NIC not published", domain=domain, alias=alias, error=str(exc))
            return
        self._latest[key] = None if state is None else {**state, "schema": SCHEMA}
        self._dirty.add(key)
        self._wake.set()

    def ready(self) -> None:
        """The daemon has published every current NIC: stale retained topics may go."""
        self._ready.set()

    def freeze(self) -> None:
        """Shutdown: keep the last retained state (the NICs still exist; status says offline)."""
        self._frozen = True

    # -- the publishing task

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, publish, reconnect with capped backoff, until *stop* is set."""
        settings = self.settings
        backoff = 1.0
        will = aiomqtt.Will(
            self.topics.status,
            _json({"status": "offline", "reason": "connection lost", "schema": SCHEMA}),
            qos=settings.qos,
            retain=True,
        )
        identifier = settings.client_id
        while not stop.is_set():
            try:
                client = _make_client(settings, identifier, will)
                async with client:
                    self._on_connected()
                    backoff = 1.0
                    await self._serve(client, stop)
                return
            except MqttConnectError as exc:
                self._on_failure(_refusal(settings, exc), refused=True)
            except aiomqtt.MqttError as exc:
                self._on_failure(str(exc) or type(exc).__name__, refused=False)
            except OSError as exc:  # TLS files gone since load, and the like
                self._on_failure(str(exc), refused=False)
            except Exception:  # a bug here must not end publishing for good
                log.exception("mqtt publisher error")
            finally:
                self.connected = False
                self._watcher = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            backoff = min(backoff * 2, max(settings.reconnect_max, 0.1))

    def _broker(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _on_connected(self) -> None:
        self.connected = True
        if self._down_logged:
            down = time.monotonic() - (self._down_since or time.monotonic())
            log.info("mqtt broker back", broker=self._broker(), down_seconds=round(down, 1))
        elif not self._ever_connected:
            log.info("mqtt connected", broker=self._broker(), topics=self.topics.base)
        self._ever_connected = True
        self._down_logged = False
        self._down_since = None

    def _on_failure(self, error: str, *, refused: bool) -> None:
        # One line when the broker goes away (or refuses us), none per retry.
        if self._down_logged:
            return
        self._down_logged = True
        self._down_since = time.monotonic()
        retry = f"retrying with backoff up to {self.settings.reconnect_max:g} s"
        if refused:
            log.error("mqtt broker refused the connection", error=error, retry=retry)
            return
        lost = "mqtt broker connection lost" if self._ever_connected else "mqtt broker unreachable"
        log.warning(lost, broker=self._broker(), error=error, retry=retry)

    async def _serve(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        # Raises MqttError as soon as the connection drops, even while we are idle.
        self._watcher = watcher = asyncio.create_task(self._watch(client))
        stop_wait = asyncio.create_task(stop.wait())
        sweep: asyncio.Task[None] | None = None
        try:
            await self._publish_status(client, "online")
            # A restarted broker may have lost everything: republish every NIC.
            self._dirty.update(self._latest)
            if not self._swept and not self._frozen:
                sweep = asyncio.create_task(self._sweep(client))
            while True:
                await self._flush(client, stop)
                if stop.is_set():
                    await self._close(client)
                    return
                self._wake.clear()
                if self._pending():
                    continue
                wake = asyncio.create_task(self._wake.wait())
                done, _ = await asyncio.wait(
                    {wake, stop_wait, watcher}, return_when=asyncio.FIRST_COMPLETED
                )
                wake.cancel()
                if watcher in done:
                    watcher.result()
                    raise aiomqtt.MqttError("connection closed")
        finally:
            for task in (watcher, stop_wait, sweep):
                if task is None:
                    continue
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the failure was handled above

    async def _watch(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            # Only the sweep subscribes: remember our retained NIC topics.
            if self._retained_seen is not None and message.retain and message.payload:
                self._retained_seen.add(message.topic.value)

    async def _sweep(self, client: aiomqtt.Client) -> None:
        """Clear retained NIC topics a previous run left for NICs that no longer exist."""
        try:
            self._retained_seen = set()
            await client.subscribe(self.topics.nic_filter, qos=self.settings.qos)
            await asyncio.sleep(SWEEP_COLLECT)
            await client.unsubscribe(self.topics.nic_filter)
            seen, self._retained_seen = self._retained_seen, None
            await self._ready.wait()
            if self._frozen:
                return
            current = {self.topics.nic(d, a) for (d, a), s in self._latest.items() if s}
            for topic in sorted(seen - current):
                await self._publish(client, topic, b"", retain=True)
                log.info("mqtt: cleared stale NIC state", topic=topic)
            self._swept = True
        except aiomqtt.MqttError as exc:
            log.debug("mqtt: stale state sweep interrupted", error=str(exc))
        finally:
            self._retained_seen = None

    def _pending(self) -> bool:
        return bool(self._dirty) or len(self.events) > 0 or self._status_stale()

    def _status_stale(self) -> bool:
        return self.events.dropped != self._status_dropped

    async def _flush(self, client: aiomqtt.Client, stop: asyncio.Event | None = None) -> None:
        """Publish what is pending; returns early once *stop* is set (_close takes over)."""
        while stop is None or not stop.is_set():
            if self._dirty:  # retained state first: it is what the fleet view shows
                key = self._dirty.pop()
                state = self._latest.get(key)
                try:
                    await self._publish(
                        client,
                        self.topics.nic(*key),
                        b"" if state is None else _json(state),
                        retain=True,
                    )
                except BaseException:
                    self._dirty.add(key)
                    raise
                if state is None and key not in self._dirty and self._latest.get(key) is None:
                    self._latest.pop(key, None)
            elif (item := self.events.get()) is not None:
                try:
                    payload = _json({**item, "dropped": self.events.dropped})
                    await self._publish(client, self.topics.events, payload, retain=False)
                except BaseException:
                    self.events.unget(item)
                    raise
            elif self._status_stale():
                await self._publish_status(client, "online")
            else:
                return

    async def _publish_status(self, client: aiomqtt.Client, status: str) -> None:
        dropped = self.events.dropped
        payload: dict[str, Any] = {
            "status": status,
            "time": time.time(),
            "dropped": dropped,
            "version": self._version,
            "schema": SCHEMA,
        }
        if status == "offline":
            payload["reason"] = "shutdown"
        await self._publish(client, self.topics.status, _json(payload), retain=True)
        self._status_dropped = dropped

    async def _publish(
        self, client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool
    ) -> None:
        publish = asyncio.create_task(
            client.publish(topic, payload, qos=self.settings.qos, retain=retain)
        )
        watcher = self._watcher
        # A QoS 1/2 publish in flight when the connection drops would wait for its full
        # timeout; the watcher notices the drop at once.
        waits: set[asyncio.Task[None]] = {publish} if watcher is None else {publish, watcher}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not publish.done():
                publish.cancel()
        if not publish.cancelled() and publish.done():
            publish.result()
            self.published += 1
            return
        raise aiomqtt.MqttError("connection lost while publishing")

    async def _close(self, client: aiomqtt.Client) -> None:
        """Flush briefly, then publish "offline": the will only covers unclean exits."""
        started = time.monotonic()
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await asyncio.wait_for(self._flush(client), timeout=CLOSE_FLUSH)
        left = max(0.1, CLOSE_BUDGET - (time.monotonic() - started))
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await asyncio.wait_for(self._publish_status(client, "offline"), timeout=left)
        log.info("mqtt disconnected", broker=self._broker(), dropped=self.events.dropped)


# ----------------------------------------------------------------------------- fleet


@dataclass(frozen=True)
class FleetMessage:
    topic: ParsedTopic
    payload: bytes
    retained: bool


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
        client = _make_client(settings, identifier)
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
        raise BrokerRefused(_refusal(settings, exc)) from None
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


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()
