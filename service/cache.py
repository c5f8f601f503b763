"""The reward cache: in Redis when RLAIFV_REDIS_URL is set (shared by replicas), in memory otherwise.

Redis failing is a cache miss (and a skipped write), never an error: the endpoints keep answering
without the cache while Redis is down. Only /v1/rewards results are cached: scoring given answers is deterministic,
sampling is not. The key hashes everything the result depends on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from rlaifv.reward.images import PREPROCESSING_VERSION
from rlaifv.reward.prompt import ANSWER_TOKENIZATION_VERSION
from rlaifv.service.redis_conn import Breaker, RedisSkipped

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rlaifv.reward.scoring import RewardConfig

log = logging.getLogger("rlaifv.cache")


class RewardCache:
    def __init__(
        self,
        *,
        size: int,
        ttl_s: int,
        redis: Redis | None = None,
        prefix: str = "rlaifv:cache:",
        breaker: Breaker | None = None,
    ) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.redis = redis
        self.prefix = prefix
        self.breaker = breaker or Breaker(5.0)
        self._memory: OrderedDict[str, tuple[float, str]] = OrderedDict()

    @staticmethod
    def key(
        model: str,
        config: RewardConfig,
        images: list[bytes],
        question: str | None,
        messages: Any,
        answers: list[str],
        continue_final: bool = False,
    ) -> str:
        h = hashlib.sha256()
        parts = [
            f"images-v{PREPROCESSING_VERSION}",
            f"answers-v{ANSWER_TOKENIZATION_VERSION}",
            model,
            config.model_dump_json(),
            question or "",
            json.dumps(messages, sort_keys=True),
            json.dumps(answers),
        ]
        if continue_final:  # answers continuing the last message score differently; other keys stay as they were
            parts.append("continue_final_message")
        for part in parts:
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        for image in images:
            h.update(hashlib.sha256(image).digest())
        return h.hexdigest()

    async def get(self, key: str) -> str | None:
        if self.redis is not None:
            redis = self.redis
            try:
                value = await self.breaker.call(lambda: redis.get(self.prefix + key))
            except RedisSkipped as exc:
                if exc.__cause__ is not None:
                    log.warning("reward cache skipped: redis failed (%s)", exc)
                return None
            return value.decode() if isinstance(value, bytes) else value
        entry = self._memory.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            del self._memory[key]
            return None
        self._memory.move_to_end(key)
        return value

    async def set(self, key: str, value: str) -> None:
        if self.redis is not None:
            redis = self.redis
            with contextlib.suppress(RedisSkipped):
                await self.breaker.call(lambda: redis.set(self.prefix + key, value, ex=self.ttl_s))
            return
        self._memory[key] = (time.monotonic() + self.ttl_s, value)
        self._memory.move_to_end(key)
        while len(self._memory) > self.size:
            self._memory.popitem(last=False)
