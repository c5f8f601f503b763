"""The one place a Redis client is made from settings, and what counts as "Redis is down".

Commands retry once, quickly, after a connection error (a pooled connection may be stale after a Redis restart),
and give up after `RLAIFV_REDIS_TIMEOUT_S` (a timeout is not retried: a hung Redis would double every wait);
callers then degrade (cache, rate limits) or answer 503 (jobs) instead of hanging. A Redis that refuses writes
(out of memory under `noeviction`, a read-only replica) counts as down too: the same 503, not a 500 (a full one
with its own code, `jobs_store_full`). The job workers tell a full Redis apart (`OutOfMemoryError`): its refusal
ends no delivery, so they wait with the result in hand instead of taking the item up again (`service/jobs.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rlaifv.service.settings import Settings

T = TypeVar("T")

REDIS_DOWN: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    OSError,
)


FULL_HINT = (
    "free memory: cancel jobs (DELETE /v1/jobs/{id}: their waiting items go), let finished jobs expire"
    " (RLAIFV_JOBS_TTL_S), or raise Redis's maxmemory (redis-cli CONFIG SET maxmemory <bytes>; the Redis"
    " container's --maxmemory in deploy/k8s); results that replace larger items are still stored"
)
"""What frees a full job store, in every message that says it is full (log lines, 503s, /readyz)."""


def memory_use(info: object) -> tuple[int, int] | None:
    """(used_memory, maxmemory) of an `INFO memory` reply as redis-py parses it; None when it holds no such fields
    (INFO refused to an ACL user: the caller cannot tell, and does not refuse for it)."""
    if not isinstance(info, dict):
        return None
    used, bound = info.get("used_memory"), info.get("maxmemory", 0)
    if not isinstance(used, int) or not isinstance(bound, int):
        return None
    return used, bound


def over_fraction(used: int, maxmemory: int, fraction: float) -> bool:
    """Whether `used` bytes are past `fraction` of Redis's maxmemory; never with no maxmemory (0: unbounded)."""
    return maxmemory > 0 and used > fraction * maxmemory


REDIS_FAILED: tuple[type[Exception], ...] = (RedisError, OSError)
"""What the optional users (the reward cache, rate limits) degrade on: any Redis error, a refused command too (an
ACL user without write rights: every /v1/rewards was a 500, where the docs promise a cache miss)."""


def connect(settings: Settings) -> Redis:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    if not settings.redis_url:
        raise ValueError("no Redis configured (RLAIFV_REDIS_URL)")
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(RedisConnectionError,))
    return Redis.from_url(settings.redis_connection_url(), retry=retry, **settings.redis_options())


class RedisSkipped(Exception):
    """Redis left alone (the breaker is open) or given up on: the optional user degrades (a cache miss, a rate
    limit counted in memory)."""


class Breaker:
    """For the optional users of Redis (the reward cache, rate limits; one breaker for both, as they share one
    Redis): a call gives up after `timeout_s` (RLAIFV_REDIS_OPTIONAL_TIMEOUT_S), not RLAIFV_REDIS_TIMEOUT_S, and
    after a failure Redis is left alone for `pause_s`. While Redis hung, every request arriving before the first
    timeout ended waited it out (5 s, twice for /v1/rewards: the rate limit and the cache each had a breaker)."""

    def __init__(self, pause_s: float, timeout_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.pause_s = pause_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._until = float("-inf")

    @property
    def open(self) -> bool:
        """True while Redis is left alone."""
        return self.clock() < self._until

    def trip(self) -> None:
        self._until = self.clock() + self.pause_s

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """`make()`'s result within `timeout_s`; `RedisSkipped` when the breaker is open or the call failed (which
        opens it). `make` is called only when Redis is asked, so nothing is left unawaited."""
        if self.open:
            raise RedisSkipped("left alone after a failure")
        try:
            return await asyncio.wait_for(make(), self.timeout_s)
        except REDIS_FAILED as exc:  # TimeoutError is an OSError
            self.trip()
            raise RedisSkipped(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
