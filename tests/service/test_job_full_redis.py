"""Batch jobs against a full Redis (`--maxmemory` under `noeviction`, as deploy/k8s runs it): a result refused for
memory is held and written later, not run again nor abandoned; new jobs are refused before Redis is full; a refused
submission leaves no items; an item's body goes with its result; /readyz and /metrics show a full store. Each test
starts its own redis-server with a small maxmemory; waits poll a condition against a deadline."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis as sync_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError

from rlaifv.service.errors import StoreUnavailable
from rlaifv.service.jobs import CLAIM_PENDING_S, GROUP, MEMORY_READ_S, PREFIX, JobStore, JobWorkers
from rlaifv.service.metrics import Metrics
from rlaifv.service.protocol import JobRequest
from rlaifv.service.redis_conn import connect
from rlaifv.service.settings import Settings
from rlaifv.testing.job_worker import StubServing, until
from rlaifv.testing.server import free_port

pytestmark = pytest.mark.integration
BODY = {"question": "What is in the image?", "answers": ["a red circle."]}
MAXMEMORY = 8 * 1024 * 1024


class FullRedis:
    """A private redis-server with a small maxmemory under noeviction, and filler keys to make it full."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = sync_redis.Redis.from_url(self.url, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except sync_redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        self.fillers = 0

    def fill(self, size: int = 1024) -> None:
        """Write filler keys until Redis refuses one for memory."""
        while True:
            try:
                self.client.set(f"filler:{self.fillers}", b"x" * size)
            except OutOfMemoryError:
                return
            self.fillers += 1

    def fill_to(self, fraction: float) -> None:
        """Filler keys until used_memory is past `fraction` of maxmemory (Redis still takes writes)."""
        while self.client.info("memory")["used_memory"] <= fraction * MAXMEMORY:
            self.client.set(f"filler:{self.fillers}", b"x" * 4096)
            self.fillers += 1

    def make_room(self, size: int) -> None:
        """Delete filler keys until used_memory is `size` bytes or more under maxmemory."""
        while self.client.info("memory")["used_memory"] > MAXMEMORY - size:
            self.free(100)

    def free(self, count: int | None = None) -> None:
        """Delete the last `count` filler keys (all by default)."""
        count = self.fillers if count is None else count
        keys = [f"filler:{i}" for i in range(self.fillers - count, self.fillers)]
        for start in range(0, len(keys), 1000):
            self.client.delete(*keys[start : start + 1000])
        self.fillers -= count

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def full_redis() -> Iterator[FullRedis]:
    server = FullRedis()
    yield server
    server.close()


def settings_for(server: FullRedis, **fields: Any) -> Settings:
    fields = {"jobs_stream": f"rlaifv:jobs:full-test-{uuid.uuid4().hex}", "jobs_ttl_s": 3600} | fields
    return Settings(bundle="unused", redis_url=server.url, **fields)


@pytest.fixture
async def make_store(full_redis: FullRedis) -> AsyncIterator[Callable[..., JobStore]]:
    clients: list[Any] = []

    def make(**fields: Any) -> JobStore:
        settings = settings_for(full_redis, **fields)
        redis = connect(settings)
        clients.append(redis)
        return JobStore(redis, settings)

    yield make
    for redis in clients:
        await redis.aclose()


def request(items: int = 2, body: dict[str, Any] | None = None) -> JobRequest:
    return JobRequest(kind="rewards", items=[body or BODY] * items)


def items_keys(server: FullRedis) -> list[bytes]:
    return list(server.client.scan_iter(match=PREFIX + "job-*:items"))


async def test_a_result_refused_for_memory_is_written_once_redis_takes_writes_again(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """Each refused result read as an outage: the batch ran again, the entry's uncounted outages were spent, and
    then the reclaims between workers failed good items as `item_abandoned`. Now the worker holds its results
    (another worker, reclaiming every claim-idle time, never takes the entries) and writes them once memory is
    freed: each item ran once, counted once, and nothing was abandoned."""
    fields = {"jobs_workers": 1, "jobs_claim_idle_ms": 100, "jobs_backoff_max_s": 0.05, "jobs_max_deliveries": 1}
    store = make_store(**fields)
    other_store = make_store(**fields | {"jobs_stream": store.stream})
    job = await store.create(request(3))
    full_redis.fill()
    metrics, settings = Metrics(), settings_for(full_redis, **fields | {"jobs_stream": store.stream})
    serving, other_serving = StubServing(rewards=100), StubServing(rewards=100)
    workers = JobWorkers(store, serving, settings, metrics)  # type: ignore[arg-type]
    other = JobWorkers(other_store, other_serving, settings, Metrics())  # type: ignore[arg-type]
    refused = 0
    real_record = store.record

    async def counted_record(*args: Any) -> bool:
        nonlocal refused
        try:
            return await real_record(*args)
        except OutOfMemoryError:
            refused += 1
            raise

    store.record = counted_record  # type: ignore[method-assign]
    workers.start()

    async def held() -> bool:  # well past several claim-idle times of refusals, while the other worker reclaims
        return serving.calls == 3 and refused >= 30

    await until(held, "the worker to hold its refused results")
    other.start()
    before = refused

    async def more() -> bool:
        return refused >= before + 20

    await until(more, "more refusals with the other worker running")
    assert workers.store_full
    full_redis.free()

    async def finished() -> bool:
        state = await store.get(job.id)
        return state is not None and state.status == "succeeded"

    await until(finished, "the job once Redis takes writes")
    await workers.stop(grace_s=5)
    await other.stop(grace_s=5)
    state = await store.get(job.id)
    assert state is not None and (state.completed, state.failed) == (3, 0)
    assert (serving.calls, other_serving.calls) == (3, 0)
    assert metrics.jobs.labels(outcome="succeeded")._value.get() == 3
    assert not workers.store_full
    assert (await store.redis.xpending(store.stream, GROUP))["pending"] == 0
    results = [json.loads(line) async for line in store.result_lines(state)]
    assert [r["status"] for r in results] == ["succeeded"] * 3


async def test_new_jobs_are_refused_past_the_memory_fraction_and_admitted_again(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """Jobs were accepted into a Redis with no room for their results: every job stalled. Past the fraction a
    submission is a 503 `jobs_store_full` with Retry-After, leaving nothing behind; memory is read at most every
    `MEMORY_READ_S` (a fake clock here), and without a maxmemory nothing is checked."""
    store = make_store(jobs_admit_memory_fraction=0.5)
    now = [1000.0]
    store.clock = lambda: now[0]
    await store.create(request(1))  # reads memory: well under half
    full_redis.fill_to(0.5)
    now[0] += MEMORY_READ_S
    with pytest.raises(StoreUnavailable) as refused:
        await store.create(request(2))
    assert refused.value.code == "jobs_store_full" and refused.value.headers["Retry-After"] == "5"
    assert "RLAIFV_JOBS_ADMIT_MEMORY_FRACTION" in refused.value.message and "maxmemory" in refused.value.message
    assert len(items_keys(full_redis)) == 1  # the first job's
    full_redis.free()
    with pytest.raises(StoreUnavailable):  # the last reading still stands
        await store.create(request(2))
    now[0] += MEMORY_READ_S
    await store.create(request(2))
    full_redis.fill_to(0.5)
    full_redis.client.config_set("maxmemory", 0)  # unbounded: no check
    now[0] += MEMORY_READ_S
    await store.create(request(2))


async def test_jobs_admitted_between_readings_count_against_the_room(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """A burst of submissions within one reading of Redis's memory all passed on that one reading."""
    store = make_store(jobs_admit_memory_fraction=0.5)
    store.clock = lambda: 1000.0  # one reading for the whole test
    used = full_redis.client.info("memory")["used_memory"]
    big = {"question": "q" * 200_000, "answers": ["a."]}
    admitted = 0
    with pytest.raises(StoreUnavailable):
        for _ in range(100):
            await store.create(request(1, big))
            admitted += 1
    assert 0 < admitted <= (0.5 * MAXMEMORY - used) // 200_000


async def test_the_job_routes_answer_a_full_store_with_503_jobs_store_full(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    from fastapi import FastAPI

    from rlaifv.service.errors import install_error_handlers
    from rlaifv.service.routes import jobs as job_routes

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(job_routes.router)
    app.state.job_store = make_store(jobs_admit_memory_fraction=0.5)
    full_redis.fill_to(0.5)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [
            await client.post("/v1/jobs", json={"kind": "rewards", "items": [BODY]}),
            await client.post(
                "/v1/jobs/upload?kind=rewards",
                content=json.dumps(BODY).encode() + b"\n",
                headers={"Content-Type": "application/x-ndjson"},
            ),
        ]
    for answer in answers:
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
        assert answer.json()["error"]["code"] == "jobs_store_full"


async def test_a_submission_redis_refuses_for_memory_leaves_no_items(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """The first chunk of items went in (Redis had room for it) and the next was refused: their images stayed for the
    jobs' TTL (7 days by default). Now they are deleted, and the Idempotency-Key is free."""
    store = make_store(jobs_admit_memory_fraction=1.0)
    store.clock = lambda: 1000.0  # memory read once, while Redis is empty: the admission check lets it through
    await store.create(request(1))
    full_redis.fill()
    full_redis.make_room(2_000_000)  # room for the first chunk (1000 items of 1.5 KB), not for the rest
    item = {"question": "q" * 1500, "answers": ["a."]}
    with pytest.raises(StoreUnavailable) as refused:
        await store.create(request(1500, item), idempotency_key="k-1")
    assert refused.value.code == "jobs_store_full"
    assert len(items_keys(full_redis)) == 1  # the first job's
    assert list(full_redis.client.scan_iter(match=PREFIX + "idem:*")) == []


async def test_items_live_briefly_until_their_job_is_created(
    full_redis: FullRedis, make_store: Callable[..., JobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submission cut off between writing its items and creating its job (its reply lost, its process killed)
    leaves items that expire within `CLAIM_PENDING_S`, not the jobs' TTL; a job created keeps them for the TTL."""
    store = make_store()
    job = await store.create(request(2))
    assert full_redis.client.ttl(PREFIX + job.id + ":items") > CLAIM_PENDING_S
    real_pipeline = store.redis.pipeline

    def cut_before_the_job(transaction: bool = True, **kwargs: Any) -> Any:
        pipe = real_pipeline(transaction=transaction, **kwargs)
        if transaction:

            async def lost(*args: Any, **kwargs: Any) -> Any:
                raise RedisConnectionError("connection lost")

            pipe.execute = lost
        return pipe

    monkeypatch.setattr(store.redis, "pipeline", cut_before_the_job)
    with pytest.raises(StoreUnavailable):
        await store.create(request(2))
    (stray,) = [key for key in items_keys(full_redis) if key != (PREFIX + job.id + ":items").encode()]
    assert 0 < full_redis.client.ttl(stray) <= CLAIM_PENDING_S


async def test_an_items_body_goes_with_its_result(full_redis: FullRedis, make_store: Callable[..., JobStore]) -> None:
    """Item bodies (images) stayed until the whole job was done, while the results (best-of-N: many answers each)
    filled Redis: a job's memory was its items and its results together."""
    store = make_store()
    job = await store.create(request(2))
    items = PREFIX + job.id + ":items"
    ok = {"status": "succeeded", "result": {"rewards": [0.0]}}
    assert await store.record(job.id, 0, ok)
    assert full_redis.client.hkeys(items) == [b"1"]
    assert not await store.record(job.id, 0, ok)  # a rerun stores nothing; it needs no body (it checks first)
    kind, _, has_result, item = await store.load(job.id, 0)
    assert (kind, has_result, item) == ("rewards", True, None)
    assert await store.record(job.id, 1, ok)
    assert full_redis.client.exists(items) == 0


async def test_readiness_and_metrics_show_a_full_store_without_failing(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """A full Redis stalled every job while /readyz and /healthz stayed green and said nothing. Now /readyz
    reports `checks.redis` "full: ..." (still 200, also with RLAIFV_READY_REQUIRES_REDIS: the store still serves
    status and results) and /metrics `rlaifv_jobs_store_full` 1 and `rlaifv_redis_up` 1; Redis gone: up 0."""
    from rlaifv.service.app import create_worker_app

    settings = settings_for(full_redis, jobs_admit_memory_fraction=0.5, ready_requires_redis=True)
    app = create_worker_app(settings, Metrics())
    app.state.redis = connect(settings)
    app.state.ready = True
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["redis"] == "ok"
        assert "rlaifv_jobs_store_full 0.0" in (await client.get("/metrics")).text
        full_redis.fill_to(0.5)
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["redis"].startswith("full: ") and "maxmemory" in ready.json()["checks"]["redis"]
        assert (await client.get("/healthz")).status_code == 200
        text = (await client.get("/metrics")).text
        assert "rlaifv_jobs_store_full 1.0" in text and "rlaifv_redis_up 1.0" in text
        full_redis.close()
        assert (await client.get("/readyz")).status_code == 503
        assert "rlaifv_redis_up 0.0" in (await client.get("/metrics")).text
    await app.state.redis.aclose()


async def test_an_entry_is_acknowledged_while_redis_is_full(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """The ack was a MULTI, and a full Redis refuses every command queued in one, although XACK and XDEL free
    memory: a rerun of an item with a result (or one abandoned) read as an outage and spent the entry's budget."""
    store = make_store()
    await store.create(request(1))
    await store.ensure_group()
    reply = await store.redis.xreadgroup(GROUP, "worker-0", {store.stream: ">"}, count=1)
    entry_id = reply[0][1][0][0]
    full_redis.fill()
    await store.ack(entry_id)
    assert (await store.redis.xpending(store.stream, GROUP))["pending"] == 0
    assert await store.redis.xlen(store.stream) == 0


async def test_at_maxmemory_a_result_replacing_a_larger_body_is_stored_and_a_cancel_frees_memory(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """Redis refuses a script for memory at its first write that can grow memory: RECORD wrote the result before
    dropping the body, CANCEL the status before the items, so at maxmemory neither ran and the "let jobs finish,
    cancel jobs" the messages advise freed nothing. A result that would grow memory still waits."""
    store = make_store(jobs_admit_memory_fraction=1.0)
    job = await store.create(request(3))
    items = PREFIX + job.id + ":items"
    full_redis.client.hset(items, mapping={"0": b"x" * 200_000, "1": b"{}"})
    full_redis.fill()
    ok = {"status": "succeeded", "result": {"rewards": [0.0]}}
    assert await store.record(job.id, 0, ok)
    assert sorted(full_redis.client.hkeys(items)) == [b"1", b"2"]
    full_redis.fill()
    with pytest.raises(OutOfMemoryError):
        await store.record(job.id, 1, {"status": "succeeded", "result": {"rewards": [0.0] * 50_000}})
    full_redis.fill()
    cancelled = await store.cancel(job.id)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert full_redis.client.exists(items) == 0


async def test_submissions_checked_at_once_count_each_others_bytes(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """Each submission arriving during a reading's round trip read INFO again and replaced the running total with
    the fresh reading, dropping the bytes the others had just admitted: ten jobs of 1 MB passed against 3 MB."""
    store = make_store(jobs_admit_memory_fraction=0.5)
    info, reading = store.redis.info, asyncio.Event()

    async def slow_info(section: str) -> Any:
        await reading.wait()  # every submission is waiting on a reading when it comes
        return await info(section)

    store.redis.info = slow_info  # type: ignore[method-assign]
    room = 0.5 * MAXMEMORY - full_redis.client.info("memory")["used_memory"]
    size = 1_000_000
    admits = [asyncio.create_task(store._admit(size)) for _ in range(10)]
    await asyncio.sleep(0)
    reading.set()
    outcomes = await asyncio.gather(*admits, return_exceptions=True)
    admitted = sum(outcome is None for outcome in outcomes)
    assert admitted == int(room // size), outcomes
    assert all(isinstance(o, StoreUnavailable) for o in outcomes if o is not None)


async def test_a_failed_memory_reading_is_not_repeated_by_each_waiting_submission(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """Submissions queued behind a reading that timed out each read again, one after another: the tenth waited ten
    timeouts before its 503."""
    store = make_store()
    readings = 0

    async def hung_info(section: str) -> Any:
        nonlocal readings
        readings += 1
        raise RedisConnectionError("timed out")

    store.redis.info = hung_info  # type: ignore[method-assign]
    outcomes = await asyncio.gather(*(store._admit(1000) for _ in range(5)), return_exceptions=True)
    assert readings == 1 and isinstance(outcomes[0], RedisConnectionError) and outcomes[1:] == [None] * 4


async def test_an_abandoned_item_whose_failure_redis_refuses_is_left_pending_not_waited_for(
    full_redis: FullRedis, make_store: Callable[..., JobStore]
) -> None:
    """Waited for (`_record`) outside the claims' renewal, its entry went idle and other workers reran it."""
    store = make_store()
    workers = JobWorkers(store, StubServing(), settings_for(full_redis), Metrics())  # type: ignore[arg-type]
    acked: list[bytes] = []

    async def refused(*args: Any) -> bool:
        raise OutOfMemoryError("OOM command not allowed")

    async def ack(entry_id: bytes) -> None:
        acked.append(entry_id)

    store.record, store.ack = refused, ack  # type: ignore[method-assign]
    entries = [(b"1-0", {b"job": b"job-x", b"index": b"0"}, 99), (b"2-0", {b"job": b"job-x", b"index": b"1"}, 1)]
    kept = await asyncio.wait_for(workers._without_abandoned(entries), timeout=5)
    assert [entry_id for entry_id, _, _ in kept] == [b"2-0"] and acked == []
