"""The job store against a real redis-server: what is left behind when a job is gone, cancelled or finished,
an Idempotency-Key whose first submission died, a Redis that refuses writes, and the cache's breaker."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rlaifv.service.errors import BadRequest, Conflict, StoreUnavailable, SubmissionPending
from rlaifv.service.jobs import CLAIM_PENDING_S, PREFIX, JobStore
from rlaifv.service.protocol import JobRequest
from rlaifv.service.settings import Settings
from rlaifv.testing.job_worker import StubServing, until

pytestmark = pytest.mark.integration
BODY = {"question": "What is in the image?", "answers": ["a red circle."]}
OK = {"status": "succeeded", "result": {"rewards": [0.0]}}


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[JobStore]:
    from rlaifv.service.redis_conn import connect

    stream = f"rlaifv:jobs:store-test-{uuid.uuid4().hex}"  # each test's own: no test reads another's items
    settings = Settings(bundle="unused", redis_url=redis_url, jobs_stream=stream, jobs_ttl_s=3600)
    redis = connect(settings)
    yield JobStore(redis, settings)
    await redis.aclose()


def request(items: int = 2, **fields: Any) -> JobRequest:
    return JobRequest(kind="rewards", items=[BODY] * items, **fields)


async def test_a_result_for_a_job_that_is_gone_writes_nothing(store: JobStore) -> None:
    """A job that expired (or was lost with a Redis restarted without persistence) while an item ran."""
    job = await store.create(request())
    await store.redis.delete(PREFIX + job.id)
    assert await store.record(job.id, 0, OK) is False
    assert not await store.redis.exists(PREFIX + job.id, PREFIX + job.id + ":results")
    assert await store.get(job.id) is None


async def test_a_jobs_items_are_checked_off_the_event_loop(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job body the size limit allows holds hundreds of thousands of values; checked on the event loop, every
    other request waited for it (6 s for 480,000 messages). Bodies of other routes are bounded instead."""
    import threading

    seen: list[threading.Thread] = []
    check = JobStore.validate

    def validate(self: JobStore, job: JobRequest) -> list[str]:
        seen.append(threading.current_thread())
        return check(self, job)

    monkeypatch.setattr(JobStore, "validate", validate)
    await store.create(request())
    assert seen and seen[0] is not threading.main_thread()


def test_a_job_item_holds_no_more_values_than_a_request_body(store: JobStore) -> None:
    """A job's body is not bounded as a request's is: one item of 5M empty objects held the event loop 24 s when
    the worker ran it (and seconds when it was checked). Each item is bounded as a request's body is."""
    from rlaifv.service.errors import BadRequest
    from rlaifv.service.json_body import MAX_JSON_MARKS

    big = BODY | {"messages": [{"role": "user", "content": "q", "annotations": [{}] * MAX_JSON_MARKS}]}
    big.pop("question")
    with pytest.raises(BadRequest) as refused:
        store.validate(JobRequest(kind="rewards", items=[BODY, big]))
    assert refused.value.param == "items[1]" and refused.value.code == "too_many_values", refused.value
    assert "over the limit of 200,000" in refused.value.message


async def test_a_fragment_of_a_job_hash_reads_as_no_job(store: JobStore) -> None:
    fragment = "job-" + "0" * 32
    await store.redis.hset(PREFIX + fragment, mapping={"completed": 16, "updated": 1})
    assert await store.get(fragment) is None
    assert await store.cancel(fragment) is None


async def test_only_job_ids_name_jobs(store: JobStore) -> None:
    """An Idempotency-Key's record shares the prefix: an id naming it reads as no job (it was a Redis WRONGTYPE
    error, a 500, and told whether the key had been used)."""
    job = await store.create(request(), idempotency_key="k-1")
    for other in ("idem:-:k-1", "idem:-:k-2", job.id + ":results", job.id.upper(), "job-1"):
        assert await store.get(other) is None, other
        assert await store.cancel(other) is None, other
    assert await store.get(job.id) is not None


async def test_a_job_is_only_its_owners(store: JobStore) -> None:
    """With API keys, a job is read and cancelled only with the key that submitted it; to any other it does not
    exist (the same answer as for no job, so ids cannot be probed)."""
    job = await store.create(request(), owner="key-a")
    for stranger in ("key-b", None):
        assert await store.get(job.id, stranger) is None
        assert await store.cancel(job.id, stranger) is None
    mine = await store.get(job.id, "key-a")
    assert mine is not None and mine.status == "queued"
    cancelled = await store.cancel(job.id, "key-a")
    assert cancelled is not None and cancelled.status == "cancelled"
    anonymous = await store.create(request())
    assert await store.get(anonymous.id) is not None and await store.get(anonymous.id, "key-a") is None
    again = await store.create(request(), owner="key-b", idempotency_key="k-owned")
    assert (await store.create(request(), owner="key-b", idempotency_key="k-owned")).id == again.id
    # a job written before owners were kept: its key (and every other) still reads it; its key's retry replays it
    legacy = await store.create(request(), owner="key-c", idempotency_key="k-legacy")
    await store.redis.hdel(PREFIX + legacy.id, "owner")
    assert await store.get(legacy.id, "key-c") is not None
    assert (await store.create(request(), owner="key-c", idempotency_key="k-legacy")).id == legacy.id


async def test_a_finished_job_drops_its_items_and_its_results_expire_with_it(store: JobStore) -> None:
    job = await store.create(request())
    assert await store.record(job.id, 0, OK) is True
    assert await store.record(job.id, 0, OK) is False  # a rerun is stored once, and counted once
    assert await store.redis.exists(PREFIX + job.id + ":items")
    assert await store.record(job.id, 1, OK) is True
    done = await store.get(job.id)
    assert done is not None and (done.status, done.completed) == ("succeeded", 2)
    assert not await store.redis.exists(PREFIX + job.id + ":items")
    assert 0 < await store.redis.ttl(PREFIX + job.id + ":results") <= await store.redis.ttl(PREFIX + job.id)


async def test_cancel_drops_the_items_and_leaves_a_finished_job_as_it_is(store: JobStore) -> None:
    job = await store.create(request())
    cancelled = await store.cancel(job.id)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert not await store.redis.exists(PREFIX + job.id + ":items")
    finished = await store.create(request(1))
    await store.record(finished.id, 0, OK)
    again = await store.cancel(finished.id)
    assert again is not None and again.status == "succeeded"


async def test_a_result_finished_after_the_cancel_is_not_stored(store: JobStore) -> None:
    """The cancel's answer is the job's last word: the in-flight batch's results changed it 3 s later."""
    job = await store.create(request(3))
    assert await store.record(job.id, 0, OK) is True
    cancelled = await store.cancel(job.id)
    assert cancelled is not None and (cancelled.status, cancelled.completed) == ("cancelled", 1)
    assert await store.record(job.id, 1, OK) is False  # running when the cancel came
    after = await store.get(job.id)
    assert after is not None and (after.status, after.completed, after.updated) == ("cancelled", 1, cancelled.updated)
    assert [line async for line in store.result_lines(after)] == [line async for line in store.result_lines(job)][:1]


async def test_an_idempotency_key_binds_the_body_not_its_key_order(store: JobStore) -> None:
    """A client that re-serialises a map on its retry sends the same body in another key order: it got 409."""
    first = await store.create(
        JobRequest(kind="rewards", items=[{"question": "q", "answers": ["a"]}], metadata={"x": "1", "y": "2"}),
        idempotency_key="k-order",
    )
    again = await store.create(
        JobRequest(kind="rewards", items=[{"answers": ["a"], "question": "q"}], metadata={"y": "2", "x": "1"}),
        idempotency_key="k-order",
    )
    assert again.id == first.id


async def test_a_key_an_earlier_version_claimed_still_finds_its_job(store: JobStore) -> None:
    """During a rolling upgrade a retry reaches a new replica while an old one created the job: the old version
    hashed the body as `model_dump_json()`; a 409 there refused a job that exists (the SDK does not retry 409)."""
    import hashlib

    body = request()
    first = await store.create(body, idempotency_key="k-legacy")
    claim = f"{PREFIX}idem:-:k-legacy"
    legacy = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    await store.redis.set(claim, f"{first.id} {legacy}", keepttl=True)  # as the old version wrote it
    assert (await store.create(body, idempotency_key="k-legacy")).id == first.id
    with pytest.raises(Conflict):
        await store.create(request(3), idempotency_key="k-legacy")


async def test_an_idempotency_key_whose_submission_died_is_free_again_once_its_claim_lapses(store: JobStore) -> None:
    """The claim of a submission that never created its job: a retryable 503 meanwhile, never a lasting 409."""
    first = await store.create(request(), idempotency_key="k-died", owner="o")
    claim = f"{PREFIX}idem:o:k-died"
    assert await store.redis.ttl(claim) > CLAIM_PENDING_S  # the job exists: kept for the jobs' TTL
    assert (await store.create(request(), idempotency_key="k-died", owner="o")).id == first.id
    # a submission that died after its claim: the claim names a job that was never written
    digest = (await store.redis.get(claim)).decode().split()[1]
    await store.redis.set(claim, f"job-never-written {digest}", ex=CLAIM_PENDING_S)
    with pytest.raises(SubmissionPending) as pending:
        await store.create(request(), idempotency_key="k-died", owner="o")
    assert pending.value.status == 503 and 1 <= int(pending.value.headers["Retry-After"]) <= CLAIM_PENDING_S
    await store.redis.delete(claim)  # what the claim's expiry does
    retried = await store.create(request(), idempotency_key="k-died", owner="o")
    assert retried.id != first.id and await store.get(retried.id, "o") is not None


async def test_a_redis_that_refuses_writes_is_a_503_not_a_500(store: JobStore) -> None:
    await store.redis.config_set("maxmemory", "1")
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.create(request())
        assert info.value.headers["Retry-After"]
    finally:
        await store.redis.config_set("maxmemory", "0")


async def test_the_cache_leaves_a_failing_redis_alone_for_a_while() -> None:
    """While Redis hangs every call would wait out a timeout: after one failure the cache skips it."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from rlaifv.service.cache import RewardCache
    from rlaifv.service.redis_conn import Breaker

    class Hanging:
        calls = 0

        async def get(self, key: str) -> bytes:
            Hanging.calls += 1
            raise RedisTimeoutError("timed out")

        async def set(self, *args: Any, **kwargs: Any) -> None:
            Hanging.calls += 1
            raise RedisTimeoutError("timed out")

    now = [0.0]
    cache = RewardCache(size=8, ttl_s=60, redis=Hanging(), breaker=Breaker(5.0, clock=lambda: now[0]))  # type: ignore[arg-type]
    assert await cache.get("k") is None and Hanging.calls == 1
    await cache.set("k", "v")
    assert await cache.get("k") is None and Hanging.calls == 1  # left alone
    now[0] = 5.1
    assert await cache.get("k") is None and Hanging.calls == 2  # tried again after the pause


@pytest.mark.looptime
async def test_a_hung_redis_costs_the_cache_and_the_rate_limits_one_short_wait() -> None:
    """Every request arriving while the first Redis call hung waited out the 5 s command timeout, /v1/rewards twice
    (the rate limit and the cache each had a breaker): 80 of 100 rewards requests took 5 or 10 s. Now a call gives
    up after RLAIFV_REDIS_OPTIONAL_TIMEOUT_S, and one breaker serves both users (virtual time: looptime)."""
    from rlaifv.service.cache import RewardCache
    from rlaifv.service.rate_limit import RateLimiter
    from rlaifv.service.redis_conn import Breaker

    class Hung:
        calls = 0

        async def get(self, key: str) -> bytes:
            Hung.calls += 1
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        def pipeline(self) -> Any:
            class Pipe:
                def incr(self, key: str) -> None: ...

                def expire(self, key: str, seconds: int) -> None: ...

                async def execute(self) -> list[int]:
                    Hung.calls += 1
                    await asyncio.Event().wait()
                    raise AssertionError("unreachable")

            return Pipe()

    loop = asyncio.get_running_loop()
    breaker = Breaker(5.0, timeout_s=0.5, clock=loop.time)
    cache = RewardCache(size=8, ttl_s=60, redis=Hung(), breaker=breaker)  # type: ignore[arg-type]
    limiter = RateLimiter(per_minute=100, redis=Hung(), breaker=breaker)  # type: ignore[arg-type]
    start = loop.time()
    results = await asyncio.gather(*(cache.get(f"k{i}") for i in range(10)))  # arrived while Redis hung
    assert results == [None] * 10 and loop.time() - start == pytest.approx(0.5, abs=0.01)
    calls = Hung.calls
    assert await limiter.hit("client") is None and await cache.get("k") is None  # both left Redis alone
    assert Hung.calls == calls and loop.time() - start == pytest.approx(0.5, abs=0.01)


async def test_a_stopping_worker_finishes_the_item_in_hand_within_its_grace(store: JobStore) -> None:
    """`rlaifv worker` on SIGTERM: no new items, the running one completes and is stored (no rerun later)."""
    import asyncio

    from pydantic import BaseModel

    from rlaifv.service.jobs import JobWorkers
    from rlaifv.service.metrics import Metrics

    class Scored(BaseModel):
        rewards: list[float]

    class Gated:
        """Serving whose scoring waits for the test: the item is in hand while the worker is told to stop."""

        def __init__(self) -> None:
            self.started, self.release = asyncio.Event(), asyncio.Event()

        async def rewards(self, request: Any, http_request: Any) -> Scored:
            self.started.set()
            await self.release.wait()
            return Scored(rewards=[0.5])

    serving = Gated()
    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1)
    workers = JobWorkers(store, serving, settings, Metrics())  # type: ignore[arg-type]
    job = await store.create(request(3))
    workers.start()
    await serving.started.wait()
    stopping = asyncio.create_task(workers.stop(grace_s=60))
    await asyncio.sleep(0)
    later = await store.create(request(1))  # arrives while the worker drains: left for another worker
    assert not stopping.done()
    serving.release.set()
    await stopping
    done, waiting = await store.get(job.id), await store.get(later.id)
    assert done is not None and (done.status, done.completed) == ("succeeded", 3)  # the batch in hand finished
    assert waiting is not None and (waiting.status, waiting.completed) == ("queued", 0)
    pending = await store.redis.xpending(store.stream, "rlaifv-workers")
    assert pending["pending"] == 0  # nothing in hand was left to be reclaimed and run again
    assert await store.redis.xinfo_consumers(store.stream, "rlaifv-workers") == []  # stopped ones piled up there

    # stopped at once with an item in hand: its consumer stays in the group, so that its entry is reclaimed
    serving.started.clear(), serving.release.clear()
    workers.start()
    await serving.started.wait()
    await workers.stop(grace_s=0)
    held = await store.redis.xinfo_consumers(store.stream, "rlaifv-workers")
    assert [c["pending"] for c in held] == [1]
    # ... handed back: another worker takes it at once, not a claim-idle time (60 s) later
    _, taken, *_ = await store.redis.xautoclaim(store.stream, "rlaifv-workers", "next", 60_000, count=10)
    assert len(taken) == 1


async def test_a_lost_reply_after_the_job_was_created_keeps_its_idempotency_key(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's MULTI ran but its reply (or the read after it) was lost: the client gets a 503 and retries with
    the same key, which must find that job, not create a second one."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    real_get, calls = store._get, []

    async def flaky_get(job_id: str, owner: str | None = None):
        calls.append(job_id)
        if len(calls) == 1:
            raise RedisTimeoutError("reply lost")
        return await real_get(job_id, owner)

    monkeypatch.setattr(store, "_get", flaky_get)
    before = await store.redis.xlen(store.stream)
    with pytest.raises(StoreUnavailable):
        await store.create(request(), idempotency_key="k-lost", owner="o")
    retried = await store.create(request(), idempotency_key="k-lost", owner="o")
    assert retried.id == calls[0]  # the job the first attempt created
    assert await store.redis.xlen(store.stream) == before + 2  # its two items, queued once


async def test_a_job_consumer_that_ended_fails_the_workers_liveness(store: JobStore) -> None:
    """Consumers catch their own errors, so one that ended is a bug only a restart mends: /healthz answers 503
    naming it (a draining worker's ended consumers are fine)."""
    import asyncio

    import httpx

    from rlaifv.service.app import create_worker_app
    from rlaifv.service.jobs import JobWorkers
    from rlaifv.service.metrics import Metrics

    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=2)
    workers = JobWorkers(store, None, settings, Metrics())  # type: ignore[arg-type]
    app = create_worker_app(settings, Metrics())
    app.state.job_workers = workers
    workers.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
        assert workers.liveness() is None and (await client.get("/healthz")).status_code == 200
        workers._tasks[0].cancel()
        await asyncio.wait([workers._tasks[0]])
        health = await client.get("/healthz")
        assert health.status_code == 503, health.text
        assert health.json() == {"status": "unavailable", "checks": {"jobs": "1 of 2 job consumers stopped"}}
        await workers.stop()
        assert (await client.get("/healthz")).status_code == 200


async def test_a_worker_stopped_while_its_model_loads_takes_no_job(redis_url: str) -> None:
    """SIGTERM during the load: the worker never starts consuming (no consumer group appears), so an evicted pod
    that was still loading leaves nothing to reclaim."""
    import redis.asyncio as aioredis

    from rlaifv.service.default_model import default_bundle
    from rlaifv.service.worker_cli import run_worker

    stream = "rlaifv:jobs:stopped-while-loading"
    stop = asyncio.Event()
    stop.set()
    settings = Settings(bundle=default_bundle(), redis_url=redis_url, jobs_stream=stream, worker_port=0)
    await run_worker(settings, stop)
    client = aioredis.from_url(redis_url)
    try:
        assert not await client.exists(stream)
    finally:
        await client.aclose()


async def test_the_workers_operations_port_binds_an_ipv6_host() -> None:
    import socket

    import httpx

    from rlaifv.service.app import create_worker_app
    from rlaifv.service.metrics import Metrics
    from rlaifv.service.worker_cli import OperationsServer
    from rlaifv.testing.server import free_port

    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:  # a machine without IPv6 loopback
        pytest.skip(str(exc))
    settings = Settings(bundle="unused", host="::1", worker_port=free_port())
    server = await OperationsServer.open(create_worker_app(settings, Metrics()), settings)
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://[::1]:{settings.worker_port}/healthz")
        assert response.status_code == 200
    finally:
        await server.close()


def test_cached_rewards_are_keyed_by_the_image_preprocessing_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards cached for the same bytes under an older decoding (sideways photos, black transparency) are misses."""
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service import cache

    args = ("m", RewardConfig(), [b"image"], "q", None, ["a"])
    now = cache.RewardCache.key(*args)
    monkeypatch.setattr(cache, "PREPROCESSING_VERSION", cache.PREPROCESSING_VERSION - 1)
    assert cache.RewardCache.key(*args) != now


async def test_a_batch_running_longer_than_the_claim_idle_time_stays_its_workers(store: JobStore) -> None:
    """Another worker reclaims items idle for RLAIFV_JOBS_CLAIM_IDLE_MS: a consumer still running a long batch
    renews its claim, so its items are not taken and run twice (they were, past 60 s on a GPU)."""
    from pydantic import BaseModel

    from rlaifv.service.jobs import GROUP, JobWorkers
    from rlaifv.service.metrics import Metrics

    class Scored(BaseModel):
        rewards: list[float]

    class Gated:
        def __init__(self) -> None:
            self.started, self.release, self.calls = asyncio.Event(), asyncio.Event(), 0

        async def rewards(self, request: Any, http_request: Any) -> Scored:
            self.calls += 1
            self.started.set()
            await self.release.wait()
            return Scored(rewards=[0.5])

    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=600)
    serving = Gated()
    workers = JobWorkers(store, serving, settings, Metrics())  # type: ignore[arg-type]
    job = await store.create(request(1))
    workers.start()
    await serving.started.wait()
    loop = asyncio.get_running_loop()
    end = loop.time() + 2.4  # four claim-idle periods of wall time: what Redis's idle clock counts
    while loop.time() < end:
        taken = await store.redis.xautoclaim(store.stream, GROUP, "another-worker", min_idle_time=600, count=10)
        assert not taken[1], "a running item was reclaimed by another consumer"
        await asyncio.sleep(0.03)
    serving.release.set()
    await workers.stop(grace_s=5)
    done = await store.get(job.id)
    assert done is not None and done.completed == 1 and serving.calls == 1


async def test_an_item_queued_past_its_deadline_goes_again_and_one_that_ran_past_it_fails(store: JobStore) -> None:
    """Under HTTP load 29 of 48 items failed as deadline_exceeded though none had run: a deadline passed while
    queued is waited out as a full queue is; one passed while running still fails (it would again)."""
    from pydantic import BaseModel

    from rlaifv.service.errors import DeadlineExceeded, QueuedTooLong
    from rlaifv.service.jobs import JobWorkers
    from rlaifv.service.metrics import Metrics

    class Scored(BaseModel):
        rewards: list[float]

    class Busy:
        def __init__(self, failures: list[Exception]) -> None:
            self.failures, self.calls = failures, 0

        async def rewards(self, request: Any, http_request: Any) -> Scored:
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)
            return Scored(rewards=[0.5])

    async def run(serving: Busy) -> Any:
        settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1)
        workers = JobWorkers(store, serving, settings, Metrics())  # type: ignore[arg-type]
        job = await store.create(request(1))
        workers.start()
        try:
            while (done := await store.get(job.id)) is None or done.completed + done.failed < 1:
                await asyncio.sleep(0.01)
        finally:
            await workers.stop(grace_s=5)
        return done

    queued = Busy([QueuedTooLong("request deadline passed while queued"), QueuedTooLong("again")])
    done = await asyncio.wait_for(run(queued), timeout=30)
    assert (done.completed, done.failed, queued.calls) == (1, 0, 3)
    ran = Busy([DeadlineExceeded("request not served within 1 s")])
    done = await asyncio.wait_for(run(ran), timeout=30)
    assert (done.completed, done.failed, ran.calls) == (0, 1, 1)


async def test_a_result_stored_in_its_jobs_last_half_second_expires_with_it(store: JobStore) -> None:
    """TTL reads whole seconds: with under 500 ms left it read 0, no EXPIRE was set, and the results outlived the
    job for ever."""
    from rlaifv.service.jobs import PREFIX

    job = await store.create(request(2))
    key = PREFIX + job.id
    await store.redis.pexpire(key, 300)  # the job's last moments (as after its week)
    assert await store.record(job.id, 0, {"status": "succeeded", "result": {"rewards": [0.1]}})
    assert 0 < await store.redis.pttl(key + ":results") <= 300


async def test_a_claim_renewal_that_loses_its_cancel_does_not_hold_the_worker(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py loses a cancel that lands while Redis reloads its AOF (the call returns instead): the renewal
    looped on, the consumer waited for it for ever with its health checks green, and the job stayed running."""
    from pydantic import BaseModel

    from rlaifv.service.jobs import JobWorkers
    from rlaifv.service.metrics import Metrics

    class Scored(BaseModel):
        rewards: list[float]

    renewing = asyncio.Event()
    real = store.redis.xpending_range

    async def swallowing_xpending(*args: Any, **kwargs: Any) -> Any:
        if len(args) < 6 or renewing.is_set():  # not the renewal's first (it names the consumer): as Redis answers
            return await real(*args, **kwargs)
        renewing.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return []  # the cancel lost, as redis-py does while Redis loads its AOF
        return []

    class Gated:
        async def rewards(self, request: Any, http_request: Any) -> Scored:
            await renewing.wait()  # the renewal is inside its Redis call when the batch ends
            return Scored(rewards=[0.5])

    monkeypatch.setattr(store.redis, "xpending_range", swallowing_xpending)
    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=150)
    workers = JobWorkers(store, Gated(), settings, Metrics())  # type: ignore[arg-type]
    first = await store.create(request(1))
    workers.start()

    async def finished(job_id: str) -> None:
        while (job := await store.get(job_id)) is None or job.completed < 1:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(finished(first.id), timeout=30)
    second = await store.create(request(1))
    await asyncio.wait_for(finished(second.id), timeout=30)  # the consumer went on to the next batch
    await asyncio.wait_for(workers.stop(grace_s=5), timeout=30)


async def test_credentials_in_settings_win_and_a_redis_refusing_writes_is_a_cache_miss(redis_url: str) -> None:
    """The URL's password won over RLAIFV_REDIS_PASSWORD (redis-py lets the URL's options win); an ACL user
    without write rights made every /v1/rewards a 500 (the cache caught only outages)."""
    import redis as sync_redis

    from rlaifv.service.cache import RewardCache
    from rlaifv.service.rate_limit import RateLimiter
    from rlaifv.service.redis_conn import Breaker, connect

    admin = sync_redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pass-0123", "~*", "+@read", "+@connection")
    url = redis_url.replace("redis://", "redis://reader:wrong-pass@")
    settings = Settings(bundle="unused", redis_url=url, redis_password="reader-pass-0123")
    reader = connect(settings)
    try:
        assert await reader.ping()
        cache = RewardCache(size=8, ttl_s=60, redis=reader, breaker=Breaker(5.0))
        await cache.set("k", "v")  # NOPERM: not stored, no error
        assert await cache.get("k") is None
        limiter = RateLimiter(per_minute=1, redis=connect(settings), breaker=Breaker(5.0))
        assert await limiter.hit("c") is None and await limiter.hit("c") is not None  # counted in memory
    finally:
        await reader.aclose()
        admin.execute_command("ACL", "DELUSER", "reader")


# -- GET /v1/jobs: the owner's index --------------------------------------------------------------------------------


def owner_id() -> str:
    """An owner of the test's own: the session's Redis holds every test's jobs."""
    return uuid.uuid4().hex[:16]


async def spread(store: JobStore, owner: str, ids: list[str]) -> None:
    """Give the jobs (in creation order) a second each from the first one's creation time: jobs created in a row
    may share a millisecond, which orders them by id instead."""
    from rlaifv.service.jobs import OWNERS

    first = int(await store.redis.zscore(OWNERS + owner, ids[0]))
    await store.redis.zadd(OWNERS + owner, {job_id: first + 1_000 * i for i, job_id in enumerate(ids)}, xx=True)


async def redis_ms(store: JobStore) -> int:
    seconds, micros = await store.redis.time()
    return seconds * 1000 + micros // 1000


async def listed(store: JobStore, owner: str | None, limit: int = 100, after: str | None = None) -> list[str]:
    jobs, _ = await store.list_jobs(owner, limit=limit, after=after)
    return [job.id for job in jobs]


async def test_jobs_are_listed_newest_first_a_page_at_a_time(store: JobStore) -> None:
    from rlaifv.service.jobs import OWNERS

    owner = owner_id()
    ids = [(await store.create(request(1), owner=owner)).id for _ in range(5)]
    index = OWNERS + owner
    scores = [await store.redis.zscore(index, job_id) for job_id in ids]
    assert scores == sorted(scores)  # scored by creation time, in ms
    jobs = [await store.get(job_id, owner) for job_id in ids]
    assert [int(score) // 1000 for score in scores] == [job.created for job in jobs if job is not None]
    await spread(store, owner, ids)
    newest_first = ids[::-1]
    assert await listed(store, owner) == newest_first
    pages, after, more = [], None, True
    while more:
        page, more = await store.list_jobs(owner, limit=2, after=after)
        pages.append([job.id for job in page])
        after = page[-1].id
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    page, more = await store.list_jobs(owner, limit=5)
    assert [job.id for job in page] == newest_first and more is False  # exactly full: no more
    page, more = await store.list_jobs(owner, limit=4)
    assert len(page) == 4 and more is True
    assert await store.list_jobs(owner, limit=3, after=newest_first[-1]) == ([], False)
    assert await store.list_jobs(owner_id()) == ([], False)  # an owner without jobs


async def test_jobs_of_the_same_millisecond_are_paged_by_rank_without_gaps_or_repeats(store: JobStore) -> None:
    """A cursor by score would skip or repeat jobs that share one; ranks give ties a fixed order (by id)."""
    from rlaifv.service.jobs import OWNERS

    owner = owner_id()
    ids = [(await store.create(request(1), owner=owner)).id for _ in range(5)]
    score = await store.redis.zscore(OWNERS + owner, ids[0])
    await store.redis.zadd(OWNERS + owner, dict.fromkeys(ids, score), xx=True)
    expected = sorted(ids, reverse=True)
    assert await listed(store, owner) == expected
    seen, after = [], None
    for _ in range(5):
        page = await listed(store, owner, limit=1, after=after)
        seen += page
        after = page[-1]
    assert seen == expected


async def test_a_caller_lists_only_its_own_jobs(store: JobStore) -> None:
    alice, bob = owner_id(), owner_id()
    mine = [(await store.create(request(1), owner=alice)).id for _ in range(2)]
    theirs = (await store.create(request(1), owner=bob)).id
    anonymous = (await store.create(request(1))).id
    assert sorted(await listed(store, alice)) == sorted(mine)
    assert await listed(store, bob) == [theirs]
    assert anonymous in await listed(store, None) and not set(mine) & set(await listed(store, None))
    for cursor in (theirs, anonymous):  # another owner's job is no cursor of alice's: the same 400 as no job
        with pytest.raises(BadRequest) as info:
            await store.list_jobs(alice, after=cursor)
        assert info.value.param == "after" and info.value.status == 400
        assert "is not one of your jobs" in info.value.message
    assert await store.get(theirs, bob) is not None  # still there for its owner


async def test_jobs_that_are_gone_are_not_listed_and_leave_the_index(store: JobStore) -> None:
    """A job hash that expired (or a Redis restarted without its data lost) is skipped and its entry removed; the
    next page and `has_more` count only jobs that exist."""
    from rlaifv.service.jobs import OWNERS

    owner = owner_id()
    index = OWNERS + owner
    ids = [(await store.create(request(1), owner=owner)).id for _ in range(5)]
    await spread(store, owner, ids)
    j1, j2, j3, j4, j5 = ids
    await store.redis.delete(PREFIX + j4, PREFIX + j2)  # what their TTL does
    page, more = await store.list_jobs(owner, limit=2)
    assert [job.id for job in page] == [j5, j3] and more is True  # j2 skipped, j1 still there
    assert await store.redis.zscore(index, j4) is None and await store.redis.zscore(index, j2) is None  # pruned
    assert await store.list_jobs(owner, limit=2, after=j3) == ([(await store.get(j1, owner))], False)
    await store.redis.delete(PREFIX + j1)
    page, more = await store.list_jobs(owner, limit=2)
    assert [job.id for job in page] == [j5, j3] and more is False  # the only job after the page is gone
    assert await store.redis.zcard(index) == 2


async def test_entries_older_than_the_ttl_are_trimmed_and_the_index_expires_with_the_jobs(store: JobStore) -> None:
    """The index cannot grow without bound: entries of jobs past their TTL go when a job is created or the list is
    read, and the index itself expires once its newest job has."""

    from rlaifv.service.jobs import INDEX_GRACE_MS, OWNERS

    owner = owner_id()
    index = OWNERS + owner
    old, kept = (await store.create(request(1), owner=owner)).id, (await store.create(request(1), owner=owner)).id
    assert 0 < await store.redis.ttl(PREFIX + kept) <= await store.redis.ttl(index) <= 3600 + INDEX_GRACE_MS // 1000
    past = await redis_ms(store) - 3600 * 1000 - INDEX_GRACE_MS - 1_000  # created before the TTL (and grace)
    await store.redis.zadd(index, {old: past}, xx=True)
    await store.redis.delete(PREFIX + old)  # expired
    await store.create(request(1), owner=owner)  # trimmed at write
    assert await store.redis.zscore(index, old) is None and await store.redis.zcard(index) == 2
    await store.create(request(1), owner=owner)  # three jobs: a page of one reads the two newest entries
    await store.redis.zadd(index, {kept: past}, xx=True)
    await store.redis.delete(PREFIX + kept)
    assert len(await listed(store, owner, limit=1)) == 1  # a page that does not reach it...
    assert await store.redis.zscore(index, kept) is None  # ...trims it at read


async def test_a_cursor_that_is_not_the_callers_job_is_a_400_naming_after(store: JobStore) -> None:
    from rlaifv.service.jobs import OWNERS

    owner = owner_id()
    legacy, job = [(await store.create(request(1), owner=owner)).id for _ in range(2)]
    others = (await store.create(request(1), owner=owner_id())).id
    await store.redis.zrem(OWNERS + owner, legacy)  # a job created before the index existed
    for cursor in ("nope", "job-" + "0" * 32, legacy, others, job.upper(), "idem:-:k-1"):
        with pytest.raises(BadRequest) as info:
            await store.list_jobs(owner, after=cursor)
        assert (info.value.status, info.value.param, info.value.code) == (400, "after", "invalid_value"), cursor
    assert await listed(store, owner, after=job) == []  # the oldest listed job (legacy is not listed)


async def test_a_cursor_that_expired_while_paging_still_marks_the_place(store: JobStore) -> None:
    """`last_id` is the page's oldest job, the likeliest to expire before the next request: the SDK's paging loop
    got a 400 it does not retry."""
    from rlaifv.service.jobs import OWNERS

    owner = owner_id()
    ids = [(await store.create(request(1), owner=owner)).id for _ in range(4)]
    await spread(store, owner, ids)
    page, more = await store.list_jobs(owner, limit=2)
    assert [job.id for job in page] == ids[:1:-1] and more
    await store.redis.delete(PREFIX + page[-1].id)  # expired between the two requests
    assert await listed(store, owner, after=page[-1].id) == [ids[1], ids[0]]
    assert await store.redis.zscore(OWNERS + owner, page[-1].id) is None  # then it leaves the index
    # a cursor trimmed as expired for sure while the caller paged: so is everything older, and the list ends
    await store.redis.delete(PREFIX + ids[1])
    old = int(await store.redis.zscore(OWNERS + owner, ids[0])) - store.index_window_ms - 1
    await store.redis.zadd(OWNERS + owner, {ids[0]: old - 1, ids[1]: old}, xx=True)
    assert await store.list_jobs(owner, after=ids[1]) == ([], False)


async def test_a_page_whose_anchor_expires_while_it_is_read_is_read_again(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page is read in rounds after the last job found alive; should that job expire and another reader remove
    its entry between two rounds, the page is read again instead of restarting at the top or failing."""
    from rlaifv.service.jobs import OWNERS

    owner = owner_id()
    ids = [(await store.create(request(1), owner=owner)).id for _ in range(6)]
    await spread(store, owner, ids)
    j1, j2, j3, j4, j5, j6 = ids
    await store.redis.delete(PREFIX + j5)
    real_forget, calls = store._forget, []

    async def forget_while_j4_expires(index: str, job_ids: list[str]) -> None:
        calls.append(job_ids)
        if len(calls) == 1:  # after the first round (j6, j5 gone, j4: the anchor)
            await store.redis.delete(PREFIX + j4)
            await store.redis.zrem(index, j4)
        await real_forget(index, job_ids)

    monkeypatch.setattr(store, "_forget", forget_while_j4_expires)
    page, more = await store.list_jobs(owner, limit=2)
    assert [job.id for job in page] == [j6, j3] and more is True
    assert calls[0] == [j5] and await store.redis.zcard(OWNERS + owner) == 4
    assert await listed(store, owner, after=j3) == [j2, j1]


async def test_listing_while_redis_is_down_is_a_503(redis_url: str) -> None:
    from rlaifv.service.redis_conn import connect
    from rlaifv.testing.server import free_port

    settings = Settings(bundle="unused", redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_retry_after_s=7)
    redis = connect(settings)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await JobStore(redis, settings).list_jobs("o", limit=5)
        assert info.value.status == 503 and info.value.headers["Retry-After"] == "7"
    finally:
        await redis.aclose()


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


async def test_an_item_nested_too_deeply_to_store_is_a_400_naming_it(store: JobStore) -> None:
    """A field the endpoint ignores (a message's `annotations`) may nest deeper than JSON can be written back:
    storing the item was a 500 (RecursionError)."""
    deep = {"role": "user", "content": "q", "annotations": [_nested(5000)]}
    item = BODY | {"messages": [deep], "question": None}
    with pytest.raises(BadRequest) as info:
        await store.create(JobRequest(kind="rewards", items=[BODY, item]), idempotency_key="deep-1")
    assert info.value.param == "items[1]" and "nested too deeply (5005 levels)" in info.value.message
    # past pydantic's serialisation bound (~255 levels), within json's: the Idempotency-Key's digest failed (and
    # json's own bound moves with the recursion limit: a test suite raised it)
    shallower = BODY | {"messages": [deep | {"annotations": [_nested(300)]}], "question": None}
    with pytest.raises(BadRequest) as info:
        await store.create(JobRequest(kind="rewards", items=[BODY, shallower]), idempotency_key="deep-2")
    assert info.value.param == "items[1]" and "at most 128 levels" in info.value.message
    fine = BODY | {"messages": [deep | {"annotations": [_nested(100)]}], "question": None}
    assert (await store.create(JobRequest(kind="rewards", items=[fine]), idempotency_key="deep-3")).total == 1


def test_upload_lines_and_metadata_nested_too_deeply_are_400s() -> None:
    from rlaifv.service.jobs import parse_jsonl

    with pytest.raises(BadRequest) as info:
        parse_jsonl([json.dumps(BODY).encode(), b"[" * 100_000 + b"]" * 100_000])
    assert info.value.param == "items[1]" and "nested too deeply" in info.value.message


async def test_the_index_runs_on_redis_s_clock_not_the_replicas(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scores came from the writing replica's clock and the trim from the reader's: a replica whose clock ran
    ahead hid every job from one whose clock was right (and trimmed early); both now read Redis's TIME."""
    import time as real_time
    import types

    from rlaifv.service import jobs as jobs_module
    from rlaifv.service.jobs import OWNERS

    owner = owner_id()
    ahead = types.SimpleNamespace(time=lambda: real_time.time() + 7200)
    monkeypatch.setattr(jobs_module, "time", ahead)
    job = (await store.create(request(1), owner=owner)).id
    assert abs(await store.redis.zscore(OWNERS + owner, job) - await redis_ms(store)) < 60_000
    behind = types.SimpleNamespace(time=lambda: real_time.time() - 7200)
    monkeypatch.setattr(jobs_module, "time", behind)
    assert await listed(store, owner) == [job]


async def test_a_reader_without_write_access_lists_and_skips_expired_entries(store: JobStore, redis_url: str) -> None:
    """The list trimmed the index while reading: a read-only ACL user (or a read-only replica) got a 500."""
    import redis as sync_redis

    from rlaifv.service.jobs import OWNERS
    from rlaifv.service.redis_conn import connect

    owner = owner_id()
    ids = [(await store.create(request(1), owner=owner)).id for _ in range(3)]
    await spread(store, owner, ids)
    expired = await redis_ms(store) - store.index_window_ms - 1_000
    await store.redis.zadd(OWNERS + owner, {ids[0]: expired}, xx=True)  # its job not yet removed by Redis
    admin = sync_redis.Redis.from_url(redis_url)
    user = f"lister-{owner}"
    admin.execute_command(
        "ACL", "SETUSER", user, "on", ">lister-pass-0123", "~*", "+@read", "+@connection", "+eval", "+time"
    )
    try:
        settings = Settings(
            bundle="unused", redis_url=redis_url, redis_username=user, redis_password="lister-pass-0123",
            jobs_stream=store.stream, jobs_ttl_s=3600,
        )  # fmt: skip
        reader = JobStore(connect(settings), settings)
        page, more = await reader.list_jobs(owner, limit=1)
        assert [job.id for job in page] == [ids[2]] and more
        assert await listed(reader, owner, after=ids[2]) == [ids[1]]  # ids[0] expired for sure: not listed
        assert await store.redis.zscore(OWNERS + owner, ids[0]) is not None  # and not removed by this reader
        await reader.redis.aclose()
    finally:
        admin.execute_command("ACL", "DELUSER", user)
    assert await listed(store, owner) == [ids[2], ids[1]]  # a writer trims it
    assert await store.redis.zscore(OWNERS + owner, ids[0]) is None


async def test_a_stream_entry_that_names_no_item_is_dropped_not_retried_for_ever(store: JobStore) -> None:
    """An entry without an index (written by hand, by another program) raised in the consumer, was reclaimed every
    claim-idle period for ever and held the backlog (KEDA's signal) above zero."""
    from rlaifv.service.jobs import GROUP, JobWorkers
    from rlaifv.service.metrics import Metrics

    await store.ensure_group()
    for fields in ({"job": "job-0000"}, {"foo": "bar"}, {"job": "job-x", "index": "not a number"}):
        await store.redis.xadd(store.stream, fields)
    serving = StubServing()
    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1)
    workers = JobWorkers(store, serving, settings, Metrics())  # type: ignore[arg-type]
    job = await store.create(request(1))
    workers.start()

    async def done() -> bool:
        state = await store.get(job.id)
        return state is not None and state.status == "succeeded"

    await until(done, "the job after the bad entries")
    await workers.stop(grace_s=5)
    assert (await store.redis.xpending(store.stream, GROUP))["pending"] == 0 and serving.calls == 1


@pytest.mark.parametrize("deliveries", [2, 3])
async def test_an_item_whose_workers_all_died_fails_after_the_most_deliveries(store: JobStore, deliveries: int) -> None:
    """An item that kills its worker (out of memory, a crash in a driver) was reclaimed by worker after worker
    until its job expired; after RLAIFV_JOBS_MAX_DELIVERIES takings it fails instead (and one under the bound
    still runs)."""
    from rlaifv.service.jobs import GROUP, JobWorkers
    from rlaifv.service.metrics import Metrics

    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=100)
    settings = settings.model_copy(update={"jobs_max_deliveries": 3})
    job = await store.create(request(1))
    await store.ensure_group()
    await store.redis.xreadgroup(GROUP, "dead-0", {store.stream: ">"}, count=10)  # delivery 1
    (entry_id,) = [p["message_id"] for p in await store.redis.xpending_range(store.stream, GROUP, "-", "+", 10)]
    for k in range(deliveries - 1):  # taken again by workers that died in turn
        await store.redis.xclaim(store.stream, GROUP, f"dead-{k + 1}", 0, [entry_id], idle=100_000)
    serving = StubServing()
    workers = JobWorkers(store, serving, settings, Metrics())  # type: ignore[arg-type]
    workers.start()  # its own taking makes deliveries + 1

    async def finished() -> bool:
        state = await store.get(job.id)
        return state is not None and state.status in ("succeeded", "failed")

    await until(finished, "the reclaimed item's outcome")
    await workers.stop(grace_s=5)
    state = await store.get(job.id)
    assert state is not None
    if deliveries + 1 > 3:
        assert (state.status, serving.calls) == ("failed", 0)
        results = [json.loads(line) for line in [line async for line in store.result_lines(state)]]
        assert results[0]["error"]["code"] == "item_abandoned" and "taken 3 times" in results[0]["error"]["message"]
    else:
        assert (state.status, serving.calls) == ("succeeded", 1)
    assert (await store.redis.xpending(store.stream, GROUP))["pending"] == 0


async def test_items_read_while_the_worker_is_told_to_stop_are_handed_back_not_run(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM came while the consumer waited in XREADGROUP: the draining worker ran the items it then got."""
    from rlaifv.service.jobs import GROUP, JobWorkers
    from rlaifv.service.metrics import Metrics

    serving = StubServing()
    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1)
    workers = JobWorkers(store, serving, settings, Metrics())  # type: ignore[arg-type]
    job = await store.create(request(2))
    real_next, read = workers._next, asyncio.Event()

    async def told_to_stop_meanwhile(consumer: str) -> Any:
        entries = await real_next(consumer)
        if entries:
            workers._draining = True
            read.set()
        return entries

    monkeypatch.setattr(workers, "_next", told_to_stop_meanwhile)
    workers.start()
    await read.wait()
    await workers.stop(grace_s=5)
    state = await store.get(job.id)
    assert state is not None and (state.status, serving.calls) == ("queued", 0)
    pending = await store.redis.xpending_range(store.stream, GROUP, "-", "+", 10)
    assert [p["times_delivered"] for p in pending] == [0, 0]  # a stop asked for is no crash: not counted
    _, taken, *_ = await store.redis.xautoclaim(store.stream, GROUP, "next", settings.jobs_claim_idle_ms, count=10)
    assert len(taken) == 2  # at once, by the next worker


async def test_a_batch_whose_worker_died_twice_is_reclaimed_an_item_at_a_time(store: JobStore) -> None:
    """An item that kills its worker takes its whole batch down with it: reclaimed together each time, all 16
    items of the batch reached the delivery bound and failed as abandoned, not only the one that did it."""
    from rlaifv.service.jobs import GROUP, JobWorkers
    from rlaifv.service.metrics import Metrics

    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=100)
    workers = JobWorkers(store, None, settings, Metrics())  # type: ignore[arg-type]
    await store.create(request(3))
    await store.ensure_group()
    await store.redis.xreadgroup(GROUP, "died-once", {store.stream: ">"}, count=10)
    await store.redis.xclaim(store.stream, GROUP, "died-once", 0, await pending_ids(store), idle=100_000, justid=True)
    first = await workers._reclaim("next")
    assert len(first) == 3  # delivered once: the batch goes on together
    await store.redis.xclaim(store.stream, GROUP, "died-twice", 0, await pending_ids(store), idle=100_000)
    again = await workers._reclaim("next-2")
    assert len(again) == 1  # delivered twice: each alone, so only the item that kills counts on


async def test_consumers_that_died_leave_the_group_once_their_entries_are_reclaimed(store: JobStore) -> None:
    """Each killed worker stayed in XINFO CONSUMERS for ever (a crash-looping pod added one per restart). A dead
    consumer leaves once another worker took its entries; one that still holds entries stays, or they would be
    lost (deleting a consumer drops its pending entries), and so does one heard from recently."""
    from rlaifv.service.jobs import GROUP, JobWorkers
    from rlaifv.service.metrics import Metrics

    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=100)
    workers = JobWorkers(store, None, settings, Metrics())  # type: ignore[arg-type]
    assert workers.forget_after_ms == 60_000
    await store.create(request(3))
    await store.ensure_group()
    await store.redis.xreadgroup(GROUP, "died", {store.stream: ">"}, count=2)
    await store.redis.xreadgroup(GROUP, "busy", {store.stream: ">"}, count=1)
    died = (await pending_ids(store))[:2]
    await store.redis.xclaim(store.stream, GROUP, "died", 0, died, idle=100_000, justid=True)

    async def names() -> list[str]:
        return sorted(c["name"].decode() for c in await store.redis.xinfo_consumers(store.stream, GROUP))

    assert len(await workers._reclaim("next")) == 2
    assert await names() == ["busy", "died", "next"]  # "died" was heard from just now: not yet taken for dead
    workers.forget_after_ms = 0
    await store.redis.xclaim(store.stream, GROUP, "died-later", 0, died, idle=100_000, justid=True)
    assert len(await workers._reclaim("next")) == 1  # delivered twice: one at a time
    assert await names() == ["busy", "died-later", "next"]  # holds the other entry: it stays, the entry with it
    assert len(await workers._reclaim("next")) == 1
    assert await names() == ["busy", "next"]  # "busy" holds an entry: it stays too
    assert len(await pending_ids(store)) == 3


async def pending_ids(store: JobStore) -> list[bytes]:
    from rlaifv.service.jobs import GROUP

    return [p["message_id"] for p in await store.redis.xpending_range(store.stream, GROUP, "-", "+", 100)]


async def pending_state(store: JobStore) -> dict[bytes, tuple[bytes, int]]:
    from rlaifv.service.jobs import GROUP

    pending = await store.redis.xpending_range(store.stream, GROUP, "-", "+", 100)
    return {p["message_id"]: (p["consumer"], p["times_delivered"]) for p in pending}


async def test_a_worker_back_from_a_redis_outage_takes_up_its_items_as_the_deliveries_they_were(
    store: JobStore,
) -> None:
    """An outage ends the deliveries of the batch in hand, not its items: the consumer that lived through it takes up
    the entries it still holds without a new delivery (they were reclaimed once idle, each outage counted one, and
    five outages abandoned an item that was fine). One another worker took meanwhile (the outage outlasted the
    claim-idle time) gets back the delivery that taking counted, its holder and idle time kept; one taken again
    after that keeps its count. Asked twice (a reply lost to another outage), nothing changes."""
    from rlaifv.service.jobs import GROUP, JobWorkers, _Interrupted
    from rlaifv.service.metrics import Metrics

    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=100)
    workers = JobWorkers(store, None, settings, Metrics())  # type: ignore[arg-type]
    await store.create(request(4))
    await store.ensure_group()
    await store.redis.xreadgroup(GROUP, "back", {store.stream: ">"}, count=10)  # delivery 1 of each
    ids = await pending_ids(store)
    await store.redis.xclaim(store.stream, GROUP, "other", 0, ids[:1], idle=50_000)  # delivery 2
    for _ in range(2):
        await store.redis.xclaim(store.stream, GROUP, "twice", 0, ids[1:2])  # deliveries 2 and 3
    interrupted = _Interrupted()
    for _ in range(2):
        interrupted.outage([(entry_id, {}, 1) for entry_id in ids])
        taken = await workers._resume("back", interrupted)
        assert [(entry_id, fields[b"index"], times) for entry_id, fields, times in taken] == [
            (ids[2], b"2", 1),
            (ids[3], b"3", 1),
        ]
        assert await pending_state(store) == {
            ids[0]: (b"other", 1),
            ids[1]: (b"twice", 3),
            ids[2]: (b"back", 1),
            ids[3]: (b"back", 1),
        }
    (given_back,) = await store.redis.xpending_range(store.stream, GROUP, ids[0], ids[0], 1)
    assert given_back["time_since_delivered"] >= 50_000  # still idle: its holder's state is as it was


async def test_an_item_taken_up_after_outages_again_and_again_is_left_to_a_reclaim_that_counts(store: JobStore) -> None:
    """An item whose every run meets an outage (the connection lost as its result is written; a refusal for memory
    is waited out instead, `JobWorkers._record`) must not run for ever in one worker: once
    RLAIFV_JOBS_MAX_DELIVERIES of its outages went uncounted it is left where it is, and the reclaim that takes it
    once idle counts a delivery. So is at once an entry whose run failed otherwise."""
    from rlaifv.service.jobs import GROUP, JobWorkers, _Interrupted
    from rlaifv.service.metrics import Metrics

    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=100)
    settings = settings.model_copy(update={"jobs_max_deliveries": 2})
    workers = JobWorkers(store, None, settings, Metrics())  # type: ignore[arg-type]
    await store.create(request(2))
    await store.ensure_group()
    await store.redis.xreadgroup(GROUP, "back", {store.stream: ">"}, count=10)
    refused, failed = await pending_ids(store)
    interrupted = _Interrupted()
    interrupted.outage([])
    interrupted.failed([(failed, {}, 1)])
    assert interrupted.batch is None  # a taking up that failed otherwise is given up, not tried for ever
    for expected in ([refused], [refused], []):
        interrupted.outage([(refused, {}, 1)])
        assert [entry_id for entry_id, _, _ in await workers._resume("back", interrupted)] == expected
    assert await pending_state(store) == {refused: (b"back", 1), failed: (b"back", 1)}
    await store.redis.xclaim(store.stream, GROUP, "back", 0, [refused, failed], idle=100_000, justid=True)
    assert [times for _, _, times in await workers._reclaim("next")] == [2, 2]


async def test_a_delivery_is_given_back_once_however_often_its_taking_up_is_asked(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's outage outlasted the claim-idle time: B reclaimed its item (delivery 2), and A, back, gave that delivery
    back (B's, 1), but the reply was lost to another outage. B then died running the item and C reclaimed it (2).
    A, asking again, read C's taking as the one to undo and gave back a second delivery (C's, 1): B's death went
    uncounted, and each lost reply followed by a death let the item run once more than RLAIFV_JOBS_MAX_DELIVERIES
    allows. The delivery given back is marked in the entry's outage record, which expires with the jobs' TTL and
    goes with the entry's XACK."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from rlaifv.service.jobs import GROUP, JobWorkers, _Interrupted
    from rlaifv.service.metrics import Metrics

    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=100)
    workers = JobWorkers(store, None, settings, Metrics())  # type: ignore[arg-type]
    await store.create(request(1))
    await store.ensure_group()
    await store.redis.xreadgroup(GROUP, "A", {store.stream: ">"}, count=10)  # delivery 1
    (entry_id,) = await pending_ids(store)
    real_eval = store.redis.eval

    async def reply_lost(*args: Any) -> Any:
        await real_eval(*args)
        raise RedisConnectionError("Connection reset by peer")

    interrupted = _Interrupted()
    interrupted.outage([(entry_id, {}, 1)])
    await store.redis.xclaim(store.stream, GROUP, "B", 0, [entry_id])  # A is away: B takes it (2)
    with monkeypatch.context() as patched:
        patched.setattr(store.redis, "eval", reply_lost)
        with pytest.raises(RedisConnectionError):
            await workers._resume("A", interrupted)
    assert await pending_state(store) == {entry_id: (b"B", 1)}
    await store.redis.xclaim(store.stream, GROUP, "C", 0, [entry_id])  # B died running it: C takes it (2)
    for _ in range(2):
        assert await workers._resume("A", interrupted) == []
        assert await pending_state(store) == {entry_id: (b"C", 2)}
    record = store.outages.encode() + entry_id
    assert await store.redis.hgetall(record) == {b"A@1": b"1", b"uncounted": b"1"}
    assert 0 < await store.redis.pttl(record) <= store.ttl_s * 1000
    await store.ack(entry_id)
    assert await store.redis.exists(record) == 0


async def test_an_item_whose_every_run_reads_as_an_outage_runs_at_most_twice_the_bound(store: JobStore) -> None:
    """An item whose every run meets an outage (the connection lost as its result is written) was taken up
    RLAIFV_JOBS_MAX_DELIVERIES
    times in a row by each worker that held it, then reclaimed by the next: max x (max + 1) runs (30 at the default
    5). Its outages now go uncounted max times in all workers together: max counted deliveries and max takings up,
    then it fails as abandoned."""
    from rlaifv.service.jobs import GROUP, JobWorkers, _Interrupted
    from rlaifv.service.metrics import Metrics

    bound = 3
    settings = Settings(bundle="unused", jobs_stream=store.stream, jobs_workers=1, jobs_claim_idle_ms=100)
    settings = settings.model_copy(update={"jobs_max_deliveries": bound})
    workers = JobWorkers(store, None, settings, Metrics())  # type: ignore[arg-type]
    job = await store.create(request(1))
    await store.ensure_group()
    runs, holders = 0, 0
    entries = await workers._next("worker-0")
    while entries:
        consumer, interrupted = f"worker-{holders}", _Interrupted()
        while entries:  # each run's result meets an "outage": taken up again while that may go uncounted
            runs += len(entries)
            interrupted.outage(entries)
            entries = await workers._resume(consumer, interrupted)
        ids = await pending_ids(store)
        await store.redis.xclaim(store.stream, GROUP, consumer, 0, ids, idle=100_000, justid=True)  # left idle
        holders += 1
        entries = await workers._without_abandoned(await workers._reclaim(f"worker-{holders}"))
    state = await store.get(job.id)
    assert state is not None and state.status == "failed"
    assert (runs, holders) == (2 * bound, bound)
