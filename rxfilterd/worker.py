"""A coalescing worker: runs one job when kicked, never two at once.

Kicks that arrive while the job runs fold into a single follow-up run, so a burst
of events costs one run in flight plus one after it. The follow-up waits until the
kicks pause for `settle` seconds (at most `settle_max`): a guest command that fires
events over a few hundred milliseconds then costs two runs, not one per round trip.
A first run after a quiet spell never waits. A token bucket (`rate` runs a
second, bursts of `burst`) bounds what a hostile guest can make the host do while
leaving an occasional change unthrottled.

A worker turns noisy when a follow-up waited the whole `settle_max` without a pause,
or kicks came while it waited for a token. A noisy worker waits `settle_max` and its
token out before each run, under a `Mute` held (kicks could not shorten that wait, so
their events are not worth receiving), and takes the mute off before the run. No kick
within `settle` after a run ends the noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

log = structlog.get_logger("rxfilterd")


class Mute(Protocol):
    """Protocol: what stops a noisy worker's kicks coming while it waits (see module)."""

    async def hold(self) -> None:
        """Stop them (may decline); cancelled half-way, a release() still follows."""

    async def release(self) -> None:
        """Let them come again; returns once they do. Harmless when not held."""

    def calm(self) -> None:
        """The noise ended (no kick within `settle` after a run)."""


class CoalescingWorker:
    def __init__(
        self,
        name: str,
        job: Callable[[str], Awaitable[None]],
        rate: float | None = None,
        burst: int = 1,
        settle: float = 0.0,
        settle_max: float = 0.25,
        mute: Mute | None = None,
    ) -> None:
        self.name = name
        self._mute = mute
        self._noisy = False
        self._settle = settle
        self._settle_max = settle_max
        self._kicks = 0
        self._followup = False
        self._job = job
        self._rate = rate
        self._burst = max(1, burst)
        self._tokens = float(self._burst)
        self._refilled = time.monotonic()
        self._wake = asyncio.Event()
        self._cause = ""
        self._timer: asyncio.TimerHandle | None = None
        self._running = False
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    @property
    def mute(self) -> Mute | None:
        return self._mute

    def kick(self, cause: str, delay: float = 0.0) -> None:
        """Ask for a run (after DELAY seconds); CAUSE is what the run is told."""
        if self._stopping:
            return
        if delay > 0:
            if self._timer is None:  # an earlier pending retry stands
                self._timer = asyncio.get_running_loop().call_later(delay, self._fire, cause)
            return
        self._kicks += 1
        # The first cause since the last run wins: it is what started the change.
        if not self._wake.is_set():
            self._cause = cause
        self._wake.set()

    def _fire(self, cause: str) -> None:
        self._timer = None
        self.kick(cause)

    async def _run(self) -> None:
        while not self._stopping:
            if self._noisy and not await self._kicked_within(self._settle):
                self._noisy = False
                if self._mute is not None:
                    self._mute.calm()
            await self._wake.wait()
            if self._noisy and self._mute is not None:
                await self._wait_muted(self._mute)
            else:
                if self._followup and not await self._wait_for_quiet():
                    self._noisy = True
                seen = self._kicks
                await self._take_token()
                self._noisy = self._noisy or self._kicks != seen
            if self._stopping:
                return
            self._wake.clear()
            cause, self._cause = self._cause, ""
            # Awaited in this task, not in one of its own: a new task would cost a
            # loop turn before the job starts, on the path a guest's change waits on.
            self._running = True
            try:
                await self._job(cause)
            except asyncio.CancelledError:
                if self._stopping or self._task.cancelling():
                    raise
                # The job cancelled itself: that costs one run, like a failure.
            except Exception:  # a bug must cost one run, not the worker
                log.exception("worker job failed", worker=self.name)
            finally:
                self._running = False
            # Kicked while it ran: the guest was still changing.
            self._followup = self._wake.is_set()

    async def _kicked_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        return self._wake.is_set()

    async def _wait_for_quiet(self) -> bool:
        """Wait until the kicks pause for `settle`: whether they did before `settle_max`."""
        if self._settle <= 0:
            return True
        deadline = time.monotonic() + self._settle_max
        while time.monotonic() < deadline:
            seen = self._kicks
            await asyncio.sleep(min(self._settle, max(0.0, deadline - time.monotonic())))
            if self._kicks == seen:
                return True
        return False

    async def _wait_muted(self, mute: Mute) -> None:
        try:
            await mute.hold()
            await asyncio.sleep(self._settle_max)
            await self._take_token()
        finally:
            # Before the run: its query must come after the kicks can come again.
            await mute.release()

    def set_rate(self, rate: float | None, burst: int = 1) -> None:
        """A new limit (config reload); tokens already earned are kept up to BURST."""
        self._rate = rate
        self._burst = max(1, burst)
        self._tokens = min(self._tokens, float(self._burst))

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

    async def stop(self, grace: float = 0.0) -> None:
        """No more runs; a run in flight gets up to GRACE seconds, then is cancelled.

        Pending kicks and retries are dropped. The job sees the cancellation (and can
        say what it leaves undone) when the grace runs out.
        """
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if grace > 0 and self._running:
            # The loop in _run ends after this run, since _stopping is set.
            await asyncio.wait({self._task}, timeout=grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class WorkerPool:
    """Every worker made and not yet told to stop, and those stopping.

    The bookkeeping that proves nothing is left behind for a NIC or domain that went.
    """

    def __init__(self) -> None:
        self._live: set[CoalescingWorker] = set()
        self._stopping: set[CoalescingWorker] = set()

    def start(
        self,
        name: str,
        job: Callable[[str], Awaitable[None]],
        *,
        rate: float | None = None,
        burst: int = 1,
        settle: float = 0.0,
        mute: Mute | None = None,
    ) -> CoalescingWorker:
        worker = CoalescingWorker(name, job, rate=rate, burst=burst, settle=settle, mute=mute)
        self._live.add(worker)
        return worker

    def retire(
        self, workers: list[CoalescingWorker], grace: float, then: Callable[[], None]
    ) -> asyncio.Task[None]:
        """Stop WORKERS in a task (callers may be one of their jobs), then call THEN."""
        for worker in workers:
            self._live.discard(worker)
            self._stopping.add(worker)

        async def stop_all() -> None:
            try:
                await asyncio.gather(*(w.stop(grace) for w in workers))
            finally:
                self._stopping.difference_update(workers)
                then()

        return asyncio.get_running_loop().create_task(stop_all())

    def counts(self, owned: set[CoalescingWorker]) -> tuple[int, int, int]:
        """Live workers, those stopping, and live ones OWNED does not hold (orphans)."""
        return len(self._live), len(self._stopping), len(self._live - owned)
