"""MQTT: decisions and NIC state for the fleet view.

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
import time
from collections import deque
from typing import Generic, TypeVar

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError  # not re-exported by aiomqtt 2.x

import rxfilterd
from rxfilterd.config import MqttSettings
from rxfilterd.mqtt_client import BrokerHealth, make_client, refusal
from rxfilterd.mqtt_topics import TopicError, Topics
from rxfilterd.records import Decision, JsonObject, JsonValue, NicKey, NicState

log = structlog.get_logger("rxfilterd")

# Each payload's schema version (docs/mqtt.md). Events are at 3 and NIC state at 2:
# both name the libvirt connection (`libvirt`: host, pod/<name>), and a NIC's topic
# has that level too. (Events at 2 stopped repeating their name as `action`.)
STATUS_SCHEMA = 1
NIC_SCHEMA = 2
EVENT_SCHEMA = 3
# After a (re)connect: how long retained NIC topics from an earlier run take to arrive.
SWEEP_COLLECT = 1.0
# Clean shutdown: flush what is pending, then "offline", within about a second.
CLOSE_FLUSH = 0.5
CLOSE_BUDGET = 1.0

_T = TypeVar("_T")


class EventQueue(Generic[_T]):
    """Bounded FIFO that drops its oldest item when full and counts what it dropped."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("queue size must be at least 1")
        self.size = size
        self.dropped = 0
        self._items: deque[_T] = deque()

    def put(self, item: _T) -> None:
        if len(self._items) >= self.size:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)

    def get(self) -> _T | None:
        return self._items.popleft() if self._items else None

    def unget(self, item: _T) -> None:
        """Put back an item whose publish failed; dropped instead if newer ones filled it."""
        if len(self._items) >= self.size:
            self.dropped += 1
        else:
            self._items.appendleft(item)

    def __len__(self) -> int:
        return len(self._items)


def event_payload(decision: Decision, seq: int, dropped: int) -> bytes:
    """An events message: the decision, its number in this run, and the drops so far."""
    fields = decision.payload()
    return _json({**fields, "schema": EVENT_SCHEMA, "seq": seq, "dropped": dropped})


def nic_payload(state: NicState | None) -> bytes:
    """A NIC's retained message; empty (which clears the topic) once the NIC is gone."""
    return b"" if state is None else _json({**state.payload(), "schema": NIC_SCHEMA})


def status_payload(status: str, *, dropped: int, version: str) -> bytes:
    """A clean status message: online, or offline at shutdown (the will says the rest)."""
    payload: JsonObject = {
        "status": status,
        "time": time.time(),
        "dropped": dropped,
        "version": version,
        "schema": STATUS_SCHEMA,
    }
    if status == "offline":
        payload["reason"] = "shutdown"
    return _json(payload)


# What the broker publishes for us when the connection drops uncleanly.
WILL_PAYLOAD: JsonObject = {
    "status": "offline",
    "reason": "connection lost",
    "schema": STATUS_SCHEMA,
}


def _json(value: JsonValue) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class Publisher:
    """Publishes decision events and retained NIC state; see docs/mqtt.md."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix, settings.client_id)
        # Decisions with their sequence numbers, waiting for the broker.
        self.events: EventQueue[tuple[int, Decision]] = EventQueue(settings.queue_size)
        self.health = BrokerHealth(settings, self.topics.base)
        self.published = 0
        # Read here, at start-up, not on the event loop once the daemon syncs NICs.
        self._version = rxfilterd.__version__
        # Latest state per NIC; None = gone, kept until its clear has been published.
        self._latest: dict[NicKey, NicState | None] = {}
        self._dirty: set[NicKey] = set()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._seq = 0
        self._frozen = False
        self._swept = False
        self._retained_seen: set[str] | None = None
        self._status_dropped = -1
        self._watcher: asyncio.Task[None] | None = None
        self._bad_names: set[NicKey] = set()

    # -- the sync path: never blocks, never raises for broker trouble

    def decision(self, decision: Decision) -> None:
        """A decision sink: queue one decision as an event message."""
        self._seq += 1
        self.events.put((self._seq, decision))
        self._wake.set()

    def nic_state(self, key: NicKey, state: NicState | None) -> None:
        """A state sink: remember the NIC's latest state (None: gone)."""
        if self._frozen:
            return
        try:
            self.topics.nic(*key)
        except TopicError as exc:
            if key not in self._bad_names:
                self._bad_names.add(key)
                libvirt, domain, alias = key
                log.warning(
                    "mqtt: NIC not published",
                    libvirt=libvirt,
                    domain=domain,
                    alias=alias,
                    error=str(exc),
                )
            return
        self._latest[key] = state
        self._dirty.add(key)
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self.health.connected

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
            _json(WILL_PAYLOAD),
            qos=settings.qos,
            retain=True,
        )
        identifier = settings.client_id
        while not stop.is_set():
            try:
                client = make_client(settings, identifier, will)
                async with client:
                    self.health.up()
                    backoff = 1.0
                    await self._serve(client, stop)
                return
            except MqttConnectError as exc:
                self.health.down(refusal(settings, exc), refused=True)
            except aiomqtt.MqttError as exc:
                self.health.down(str(exc) or type(exc).__name__, refused=False)
            except OSError as exc:  # TLS files gone since load, and the like
                self.health.down(str(exc), refused=False)
            except Exception:  # a bug here must not end publishing for good
                log.exception("mqtt publisher error")
            finally:
                self.health.connected = False
                self._watcher = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            backoff = min(backoff * 2, max(settings.reconnect_max, 0.1))

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
            current = {self.topics.nic(*key) for key, s in self._latest.items() if s}
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
                        nic_payload(state),
                        retain=True,
                    )
                except BaseException:
                    self._dirty.add(key)
                    raise
                if state is None and key not in self._dirty and self._latest.get(key) is None:
                    self._latest.pop(key, None)
            elif (item := self.events.get()) is not None:
                try:
                    seq, decision = item
                    seq, decision = item
                    payload = event_payload(decision, seq, self.events.dropped)
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
        payload = status_payload(status, dropped=dropped, version=self._version)
        await self._publish(client, self.topics.status, payload, retain=True)
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
        log.info("mqtt disconnected", broker=self.health.broker, dropped=self.events.dropped)
