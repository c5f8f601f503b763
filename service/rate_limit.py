"""Rate limits per client: fixed one-minute windows, counted in Redis when RLAIFV_REDIS_URL is set (shared by
replicas: INCR + EXPIRE in one pipeline), in memory otherwise. While Redis is unreachable each replica counts
in memory: the limit then holds per replica instead of across them, and requests are never failed for it."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from rlaifv.service.redis_conn import Breaker, RedisSkipped

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("rlaifv.rate_limit")


class RateLimiter:
    """Fixed one-minute windows per client (API key fingerprint, else address)."""

    def __init__(
        self,
        *,
        per_minute: int,
        redis: Redis | None = None,
        prefix: str = "rlaifv:rate:",
        breaker: Breaker | None = None,
    ) -> None:
        self.per_minute = per_minute
        self.redis = redis
        self.prefix = prefix
        self.breaker = breaker or Breaker(5.0)
        self._memory: dict[str, tuple[int, int]] = {}

    async def hit(self, client: str) -> int | None:
        """Count one request; returns seconds to wait when over quota, else None."""
        now = time.time()
        window = int(now // 60)
        retry = max(1, int(60 - now % 60))
        count = None
        if self.redis is not None:
            key = f"{self.prefix}{client}:{window}"
            pipe = self.redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, 120)
            try:
                count, _ = await self.breaker.call(pipe.execute)
            except RedisSkipped as exc:
                if exc.__cause__ is not None:
                    log.warning("rate limit counted in memory: redis failed (%s)", exc)
        if count is None:
            seen_window, count = self._memory.get(client, (window, 0))
            count = count + 1 if seen_window == window else 1
            self._memory[client] = (window, count)
            if len(self._memory) > 100_000:
                self._memory = {k: v for k, v in self._memory.items() if v[0] == window}
        return retry if int(count) > self.per_minute else None
