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
    # The grace is waited out, then the run is cancelled (a stuck run that was not
    # would hang this test): the upper bound only tells the two apart.
    assert cancelled and 0.1 <= took < 5


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


class GuestNoise:
    """A guest changing its filter non-stop: a kick every 5 ms, none while muted."""

    def __init__(self) -> None:
        self.trace: list[str] = []
        self.held = False
        self.was_held = asyncio.Event()

    async def hold(self) -> None:
        self.trace.append("hold")
        self.held = True
        self.was_held.set()

    async def release(self) -> None:
        if self.held:
            self.trace.append("release")
        self.held = False

    def calm(self) -> None:
        self.trace.append("calm")

    async def make_noise(self, worker: CoalescingWorker, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            if not self.held:
                worker.kick("event")
            await asyncio.sleep(0.005)


def test_a_noisy_follow_up_waits_muted_and_unmutes_before_its_run() -> None:
    async def scenario() -> list[str]:
        noise = GuestNoise()

        async def job(cause: str) -> None:
            assert not noise.held, "a run started with the events muted"
            noise.trace.append("run")
            await asyncio.sleep(0.01)  # a query round trip

        worker = CoalescingWorker("nic", job, settle=0.02, settle_max=0.1, mute=noise)
        await noise.make_noise(worker, 0.6)
        await asyncio.sleep(0.3)  # the guest is quiet: the last follow-up and no more
        await worker.stop()
        return noise.trace

    trace = asyncio.run(scenario())
    # The first follow-up heard the noise for all of settle_max; then every follow-up
    # waits muted and unmutes before it runs; the run after the noise ends it.
    assert trace[:2] == ["run", "run"], trace
    cycles = trace[2:-1]
    assert cycles and cycles == ["hold", "release", "run"] * (len(cycles) // 3), trace
    assert trace[-1] == "calm", trace


def test_a_worker_stopped_while_muted_still_unmutes() -> None:
    async def scenario() -> list[str]:
        noise = GuestNoise()

        async def job(cause: str) -> None:
            await asyncio.sleep(0.01)

        worker = CoalescingWorker("nic", job, settle=0.02, settle_max=0.1, mute=noise)
        noisy = asyncio.get_running_loop().create_task(noise.make_noise(worker, 10.0))
        await noise.was_held.wait()
        await worker.stop()
        noisy.cancel()
        return noise.trace

    assert asyncio.run(scenario())[-2:] == ["hold", "release"]


def test_a_quiet_follow_up_never_mutes() -> None:
    async def scenario() -> list[str]:
        noise = GuestNoise()

        async def job(cause: str) -> None:
            noise.trace.append("run")
            await asyncio.sleep(0.01)

        worker = CoalescingWorker("nic", job, settle=0.02, settle_max=0.2, mute=noise)
        for _ in range(3):  # bursts with pauses, as guest commands make them
            await noise.make_noise(worker, 0.08)
            await asyncio.sleep(0.1)
        await worker.stop()
        return noise.trace

    assert set(asyncio.run(scenario())) == {"run"}


def test_kicks_while_throttled_make_a_worker_noisy() -> None:
    async def scenario() -> list[str]:
        noise = GuestNoise()

        async def job(cause: str) -> None:
            noise.trace.append("run")  # instant: the kicks come while it waits for tokens

        worker = CoalescingWorker("nic", job, rate=10.0, burst=1, settle=0.02, mute=noise)
        await noise.make_noise(worker, 0.6)
        await asyncio.sleep(0.3)
        await worker.stop()
        return noise.trace

    trace = asyncio.run(scenario())
    assert trace[0] == "run" and "hold" in trace and trace[-1] == "calm", trace
    cycles = trace[trace.index("hold") : -1]
    assert cycles == ["hold", "release", "run"] * (len(cycles) // 3), trace
