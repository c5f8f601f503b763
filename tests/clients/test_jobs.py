"""Batch jobs against the real server with a real Redis: `submit`, `get`, `wait` (callback and bar),
`results` (iterator), `cancel`, `list` (pages), sync and async. Skipped where the server has no /v1/jobs or no
redis-server exists."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
from rlaifv_client.types import JobList

from .conftest import API_KEY, QUESTION, LiveServer

pytestmark = pytest.mark.integration


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


def _submit_in_a_row(client: Client, red_png: bytes, count: int, redis_url: str) -> list[Job]:
    """`count` small jobs, cancelled at once (the listing is the point), at least a millisecond apart in the job
    index: jobs submitted in a row may share one, which orders them by id instead."""
    import hashlib

    import redis

    from rlaifv.service.jobs import OWNERS

    item = {"image": red_png, "question": QUESTION, "answers": ["a red square."]}
    jobs = [client.jobs.submit([item], kind="rewards", metadata={"list": str(i)}) for i in range(count)]
    for job in jobs:
        client.jobs.cancel(job)
    index = OWNERS + hashlib.sha256(API_KEY.encode()).hexdigest()[:16]  # the key's id, as the auth layer names it
    with redis.Redis.from_url(redis_url) as sync:
        scores = [int(sync.zscore(index, job.id)) for job in jobs]
        for i in range(1, count):
            scores[i] = max(scores[i], scores[i - 1] + 1)
        sync.zadd(index, {job.id: score for job, score in zip(jobs, scores, strict=True)}, xx=True)
    return [client.jobs.get(job) for job in jobs]


def _fields(jobs: Iterable[Job]) -> list[dict[str, Any]]:
    """The jobs as data (a model's == also compares its request id)."""
    return [job.model_dump() for job in jobs]


def test_jobs_list_sync(jobs_server: LiveServer, red_png: bytes, redis_url: str) -> None:
    with Client(base_url=jobs_server.url, api_key=API_KEY) as client:
        mine = _submit_in_a_row(client, red_png, 3, redis_url)
        page = client.jobs.list(limit=2)
        assert isinstance(page, JobList) and page.request_id
        assert _fields(page) == _fields(mine[:0:-1]) and len(page) == 2  # newest first, each as `get` has it
        assert (page.first_id, page.last_id, page.has_more) == (mine[2].id, mine[1].id, True)
        following = client.jobs.list(limit=2, after=page.last_id)
        assert _fields(following.data[:1]) == _fields(mine[:1])  # the rest are the other tests' (older) jobs
        assert [job.id for job in client.jobs.list(limit=1, after=page.data[-1])] == [mine[0].id]  # a Job cursor
        assert [job.id for job in client.jobs.list().data][:3] == [job.id for job in mine[::-1]]
        with pytest.raises(InvalidRequestError) as bad:
            client.jobs.list(after="job-" + "0" * 32)
        assert bad.value.param == "after" and "after" in str(bad.value)
        with pytest.raises(InvalidRequestError) as bad:
            client.jobs.list(limit=101)
        assert bad.value.param == "limit"


async def test_jobs_list_async(jobs_server: LiveServer, red_png: bytes, redis_url: str) -> None:
    with Client(base_url=jobs_server.url, api_key=API_KEY) as sync_client:
        mine = _submit_in_a_row(sync_client, red_png, 3, redis_url)
    async with AsyncClient(base_url=jobs_server.url, api_key=API_KEY) as client:
        seen: list[Job] = []
        page = await client.jobs.list(limit=2)
        while True:
            assert isinstance(page, JobList) and len(page) <= 2
            seen += page
            if not page.has_more:
                break
            page = await client.jobs.list(limit=2, after=page.last_id)
        assert page.last_id == seen[-1].id and len(seen) >= 3  # and the other tests' jobs, when they ran
        assert _fields(seen[:3]) == _fields(mine[::-1]) and len({job.id for job in seen}) == len(seen)  # none twice
        assert _fields(await client.jobs.list(limit=100)) == _fields(seen)  # the same jobs in one page
        with pytest.raises(InvalidRequestError) as bad:
            await client.jobs.list(limit=0)
        assert bad.value.param == "limit"
