"""The aiomqtt client as the publisher and the fleet reader open it, and broker errors.

With publisher.py and fleet_reader.py, the only modules that import aiomqtt.
"""

from __future__ import annotations

import logging
import time

import aiomqtt
import structlog

from rxfilterd.config import MqttSettings

log = structlog.get_logger("rxfilterd")

# paho connects in a worker thread; a short timeout keeps shutdown from waiting on it.
CONNECT_TIMEOUT = 2.0
# CONNACK, PUBACK and DISCONNECT waits.
OPERATION_TIMEOUT = 5.0
KEEPALIVE = 30

# paho's own log lines would bypass structlog; the callers log what matters themselves.
_paho_logger = logging.getLogger("rxfilterd.paho")
_paho_logger.setLevel(logging.CRITICAL)


class BrokerError(Exception):
    """The broker cannot be reached or was lost; str() is the message to print."""


class BrokerRefused(BrokerError):
    """The broker answered CONNACK with a refusal (credentials, authorisation)."""


def make_client(
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
    # aiomqtt 2.x has no option for the TCP connect's timeout (its `timeout` covers the
    # CONNACK wait only; checked up to 2.5.1, and 3.x drops paho altogether), so this is
    # paho's own setting, reached through aiomqtt's paho client: paho's default (5 s)
    # would keep the worker thread, and so the process's exit, waiting on a dead broker.
    client._client.connect_timeout = CONNECT_TIMEOUT
    return client


def refusal(settings: MqttSettings, exc: aiomqtt.MqttError) -> str:
    """What to print for a CONNACK refusal, with the keys to check."""
    reason = str(exc)
    text = f"broker {settings.host}:{settings.port} refused the connection: {reason}"
    lowered = reason.lower()
    if "password" in lowered or "authori" in lowered:
        text += " (check mqtt.username and mqtt.password_file)"
    return text


class BrokerHealth:
    """Whether the broker is connected, said in the log once per change, never per retry."""

    def __init__(self, settings: MqttSettings, topics: str) -> None:
        self.broker = f"{settings.host}:{settings.port}"
        self.connected = False
        self._topics = topics
        self._retry = f"retrying with backoff up to {settings.reconnect_max:g} s"
        self._down_logged = False
        self._down_since: float | None = None
        self._ever_connected = False

    def up(self) -> None:
        self.connected = True
        if self._down_logged:
            down = time.monotonic() - (self._down_since or time.monotonic())
            log.info("mqtt broker back", broker=self.broker, down_seconds=round(down, 1))
        elif not self._ever_connected:
            log.info("mqtt connected", broker=self.broker, topics=self._topics)
        self._ever_connected = True
        self._down_logged = False
        self._down_since = None

    def down(self, error: str, *, refused: bool) -> None:
        """One line when the broker goes away (or refuses us), none per retry."""
        self.connected = False
        if self._down_logged:
            return
        self._down_logged = True
        self._down_since = time.monotonic()
        if refused:
            log.error("mqtt broker refused the connection", error=error, retry=self._retry)
            return
        lost = "mqtt broker connection lost" if self._ever_connected else "mqtt broker unreachable"
        log.warning(lost, broker=self.broker, error=error, retry=self._retry)
