"""A coalescing worker: runs one job when kicked, never two at once.

Kicks that arrive while the job runs fold into a single follow-up run, so a burst
of events costs one run in flight plus one after it. A token bucket (`rate` runs a
second, bursts of `burst`) bounds what a hostile guest can make the host do while
leaving an occasional change unthrottled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("rxfilterd")


class CoalescingWorker:
    def __init__(
        self,
        name: str,
        job: Callable[[str], Awaitable[None]],
        rate: float | None = None,
        burst: int = 1,
    ) -> None:
        self.name = name
        self._job = job
        self._rate = rate
        self._burst = max(1, burst)
        self._tokens = float(self._burst)
        self._refilled = time.monotonic()
        self._wake = asyncio.Event()
        self._cause = ""
        self._timer: asyncio.TimerHandle | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)
        self.runs = 0

    def kick(self, cause: str, delay: float = 0.0) -> None:
        """Ask for a run (after DELAY seconds); CAUSE is what the run is told."""
        if delay > 0:
            if self._timer is None:  # an earlier pending retry stands
                self._timer = asyncio.get_running_loop().call_later(delay, self._fire, cause)
            return
        # The first cause since the last run wins: it is what started the change.
        if not self._wake.is_set():
            self._cause = cause
        self._wake.set()

    def _fire(self, cause: str) -> None:
        self._timer = None
        self.kick(cause)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await self._take_token()
            self._wake.clear()
            cause, self._cause = self._cause, ""
            self.runs += 1
            try:
                await self._job(cause)
            except Exception:  # a bug must cost one run, not the worker
                log.exception("worker job failed", worker=self.name)

    async def _take_token(self) -> None:
        if self._rate is None:
            return
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            await asyncio.sleep((1 - self._tokens) / self._rate)
            self._tokens = 1.0
            self._refilled = time.monotonic()
        self._tokens -= 1

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def idle(self) -> bool:
        return not self._wake.is_set()
