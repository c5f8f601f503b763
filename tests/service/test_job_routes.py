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

    max_items = 10_000

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


def test_an_upload_past_the_item_limit_stops_parsing_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """5.5M `{}` lines were parsed whole (800 MB, 7 s on the event loop) before the item limit refused them."""
    from rlaifv.service import jobs
    from rlaifv.service.errors import BadRequest

    parsed: list[str] = []
    real = jobs.json.loads
    monkeypatch.setattr(jobs.json, "loads", lambda text, *a, **k: parsed.append(text) or real(text, *a, **k))
    with pytest.raises(BadRequest, match="at most 3 items per job") as info:
        jobs.parse_jsonl([b"{}"] * 1000, limit=3)
    assert info.value.param == "items" and len(parsed) == 3
    assert len(jobs.parse_jsonl([b"{}", b"", b"{}", b"{}"], limit=3)) == 3


async def test_upload_metadata_nested_too_deeply_is_a_400_naming_it(client: httpx.AsyncClient) -> None:
    """Under the 4096-character bound, 2000 nested arrays made json.loads raise RecursionError: a 500."""
    body = b'{"question": "q", "answers": ["a"]}\n'
    async with client:
        response = await client.post(
            "/v1/jobs/upload", params={"kind": "rewards", "metadata": "[" * 2000 + "]" * 2000}, content=body
        )
    assert response.status_code == 400 and response.json()["error"]["param"] == "metadata", response.text


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


# -- GET /v1/jobs against a real Redis: the app's routes and auth, no model -----------------------------------------


@pytest.fixture
async def keyed(redis_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str], dict[str, str]]]:
    """The service app with two API keys of this test's own (the session's Redis holds every test's jobs) and a
    real job store; no model is loaded (the job routes need none). Yields the client and each key's headers."""
    import uuid

    from rlaifv.service.app import create_app
    from rlaifv.service.jobs import JobStore
    from rlaifv.service.redis_conn import connect
    from rlaifv.service.settings import Settings

    alice, bob = f"sk-alice-{uuid.uuid4().hex}", f"sk-bob-{uuid.uuid4().hex}"
    settings = Settings(redis_url=redis_url, api_keys=[alice, bob], jobs_stream=f"rlaifv:jobs:list-{uuid.uuid4().hex}")
    app = create_app(settings)
    redis = connect(settings)
    app.state.job_store = JobStore(redis, settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    await redis.aclose()


ITEM = {"question": "q", "answers": ["a"]}


async def test_the_job_list_pages_a_keys_own_jobs_newest_first(keyed, redis_url: str) -> None:
    import hashlib

    import redis

    from rlaifv.service.jobs import OWNERS

    client, alice, bob = keyed
    mine = []
    for i in range(5):
        r = await client.post(
            "/v1/jobs", json={"kind": "rewards", "items": [ITEM], "metadata": {"i": str(i)}}, headers=alice
        )
        assert r.status_code == 202, r.text
        mine.append(r.json())
    theirs = (await client.post("/v1/jobs", json={"kind": "rewards", "items": [ITEM]}, headers=bob)).json()
    # a second apart (jobs submitted in a row may share a millisecond, which orders them by id instead)
    key_id = hashlib.sha256(alice["Authorization"].removeprefix("Bearer ").encode()).hexdigest()[:16]
    with redis.Redis.from_url(redis_url) as sync:
        first = int(sync.zscore(OWNERS + key_id, mine[0]["id"]))
        sync.zadd(OWNERS + key_id, {job["id"]: first + 1000 * i for i, job in enumerate(mine)}, xx=True)
    order = [job["id"] for job in reversed(mine)]

    whole = await client.get("/v1/jobs", headers=alice)
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body.keys() == {"object", "data", "first_id", "last_id", "has_more"} and body["object"] == "list"
    assert body["data"] == mine[::-1]  # newest first, whole jobs; bob's is not there
    assert (body["first_id"], body["last_id"], body["has_more"]) == (order[0], order[-1], False)

    pages, after = [], None
    while True:
        r = await client.get("/v1/jobs", params={"limit": 2} | ({"after": after} if after else {}), headers=alice)
        page = r.json()
        assert r.status_code == 200 and len(page["data"]) <= 2, r.text
        pages.append([job["id"] for job in page["data"]])
        assert (page["first_id"], page["last_id"]) == (pages[-1][0], pages[-1][-1])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [order[:2], order[2:4], order[4:]]

    r = await client.get("/v1/jobs", headers=bob)
    assert [job["id"] for job in r.json()["data"]] == [theirs["id"]]
    r = await client.get("/v1/jobs", params={"after": order[-1]}, headers=alice)  # after the oldest: an empty page
    assert r.json() == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    r = await client.get("/v1/jobs", params={"after": theirs["id"]}, headers=alice)  # bob's job: no cursor of alice's
    assert r.status_code == 400 and r.json()["error"]["param"] == "after", r.text
    assert (await client.get("/v1/jobs")).status_code == 401


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"after": ""}, "after"),
        ({"after": "job-" + "0" * 61}, "after"),
        ({"after": "job-" + "0" * 32}, "after"),  # well formed, no such job
        ({"after": "idem:-:k1"}, "after"),
    ],
)
async def test_a_bad_page_request_is_a_400_naming_the_field(keyed, params: dict[str, Any], param: str) -> None:
    client, alice, _ = keyed
    r = await client.get("/v1/jobs", params=params, headers=alice)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value"), error
    assert param in error["message"], error  # "limit: Input should be ...", "Invalid 'after': ... is not one of ..."


async def test_the_limits_bounds_are_accepted(keyed) -> None:
    client, alice, _ = keyed
    for limit in (1, 100):
        r = await client.get("/v1/jobs", params={"limit": limit}, headers=alice)
        assert r.status_code == 200 and r.json()["has_more"] is False, r.text


async def test_the_job_list_answers_503_while_redis_is_down_and_501_without_it() -> None:
    from rlaifv.service.app import create_app
    from rlaifv.service.jobs import JobStore
    from rlaifv.service.redis_conn import connect
    from rlaifv.service.settings import Settings
    from rlaifv.testing.server import free_port

    without = httpx.ASGITransport(app=create_app(Settings()), raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=without, base_url="http://t") as client:
        r = await client.get("/v1/jobs")
        assert r.status_code == 501 and r.json()["error"]["code"] == "jobs_not_enabled", r.text
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_retry_after_s=3)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/v1/jobs")  # Redis configured, the model not loaded: the jobs come with it
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
        redis = connect(settings)
        app.state.job_store = JobStore(redis, settings)
        try:
            r = await client.get("/v1/jobs")
        finally:
            await redis.aclose()
    assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
    assert r.json()["error"]["code"] == "redis_unavailable"


def test_the_job_list_is_in_the_schema() -> None:
    from rlaifv.service.app import create_app
    from rlaifv.service.settings import Settings

    schema = create_app(Settings()).openapi()
    op = schema["paths"]["/v1/jobs"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobList")
    assert {p["name"] for p in op["parameters"]} == {"limit", "after"} and "422" not in op["responses"]
