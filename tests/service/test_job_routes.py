"""The job routes against a store that fails on cue (no Redis): a results stream cut by an outage (under real
uvicorn: the body left incomplete, and the SDK reading on from its last result), content negotiation, uploads'
encodings and the bounds of a job's labels; `after` and the job list against a real Redis."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rlaifv.service.errors import StoreUnavailable, install_error_handlers
from rlaifv.service.metrics import Metrics
from rlaifv.service.protocol import Job, JobRequest
from rlaifv.service.routes import jobs as job_routes
from rlaifv.testing.server import uvicorn_thread
from tests.service.conftest import logs_to

JOB_ID = "job-" + "0" * 32
RESULTS = f"/v1/jobs/{JOB_ID}/results"


class FlakyStore:
    """A job of `total` results; Redis goes away after `fail_after` results of a stream, for the first `outages`
    streams (for every one by default). `create` records what it was given."""

    max_items = 10_000

    def __init__(self, total: int = 3, fail_after: int = 2, outages: int | None = None) -> None:
        now = int(time.time())
        self.job = Job(id=JOB_ID, kind="rewards", status="succeeded", created=now, updated=now,
                       total=total, completed=total, failed=0)  # fmt: skip
        self.fail_after, self.outages = fail_after, outages
        self.created: list[JobRequest] = []

    async def get(self, job_id: str, owner: str | None = None) -> Job:
        return self.job

    async def result_lines(self, job: Job, after: int | None = None) -> AsyncIterator[str]:
        for sent, i in enumerate(range(0 if after is None else after + 1, job.total)):
            if sent == self.fail_after and self.outages != 0:
                self.outages = None if self.outages is None else self.outages - 1
                raise StoreUnavailable("the job store (Redis) is unavailable: ConnectionError")
            yield f'{{"index":{i},"status":"succeeded"}}'

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


def jobs_app(store: Any) -> tuple[FastAPI, Metrics]:
    """The job routes behind the service's request middleware (access log, metrics), on `store`."""
    from rlaifv.service.middleware import RequestContextMiddleware
    from rlaifv.service.settings import Settings

    app, metrics = FastAPI(), Metrics()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, settings=Settings())
    app.include_router(job_routes.router)
    job_routes.install_cut_filter()  # as create_app does
    app.state.job_store = store
    return app, metrics


@contextlib.contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn with the HTTP stack `rlaifv serve` runs, on a free port, in a thread; yields its URL."""
    with uvicorn_thread(app, must_stop=True) as (port, _):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Every record of our loggers and uvicorn's, whatever an earlier test in this process made of their
    propagation (`configure_logging` turns it off)."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = seen.append
    with logs_to(handler):
        yield seen


def requests_counted(metrics: Metrics, status: str) -> float:
    labels = {"route": "/v1/jobs/{job_id}/results", "method": "GET", "status": status}
    return metrics.registry.get_sample_value("rlaifv_http_requests_total", labels) or 0.0


@pytest.mark.parametrize("format", ["jsonl", "json"])
def test_a_results_stream_cut_by_an_outage_is_left_incomplete(format: str, records: list[logging.LogRecord]) -> None:
    """Ending the body cleanly let every client take a cut stream for a whole one (results were lost unnoticed);
    raising from the body made uvicorn log an unhandled error with a traceback. Now the body has no end (no last
    chunk): an error to any HTTP client, one warning naming the job in the logs, and a failure in the metrics."""
    app, metrics = jobs_app(FlakyStore())
    received = b""
    with served(app) as url, httpx.Client(base_url=url) as http:
        with (
            pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
            http.stream("GET", RESULTS, params={"format": format}) as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received += chunk
        assert http.get("/v1/jobs/" + JOB_ID).status_code == 200  # the server serves on
    first, second = '{"index":0,"status":"succeeded"}', '{"index":1,"status":"succeeded"}'
    if format == "jsonl":
        assert received.decode().splitlines() == [first, second]
    else:
        assert received.decode().endswith(f"[{first},{second}")
    (cut,) = [r for r in records if r.getMessage().startswith("job results cut short")]
    assert cut.levelno == logging.WARNING and cut.job == JOB_ID
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in records]
    (access,) = [r for r in records if r.name == "rlaifv.access" and r.route == "/v1/jobs/{job_id}/results"]
    assert (access.status, access.cut) == (500, True)
    assert (requests_counted(metrics, "500"), requests_counted(metrics, "200")) == (1.0, 0.0)


def test_a_whole_results_stream_is_complete_and_counted_200(records: list[logging.LogRecord]) -> None:
    app, metrics = jobs_app(FlakyStore(fail_after=3))
    with served(app) as url:
        response = httpx.get(url + RESULTS, params={"format": "jsonl"})
    assert response.status_code == 200 and len(response.text.splitlines()) == 3
    (access,) = [r for r in records if r.name == "rlaifv.access"]
    assert access.status == 200 and not hasattr(access, "cut")
    assert requests_counted(metrics, "200") == 1.0


class StallingStore(FlakyStore):
    """One result, then a Redis that never answers (until the request is cancelled)."""

    async def result_lines(self, job: Job, after: int | None = None) -> AsyncIterator[str]:
        import asyncio

        yield '{"index":0,"status":"succeeded"}'
        await asyncio.Event().wait()
        yield '{"index":1,"status":"succeeded"}'


def test_a_client_leaving_a_stream_is_counted_499_not_a_cut(records: list[logging.LogRecord]) -> None:
    """A response left unfinished because its client went away is the client's doing, as nginx counts it."""
    app, metrics = jobs_app(StallingStore())
    with served(app) as url:
        with httpx.Client(base_url=url) as http, http.stream("GET", RESULTS, params={"format": "jsonl"}) as response:
            assert next(response.iter_lines()) == '{"index":0,"status":"succeeded"}'
        deadline = time.monotonic() + 10
        while requests_counted(metrics, "499") == 0:
            assert time.monotonic() < deadline, "the disconnect was not counted"
            time.sleep(0.01)
    assert requests_counted(metrics, "500") == requests_counted(metrics, "200") == 0
    (access,) = [r for r in records if r.name == "rlaifv.access"]
    assert access.status == 499 and not hasattr(access, "cut")


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_the_sdk_reads_on_across_a_cut_stream_of_the_real_server(asynchronous: bool) -> None:
    """Two outages mid-stream, each after two results: the SDK asks for the rest after the last result it read and
    yields every result once, in order."""
    from rlaifv_client import AsyncClient, Backoff, Client

    app, metrics = jobs_app(FlakyStore(total=7, fail_after=2, outages=2))
    seen: list[str | None] = []
    fast = Backoff(initial=0.01, max=0.01)
    with served(app) as url:
        if asynchronous:

            async def on_request(request: httpx.Request) -> None:
                seen.append(request.url.params.get("after"))

            hooks: dict[str, Any] = {"request": [on_request]}
            async with AsyncClient(base_url=url, backoff=fast, http_client=httpx.AsyncClient(event_hooks=hooks)) as ac:
                indices = [r.index async for r in ac.jobs.results(JOB_ID)]
        else:
            hooks = {"request": [lambda request: seen.append(request.url.params.get("after"))]}
            with Client(base_url=url, backoff=fast, http_client=httpx.Client(event_hooks=hooks)) as client:
                indices = [r.index for r in client.jobs.results(JOB_ID)]
    assert indices == list(range(7)) and seen == [None, "1", "3"]
    assert (requests_counted(metrics, "500"), requests_counted(metrics, "200")) == (2.0, 1.0)


def test_the_sdk_without_retries_raises_at_a_cut_saying_how_far_it_read() -> None:
    from rlaifv_client import APIConnectionError, APITimeoutError, Client

    app, _ = jobs_app(FlakyStore(total=7, fail_after=2))
    read: list[int] = []
    with (
        served(app) as url,
        Client(base_url=url, max_retries=0) as client,
        pytest.raises(APIConnectionError) as info,
    ):
        for result in client.jobs.results(JOB_ID):
            read.append(result.index)
    assert read == [0, 1] and not isinstance(info.value, APITimeoutError)
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert f"the results stream of job {JOB_ID} was cut after 2 results; jobs.results(job, after=1) reads on" in str(
        info.value
    )


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


# -- GET /v1/jobs/{id}/results?after= ---------------------------------------------------------------------------


@pytest.mark.parametrize("after", ["-1", "x", "1.5", ""])
async def test_a_bad_results_after_is_a_400_naming_it(client: httpx.AsyncClient, after: str) -> None:
    async with client:
        r = await client.get(RESULTS, params={"after": after, "format": "jsonl"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("after", "invalid_value") and "after" in error["message"], error


async def test_results_after_an_index_start_past_it_reading_from_there(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a real Redis: only results of items after `after`, in item order, items without a result left out;
    the first page read starts at `after + 1` (the results hash is keyed by index), not at item 0."""
    import json
    import uuid

    from rlaifv.service.app import create_app
    from rlaifv.service.jobs import JobStore
    from rlaifv.service.redis_conn import connect
    from rlaifv.service.settings import Settings

    settings = Settings(redis_url=redis_url, jobs_page_size=2, jobs_stream=f"rlaifv:jobs:after-{uuid.uuid4().hex}")
    app = create_app(settings)
    redis = connect(settings)
    store = app.state.job_store = JobStore(redis, settings)
    job = await store.create(JobRequest(kind="rewards", items=[ITEM] * 8))
    for i in (0, 1, 2, 4, 5, 7):  # 3 and 6 have no result yet
        await store.record(job.id, i, {"custom_id": f"c{i}", "status": "failed", "error": {"message": "m"}})
    asked: list[list[str]] = []
    real = redis.hmget

    async def hmget(key: str, fields: list[str]) -> Any:
        asked.append(list(fields))
        return await real(key, fields)

    monkeypatch.setattr(redis, "hmget", hmget)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for after, expected in [
                (None, [0, 1, 2, 4, 5, 7]),
                (0, [1, 2, 4, 5, 7]),
                (2, [4, 5, 7]),
                (3, [4, 5, 7]),
                (5, [7]),
                (7, []),
                (1000, []),
            ]:
                params: dict[str, Any] = {} if after is None else {"after": after}
                asked.clear()
                lines = await client.get(f"/v1/jobs/{job.id}/results", params=params | {"format": "jsonl"})
                whole = await client.get(f"/v1/jobs/{job.id}/results", params=params)
                assert lines.status_code == whole.status_code == 200, (lines.text, whole.text)
                assert [json.loads(line)["index"] for line in lines.text.splitlines()] == expected, after
                assert [item["index"] for item in whole.json()["data"]] == expected, after
                assert whole.json()["data"][:1] == [json.loads(line) for line in lines.text.splitlines()][:1]
                start = 0 if after is None else after + 1
                assert (asked[0][0] if asked else None) == (str(start) if start < 8 else None), (after, asked)
    finally:
        await redis.aclose()


def test_results_after_is_in_the_schema() -> None:
    from rlaifv.service.app import create_app
    from rlaifv.service.settings import Settings

    op = create_app(Settings()).openapi()["paths"]["/v1/jobs/{job_id}/results"]["get"]
    (after,) = [p for p in op["parameters"] if p["name"] == "after"]
    assert after["in"] == "query" and not after.get("required") and "last result read" in after["description"]
    assert {"type": "integer", "minimum": 0} in after["schema"].get("anyOf", [after["schema"]])
    assert "422" not in op["responses"]
