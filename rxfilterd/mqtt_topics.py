"""MQTT topics: what rxfilterd publishes where, and reading a topic back. No I/O.

Topics and payloads: docs/mqtt.md.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Literal


class TopicError(ValueError):
    """A name that cannot be one topic level."""


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

    def nic(self, libvirt: str, domain: str, alias: str) -> str:
        levels = "/".join(topic_segment(name) for name in (libvirt, domain, alias))
        return f"{self.base}/nic/{levels}"


TopicKind = Literal["status", "events", "nic"]


@dataclass(frozen=True)
class ParsedTopic:
    host: str
    kind: TopicKind
    libvirt: str = ""
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
    if len(parts) == 5 and parts[1] == "nic" and all(parts):
        libvirt, domain, alias = (unescape_segment(p) for p in parts[2:])
        return ParsedTopic(parts[0], "nic", libvirt, domain, alias)
    return None


@dataclass(frozen=True)
class FleetMessage:
    """One of our messages as `rxfilterd fleet` reads it back."""

    topic: ParsedTopic
    payload: bytes
    retained: bool
