"""NaturalBatcher: every caller gets its own answer; batches grow with the backlog, never wait
at low load; a failing batch fails only its own callers."""

import asyncio

import pytest

from app.batching import NaturalBatcher


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
