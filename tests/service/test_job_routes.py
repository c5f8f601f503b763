"""The job routes against a store that fails on cue (no Redis): a results stream cut by an outage, content
negotiation, uploads' encodings and the bounds of a job's labels."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rlaifv.service.errors import StoreUnavailable, install_error_handlers
from rlaifv.service.protocol import Job, JobRequest
from rlaifv.service.routes import jobs as job_routes


class FlakyStore:
    """Two results, then Redis goes away; `create` records what it was given."""

    def __init__(self) -> None:
        now = int(time.time())
        self.job = Job(id="job-" + "0" * 32, kind="rewards", status="succeeded", created=now, updated=now,
                       total=3, completed=3, failed=0)  # fmt: skip
        self.created: list[JobRequest] = []

    async def get(self, job_id: str, owner: str | None = None) -> Job:
        return self.job

    async def result_lines(self, job: Job) -> AsyncIterator[str]:
        for i in range(2):
            yield f'{{"index":{i},"status":"succeeded"}}'
        raise StoreUnavailable("the job store (Redis) is unavailable: ConnectionError")

    async def create(self, request: JobRequest, **kwargs: Any) -> Job:
        self.created.append(request)
        return self.job


@pytest.fixture
def client() -> httpx.AsyncClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(job_routes.router)
    app.state.job_store = FlakyStore()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=True), base_url="http://t")


@pytest.mark.parametrize("format", ["jsonl", "json"])
async def test_a_results_stream_cut_by_an_outage_ends_early_and_is_not_an_error(
    client: httpx.AsyncClient, format: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It was aborted mid-chunk ("peer closed connection without sending complete message body") and logged as an
    unhandled error under a 200; the docs promise a body that ends early."""
    async with client:
        response = await client.get(f"/v1/jobs/{'job-' + '0' * 32}/results", params={"format": format})
    assert response.status_code == 200
    if format == "jsonl":
        assert response.text.splitlines() == ['{"index":0,"status":"succeeded"}', '{"index":1,"status":"succeeded"}']
    else:
        assert response.text.endswith('{"index":1,"status":"succeeded"}')  # invalid JSON: the count tells
    assert "job results cut short" in caplog.text


@pytest.mark.parametrize(
    ("accept", "jsonl"),
    [
        ("application/x-ndjson", True),
        ("application/json, application/x-ndjson;q=0", False),
        ("application/x-ndjson;q=0.5, application/json", False),
        ("application/json;q=0.2, application/x-ndjson;q=0.9", True),
        ("application/json", False),
        ("*/*", False),
        ("", False),
    ],
)
def test_the_accept_header_is_read_with_its_weights(accept: str, jsonl: bool) -> None:
    assert job_routes._prefers_jsonl(accept) is jsonl


async def test_an_upload_line_that_is_not_utf8_is_named(client: httpx.AsyncClient) -> None:
    """json.loads(bytes) guessed UTF-16 from a BOM and failed with a codec's message."""
    body = b'{"question": "q", "answers": ["a"]}\n' + '{"question": "q"}'.encode("utf-16")
    async with client:
        response = await client.post("/v1/jobs/upload", params={"kind": "rewards"}, content=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "items[1]"
    assert error["message"].startswith("line 2 is not UTF-8")


async def test_an_upload_that_starts_with_a_byte_order_mark_is_read(client: httpx.AsyncClient) -> None:
    """Windows tools (PowerShell 5, Excel, Notepad) write UTF-8 with a BOM; json.loads(bytes) skipped it."""
    body = "\ufeff".encode() + b'{"question": "q", "answers": ["a"]}\n{"question": "r", "answers": ["b"]}\n'
    async with client:
        response = await client.post("/v1/jobs/upload", params={"kind": "rewards"}, content=body)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"k": "v" * 513}, "the value of 'k' is over 512 characters"),
        ({str(i): "v" for i in range(17)}, "at most 16 keys, got 17"),
        ({"k" * 65: "v"}, "is over 64 characters"),
    ],
)
async def test_a_jobs_labels_are_bounded(client: httpx.AsyncClient, labels: dict[str, str], message: str) -> None:
    """Every poll returns them: 2 MB of labels made each status answer 2 MB."""
    import json

    body = {"kind": "rewards", "items": [{"question": "q", "answers": ["a"]}], "metadata": labels}
    async with client:
        posted = await client.post("/v1/jobs", json=body)
        uploaded = await client.post(
            "/v1/jobs/upload",
            params={"kind": "rewards", "metadata": json.dumps(labels)},
            content=b'{"question": "q", "answers": ["a"]}\n',
        )
        fine = await client.post("/v1/jobs", json=body | {"metadata": {"run": "7"}})
    for response in (posted, uploaded):
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "metadata" and message in error["message"], error
    assert fine.status_code == 202
