"""Blocking calls run on daemon threads of their own, for work that may not end when its caller stops waiting."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_daemon_thread(
    function: Callable[..., T], *args: Any, name: str, slots: asyncio.Semaphore | None = None
) -> T:
    """`asyncio.to_thread` on a new daemon thread, for calls that can block for long and cannot be interrupted.

    On the loop's default executor such a call holds a thread that image decoding, job files and /metrics need
    (six threads on two cores), and the executor's threads are joined at exit (a stop during a 10-minute model
    load waited for it). `slots` bounds the threads alive at once: a slot is taken before the thread starts and
    given back when the *thread* ends, not when the caller stops waiting, so callers that time out cannot pile up
    threads stuck in the same call."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if slots is not None:
            slots.release()
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting task, as to_thread does
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    if slots is not None:
        await slots.acquire()
    try:
        threading.Thread(target=run, daemon=True, name=name).start()
    except BaseException:
        if slots is not None:
            slots.release()
        raise
    return await future
