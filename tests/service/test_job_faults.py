"""Batch jobs under real faults: a worker process SIGKILLed mid-job, Redis SIGKILLed and restarted from its AOF,
Redis taken away and brought back, and rate limits shared by two service processes. Every test starts its own
redis-server on a spare port; nothing waits a fixed time: each wait polls a condition against a deadline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from rlaifv.testing.server import free_port, wait_until_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]
QUESTION = "What is in the image?"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 60, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


class RedisServer:
    """A private redis-server on a spare port; with `aof`, every write is fsynced (appendfsync always)."""

    def __init__(self, folder: Path, *, aof: bool = False) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.folder = folder
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.folder)]
        self.proc = subprocess.Popen(["redis-server", *args, *persistence], stdout=subprocess.DEVNULL)
        client = self.client()

        def up() -> bool:
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                return False

        wait_for(up, "redis-server to accept commands", timeout=20)
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def make(aof: bool = False) -> RedisServer:
        folder = tmp_path / f"redis-{len(started)}"
        folder.mkdir()
        server = RedisServer(folder, aof=aof).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


def rewards_items(red_url: str, count: int) -> list[dict[str, Any]]:
    """Small, distinct rewards items; every third carries a client id."""
    items: list[dict[str, Any]] = []
    for i in range(count):
        body = {"images": [red_url], "question": QUESTION, "answers": ["a red circle.", f"item {i}."]}
        items.append({"custom_id": f"row-{i}", "body": body} if i % 3 == 0 else body)
    return items


def results_jsonl(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"/v1/jobs/{job_id}/results", headers={"Accept": "application/x-ndjson"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def job_done(client: httpx.Client, job_id: str, seen: set[int] | None = None) -> Callable[[], dict[str, Any] | None]:
    """A condition for `wait_for`: the finished job, else None. Status codes met on the way go into `seen`."""

    def check() -> dict[str, Any] | None:
        r = client.get(f"/v1/jobs/{job_id}")
        if seen is not None:
            seen.add(r.status_code)
        if r.status_code != 200:
            return None
        job = r.json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return check


def assert_exactly_once(client: httpx.Client, job: dict[str, Any], redis_client: Any, stream: str) -> None:
    from rlaifv.service.jobs import GROUP

    lines = results_jsonl(client, job["id"])
    assert [line["index"] for line in lines] == list(range(job["total"]))  # each item once, in order
    assert job["completed"] + job["failed"] == job["total"] == redis_client.hlen(f"rlaifv:job:{job['id']}:results")
    assert redis_client.xpending(stream, GROUP)["pending"] == 0


def test_200_item_job_matches_the_synchronous_endpoint(make_server, make_redis, red_url) -> None:
    """Submitted as a JSONL upload, read back as streamed JSONL in item order; each result (or typed error) is
    what POST /v1/rewards answers for the same body."""
    redis = make_redis()
    server = make_server(redis_url=redis.url, jobs_workers=2, cache_size=0, jobs_page_size=64)
    items = rewards_items(red_url, 200)
    items[100] = {"custom_id": "too-long", "body": items[101] | {"answers": ["red " * 40]}}  # fails when it runs
    upload = "\n".join(json.dumps(item) for item in items).encode()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post(
            "/v1/jobs/upload",
            params={"kind": "rewards", "metadata": '{"run": "faults"}'},
            content=upload,
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 202, r.text
        job = wait_for(job_done(client, r.json()["id"]), "the job to finish", timeout=120)
        assert (job["status"], job["completed"], job["failed"], job["metadata"]) == (
            "succeeded",
            199,
            1,
            {"run": "faults"},
        )
        lines = results_jsonl(client, job["id"])
        assert [line["index"] for line in lines] == list(range(200))
        as_json = client.get(f"/v1/jobs/{job['id']}/results", params={"format": "json"}).json()
        assert as_json["data"] == lines

        def sync(item: dict[str, Any]) -> httpx.Response:
            return client.post("/v1/rewards", json=item.get("body", item))

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(sync, items))
    for i, (item, line, answer) in enumerate(zip(items, lines, answers, strict=True)):
        assert line.get("custom_id") == item.get("custom_id"), i
        if answer.status_code == 200:
            assert line["status"] == "succeeded", line
            assert line["result"]["rewards"] == pytest.approx(answer.json()["rewards"], abs=1e-5), i
        else:
            assert line["status"] == "failed" and line["error"] == answer.json()["error"], i
    assert lines[100]["error"]["param"] == "answers[0]" and lines[100]["error"]["type"] == "invalid_request_error"


def _rlaifv() -> list[str]:
    script = Path(sys.executable).with_name("rlaifv")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rlaifv.cli.main"]


def _env(**extra: str) -> dict[str, str]:
    return os.environ | {"RLAIFV_WARMUP": "false", "RLAIFV_TORCH_THREADS": "1", "RLAIFV_LOG_LEVEL": "warning"} | extra


def test_a_worker_process_killed_mid_job(make_server, make_redis, service_bundle, red_url) -> None:
    """Two `rlaifv worker` processes share a job; one is SIGKILLed while holding items. The other reclaims them
    (XAUTOCLAIM): every item has exactly one result and nothing stays pending."""
    redis = make_redis()
    stream = "rlaifv:jobs:crash"
    front = make_server(redis_url=redis.url, jobs_workers=0, jobs_stream=stream)
    args = [*_rlaifv(), "worker", "--bundle", str(service_bundle), "--redis-url", redis.url, "--jobs-stream", stream]
    args += ["--jobs-claim-idle-ms", "1000", "--max-batch", "8"]
    survivor_ops = f"http://127.0.0.1:{free_port()}"
    ports = ["0", survivor_ops.rsplit(":", 1)[1]]  # the survivor serves /healthz, /readyz and /metrics
    workers = [subprocess.Popen([*args, "--worker-port", port], env=_env()) for port in ports]
    r = redis.client()
    try:
        from rlaifv.service.jobs import GROUP

        def consumers() -> dict[int, int]:
            """pid -> pending entries of the workers' consumers (names are host-pid-...)."""
            if not r.exists(stream):
                return {}
            return {int(c["name"].decode().split("-")[-3]): c["pending"] for c in r.xinfo_consumers(stream, GROUP)}

        for proc in workers:
            wait_for(lambda p=proc: p.poll() is None and p.pid in consumers(), f"worker {proc.pid} to consume", 120)
        with httpx.Client(base_url=front.url, timeout=60) as client:
            job = client.post("/v1/jobs", json={"kind": "rewards", "items": rewards_items(red_url, 200)}).json()
            victim = workers[0]
            wait_for(lambda: consumers().get(victim.pid, 0) > 0, "the victim to hold items", timeout=60, interval=0.01)
            victim.kill()
            victim.wait(timeout=10)
            assert not job_done(client, job["id"])(), "the job ended before the kill: it proves nothing"
            done = wait_for(job_done(client, job["id"]), "the survivor to finish the job", timeout=120)
            assert done["status"] == "succeeded" and done["completed"] == 200
            assert_exactly_once(client, done, r, stream)
        with httpx.Client(base_url=survivor_ops, timeout=10) as ops:
            assert ops.get("/healthz").json() == {"status": "ok", "checks": {}}
            ready = ops.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"] == {"model": "ok", "redis": "ok"}, ready.text
            metrics = ops.get("/metrics").text
            processed = [
                line for line in metrics.splitlines() if line.startswith('rlaifv_jobs_items_total{outcome="succeeded"}')
            ]
            assert processed and float(processed[0].split()[-1]) > 0, "the survivor's job metrics are scraped"
            assert "rlaifv_ready 1.0" in metrics
            assert ops.get("/v1/models").status_code == 404  # operations only: a worker takes no requests
    finally:
        for proc in workers:
            proc.kill()
            proc.wait(timeout=10)


def test_redis_killed_and_restarted_from_its_aof_mid_job(make_server, make_redis, red_url) -> None:
    """Redis (appendfsync always) is SIGKILLed mid-job and restarted on the same port: the workers back off and
    resume, the job endpoints answer 503 (never 500) meanwhile, and every item has exactly one result."""
    redis = make_redis(aof=True)
    stream = "rlaifv:jobs:restart"
    server = make_server(
        redis_url=redis.url, jobs_workers=2, jobs_stream=stream, jobs_claim_idle_ms=500, jobs_backoff_max_s=0.5
    )
    seen: set[int] = set()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = client.post("/v1/jobs", json={"kind": "rewards", "items": rewards_items(red_url, 200)}).json()
        progress = wait_for(
            lambda: (n := client.get(f"/v1/jobs/{job['id']}").json()["completed"]) >= 20 and n, "some results", 60, 0.01
        )
        redis.kill()
        assert progress < 200, "the job ended before the kill: it proves nothing"
        down = client.get(f"/v1/jobs/{job['id']}")
        assert down.status_code == 503 and int(down.headers["retry-after"]) >= 1, down.text
        assert down.json()["error"]["code"] == "redis_unavailable"
        redis.start()
        done = wait_for(job_done(client, job["id"], seen), "the job to finish after the restart", timeout=120)
        assert seen <= {200, 503}, seen
        assert done["status"] == "succeeded" and done["completed"] == 200
        # A kill between an item's stored result and its XACK leaves the entry pending with the job already done:
        # a worker reclaims it once idle past RLAIFV_JOBS_CLAIM_IDLE_MS, finds the result and acks it (CI once
        # checked in between and saw 2 pending).
        from rlaifv.service.jobs import GROUP

        pending = redis.client()
        wait_for(lambda: pending.xpending(stream, GROUP)["pending"] == 0, "entries left pending by the kill acked", 30)
        assert_exactly_once(client, done, redis.client(), stream)


def test_redis_outage_degrades_jobs_only_and_heals(make_server, make_redis, red_url) -> None:
    redis = make_redis()
    server = make_server(redis_url=redis.url, jobs_workers=1, jobs_backoff_max_s=0.5, rate_limit_per_minute=1000)
    item = {"images": [red_url], "question": QUESTION, "answers": ["a red circle."]}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        redis.kill(signal.SIGTERM)
        best = client.post(
            "/v1/best-of-n", json={"images": [red_url], "question": QUESTION, "n": 2, "sampling": {"max_tokens": 4}}
        )
        assert best.status_code == 200, best.text
        assert client.post("/v1/rewards", json=item).status_code == 200  # the cache is skipped, not an error
        for response in (
            client.post("/v1/jobs", json={"kind": "rewards", "items": [item]}),
            client.get(f"/v1/jobs/job-{'0' * 32}"),
            client.get(f"/v1/jobs/job-{'0' * 32}/results", params={"format": "jsonl"}),
        ):
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1 and response.json()["error"]["code"] == "redis_unavailable"
        ready = client.get("/readyz")  # Redis state is reported; the replica stays in the load balancer
        assert ready.status_code == 200 and ready.json()["checks"]["redis"].startswith("unreachable")
        redis.start()  # empty: no persistence, so the stream and its group are gone too
        job = wait_for(
            lambda: (
                (r := client.post("/v1/jobs", json={"kind": "rewards", "items": [item] * 3})).status_code == 202
                and r.json()
            ),
            "job submission to work again",
        )
        done = wait_for(job_done(client, job["id"]), "the new job to finish without a service restart")
        assert done["status"] == "succeeded" and done["completed"] == 3
        assert client.get("/readyz").json()["checks"]["redis"] == "ok"


def test_rate_limit_holds_across_two_service_processes(make_redis, service_bundle) -> None:
    """Two `rlaifv serve` processes share one Redis: all the requests they admit together stay within the quota."""
    redis = make_redis()
    limit = 10
    env = _env(RLAIFV_RATE_LIMIT_PER_MINUTE=str(limit), RLAIFV_JOBS_WORKERS="0")
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [*_rlaifv(), "serve", "--bundle", str(service_bundle), "--port", str(p), "--redis-url", redis.url], env=env
        )
        for p in ports
    ]
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url, proc in zip(urls, procs, strict=True):
            wait_until_ready(url, proc)
        windows = {int(time.time() // 60)}
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: httpx.get(urls[i % 2] + "/v1/models", timeout=30).status_code, range(30)))
        windows.add(int(time.time() // 60))
        admitted = codes.count(200)
        assert set(codes) <= {200, 429}, codes
        assert admitted <= limit * len(windows)  # a minute boundary between requests opens a second window
        if len(windows) == 1:
            assert admitted == limit
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_a_10000_item_job_is_accepted_and_streamed_in_pages(make_server, make_redis) -> None:
    """The item limit is 10,000 by default; results come back in item order through paged HMGETs (page 500)
    whatever order they were stored in. Results are written here with the workers' own script, no model runs."""
    from rlaifv.service.jobs import PREFIX, RECORD

    redis = make_redis()
    server = make_server(redis_url=redis.url, jobs_workers=0, jobs_stream="rlaifv:jobs:big")
    items = [{"custom_id": f"k{i}", "body": {"question": "q", "answers": ["a"]}} for i in range(10_000)]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        too_many = client.post("/v1/jobs", json={"kind": "rewards", "items": [*items, items[0]]})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "items"
        job = client.post("/v1/jobs", json={"kind": "rewards", "items": items})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        r = redis.client()
        assert r.xlen("rlaifv:jobs:big") == 10_000
        key = PREFIX + job_id
        pipe = r.pipeline(transaction=False)
        for i in reversed(range(10_000)):
            entry = {"custom_id": f"k{i}", "status": "failed", "error": {"message": "m", "type": "t", "code": "c"}}
            pipe.eval(RECORD, 3, key, key + ":results", key + ":items", str(i), json.dumps(entry), "failed", 0)
        pipe.execute()
        done = client.get(f"/v1/jobs/{job_id}").json()
        assert (done["status"], done["failed"]) == ("failed", 10_000)
        lines = results_jsonl(client, job_id)
    assert [line["index"] for line in lines] == list(range(10_000))
    assert [line["custom_id"] for line in lines] == [f"k{i}" for i in range(10_000)]


def test_a_worker_whose_operations_port_is_taken_stops_at_once_naming_the_setting(service_bundle) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = [*_rlaifv(), "worker", "--bundle", str(service_bundle), "--redis-url", "redis://127.0.0.1:1/0"]
        done = subprocess.run(
            [*args, "--worker-port", str(port)], env=_env(), capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 2, done.stderr
    assert f"RLAIFV_WORKER_PORT: cannot listen on 127.0.0.1:{port}" in done.stderr


async def test_a_worker_stopped_while_its_model_loads_stops_without_waiting_for_the_load(
    service_bundle, monkeypatch
) -> None:
    """A worker told to stop during a 10-minute model load waited for the load; it now leaves the load behind
    (a daemon thread) and stops, having taken nothing."""
    import asyncio
    import threading

    from rlaifv.service import engines
    from rlaifv.service.settings import Settings
    from rlaifv.service.worker_cli import run_worker

    entered, release = threading.Event(), threading.Event()

    def endless_load(*_: Any) -> Any:
        entered.set()
        release.wait(timeout=120)
        raise RuntimeError("released")

    monkeypatch.setattr(engines, "load_engine", endless_load)
    settings = Settings(bundle=service_bundle, redis_url="redis://127.0.0.1:1/0", worker_port=0)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop))
    try:
        assert await asyncio.to_thread(entered.wait, 60)
        stop.set()
        await asyncio.wait_for(worker, timeout=60)  # returned, the load still going
        assert not release.is_set()
    finally:
        release.set()


class _Gated:
    """Serving whose scoring waits for the test at every call: the item is in hand while Redis is taken away."""

    def __init__(self) -> None:
        import asyncio

        self.calls = 0
        self.started, self.release = asyncio.Event(), asyncio.Event()

    async def rewards(self, request: Any, http_request: Any) -> Any:
        from pydantic import BaseModel

        class Scored(BaseModel):
            rewards: list[float]

        self.calls += 1
        self.started.set()
        await self.release.wait()
        self.release.clear()
        return Scored(rewards=[0.5])


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    """Await `condition()` turning true, checking every 10 ms; fail naming `what` after `timeout` seconds."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_redis_outages_while_a_worker_holds_an_item_are_no_deliveries(make_redis, monkeypatch) -> None:
    """Redis (appendfsync always) is SIGKILLed and restarted three times while the one worker holds the one item,
    each time after the item ran and before its result could be stored. The worker takes its item up again, still
    as its first delivery, and the item succeeds. Each outage counted a delivery before (the entry was reclaimed
    with XCLAIM once idle): with RLAIFV_JOBS_MAX_DELIVERIES=3 the third outage failed the item as item_abandoned
    though nothing was wrong with it."""
    import asyncio
    import uuid

    from rlaifv.service.jobs import GROUP, JobStore, JobWorkers
    from rlaifv.service.metrics import Metrics
    from rlaifv.service.protocol import JobRequest
    from rlaifv.service.redis_conn import connect
    from rlaifv.service.settings import Settings

    redis = make_redis(aof=True)
    settings = Settings(
        bundle="unused",
        redis_url=redis.url,
        jobs_stream=f"rlaifv:jobs:outages-{uuid.uuid4().hex}",
        jobs_workers=1,
        jobs_claim_idle_ms=100,
        jobs_backoff_max_s=0.1,
        jobs_max_deliveries=3,
    )
    store = JobStore(connect(settings), settings)
    serving = _Gated()
    workers = JobWorkers(store, serving, settings, Metrics())  # type: ignore[arg-type]
    item = {"question": QUESTION, "answers": ["a red circle."]}
    job = await store.create(JobRequest(kind="rewards", items=[item]))

    async def finished() -> bool:
        state = await store.get(job.id)
        return state is not None and state.status in ("succeeded", "failed")

    async def deliveries() -> list[int]:
        return [p["times_delivered"] for p in await store.redis.xpending_range(store.stream, GROUP, "-", "+", 10)]

    async def ran_or_finished() -> bool:
        return serving.started.is_set() or await finished()

    real_record, record_failed = store.record, asyncio.Event()

    async def record(*args: Any) -> bool:
        try:
            return await real_record(*args)
        except Exception:
            record_failed.set()
            raise

    async def lost_redis() -> bool:
        return record_failed.is_set()

    monkeypatch.setattr(store, "record", record)
    workers.start()
    try:
        for outage in range(3):
            await until(ran_or_finished, f"the item to run before outage {outage + 1}")
            lines = [line async for line in store.result_lines(job)]
            assert serving.started.is_set(), f"the item was not run again after {outage} outages: {lines}"
            assert await deliveries() == [1], f"outage {outage} counted a delivery"
            serving.started.clear()
            redis.kill()
            serving.release.set()  # it ran; its result cannot be stored now
            await until(lost_redis, "the worker to meet the outage")
            record_failed.clear()
            await asyncio.to_thread(redis.start)
        await until(ran_or_finished, "the item to run after the last outage")
        serving.release.set()
        await until(finished, "the job to finish")
        state = await store.get(job.id)
        results = [json.loads(line) for line in [line async for line in store.result_lines(job)]]
        assert state is not None and (state.status, state.completed, serving.calls) == ("succeeded", 1, 4), results
        assert results == [{"index": 0, "status": "succeeded", "result": {"rewards": [0.5]}}]
        assert (await store.redis.xpending(store.stream, GROUP))["pending"] == 0
    finally:
        await workers.stop()
        await store.redis.aclose()
