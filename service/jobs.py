"""Durable batch jobs on Redis Streams with a consumer group.

    rlaifv:job:{id}            hash: kind, status, total, completed, failed, created, updated, metadata
    rlaifv:job:{id}:items      hash: index -> request body (JSON)
    rlaifv:job:{id}:results    hash: index -> {"status", "result" | "error"} (JSON)
    {RLAIFV_JOBS_STREAM}       stream: one entry {job, index} per item; group "rlaifv-workers"

Every replica may run workers (RLAIFV_JOBS_WORKERS). A worker reads entries
with XREADGROUP, runs each through the same serving code as the HTTP routes
(so items of many jobs share micro-batches), stores the result, then XACKs.
A worker that dies leaves its entries pending; after RLAIFV_JOBS_CLAIM_IDLE_MS
another worker takes them over with XAUTOCLAIM. Results are written with
HSETNX, so an item processed twice is counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from rlaifv.reward.errors import InvalidInputError
from rlaifv.service.errors import BadRequest, Conflict, ServiceError
from rlaifv.service.protocol import BestOfNRequest, Job, JobItemResult, JobRequest, JobResults, RewardsRequest

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rlaifv.service.metrics import Metrics
    from rlaifv.service.serving import Serving
    from rlaifv.service.settings import Settings

log = logging.getLogger("rlaifv.jobs")
GROUP = "rlaifv-workers"
PREFIX = "rlaifv:job:"
REQUEST_MODELS = {"best_of_n": BestOfNRequest, "rewards": RewardsRequest}


def _error_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


class JobStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.stream = settings.jobs_stream
        self.ttl_s = settings.jobs_ttl_s
        self.max_items = settings.jobs_max_items

    async def ensure_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def create(self, request: JobRequest, *, idempotency_key: str | None = None, owner: str | None = None) -> Job:
        """Queue a job. With an `idempotency_key`, a repeat of the same request (a client retrying after a
        timeout) gets the job the first one created instead of a duplicate, for as long as jobs live."""
        if len(request.items) > self.max_items:
            raise BadRequest(f"at most {self.max_items} items per job, got {len(request.items)}", param="items")
        model = REQUEST_MODELS[request.kind]
        for i, item in enumerate(request.items):
            try:
                model.model_validate(item)
            except ValidationError as exc:
                err = exc.errors()[0]
                raise BadRequest(f"items[{i}]: {err['msg']}", param=f"items[{i}]{_error_path(err['loc'])}") from None
        await self.ensure_group()
        job_id = f"job-{uuid.uuid4().hex}"
        claim = None
        if idempotency_key is not None:
            claim = f"{PREFIX}idem:{owner or '-'}:{idempotency_key}"
            digest = hashlib.sha256(request.model_dump_json().encode()).hexdigest()
            if not await self.redis.set(claim, f"{job_id} {digest}", nx=True, ex=self.ttl_s):
                return await self._replay(claim, digest)
        try:
            return await self._enqueue(job_id, request)
        except BaseException:
            if claim is not None:
                await self.redis.delete(claim)
            raise

    async def _replay(self, claim: str, digest: str) -> Job:
        """The job an earlier request with the same Idempotency-Key created (it may still be being written)."""
        raw = await self.redis.get(claim)
        first_id, first_digest = raw.decode().split() if raw else ("", "")
        if first_digest != digest:
            raise Conflict("this Idempotency-Key was used for a different request body", param="Idempotency-Key")
        for _ in range(100):
            job = await self.get(first_id)
            if job is not None:
                return job
            await asyncio.sleep(0.02)
        raise Conflict("the request that first used this Idempotency-Key did not complete", param="Idempotency-Key")

    async def _enqueue(self, job_id: str, request: JobRequest) -> Job:
        now = int(time.time())
        key = PREFIX + job_id
        meta = {
            "kind": request.kind,
            "status": "queued",
            "total": len(request.items),
            "completed": 0,
            "failed": 0,
            "created": now,
            "updated": now,
            "metadata": json.dumps(request.metadata),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=meta)
        pipe.hset(key + ":items", mapping={str(i): json.dumps(item) for i, item in enumerate(request.items)})
        pipe.expire(key, self.ttl_s)
        pipe.expire(key + ":items", self.ttl_s)
        for i in range(len(request.items)):
            pipe.xadd(self.stream, {"job": job_id, "index": str(i)})
        await pipe.execute()
        return await self.get(job_id)  # type: ignore[return-value]

    async def get(self, job_id: str) -> Job | None:
        raw = await self.redis.hgetall(PREFIX + job_id)
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return Job(
            id=job_id,
            kind=d["kind"],  # type: ignore[arg-type]
            status=d["status"],  # type: ignore[arg-type]
            created=int(d["created"]),
            updated=int(d["updated"]),
            total=int(d["total"]),
            completed=int(d["completed"]),
            failed=int(d["failed"]),
            metadata=json.loads(d.get("metadata", "{}")),
        )

    async def results(self, job_id: str) -> JobResults | None:
        job = await self.get(job_id)
        if job is None:
            return None
        raw = await self.redis.hgetall(PREFIX + job_id + ":results")
        items = sorted((int(k), json.loads(v)) for k, v in raw.items())
        data = [JobItemResult(index=i, **entry) for i, entry in items]
        return JobResults(id=job_id, status=job.status, data=data)

    async def cancel(self, job_id: str) -> Job | None:
        job = await self.get(job_id)
        if job is None:
            return None
        if job.status in ("queued", "running"):
            await self.redis.hset(PREFIX + job_id, mapping={"status": "cancelled", "updated": int(time.time())})
        return await self.get(job_id)

    async def item(self, job_id: str, index: int) -> dict[str, Any] | None:
        raw = await self.redis.hget(PREFIX + job_id + ":items", str(index))
        return json.loads(raw) if raw is not None else None

    async def has_result(self, job_id: str, index: int) -> bool:
        return bool(await self.redis.hexists(PREFIX + job_id + ":results", str(index)))

    async def mark_running(self, job_id: str) -> None:
        key = PREFIX + job_id
        script = """
        if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end
        """
        await self.redis.eval(script, 1, key)

    async def record(self, job_id: str, index: int, entry: dict[str, Any]) -> None:
        """Store one item's result once; finish the job when every item has one."""
        key = PREFIX + job_id
        ok = entry["status"] == "succeeded"
        script = """
        if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
          redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
          redis.call('EXPIRE', KEYS[2], ARGV[5])
        end
        redis.call('HSET', KEYS[1], 'updated', ARGV[4])
        local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
        local completed = tonumber(redis.call('HGET', KEYS[1], 'completed'))
        local done = completed + tonumber(redis.call('HGET', KEYS[1], 'failed'))
        local status = redis.call('HGET', KEYS[1], 'status')
        if done >= total and status ~= 'cancelled' then
          if completed == 0 then
            redis.call('HSET', KEYS[1], 'status', 'failed')
          else
            redis.call('HSET', KEYS[1], 'status', 'succeeded')
          end
        end
        return done
        """
        field = "completed" if ok else "failed"
        await self.redis.eval(
            script, 2, key, key + ":results", str(index), json.dumps(entry), field, int(time.time()), self.ttl_s
        )


class JobWorkers:
    """Consumers of the job stream inside one service replica."""

    def __init__(self, store: JobStore, serving: Serving, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.serving = serving
        self.count = settings.jobs_workers
        self.claim_idle_ms = settings.jobs_claim_idle_ms
        self.metrics = metrics
        self.batch = max(1, min(settings.max_batch, 16))
        self._tasks: list[asyncio.Task] = []
        self._base = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._consume(f"{self._base}-{i}"), name=f"rlaifv-jobs-{i}") for i in range(self.count)
        ]

    async def stop(self) -> None:
        """Stop consuming; entries being processed stay pending and are reclaimed by another worker."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _consume(self, consumer: str) -> None:
        redis = self.store.redis
        while True:
            try:
                await self.store.ensure_group()
                _, entries, *_ = await redis.xautoclaim(
                    self.store.stream,
                    GROUP,
                    consumer,
                    min_idle_time=self.claim_idle_ms,
                    start_id="0-0",
                    count=self.batch,
                )
                entries = [e for e in entries if e and e[1]]
                if not entries:
                    reply = await redis.xreadgroup(
                        GROUP, consumer, {self.store.stream: ">"}, count=self.batch, block=250
                    )
                    entries = reply[0][1] if reply else []
                await asyncio.gather(*(self._process(entry_id, fields) for entry_id, fields in entries))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job worker error; retrying")
                await asyncio.sleep(1.0)

    async def _process(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        job_id = fields[b"job"].decode()
        index = int(fields[b"index"])
        job = await self.store.get(job_id)
        if job is not None and job.status != "cancelled" and not await self.store.has_result(job_id, index):
            await self.store.mark_running(job_id)
            body = await self.store.item(job_id, index)
            entry = await self._run(job.kind, body)
            await self.store.record(job_id, index, entry)
            self.metrics.jobs.labels(outcome=entry["status"]).inc()
        await self.store.redis.xack(self.store.stream, GROUP, entry_id)

    async def _run(self, kind: str, body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            if body is None:
                raise BadRequest("job item is missing (expired?)")
            if kind == "best_of_n":
                response = await self.serving.best_of_n(BestOfNRequest.model_validate(body), None)
            else:
                response = await self.serving.rewards(RewardsRequest.model_validate(body), None)
            return {"status": "succeeded", "result": response.model_dump(mode="json")}
        except ServiceError as exc:
            return _failed(exc.message, exc.param, exc.code, exc.type)
        except InvalidInputError as exc:
            return _failed(exc.message, exc.param, "invalid_value")
        except ValidationError as exc:
            return _failed(str(exc.errors()[0]["msg"]), None, "invalid_value")
        except Exception:  # a bug must not leave a poison entry that is reclaimed forever
            log.exception("job item failed")
            return _failed("internal server error", None, "internal_error", "internal_error")


def _failed(message: str, param: str | None, code: str | None, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"status": "failed", "error": {"message": message, "type": type_, "param": param, "code": code}}
