"""Fixtures for tests against a real mosquitto.

No broker on 127.0.0.1:1883: these tests skip, or fail when CI=true. Each test gets its
own random topic prefix, and what it left retained on the shared broker is cleared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.support.guest import skip_or_fail
from tests.support.mqtt import SHARED_PORT, broker_problem, clear_retained, random_prefix


@pytest.fixture
def shared_broker() -> int:
    """The port of the shared broker, once it is known to answer."""
    problem = broker_problem()
    if problem is not None:
        skip_or_fail(problem)
    return SHARED_PORT


@pytest.fixture
def topic_prefix(shared_broker: int) -> Iterator[str]:
    prefix = random_prefix()
    try:
        yield prefix
    finally:
        asyncio.run(clear_retained(shared_broker, prefix))
