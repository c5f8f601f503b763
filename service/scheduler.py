"""The asyncio scheduler between HTTP handlers and the engine's model thread.

- Bounded queue: when `max_queue` requests already wait, `submit` raises
  `Overloaded` (HTTP 429 with Retry-After) at once instead of queueing; so it
  does when the decoded images of the waiting and running requests would pass
  `max_queued_pixels` (a few 4096x4096 images in each of 64 small requests
  held gigabytes), unless nothing else holds any.
- Micro-batching: the first waiting request opens a batch; requests of the same
  kind join it (up to `max_batch`) while each arrives within `batch_window_s`
  of the previous one, for at most `batch_max_wait_s` in all; the batch shares
  one forward pass. `max_batch=1` turns batching off. Load comes in bursts:
  the clients one batch answers send their next requests together, spread over
  the time it takes to parse them. So the window restarts at every arrival, and
  a batch that opens right after another waits (up to `batch_max_wait_s`) for
  as many requests as were waiting plus the clients just answered: with a
  fixed window, a burst was cut into two half-size batches that then took turns
  on the model for good (mean batch 9-11 of 16 with 16 closed-loop clients).
- Concurrent batches: an engine that batches by itself across calls (vLLM's continuous batching) runs up to
  `concurrency` batches at once, each request of a batch as its own call answered when it is done, so a short
  request never waits for a long best-of-N to finish (with one batch at a time, n=1 / 1 token waited 4-6 s
  behind n=16 / 256 tokens). The transformers engine runs one: its batch
  is one forward pass. A batch is collected only when a slot is free, so requests arriving meanwhile wait in
  the queue (and batch together) as before.
- Deadlines: each request carries one; a request whose deadline passes while it
  waits is answered 504 and never reaches the model.
- Cancellation: when the client goes away or its deadline passes, its request
  leaves the queue at once, with its place and its images; in a batch already
  running, its `Withdrawal` is set: its samples stop at the next decoding step
  and it is not scored (the rest of the batch runs on; a scoring pass already
  begun finishes).
- Shutdown (`close`): new requests get 503 at once; queued and running work
  gets the time given, then every request still waiting for an answer gets 503
  `shutting_down` with Retry-After (`service/shutdown.py` closes it before the
  HTTP server's own grace runs out: it then cancels handlers, a bare 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from rlaifv.service.engines import Engine, EngineResult, Request
from rlaifv.service.errors import ClientDisconnected, DeadlineExceeded, Overloaded, QueuedTooLong, Unavailable
from rlaifv.service.metrics import Metrics

log = logging.getLogger("rlaifv.service")
_T = TypeVar("_T")


def _now() -> float:
    """The event loop's clock: what asyncio's own timeouts use, so a test loop with virtual time drives both."""
    return asyncio.get_running_loop().time()


@dataclass
class _Item:
    request: Request
    deadline: float
    future: asyncio.Future[EngineResult] = field(repr=False)
    enqueued: float = field(default_factory=_now)
    started: float | None = None
    pixels: int = 0  # decoded image pixels it holds, counted in `Scheduler.pixels_held` until the batcher is done


@dataclass
class Outcome:
    result: EngineResult
    queue_s: float


async def wait_for_result(
    future: asyncio.Future[_T],
    *,
    left_s: float,
    limit_s: float,
    disconnected: Callable[[], Awaitable[Any]] | None,
    metrics: Metrics | None,
) -> _T:
    """`future`'s result, waited for within a request's deadline and only while its client stays: a queued request
    and one waiting for an identical request's scores give up alike, counted alike (`metrics` None: counted by the
    caller). The future is left as it is."""
    watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
    try:
        done, _ = await asyncio.wait(
            {future} | ({watcher} if watcher else set()), timeout=max(0.0, left_s), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        if watcher is not None:
            watcher.cancel()
    if future in done:
        return future.result()
    if watcher is not None and watcher in done:
        if metrics is not None:
            metrics.rejected.labels(reason="client_disconnected").inc()
        raise ClientDisconnected()
    if metrics is not None:
        metrics.rejected.labels(reason="deadline").inc()
    raise DeadlineExceeded(f"request not served within {limit_s:g} s", code="deadline_exceeded")


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int,
        max_batch: int,
        batch_window_s: float,
        retry_after_s: int,
        batch_max_wait_s: float | None = None,
        max_queued_pixels: int = 0,
        concurrency: int = 1,
        metrics: Metrics,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.engine = engine
        self.concurrency = concurrency
        self.max_queued_pixels = max_queued_pixels
        self.pixels_held = 0
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.batch_max_wait_s = max(batch_window_s, batch_window_s if batch_max_wait_s is None else batch_max_wait_s)
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.max_queue = max_queue
        self._waiting: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._held: _Item | None = None  # an item of another kind, first in the next batch
        self._forming: list[_Item] = []  # the batch being collected: out of the queue, not yet running
        self._batches: dict[asyncio.Task[None], tuple[float, list[_Item]]] = {}  # running: task -> (start, items)
        self._slot_freed = asyncio.Event()
        self._expected = 0  # how many requests the next batch may count on (see `_collect`)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._drained = asyncio.Event()  # set, once closing, when nothing waits, forms or runs (`close` awaits it)
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)

    @property
    def depth(self) -> int:
        return len(self._waiting) + (1 if self._held is not None else 0)

    def _depth_changed(self) -> None:
        """Called wherever work enters, moves or leaves: the queue gauge, and `close`'s wait for the drain."""
        self.metrics.queue_depth.set(self.depth)
        if self._closing and not self._busy():
            self._drained.set()

    def _busy(self) -> bool:
        return bool(self.depth or self.in_flight or self._forming)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="rlaifv-scheduler")

    def stalled(self, stall_s: float) -> str | None:
        """Why this scheduler can no longer serve (its loop ended, or one batch has run over `stall_s`), or None."""
        if self._task is not None and self._task.done() and not self._closing:
            error = None if self._task.cancelled() else self._task.exception()
            return f"scheduler stopped ({type(error).__name__ if error else 'cancelled'})"
        started = min((start for start, _ in self._batches.values()), default=None)
        if stall_s > 0 and started is not None and _now() - started > stall_s:
            return f"one batch has run {_now() - started:.0f} s (limit {stall_s:g} s)"
        return None

    async def close(self, grace_s: float) -> None:
        """Refuse new work, let queued and running work finish within `grace_s`, then stop: every request still
        without an answer gets 503 `shutting_down` (a running batch's answers are discarded when it returns)."""
        self._closing = True
        end = _now() + grace_s
        while self._busy() and _now() < end:  # the event may be set while an item moves from queue to batch
            self._drained.clear()
            self._depth_changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=end - _now())
        held = [self._held] if self._held is not None else []
        running = [item for _, items in self._batches.values() for item in items]
        left = [*running, *self._forming, *held, *self._waiting]
        for task in [*([self._task] if self._task is not None else []), *self._batches]:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # a loop that had died (liveness said so): the requests left still get their 503
                log.exception("scheduler task failed")
        self._waiting.clear()
        self._held, self._forming = None, []
        self._batches.clear()
        for item in left:
            self._release(item)
            if not item.future.done():
                item.future.set_exception(self._shutting_down())
        self._depth_changed()

    def _shutting_down(self) -> Unavailable:
        return Unavailable(
            "server is shutting down", code="shutting_down", headers={"Retry-After": str(self.retry_after_s)}
        )

    async def submit(
        self,
        request: Request,
        *,
        timeout_s: float,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
        count_deadline: bool = True,
    ) -> Outcome:
        """Queue `request` and wait for its result, its deadline, or the client leaving. `count_deadline` False:
        the work is shared by requests that count their own (`SharedWork`)."""
        if self._closing:
            raise self._shutting_down()
        pixels = sum(image.width * image.height for image in request.images)
        if (
            pixels
            and self.max_queued_pixels
            and self.pixels_held
            and self.pixels_held + pixels > self.max_queued_pixels
        ):
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(
                f"server busy: the waiting requests hold {self.pixels_held:,} decoded image pixels and this one"
                f" {pixels:,} more, over the limit of {self.max_queued_pixels:,}",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        if len(self._waiting) >= self.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(
                f"server busy: {self.max_queue} requests already waiting",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        loop = asyncio.get_running_loop()
        item = _Item(request, _now() + timeout_s, loop.create_future(), pixels=pixels)
        self._waiting.append(item)
        self._arrived.set()
        self.pixels_held += pixels  # until the batcher has run the item or it left the queue (`_release`)
        self._depth_changed()
        try:
            result = await wait_for_result(
                item.future,
                left_s=item.deadline - _now(),
                limit_s=timeout_s,
                disconnected=disconnected,
                metrics=self.metrics if count_deadline else None,
            )
            return Outcome(result, (item.started or item.enqueued) - item.enqueued)
        except DeadlineExceeded as exc:
            if item.started is None and not isinstance(exc, QueuedTooLong):
                raise QueuedTooLong(exc.message, code=exc.code) from None
            raise
        finally:
            if not item.future.done():
                item.future.cancel()  # a batch being formed skips it
                item.request.withdrawal.set()  # a running batch stops sampling it and does not score it
            self._leave(item)

    def _leave(self, item: _Item) -> None:
        """A request that left before it was taken for a batch gives back its place and its images now (they
        were held until the batcher came to it: live clients got 429 for requests no one waited for)."""
        if item is self._held:
            self._held = None
        elif item.started is None and item in self._waiting:
            self._waiting.remove(item)
        else:
            return
        self._release(item)
        self._depth_changed()

    # -- the batching loop ---------------------------------------------------------

    @overload
    async def _next(self, timeout: None) -> _Item: ...

    @overload
    async def _next(self, timeout: float) -> _Item | None: ...

    async def _next(self, timeout: float | None) -> _Item | None:
        """The next waiting item, waiting up to `timeout` (None: for ever) for one to arrive."""
        if self._held is not None:
            item, self._held = self._held, None
            self._depth_changed()
            return item
        end = None if timeout is None else _now() + timeout
        while not self._waiting:
            left = None if end is None else end - _now()
            if left is not None and left <= 0:
                return None
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return None
        item = self._waiting.popleft()
        self._depth_changed()
        return item

    def _release(self, item: _Item) -> None:
        """The item's images are no longer the scheduler's: run, or dropped from the queue (a request that left
        or timed out still holds its images while queued or in a running batch)."""
        self.pixels_held -= item.pixels
        item.pixels = 0

    def _live(self, item: _Item) -> bool:
        if item.future.done():
            self._release(item)
            return False
        if _now() > item.deadline:
            item.future.set_exception(DeadlineExceeded("request deadline passed while queued"))
            self._release(item)
            return False
        return True

    async def _collect(self) -> list[_Item]:
        first = await self._next(None)
        while not self._live(first):
            first = await self._next(None)
        batch = self._forming = [first]  # seen by `close` while it forms
        opened = _now()
        expected, self._expected = self._expected, 0
        while len(batch) < self.max_batch:
            left = opened + self.batch_max_wait_s - _now()
            item = await self._next(left if len(batch) < expected else min(self.batch_window_s, left))
            if item is None:
                break
            if not self._live(item):
                continue
            if item.request.kind != first.request.kind:
                self._held = item
                self._depth_changed()
                break
            batch.append(item)
        return batch

    async def _loop(self) -> None:
        while True:
            while len(self._batches) >= self.concurrency:  # collect only with a slot free: the queue batches
                self._slot_freed.clear()
                await self._slot_freed.wait()
            batch = [item for item in await self._collect() if self._live(item)]  # some left while it formed
            self._forming = []
            if not batch:
                self._depth_changed()
                continue
            now = _now()
            for item in batch:
                item.started = now
            self.in_flight += len(batch)
            self.metrics.batch_size.labels(kind=batch[0].request.kind).observe(len(batch))
            task = asyncio.create_task(self._run(batch), name="rlaifv-batch")
            self._batches[task] = (now, batch)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        if self._batches.pop(task, None) is not None:
            self._slot_freed.set()

    async def _run(self, batch: list[_Item]) -> None:
        """An engine that batches across calls gets each request as its own call, answered as soon as it is done:
        a short request that joined a long best-of-N's batch waited for the whole batch (vLLM had long finished
        it). The batch still takes one slot of `concurrency`, so the queue batches as before."""
        if self.concurrency > 1:
            await asyncio.gather(*(self._run_items([item]) for item in batch))
        else:
            await self._run_items(batch)

    async def _run_items(self, batch: list[_Item]) -> None:
        """Every request of the batch gets its outcome and gives back its images, whatever the engine does: a bug
        (an exception, a result list of the wrong length) fails this batch only, and serving goes on."""
        try:
            outcomes = await self.engine.run([item.request for item in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the engine answered {len(outcomes)} of {len(batch)} requests")
        except Exception as exc:
            log.exception("batch failed")
            outcomes = [exc] * len(batch)
        finally:
            self.in_flight -= len(batch)
            self._depth_changed()
        for item, outcome in zip(batch, outcomes, strict=True):
            self._release(item)
            if item.future.done():
                continue
            if isinstance(outcome, Exception):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
        # Waiting requests plus the clients just answered, who usually send their next request soon.
        self._expected = min(self.max_batch, self.depth + len(batch))
