"""Work that several requests wait for, run for as long as one of them still does.

Identical concurrent /v1/rewards requests share one scoring. It was the first request's own, watching only its
client: when that client left, the scoring was cancelled, the others woke to nothing and scored again from scratch
(twice the latency, a second scoring). Here the work is a task of its own; each request waits for it within its own
deadline and only while its own client stays (its 504 and its 499 are its own), and the last one to stop waiting
cancels it, so a lone request's departure still stops the engine's work at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from rlaifv.service.errors import DeadlineExceeded
from rlaifv.service.scheduler import wait_for_result

if TYPE_CHECKING:
    from rlaifv.service.metrics import Metrics

T = TypeVar("T")
U = TypeVar("U")


class SharedWork(Generic[T]):
    """`work` as a task that is cancelled when the last request waiting for it stops waiting.

    The first waiter must start waiting before the loop runs anything else (no `await` between the constructor
    and its `result`): until then nobody waits, and a waiter leaving meanwhile would cancel the work."""

    def __init__(self, work: Coroutine[Any, Any, T], metrics: Metrics, owner: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.owner = owner  # the request that started it: its log lines carry that id (the task copies the context)
        self.task: asyncio.Task[T] = loop.create_task(work)
        self._settled: asyncio.Future[T | None] = loop.create_future()
        self.task.add_done_callback(self._settle)
        self._metrics = metrics
        self._waiting = 0

    def _settle(self, task: asyncio.Task[T]) -> None:
        """The outcome for those who only want a result (`result_if_any`); reading the error here also keeps a
        failure that nobody waited for out of the log as "never retrieved"."""
        failed = task.cancelled() or task.exception() is not None
        self._settled.set_result(None if failed else task.result())

    async def result(self, *, disconnected: Callable[[], Awaitable[Any]] | None) -> T:
        """The work's result or its error (its own deadline bounds the wait), or this waiter's ClientDisconnected.
        The work's deadline is counted here, for the request that started it, only while it waits: the work counts
        none (a request that had left was counted twice, as gone and as late)."""
        try:
            return await self._wait(self.task, float("inf"), 0.0, disconnected)
        except DeadlineExceeded:
            self._metrics.rejected.labels(reason="deadline").inc()
            raise

    async def result_if_any(
        self,
        *,
        left_s: float,
        limit_s: float,
        disconnected: Callable[[], Awaitable[Any]] | None,
        shares: Callable[[BaseException], bool],
    ) -> T | None:
        """The work's result, None when it failed or was cancelled, so that the waiter does the work itself; raised:
        this waiter's own ClientDisconnected or DeadlineExceeded, and a failure `shares` says it would meet too."""
        result = await self._wait(self._settled, left_s, limit_s, disconnected)
        error = self.task.exception() if self.task.done() and not self.task.cancelled() else None
        if result is None and error is not None and shares(error):
            raise error.with_traceback(None)  # raised in every waiter: its traceback would grow with each
        return result

    async def _wait(
        self,
        future: asyncio.Future[U],
        left_s: float,
        limit_s: float,
        disconnected: Callable[[], Awaitable[Any]] | None,
    ) -> U:
        self._waiting += 1
        try:
            return await wait_for_result(
                future, left_s=left_s, limit_s=limit_s, disconnected=disconnected, metrics=self._metrics
            )
        finally:
            self._waiting -= 1
            if not self._waiting and not self.task.done():
                self.task.cancel()
                await asyncio.wait({self.task})  # the engine told to stop before this request's answer is logged
