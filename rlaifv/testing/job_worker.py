"""Stand-ins for the job workers' tests: a serving that scores without a model, and a bounded wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel


class ScoredResult(BaseModel):
    rewards: list[float]


class StubServing:
    """A `Serving` whose `rewards` answers `rewards` rewards of 0.5 at once, counting its calls (a job worker's item
    runs without a model; `rewards` > 1 makes a result larger than its item)."""

    def __init__(self, rewards: int = 1) -> None:
        self.calls = 0
        self.rewards_per_result = rewards

    async def rewards(self, request: Any, http_request: Any) -> ScoredResult:
        self.calls += 1
        return ScoredResult(rewards=[0.5] * self.rewards_per_result)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Await `condition()` turning true, checked every 20 ms of the loop's clock; fail after 30 s of it."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while not await condition():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
