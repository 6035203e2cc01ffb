"""The coalescing worker: a burst costs one run in flight plus one follow-up."""

from __future__ import annotations

import asyncio

from rxfilterd.worker import CoalescingWorker


def test_burst_collapses_into_one_follow_up() -> None:
    async def scenario() -> list[str]:
        started = asyncio.Event()
        release = asyncio.Event()
        causes: list[str] = []

        async def job(cause: str) -> None:
            causes.append(cause)
            started.set()
            await release.wait()

        worker = CoalescingWorker("nic", job)
        worker.kick("event")
        await started.wait()
        for _ in range(15):  # the burst QEMU sends for one guest command
            worker.kick("event")
        release.set()
        await asyncio.sleep(0.05)
        await worker.stop()
        return causes

    assert asyncio.run(scenario()) == ["event", "event"]


def test_rate_limit_allows_a_burst_then_spaces_runs() -> None:
    async def scenario() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        times: list[float] = []

        async def job(_cause: str) -> None:
            times.append(loop.time())

        worker = CoalescingWorker("nic", job, rate=5.0, burst=2)
        for _ in range(20):  # a guest flipping as fast as it can, for ~0.5 s
            last_kick = loop.time()
            worker.kick("event")
            await asyncio.sleep(0.025)
        await asyncio.sleep(0.3)
        await worker.stop()
        return times, last_kick

    times, last_kick = asyncio.run(scenario())
    assert times[-1] >= last_kick  # the last state lands
    # Never more than the bucket allows over the span (jitter can only mean fewer runs).
    assert len(times) <= 2 + 5.0 * (times[-1] - times[0]) + 1e-6
    # Throttled: 20 kicks became far fewer runs, and a run followed the last kick.
    assert 3 <= len(times) < 10


def test_a_failing_job_does_not_kill_the_worker() -> None:
    async def scenario() -> int:
        calls = 0

        async def job(_cause: str) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("boom")

        worker = CoalescingWorker("nic", job)
        worker.kick("a")
        await asyncio.sleep(0.01)
        worker.kick("b")
        await asyncio.sleep(0.01)
        await worker.stop()
        return calls

    assert asyncio.run(scenario()) == 2


def test_delayed_kick_fires_once() -> None:
    async def scenario() -> list[str]:
        causes: list[str] = []

        async def job(cause: str) -> None:
            causes.append(cause)

        worker = CoalescingWorker("nic", job)
        worker.kick("retry", delay=0.05)
        worker.kick("retry", delay=0.05)
        await asyncio.sleep(0.15)
        await worker.stop()
        return causes

    assert asyncio.run(scenario()) == ["retry"]


def test_stop_lets_a_run_in_flight_finish_within_the_grace() -> None:
    async def scenario() -> list[str]:
        done: list[str] = []

        async def job(cause: str) -> None:
            await asyncio.sleep(0.05)
            done.append(cause)

        worker = CoalescingWorker("nic", job)
        worker.kick("event")
        await asyncio.sleep(0.01)
        worker.kick("event")  # a follow-up that must not start after stop()
        await worker.stop(grace=1.0)
        worker.kick("late")  # ignored once stopped
        await asyncio.sleep(0.01)
        return done

    assert asyncio.run(scenario()) == ["event"]


def test_stop_cancels_a_run_that_outlives_the_grace() -> None:
    async def scenario() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        cancelled = False
        started = asyncio.Event()

        async def job(_cause: str) -> None:
            nonlocal cancelled
            started.set()
            try:
                await asyncio.Event().wait()  # a query to a stuck domain
            except asyncio.CancelledError:
                cancelled = True
                raise

        worker = CoalescingWorker("nic", job)
        worker.kick("event")
        await started.wait()
        began = loop.time()
        await worker.stop(grace=0.1)
        return cancelled, loop.time() - began

    cancelled, took = asyncio.run(scenario())
    assert cancelled and 0.1 <= took < 0.5


def test_stop_drops_a_pending_retry() -> None:
    async def scenario() -> list[str]:
        causes: list[str] = []

        async def job(cause: str) -> None:
            causes.append(cause)

        worker = CoalescingWorker("nic", job)
        worker.kick("retry", delay=0.05)
        await worker.stop()
        await asyncio.sleep(0.1)
        return causes

    assert asyncio.run(scenario()) == []


def test_follow_up_waits_for_the_burst_to_settle() -> None:
    async def scenario() -> list[str]:
        causes: list[str] = []

        async def job(cause: str) -> None:
            causes.append(cause)
            await asyncio.sleep(0.01)  # a query round trip

        worker = CoalescingWorker("nic", job, settle=0.06, settle_max=1.0)
        # Events every 10 ms for 150 ms, as one guest command can produce.
        for _ in range(15):
            worker.kick("event")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        await worker.stop()
        return causes

    # The first run starts at once, the follow-up only once the events stop.
    assert asyncio.run(scenario()) == ["event", "event"]


def test_set_rate_takes_effect_for_the_next_runs() -> None:
    async def scenario() -> int:
        runs = 0

        async def job(_cause: str) -> None:
            nonlocal runs
            runs += 1

        worker = CoalescingWorker("nic", job, rate=1000.0, burst=1)
        worker.set_rate(0.5, 1)  # one run now, the next only after 2 s
        worker.kick("event")
        await asyncio.sleep(0.05)
        worker.kick("event")
        await asyncio.sleep(0.3)
        await worker.stop()
        return runs

    assert asyncio.run(scenario()) == 1
