"""NaturalBatcher: every caller gets its own answer; batches grow with the backlog, never wait
at low load; a failing batch fails only its own callers."""

import asyncio

import pytest

from app.batching import CongestionLimit, NaturalBatcher
from tests.clock import FakeClock


class Recorder:
    def __init__(self, fail_on=None):
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_on = fail_on

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [i * 10 for i in items]


def test_a_lone_request_goes_at_once_and_gets_its_answer():
    async def scenario():
        async def double(items):
            return [i * 2 for i in items]

        batcher = NaturalBatcher(double, max_batch_size=8, max_in_flight=2)
        return await batcher.submit(21), batcher.batches

    assert asyncio.run(scenario()) == (42, 1)


def test_a_lone_request_runs_in_its_callers_task_and_a_backlog_does_not():
    """At low load a request is its own batch with nothing in between (no task or future to
    hand the answer back); requests that had to wait are run for them."""

    async def scenario():
        callers = {}
        gate = asyncio.Event()

        async def record(items):
            callers[items[0]] = asyncio.current_task()
            await gate.wait()
            return items

        batcher = NaturalBatcher(record, max_batch_size=8, max_in_flight=1)
        first = asyncio.create_task(batcher.submit(1))
        second = asyncio.create_task(batcher.submit(2))
        # Opened after both tasks' first steps (the loop runs callbacks in order): the first
        # request is under way and the second has queued behind it.
        asyncio.get_running_loop().call_soon(gate.set)
        assert await asyncio.gather(first, second) == [1, 2]
        return callers[1] is first, callers[2] is second

    assert asyncio.run(scenario()) == (True, False)


def test_requests_arriving_while_busy_leave_together_in_order():
    async def scenario():
        fn = Recorder()
        batcher = NaturalBatcher(fn, max_batch_size=4, max_in_flight=1)
        calls = [asyncio.create_task(batcher.submit(i)) for i in range(7)]
        await asyncio.sleep(0)
        fn.release.set()
        return await asyncio.gather(*calls), fn.batches

    results, batches = asyncio.run(scenario())
    assert results == [i * 10 for i in range(7)]
    # The first goes alone (nothing was running); the backlog then leaves in batches of at
    # most 4 instead of one call each.
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]


def test_a_failing_batch_fails_only_its_callers():
    async def scenario():
        fn = Recorder(fail_on=0)
        batcher = NaturalBatcher(fn, max_batch_size=4, max_in_flight=1)
        first = asyncio.create_task(batcher.submit(0))
        later = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        fn.release.set()
        with pytest.raises(ValueError, match="bad item 0"):
            await first
        return await asyncio.gather(*later)

    assert asyncio.run(scenario()) == [10, 20]


def test_a_caller_that_gave_up_is_skipped_and_the_rest_are_answered():
    async def scenario():
        fn = Recorder()
        batcher = NaturalBatcher(fn, max_batch_size=8, max_in_flight=1)
        running = asyncio.create_task(batcher.submit(0))
        waiting = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        waiting[1].cancel()  # client disconnected while queued
        await asyncio.sleep(0)
        fn.release.set()
        answers = await asyncio.gather(running, waiting[0], waiting[2])
        return answers, fn.batches

    answers, batches = asyncio.run(scenario())
    assert answers == [0, 10, 30]
    assert batches == [[0], [1, 3]]


def test_congestion_limit_closes_slots_while_batches_out_together_wait_and_reopens_them():
    limit = CongestionLimit(ceiling=3, threshold=1.0, window=100, smoothing=1.0)
    for _ in range(5):
        limit.observe(0.010, in_flight=1)  # the floor: 10 ms
    assert limit.limit == 3
    limit.observe(0.030, in_flight=3)  # three out, each 2/3 waiting: two batches' worth queued
    limit.observe(0.030, in_flight=3)
    assert limit.limit == 1
    limit.observe(0.030, in_flight=3)
    assert limit.limit == 1  # never below one
    limit.observe(0.025, in_flight=1)  # 0.6 of a batch queued: between half the threshold and it, hold
    assert limit.limit == 1
    limit.observe(0.012, in_flight=1)  # under half the threshold
    assert limit.limit == 2
    limit.observe(0.012, in_flight=2)
    limit.observe(0.012, in_flight=2)
    assert limit.limit == 3  # never above the ceiling


def test_a_batch_out_alone_never_closes_a_slot_however_slow():
    """At low load a latency spike (another tenant, a GC pause) hits a batch that is out alone:
    closing slots would only make the next arrival wait for it."""
    limit = CongestionLimit(ceiling=3, threshold=1.0, window=100, smoothing=1.0)
    limit.observe(0.010, in_flight=1)
    for seconds in (0.100, 1.0, 10.0):
        limit.observe(seconds, in_flight=1)
        assert limit.limit == 3
    limit.observe(0.100, in_flight=2)  # two out, both mostly waiting: now it closes one
    assert limit.limit == 2


def test_congestion_limit_floor_is_the_minimum_of_its_window():
    """A machine that got slower for good raises the floor once its fast batches leave the
    window, and the slots open again."""
    limit = CongestionLimit(ceiling=3, threshold=1.0, window=4, smoothing=1.0)
    limit.observe(0.010, in_flight=1)
    for _ in range(3):
        limit.observe(0.030, in_flight=3)
    assert limit.limit == 1
    limit.observe(0.030, in_flight=3)  # the 10 ms batch has left the window: the floor is 30 ms
    assert limit.limit == 2
    with pytest.raises(ValueError):
        CongestionLimit(ceiling=0)
    with pytest.raises(ValueError):
        CongestionLimit(ceiling=3, threshold=0.5)  # below 1 a lone batch could close a slot


def test_a_full_machine_sends_arrivals_in_the_next_batch_instead_of_alone():
    """Once batches out together wait for the cores, a request arriving while a batch is out
    waits and leaves with the others; while the machine has room it goes at once, beside the
    batch out."""

    class Stages(Recorder):
        """A DAG whose batches take `seconds` of work on the clock: side by side while the
        machine has room, one after another once its cores are `full`."""

        def __init__(self, clock):
            super().__init__()
            self.clock, self.seconds, self.full = clock, 0.010, False

        async def __call__(self, items):
            started = self.clock.now
            answers = await super().__call__(items)
            self.clock.now = self.clock.now + self.seconds if self.full else max(self.clock.now, started + self.seconds)
            return answers

    async def arrivals(batcher, stages, ids):
        """The first id goes out; the rest arrive while its batch is still in the DAG."""
        stages.release.clear()
        out = [asyncio.ensure_future(batcher.submit(i)) for i in ids]
        await asyncio.sleep(0)
        stages.release.set()
        return await asyncio.gather(*out)

    async def scenario():
        clock = FakeClock()
        stages = Stages(clock)
        stages.release.set()
        batcher = NaturalBatcher(stages, max_batch_size=8, max_in_flight=CongestionLimit(3, 1.0, smoothing=1.0), clock=clock)
        for i in range(3):
            await batcher.submit(i)  # 10 ms each: the floor
        start = len(stages.batches)
        assert await arrivals(batcher, stages, [10, 11, 12]) == [100, 110, 120]
        room = stages.batches[start:]
        assert batcher.open_slots() == 3
        stages.full = True  # the three batches now share one core's worth, and each needs more of it
        stages.seconds = 0.030
        assert await arrivals(batcher, stages, [20, 21, 22]) == [200, 210, 220]
        assert batcher.open_slots() == 1
        start = len(stages.batches)
        assert await arrivals(batcher, stages, [30, 31, 32]) == [300, 310, 320]
        return room, stages.batches[start:]

    room, full = asyncio.run(scenario())
    assert room == [[10], [11], [12]]  # each went at once
    assert full == [[30], [31, 32]]  # the later two waited and went together
