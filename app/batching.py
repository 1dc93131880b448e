"""Natural batching: concurrent calls grouped into a batch when capacity frees, not on arrival.

Ray Serve's `@serve.batch` forms a batch as soon as its wait timeout expires and only then
queues it for one of `max_concurrent_batches` slots. With a short timeout (what latency at low
load needs) a saturated replica therefore forms batches of one that queue behind each other,
and the per-call overhead of the downstream chain is never shared: measured here, 32 clients
in a closed loop produced batches of 1.04 requests on average. Forming the batch when a slot
frees instead gives a batch of one at low load (no added wait) and batches as large as the
backlog under load, the shape of the natural batching used by inference servers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class CongestionLimit:
    """How many batches may be in flight, set as TCP Vegas sets its window: from how much of the
    work in flight is waiting for a core rather than running.

    A batch that took `seconds` against a floor (the fastest batch of the last `window`) while
    `n` batches were out spent about `1 - floor/seconds` of its time waiting, and so did the
    others: `n * (1 - floor/seconds)` batches' worth of work was queued. One slot closes after a
    batch that leaves the smoothed queue above `threshold` batches, one reopens after a batch
    that brings it under half of that; the limit stays within 1..`ceiling`.

    Why: a batch in flight beside others uses cores the machine may not have. With room to
    spare, a request that arrives while a batch is out should go at once (waiting for that
    batch would add its latency); on a machine whose cores the load already fills, it should
    wait and go with the next batch, which costs one round of Serve calls for many requests
    instead of one per request. On a 2-core machine about 2.5x slower than usual, where 50
    req/s filled the cores, one batch in flight instead of three gave a p95 of 89 against 136
    ms. Scaling by `n` is what keeps the limit out of the way at low load: a batch out alone
    can never count as more than one batch queued, however slow a spike makes it, so with a
    `threshold` of at least 1 it never closes a slot (closing one would not have helped it).
    The floor is a sliding minimum, so a machine that gets slower for good raises it within
    `window` batches."""

    def __init__(self, ceiling: int, threshold: float = 1.0, window: int = 1000, smoothing: float = 0.2):
        if ceiling < 1 or threshold < 1 or window < 1 or not 0 < smoothing <= 1:
            raise ValueError("ceiling >= 1, threshold >= 1, window >= 1 and 0 < smoothing <= 1 are required")
        self.ceiling, self.threshold, self.smoothing = ceiling, threshold, smoothing
        self.limit = ceiling
        self.queued: float | None = None
        """Smoothed estimate of the batches' worth of in-flight work waiting for a core."""
        self._recent: deque[float] = deque(maxlen=window)
        self._floor: deque[float] = deque()  # increasing; its head is the minimum of _recent

    def observe(self, seconds: float, in_flight: int) -> None:
        """A batch came back after `seconds`; `in_flight` batches were out when it left, itself included."""
        if len(self._recent) == self._recent.maxlen and self._floor[0] == self._recent[0]:
            self._floor.popleft()  # the oldest sample leaves the window
        self._recent.append(seconds)
        while self._floor and self._floor[-1] > seconds:
            self._floor.pop()
        self._floor.append(seconds)
        queued = in_flight * (1 - self._floor[0] / seconds) if seconds > 0 else 0.0
        a = self.smoothing
        self.queued = queued if self.queued is None else (1 - a) * self.queued + a * queued
        if self.queued > self.threshold:
            self.limit = max(1, self.limit - 1)
        elif self.queued < self.threshold / 2:
            self.limit = min(self.ceiling, self.limit + 1)


class NaturalBatcher(Generic[T, R]):
    """`await batcher.submit(item)` returns `fn(batch)[i]` for the batch the item went into.

    `fn` takes a list and returns a list of the same length, in order. An exception from `fn`
    fails exactly the callers of that batch. At most `max_in_flight` batches run at once;
    items that arrive meanwhile wait and leave together, up to `max_batch_size` per batch.
    `max_in_flight` is a number, or a CongestionLimit, whose batches' latency (timed by
    `clock`) sets how many of its `ceiling` slots are open.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[list[R]]],
        max_batch_size: int,
        max_in_flight: int | CongestionLimit,
        clock: Callable[[], float] = time.perf_counter,
    ):
        limit = max_in_flight if isinstance(max_in_flight, CongestionLimit) else None
        if limit is not None:
            max_in_flight = limit.ceiling
        if max_batch_size < 1 or max_in_flight < 1:
            raise ValueError("max_batch_size and max_in_flight must be at least 1")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self.limit = limit
        self._clock = clock
        self._waiting: deque[tuple[T, asyncio.Future]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()  # strong references until each batch is done
        self.batches = 0
        self.items = 0

    def open_slots(self) -> int:
        """Batches that may be in flight now: `max_in_flight`, or fewer while the limit closes some."""
        return self.max_in_flight if self.limit is None else self.limit.limit

    async def _timed(self, items: list[T]) -> list[R]:
        if self.limit is None:
            return await self._fn(items)
        started, in_flight = self._clock(), self._in_flight
        results = await self._fn(items)
        self.limit.observe(self._clock() - started, in_flight)  # a failed batch says nothing of the load
        return results

    async def submit(self, item: T) -> R:
        if not self._waiting and self._in_flight < self.open_slots():
            return await self._alone(item)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self.open_slots():
            batch = []
            while self._waiting and len(batch) < self.max_batch_size:
                item, future = self._waiting.popleft()
                if not future.done():  # a caller that gave up (client disconnected) is skipped
                    batch.append((item, future))
            if not batch:
                continue
            self._in_flight += 1
            self.batches += 1
            self.items += len(batch)
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _alone(self, item: T) -> R:
        """Nothing queued and a slot free: a batch of one, run in the caller's own task. At
        low load that is every request, and it then costs no task, no future and no extra
        turns of the event loop to hand the answer back. A caller that gives up (client
        disconnected) cancels its own work, which nobody else waits for."""
        self._in_flight += 1
        self.batches += 1
        self.items += 1
        try:
            results = await self._timed([item])
            if len(results) != 1:
                raise RuntimeError(f"batch function returned {len(results)} results for 1 item")
            return results[0]
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            results = await self._timed([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._dispatch()
