"""The one place a Redis client is made from settings, and what counts as "Redis is down".

Commands retry once, quickly, after a connection error (a pooled connection may be stale after a Redis restart),
and give up after `RLAIFV_REDIS_TIMEOUT_S` (a timeout is not retried: a hung Redis would double every wait);
callers then degrade (cache, rate limits) or answer 503 (jobs) instead of hanging. A Redis that refuses writes
(out of memory under `noeviction`, a read-only replica) counts as down too: the same 503, not a 500.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rlaifv.service.settings import Settings

REDIS_DOWN: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    OSError,
)


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


class Breaker:
    """For the optional users of Redis (the reward cache, rate limits): after a failure they leave Redis alone for
    `pause_s`, so while it hangs each request does not wait out a timeout before degrading."""

    def __init__(self, pause_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.pause_s = pause_s
        self.clock = clock
        self._until = float("-inf")

    @property
    def open(self) -> bool:
        """True while Redis is left alone."""
        return self.clock() < self._until

    def trip(self) -> None:
        self._until = self.clock() + self.pause_s
