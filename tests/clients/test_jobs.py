"""Batch jobs against the real server with a real Redis: `submit`, `get`, `wait` (callback and bar),
`results` (iterator), `cancel`, sync and async. Skipped where the server has no /v1/jobs or no redis-server exists."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlaifv.testing.server import free_port
from rlaifv_client import (
    AsyncClient,
    BestOfN,
    Client,
    InvalidRequestError,
    Job,
    JobError,
    NotFoundError,
    Rewards,
    WaitTimeoutError,
)

from .conftest import API_KEY, QUESTION, LiveServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis_bin, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if redis_bin is None or cli is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    redis = subprocess.Popen([redis_bin, *args], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run([cli, "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        redis.terminate()
        redis.wait(timeout=10)


@pytest.fixture(scope="module")
def jobs_server(server: LiveServer, tiny_bundle: Path, redis_url: str) -> Iterator[LiveServer]:
    if "/v1/jobs" not in server.openapi()["paths"]:
        pytest.skip("the server has no /v1/jobs route")
    with LiveServer(tiny_bundle, api_keys=[API_KEY], redis_url=redis_url, jobs_workers=1) as live:
        yield live


def test_jobs_sync(jobs_server: LiveServer, red_png: bytes, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(red_png)
    with Client(base_url=jobs_server.url, api_key=API_KEY) as client:
        items = [{"image": path if i % 2 else red_png, "question": QUESTION, "n": 2, "max_tokens": 4} for i in range(3)]
        items.append({"image": red_png, "question": QUESTION, "n": 100})  # over max_n: this item fails, the job not
        job = client.jobs.submit(items, metadata={"run": "sdk-test"})
        assert (
            isinstance(job, Job) and job.kind == "best_of_n" and job.total == 4 and job.metadata == {"run": "sdk-test"}
        )
        assert client.jobs.get(job.id).id == job.id

        updates: list[Job] = []
        done = client.jobs.wait(job, poll_interval=0.1, timeout=60, on_progress=updates.append, progress=True)
        assert done.status == "succeeded" and (done.completed, done.failed) == (3, 1) and done.progress == 1.0
        assert done.raise_for_status() is done
        assert updates[-1].status == "succeeded" and all(u.id == job.id for u in updates)
        assert f"{job.id} [" in capsys.readouterr().err  # the progress bar

        results = list(client.jobs.results(job))
        assert [r.index for r in results] == [0, 1, 2, 3]
        assert [r.status for r in results] == ["succeeded"] * 3 + ["failed"]
        assert all(isinstance(r.result, BestOfN) and len(r.result.candidates) == 2 for r in results[:3])
        assert results[3].result is None and results[3].error is not None and results[3].error.param == "n"

        assert client.jobs.cancel(job).status == "succeeded"  # cancelling a finished job changes nothing
        with pytest.raises(NotFoundError) as info:
            client.jobs.get("job-does-not-exist")
        assert info.value.code == "job_not_found"
        with pytest.raises(TypeError, match=r"items\[0\].*answers"):  # a rewards item in a best_of_n job
            client.jobs.submit([{"image": red_png, "question": QUESTION, "answers": ["a"]}])
        with pytest.raises(InvalidRequestError) as bad:  # checked by the server against the request schema
            client.jobs.submit([{"question": QUESTION}, {"question": QUESTION, "n": 0}])
        assert bad.value.param == "items[1].n"


async def test_jobs_async(jobs_server: LiveServer, red_png: bytes) -> None:
    async with AsyncClient(base_url=jobs_server.url, api_key=API_KEY) as client:
        answers = ["a red square.", "a dog."]
        job = await client.jobs.submit(
            [{"image": red_png, "question": QUESTION, "answers": answers}] * 2, kind="rewards"
        )
        seen: list[int] = []

        async def on_progress(j: Job) -> None:
            seen.append(j.completed)

        done = await client.jobs.wait(job.id, poll_interval=0.1, timeout=60, on_progress=on_progress)
        assert done.status == "succeeded" and seen[-1] == 2
        results = [r async for r in client.jobs.results(job)]
        assert [r.index for r in results] == [0, 1]
        assert all(isinstance(r.result, Rewards) and len(r.result.rewards) == 2 for r in results)
        assert (await client.jobs.get(job)).completed == 2

        big = await client.jobs.submit(
            [{"image": red_png, "question": QUESTION, "n": 4, "max_tokens": 8, "seed": i} for i in range(250)]
        )
        with pytest.raises(WaitTimeoutError) as info:
            await client.jobs.wait(big, poll_interval=0.05, timeout=0.2)
        assert info.value.job.id == big.id and not info.value.job.done
        cancelled = await client.jobs.cancel(big)
        assert cancelled.status == "cancelled"
        with pytest.raises(JobError, match="cancelled"):
            (await client.jobs.wait(big, poll_interval=0.1, timeout=10)).raise_for_status()
