"""The one place a Redis client is made from settings, and what counts as "Redis is down".

Commands retry once, quickly (a pooled connection may be stale after a Redis restart), and give up after
`RLAIFV_REDIS_TIMEOUT_S`; callers then degrade (cache, rate limits) or answer 503 (jobs) instead of hanging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rlaifv.service.settings import Settings

REDIS_DOWN: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)


def connect(settings: Settings) -> Redis:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    if not settings.redis_url:
        raise ValueError("no Redis configured (RLAIFV_REDIS_URL)")
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), 1)
    return Redis.from_url(settings.redis_url, retry=retry, **settings.redis_options())
