"""The SDK without a server: exports, configuration, retry schedule, error mapping, image encoding, bodies."""

from __future__ import annotations

import asyncio
import base64
import builtins
import io
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import rlaifv_client
from rlaifv_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    Backoff,
    Client,
    ConflictError,
    ImageInputError,
    InvalidArgumentError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RLAIFVError,
    ServerError,
)
from rlaifv_client._base_client import best_of_n_body, job_body, parse_retry_after, score_body, should_retry
from rlaifv_client._exceptions import make_status_error
from rlaifv_client._images import encode_image, encode_images, sniff_mime

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def test_public_api_is_pinned() -> None:
    assert set(rlaifv_client.__all__) == {
        "NOT_GIVEN", "APIConnectionError", "APIError", "APIStatusError", "APITimeoutError", "AsyncClient",
        "AsyncJobs", "AuthenticationError", "Backoff", "BestOfN", "Candidate", "ClaimCheck", "Client",
        "ClientClosedError", "ConflictError", "FieldError", "RequestTimeoutError",
        "Health", "InvalidArgumentError",
        "ImageInputError", "InvalidRequestError", "Job", "JobError", "JobResult", "Jobs", "Model", "ModelList",
        "NotFoundError", "NotGiven", "PermissionDeniedError", "RLAIFVError", "RateLimitError", "Rewards",
        "ServerError", "TimeoutError", "WaitTimeoutError", "__version__", "data_url", "encode_image", "types",
    }  # fmt: skip
    aliases = {"TimeoutError": "APITimeoutError"}  # openai-python's alias
    for name in set(rlaifv_client.__all__) - {"NOT_GIVEN", "__version__", "types"}:
        obj = getattr(rlaifv_client, name)
        assert obj.__name__ == aliases.get(name, name) and obj.__module__.startswith("rlaifv_client"), (name, obj)
    assert isinstance(rlaifv_client.NOT_GIVEN, rlaifv_client.NotGiven)
    assert rlaifv_client.types.__name__ == "rlaifv_client.types"
    assert rlaifv_client.__version__.count(".") >= 1


def test_public_methods_have_docstrings() -> None:
    for cls in (rlaifv_client.Client, rlaifv_client.AsyncClient, rlaifv_client.Jobs, rlaifv_client.AsyncJobs):
        assert cls.__doc__
        for name, member in vars(cls).items():
            if callable(member) and not name.startswith("_"):
                assert member.__doc__, f"{cls.__name__}.{name} has no docstring"


def test_exception_tree() -> None:
    assert rlaifv_client.TimeoutError is APITimeoutError
    assert issubclass(APITimeoutError, APIConnectionError) and issubclass(APITimeoutError, builtins.TimeoutError)
    for cls in (InvalidRequestError, AuthenticationError, PermissionDeniedError, NotFoundError, RateLimitError):
        assert issubclass(cls, APIStatusError) and issubclass(cls, RLAIFVError)
    assert issubclass(ImageInputError, ValueError)
    assert issubclass(ImageInputError, InvalidArgumentError) and issubclass(InvalidArgumentError, RLAIFVError)
    assert issubclass(InvalidArgumentError, ValueError)


def test_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLAIFV_BASE_URL", "http://reward.internal:9000/")
    monkeypatch.setenv("RLAIFV_API_KEY", "sk-from-env-123456")
    with Client() as client:
        assert str(client.base_url) == "http://reward.internal:9000/"
        assert client.api_key == "sk-from-env-123456"
    with Client(base_url="http://other:1", api_key="sk-arg") as client:  # arguments win over the environment
        assert (str(client.base_url), client.api_key) == ("http://other:1/", "sk-arg")
    monkeypatch.delenv("RLAIFV_BASE_URL")
    monkeypatch.delenv("RLAIFV_API_KEY")
    with Client() as client:
        assert str(client.base_url) == "http://127.0.0.1:8000/" and client.api_key is None


def test_constructor_is_keyword_only_and_validates() -> None:
    with pytest.raises(TypeError):
        Client("http://localhost:8000")  # type: ignore[misc]
    with pytest.raises(ValueError, match="http"):
        Client(base_url="ftp://x")
    with pytest.raises(ValueError, match="max_retries"):
        Client(max_retries=-1)


def test_headers_user_agent_and_with_options() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok", "checks": {}}, headers={"x-request-id": "abc"})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with Client(base_url="http://svc/prefix", api_key="sk-123456789", http_client=http) as client:
        health = client.health()
        assert health.ok and health.request_id == "abc"
        quick = client.with_options(timeout=3, max_retries=0)
        assert quick.max_retries == 0 and quick.timeout == 3 and quick.api_key == "sk-123456789"
        quick.close()  # shares the pool: closing the copy must not close it
        client.health()
    request = seen[0]
    assert str(request.url) == "http://svc/prefix/healthz"
    assert request.headers["authorization"] == "Bearer sk-123456789"
    assert request.headers["user-agent"].startswith(f"rlaifv-client/{rlaifv_client.__version__} ")
    assert len(request.headers["x-request-id"]) == 32


def test_per_call_timeout_and_extra_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503, json={"status": "unavailable", "checks": {"model": "loading"}})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    fast = Backoff(initial=0.001, max=0.001)
    with Client(base_url="http://svc", timeout=7.0, backoff=fast, http_client=http) as client:
        assert client.ready().status == "unavailable"  # /readyz's 503 is an answer, not an error: no retries
        assert seen[-1].extensions["timeout"]["read"] == 7.0
        client.ready(timeout=None)
        assert seen[-1].extensions["timeout"]["read"] is None
        with pytest.raises(ServerError):
            client.best_of_n(question="q", timeout=httpx.Timeout(2.0), extra_headers={"X-Team": "vision"})
        assert seen[2].extensions["timeout"]["read"] == 2.0 and seen[-1].headers["x-team"] == "vision"
        assert all(0 < r.extensions["timeout"]["read"] <= 2.0 for r in seen[3:])  # a retry gets what is left of it
    assert len(seen) == 2 + 3  # best_of_n: 1 + 2 retries of the 503


# -- the retry schedule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "retry_after", "rand", "expected"),
    [
        (0, None, 0.0, 0.5),
        (1, None, 0.0, 1.0),
        (2, None, 0.0, 2.0),
        (5, None, 0.0, 8.0),  # capped at max
        (2, None, 1.0, 1.5),  # full jitter takes 25 % off
        (0, 3.0, 0.0, 3.0),  # Retry-After wins over backoff...
        (0, 3.0, 1.0, 3.75),  # ...plus up to 25 % so rejected clients spread out
        (0, 600.0, 0.0, 60.0),  # ...capped
        (3, 0.0, 0.0, 0.0),
    ],
)
def test_backoff_schedule(attempt: int, retry_after: float | None, rand: float, expected: float) -> None:
    assert Backoff().delay(attempt, retry_after, rand=rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "Thu, 01 Jan 1970 00:00:10 GMT"}, 7.0),  # HTTP date, relative to now=3
        ({"retry-after": "Thu, 01 Jan 1970 00:00:10 -0000"}, 7.0),  # zone unknown: UTC, not the machine's zone
        ({"retry-after": "Thu, 01 Jan 1970 01:00:10 +0100"}, 7.0),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "inf", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if hasattr(time, "tzset"):  # POSIX only
        monkeypatch.setenv("TZ", "EST5")  # a local zone that is not UTC (POSIX form: no tzdata needed)
        time.tzset()
    try:
        assert parse_retry_after(httpx.Headers(headers), now=3.0) == expected
    finally:
        monkeypatch.undo()
        if hasattr(time, "tzset"):
            time.tzset()


@pytest.mark.parametrize(
    ("status", "retried"),
    [(400, False), (401, False), (403, False), (404, False), (413, False), (422, False), (408, True), (429, True),
     (500, False), (502, True), (503, True), (504, True)],
)  # fmt: skip
def test_which_statuses_are_retried(status: int, retried: bool) -> None:
    assert should_retry(httpx.Response(status)) is retried
    assert should_retry(None)  # connection errors


def test_calls_that_must_not_run_twice_are_repeated_only_when_surely_not_processed() -> None:
    request = httpx.Request("POST", "http://svc/v1/jobs")
    assert should_retry(None, error=httpx.ConnectError("refused", request=request), idempotent=False)
    assert not should_retry(None, error=httpx.ReadTimeout("slow", request=request), idempotent=False)
    assert should_retry(None, error=httpx.ReadTimeout("slow", request=request))
    assert [s for s in (408, 429, 500, 502, 503, 504) if should_retry(httpx.Response(s), idempotent=False)] == [
        429,
        503,
    ]

    attempts: list[httpx.Request] = []

    def slow(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ReadTimeout("slow", request=request)

    fast = Backoff(initial=0.001, max=0.001)
    with Client(
        base_url="http://svc", backoff=fast, http_client=httpx.Client(transport=httpx.MockTransport(slow))
    ) as c:
        with pytest.raises(APITimeoutError):
            c.jobs.submit([{"question": "q"}])
        # Retried like a read, with one Idempotency-Key on every attempt: the server creates the job once.
        assert len(attempts) == 3
        keys = {a.headers.get("Idempotency-Key") for a in attempts}
        assert len(keys) == 1 and None not in keys
        with pytest.raises(APITimeoutError):
            c.jobs.submit([{"question": "q"}])
        assert len({a.headers.get("Idempotency-Key") for a in attempts}) == 2  # a new submission, a new key


def test_retries_then_gives_up_with_the_same_request_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503, json={"error": {"message": "not ready", "type": "service_unavailable"}})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    client = Client(base_url="http://svc", max_retries=3, backoff=Backoff(initial=0.001, max=0.001), http_client=http)
    with pytest.raises(ServerError) as info:
        client.models()
    assert info.value.status_code == 503 and info.value.type == "service_unavailable"
    assert len(seen) == 4
    assert len({r.headers["x-request-id"] for r in seen}) == 1
    assert [r.headers["x-rlaifv-retry-count"] for r in seen] == ["0", "1", "2", "3"]


def _rate_limited_twice() -> tuple[list[httpx.Request], httpx.MockTransport]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) <= 2:
            body = {"error": {"message": "busy", "type": "rate_limit_error", "code": "queue_full"}}
            return httpx.Response(429, json=body, headers={"Retry-After": "2"})
        return httpx.Response(200, json={"object": "list", "data": []})

    return seen, httpx.MockTransport(handler)


def test_429_waits_the_servers_retry_after_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real waiting: the client's sleep is recorded. Retry-After (2 s) replaces the 1 ms backoff."""

    slept: list[float] = []
    _client_sleeps(monkeypatch, slept.append)
    seen, transport = _rate_limited_twice()
    backoff = Backoff(initial=0.001, max=0.001, jitter=0.25)
    with Client(
        base_url="http://svc", max_retries=3, backoff=backoff, http_client=httpx.Client(transport=transport)
    ) as c:
        assert c.models().data == []
    assert len(seen) == 3 and len(slept) == 2
    assert all(2.0 <= s <= 2.5 for s in slept), slept
    assert [r.headers["x-rlaifv-retry-count"] for r in seen] == ["0", "1", "2"]


async def test_429_waits_the_servers_retry_after_async(monkeypatch: pytest.MonkeyPatch) -> None:

    slept: list[float] = []

    _client_sleeps(monkeypatch, slept.append)
    seen, transport = _rate_limited_twice()
    backoff = Backoff(initial=0.001, max=0.001, jitter=0.25)
    http = httpx.AsyncClient(transport=transport)
    async with AsyncClient(base_url="http://svc", max_retries=3, backoff=backoff, http_client=http) as c:
        assert (await c.models()).data == []
    assert len(seen) == 3 and all(2.0 <= s <= 2.5 for s in slept) and len(slept) == 2


# -- error mapping --------------------------------------------------------------------


def _error(status: int, body: object = None, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("POST", "http://svc/v1/best-of-n")
    if body is None:
        return httpx.Response(status, text="upstream exploded", headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, InvalidRequestError), (401, AuthenticationError), (403, PermissionDeniedError), (404, NotFoundError),
     (413, InvalidRequestError), (422, InvalidRequestError), (429, RateLimitError), (500, ServerError),
     (503, ServerError), (504, ServerError), (409, ConflictError), (418, APIStatusError),
     (408, rlaifv_client.RequestTimeoutError)],
)  # fmt: skip
def test_status_error_mapping(status: int, cls: type[APIStatusError]) -> None:
    body = {"error": {"message": "boom", "type": "t", "param": "n", "code": "c"}}
    err = make_status_error(_error(status, body, {"x-request-id": "rid-1", "retry-after": "2"}))
    assert type(err) is cls
    assert (err.status_code, err.message, err.type, err.param, err.code, err.request_id) == (
        status, "boom", "t", "n", "c", "rid-1",
    )  # fmt: skip
    assert "rid-1" in str(err)


def test_invalid_request_error_field_errors() -> None:
    err = make_status_error(_error(400, {"error": {"message": "n must be <= 8", "type": "x", "param": "n"}}))
    assert isinstance(err, InvalidRequestError)
    assert [(f.param, f.message) for f in err.field_errors] == [("n", "n must be <= 8")]
    problems = [{"param": "n", "message": "too big"}, {"param": "sampling.top_p", "message": "0"}]
    many = {"error": {"message": "2 problems", "param": "n", "errors": problems}}
    err = make_status_error(_error(400, many))
    assert [f.param for f in err.field_errors] == ["n", "sampling.top_p"]


def test_rate_limit_error_carries_retry_after_and_non_json_bodies_survive() -> None:
    err = make_status_error(_error(429, {"error": {"message": "busy"}}, {"retry-after": "3"}))
    assert isinstance(err, RateLimitError) and err.retry_after == 3.0
    err = make_status_error(_error(502))
    assert isinstance(err, ServerError) and err.message == "upstream exploded" and err.type is None


def test_connection_errors_map_to_api_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    fast = Backoff(initial=0.001, max=0.001)
    refusing = httpx.Client(transport=httpx.MockTransport(refuse))
    with Client(base_url="http://svc", max_retries=1, backoff=fast, http_client=refusing) as c:
        with pytest.raises(APIConnectionError) as info:
            c.health()
        assert not isinstance(info.value, APITimeoutError)
    with (
        Client(
            base_url="http://svc", max_retries=0, http_client=httpx.Client(transport=httpx.MockTransport(slow))
        ) as c,
        pytest.raises(rlaifv_client.TimeoutError),
    ):
        c.health()


def test_readiness_through_an_ingress_that_answers_html() -> None:
    """An ingress with no ready pod answers its own 503 page: not ready, not an API error."""
    page = "<html><body>503 Service Temporarily Unavailable</body></html>"
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503, text=page)))
    with Client(base_url="http://svc", http_client=http) as client:
        assert client.ready().status == "unavailable"


def test_api_keys_are_stripped_and_must_fit_a_header() -> None:
    with Client(base_url="http://svc", api_key="sk-from-a-file\n") as client:
        assert client.api_key == "sk-from-a-file"
    with pytest.raises(ValueError, match="printable ASCII"):
        Client(base_url="http://svc", api_key="sk-\u00e9")


def test_a_key_beside_a_user_and_password_in_the_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx sends a URL's user and password as Basic authorization, replacing the key's Bearer header: the key was
    never sent and the server answered 401."""
    with pytest.raises(ValueError, match="give one of them"):
        Client(base_url="http://u:p@svc", api_key="sk-1")
    monkeypatch.setenv("RLAIFV_API_KEY", "sk-2")
    with pytest.raises(ValueError, match="RLAIFV_API_KEY"):
        AsyncClient(base_url="http://u:p@svc")
    monkeypatch.delenv("RLAIFV_API_KEY")
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"status": "ok"})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with Client(base_url="http://u:p@svc", http_client=http) as client:  # the URL's alone: a proxy's Basic auth
        client.health()
    assert seen == ["Basic dTpw"]


def test_a_request_httpx_cannot_even_send_is_not_retried() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.LocalProtocolError("Illegal header value")

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with Client(base_url="http://svc", max_retries=3, http_client=http) as client, pytest.raises(APIConnectionError):
        client.models()
    assert len(seen) == 1


def test_errors_survive_pickling() -> None:
    """Errors cross process pools: keyword-only constructors must not break unpickling."""
    import pickle

    body = {"error": {"message": "used", "type": "invalid_request_error", "param": "Idempotency-Key", "code": "c"}}
    error = pickle.loads(pickle.dumps(make_status_error(_error(409, body, {"x-request-id": "rid-9"}))))
    assert type(error) is ConflictError and (error.status_code, error.param, error.request_id) == (
        409, "Idempotency-Key", "rid-9",
    )  # fmt: skip
    assert str(pickle.loads(pickle.dumps(APIConnectionError("gone")))) == "gone"


def test_jsonl_lines_split_at_newlines_only() -> None:
    from rlaifv_client._base_client import split_lines

    chunks = ['{"a": "x\u2028y"}\r\n{"b"', ': "\u0085"}\n', '{"c": 1}']
    assert list(split_lines(chunks)) == ['{"a": "x\u2028y"}', '{"b": "\u0085"}', '{"c": 1}']


def _client_sleeps(
    monkeypatch: pytest.MonkeyPatch, sleep: Callable[[float], None], **time_functions: Callable[[], float]
) -> None:
    """`sleep` as the sync and async clients' only sleep, in their module alone: patched on the `time` and `asyncio`
    modules themselves, a server left running on a thread by an earlier test (uvicorn ticks with
    asyncio.sleep(0.1)) spun on the fake and filled the test's sleeps."""
    import rlaifv_client._client as client_module

    async def async_sleep(seconds: float) -> None:
        sleep(seconds)

    monkeypatch.setattr(client_module, "time", SimpleNamespace(sleep=sleep, **time_functions))
    monkeypatch.setattr(client_module, "asyncio", SimpleNamespace(sleep=async_sleep, iscoroutine=asyncio.iscoroutine))


def fake_clock(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], list[float]]:
    """A clock at 100 s that only sleeps move, for both clients: `jobs.wait` reads it where its loop lives
    (`Waiting`) and sleeps where it requests (time.sleep, asyncio.sleep). Returns the clock and the sleeps."""
    import types

    import rlaifv_client._base_client as base_module

    clock, slept = [100.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    def now() -> float:
        return clock[0]

    monkeypatch.setattr(base_module, "time", types.SimpleNamespace(monotonic=now, sleep=sleep, time=now))
    _client_sleeps(monkeypatch, sleep, monotonic=now, time=now)
    return clock, slept


def test_wait_sleeps_only_what_is_left_of_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout shorter than the poll interval still gets its last poll at the deadline (fake clock)."""

    clock, slept = fake_clock(monkeypatch)
    running = {"id": "j1", "kind": "rewards", "status": "running", "created": 1, "updated": 1, "total": 3}
    polls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        polls.append(clock[0])
        return httpx.Response(200, json=running | {"completed": 1, "failed": 0})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with Client(base_url="http://svc", http_client=http) as client, pytest.raises(rlaifv_client.WaitTimeoutError):
        client.jobs.wait("j1", poll_interval=10, timeout=5)
    assert slept == [5.0] and polls == [100.0, 105.0]


def test_wait_ends_at_its_deadline_whatever_the_server_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each poll's timeout is cut to what is left of the wait's, a poll that fails (503, no connection) is polled
    again instead of ending the wait, and the deadline's error says why the last poll failed (fake clock)."""

    clock, _ = fake_clock(monkeypatch)
    running = {"id": "j1", "kind": "rewards", "status": "running", "created": 1, "updated": 1, "total": 3}
    read_timeouts: list[float] = []
    answers = iter(["job", "503", "refused"])

    def handler(request: httpx.Request) -> httpx.Response:
        read_timeouts.append(request.extensions["timeout"]["read"])
        answer = next(answers, "refused")
        if answer == "refused":
            raise httpx.ConnectError("refused", request=request)
        if answer == "503":
            return httpx.Response(503, json={"error": {"message": "draining", "type": "server_error"}})
        return httpx.Response(200, json=running | {"completed": 1, "failed": 0})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with (
        Client(base_url="http://svc", http_client=http, timeout=180) as client,
        pytest.raises(rlaifv_client.WaitTimeoutError, match="last poll failed: connection error") as caught,
    ):
        client.jobs.wait("j1", poll_interval=2, timeout=5)
    assert read_timeouts == [5.0, 3.0, 1.0, 1.0]  # never the client's 180 s; one attempt per poll, the last at 105
    assert caught.value.job is not None and caught.value.job.status == "running"
    assert clock[0] == 105.0


async def test_async_wait_ends_at_its_deadline_whatever_the_server_does(monkeypatch: pytest.MonkeyPatch) -> None:

    clock, _ = fake_clock(monkeypatch)
    read_timeouts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        read_timeouts.append(request.extensions["timeout"]["read"])
        return httpx.Response(502, text="bad gateway")

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with AsyncClient(base_url="http://svc", http_client=http) as client:
        with pytest.raises(rlaifv_client.WaitTimeoutError, match="last poll failed: 502 bad gateway") as caught:
            await client.jobs.wait("j1", poll_interval=2, timeout=5)
    assert read_timeouts == [5.0, 3.0, 1.0, 1.0] and caught.value.job is None and clock[0] == 105.0


async def test_closing_async_results_early_releases_the_stream_at_once() -> None:
    import contextlib
    import json

    closed: list[bool] = []
    line = json.dumps({"index": 0, "status": "failed", "error": {"message": "m", "type": "t"}}) + "\n"

    class Lines(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[override]
            for _ in range(3):
                yield line.encode()

        async def aclose(self) -> None:
            closed.append(True)

    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, stream=Lines())))
    async with AsyncClient(base_url="http://svc", http_client=http) as client:
        async with contextlib.aclosing(client.jobs.results("j1")) as results:
            async for item in results:
                assert item.index == 0
                break
        assert closed == [True]  # before the client closes, with no event-loop turn in between


RUNNING = {"id": "j1", "kind": "rewards", "status": "running", "created": 1, "updated": 1, "total": 1}


def polled(answers: list[httpx.Response]) -> tuple[httpx.MockTransport, list[int]]:
    """A transport answering the polls in turn (then the job done); the number of polls."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= len(answers):
            return answers[len(calls) - 1]
        return httpx.Response(200, json=RUNNING | {"status": "succeeded", "completed": 1, "failed": 0})

    return httpx.MockTransport(handler), calls


def limited(retry_after: str) -> httpx.Response:
    return httpx.Response(429, headers={"Retry-After": retry_after}, json={"error": {"message": "over quota"}})


def test_wait_pauses_as_long_as_a_refused_polls_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each poll counts against the key's rate limit: polling every second into a 30 s Retry-After only made more
    429s (a wait of 20 s made 17 refused polls). A shorter Retry-After than the interval keeps the interval."""
    _, slept = fake_clock(monkeypatch)
    transport, calls = polled([limited("30"), limited("0.5")])
    with Client(base_url="http://svc", http_client=httpx.Client(transport=transport)) as client:
        assert client.jobs.wait("j1", poll_interval=1, timeout=100).status == "succeeded"
    assert slept == [30.0, 1.0] and len(calls) == 3


async def test_async_wait_pauses_as_long_as_a_refused_polls_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:

    _, slept = fake_clock(monkeypatch)
    transport, calls = polled([limited("30"), limited("0.5")])
    async with AsyncClient(base_url="http://svc", http_client=httpx.AsyncClient(transport=transport)) as client:
        assert (await client.jobs.wait("j1", poll_interval=1, timeout=100)).status == "succeeded"
    assert slept == [30.0, 1.0] and len(calls) == 3


def test_a_wait_without_a_deadline_waits_out_a_rate_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll's own retries spent, a 429 still ends in a finished job: a rate limit always lifts."""
    _, slept = fake_clock(monkeypatch)
    transport, calls = polled([limited("7")] * 3)
    with Client(base_url="http://svc", http_client=httpx.Client(transport=transport), max_retries=2) as client:
        assert client.jobs.wait("j1").status == "succeeded"
    assert len(calls) == 4 and slept[-1] == 7.0


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf"), "1"])
async def test_a_poll_interval_that_is_no_pause_is_refused_before_any_poll(interval: Any) -> None:
    """Sync slept a negative time (ValueError after a poll), async polled without pause (51 polls in 0.05 s)."""
    transport, calls = polled([])
    with (
        Client(base_url="http://svc", http_client=httpx.Client(transport=transport)) as client,
        pytest.raises(ValueError, match="poll_interval"),
    ):
        client.jobs.wait("j1", poll_interval=interval)
    async with AsyncClient(base_url="http://svc", http_client=httpx.AsyncClient(transport=transport)) as aclient:
        with pytest.raises(ValueError, match="poll_interval"):
            await aclient.jobs.wait("j1", poll_interval=interval)
    assert calls == []


def test_wait_without_a_deadline_raises_what_the_poll_raises() -> None:
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404, json={"error": {"message": "x"}})))
    with Client(base_url="http://svc", http_client=http) as client, pytest.raises(NotFoundError):
        client.jobs.wait("j1", timeout=5)


def test_values_a_newer_server_adds_parse() -> None:
    """Open enums: a status, kind or finish reason this SDK does not know is kept as a string, not a failure."""
    from rlaifv_client import types

    job = types.Job.model_validate(
        {"id": "j", "kind": "chat", "status": "paused", "created": 1, "updated": 1, "total": 1, "completed": 0,
         "failed": 0}
    )  # fmt: skip
    assert (job.kind, job.status, job.done) == ("chat", "paused", False)
    item = types.JobResult.model_validate({"index": 0, "status": "skipped", "result": {"object": "chat", "x": 1}})
    assert type(item.result) is types.BaseType and item.result.model_extra == {"object": "chat", "x": 1}
    known = types.JobResult.model_validate({"index": 0, "status": "failed", "error": {"message": "m", "type": "t"}})
    assert known.result is None and known.error is not None
    assert types.Health.model_validate({"status": "degraded"}).status == "degraded"
    info = types.RewardInfo.model_validate({"mode": "dpo", "beta": 0.1, "normalize": "median", "claim_score": "x"})
    assert (info.normalize, info.claim_score) == ("median", "x")


def test_health_reports_a_503_instead_of_raising() -> None:
    body = {"status": "unavailable", "checks": {"engine": "stalled for 900 s"}}
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503, json=body)))
    with Client(base_url="http://svc", http_client=http) as client:
        health = client.health()
    assert not health.ok and health.checks == {"engine": "stalled for 900 s"}
    page = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503, text="<html>bad gateway")))
    with Client(base_url="http://svc", http_client=page, max_retries=0) as client:
        assert client.health().status == "unavailable"


def test_job_submission_takes_the_callers_idempotency_key() -> None:
    seen: list[httpx.Request] = []
    job = {"id": "j1", "kind": "rewards", "status": "queued", "created": 1, "updated": 1, "total": 1,
           "completed": 0, "failed": 0}  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=job)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    items = [{"question": "q", "answers": ["a"]}]
    with Client(base_url="http://svc", http_client=http) as client:
        client.jobs.submit(items, kind="rewards", idempotency_key="batch-7")
        client.jobs.submit(items, kind="rewards", extra_headers={"idempotency-key": "batch-8", "X-Team": "vision"})
        client.jobs.submit_file(b'{"question": "q", "answers": ["a"]}\n', kind="rewards", idempotency_key="up-1")
        client.jobs.submit(items, kind="rewards")
        client.jobs.submit(items, kind="rewards")
        with pytest.raises(ValueError, match="idempotency_key"):
            client.jobs.submit(items, kind="rewards", idempotency_key=" ")
    keys = [r.headers["idempotency-key"] for r in seen]
    assert keys[:3] == ["batch-7", "batch-8", "up-1"] and seen[1].headers["x-team"] == "vision"
    assert keys[3] != keys[4]  # one fresh key per submission otherwise


def test_prompt_bodies_carry_every_reward_option_and_encode_message_images(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(PNG)
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image), "detail": "low"}},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": "https://example.org/a.png"}]},
        {"role": "assistant", "content": "A"},
    ]  # fmt: skip
    body = score_body(answers=["a"], messages=messages, mode="claims", repeat_penalty=0.5)
    assert body["reward"] == {"mode": "claims", "repeat_penalty": 0.5}
    first = body["messages"][0]["content"][0]["image_url"]
    assert first["url"].startswith("data:image/png;base64,") and first["detail"] == "low"
    assert body["messages"][1]["content"][0]["image_url"] == {"url": "https://example.org/a.png"}
    assert body["messages"][2] == {"role": "assistant", "content": "A"}
    bare = base64.b64encode(PNG).decode()  # bare base64 and a padded data URL: the server reads them as they are
    for url in (bare, " data:image/png;base64," + bare):
        sent = score_body(answers=["a"], messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}])  # fmt: skip
        assert sent["messages"][0]["content"][0]["image_url"]["url"] == url
    assert messages[0]["content"][0]["image_url"]["url"] == str(image)  # the caller's messages are left alone
    with pytest.raises(ImageInputError, match=r"messages\[0\]\.content\[0\]\.image_url\.url: image file not found"):
        score_body(answers=["a"], messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(tmp_path / "gone.png")}}]}])  # fmt: skip


def test_unexpected_response_shape_is_an_api_error() -> None:
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"nope": 1})))
    with (
        Client(base_url="http://svc", http_client=http) as client,
        pytest.raises(rlaifv_client.APIError, match="unexpected"),
    ):
        client.models()


# -- images ---------------------------------------------------------------------------


def test_image_forms(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "one.png"
    path.write_bytes(PNG)
    expected = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert encode_image(path) == expected
    assert encode_image(str(path)) == expected
    assert encode_image(path.as_uri()) == expected
    assert encode_image(PNG) == expected
    assert encode_image(bytearray(PNG)) == expected
    assert encode_image(io.BytesIO(PNG)) == expected
    assert encode_image(expected) == expected
    assert encode_image("https://img.example.com/a.png") == "https://img.example.com/a.png"
    pil = encode_image(Image.new("RGB", (3, 2), (1, 2, 3)))
    assert pil.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(pil.split(",", 1)[1])))
    assert decoded.size == (3, 2) and decoded.getpixel((0, 0)) == (1, 2, 3)
    assert encode_images(PNG, [path, expected]) == [expected] * 3


@pytest.mark.parametrize(
    ("data", "mime"),
    [(PNG, "image/png"), (b"\xff\xd8\xff\xe0rest", "image/jpeg"), (b"GIF89a..", "image/gif"),
     (b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"), (b"BM....", "image/bmp"), (b"hello", "application/octet-stream")],
)  # fmt: skip
def test_sniff_mime(data: bytes, mime: str) -> None:
    assert sniff_mime(data) == mime


@pytest.mark.parametrize(
    ("value", "match"),
    [("/no/such/image.png", "not found"), ("", "empty"), (b"", "empty"), (12, "unsupported image type"),
     (io.StringIO("text"), "binary mode")],
)  # fmt: skip
def test_bad_image_inputs(value: object, match: str) -> None:
    with pytest.raises(ImageInputError, match=match):
        encode_image(value)


def test_images_must_be_a_list() -> None:
    with pytest.raises(ImageInputError, match="list"):
        encode_images(None, PNG)  # type: ignore[arg-type]
    for one in ("cat.png", PNG):  # not read as a sequence of characters or of ints
        with pytest.raises(ImageInputError, match="images= takes a list"):
            best_of_n_body(images=one, question="q")  # type: ignore[arg-type]


def test_a_pil_image_read_from_a_jpeg_stays_a_jpeg() -> None:
    """As PNG a photo grows several-fold, past the server's image and body limits."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, format="JPEG", quality=90)
    photo = Image.open(io.BytesIO(buffer.getvalue()))
    url = encode_image(photo)
    assert url.startswith("data:image/jpeg;base64,")
    assert len(base64.b64decode(url.split(",", 1)[1])) < 2 * len(buffer.getvalue())
    assert encode_image(photo.convert("RGBA")).startswith("data:image/png;base64,")  # no format: lossless


# -- request bodies -------------------------------------------------------------------


def test_bodies_send_only_given_fields() -> None:
    assert best_of_n_body(question="q") == {"question": "q"}
    body = best_of_n_body(image=PNG, question="q", n=3, temperature=0.7, seed=1, beta=0.2)
    assert body["n"] == 3 and body["sampling"] == {"temperature": 0.7, "seed": 1} and body["reward"] == {"beta": 0.2}
    assert body["images"][0].startswith("data:image/png;base64,")
    assert score_body(answers=("a", "b"), question="q") == {"question": "q", "answers": ["a", "b"]}
    with pytest.raises(TypeError, match="list of strings"):
        score_body(answers="one answer", question="q")
    job = job_body("rewards", [{"question": "q", "answers": ["a"]}], {"team": "x"})
    assert job == {"kind": "rewards", "items": [{"question": "q", "answers": ["a"]}], "metadata": {"team": "x"}}
    assert job_body("best_of_n", [{"image": PNG, "question": "q", "n": 2}], None)["items"][0]["n"] == 2
    with pytest.raises(ValueError, match="kind"):
        job_body("chat", [], None)  # type: ignore[arg-type]


# -- headers, URLs and arguments ------------------------------------------------------------


def _recording_client(seen: list[httpx.Request], body: dict[str, object] | None = None, **options: object) -> Client:
    job = {"id": "j1", "kind": "rewards", "status": "queued", "created": 1, "updated": 1, "total": 1,
           "completed": 0, "failed": 0}  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/results"):
            return httpx.Response(200, text="")
        return httpx.Response(200, json=body or job)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    return Client(base_url="http://svc", api_key="sk-sdk", http_client=http, **options)  # type: ignore[arg-type]


def test_callers_headers_replace_the_sdks_whatever_their_case() -> None:
    """One header each: a user's `authorization` or `x-request-id` replaces the SDK's instead of going along."""
    mine = {"authorization": "Bearer mine", "x-request-id": "rid-mine", "user-agent": "me/1", "accept": "text/x"}
    names = ("authorization", "x-request-id", "user-agent", "accept")
    seen: list[httpx.Request] = []
    with _recording_client(seen, default_headers=mine) as client:
        client.jobs.get("j1")
    with _recording_client(seen) as client:
        client.jobs.submit([{"question": "q", "answers": ["a"]}], kind="rewards", extra_headers=mine)
        client.jobs.submit_file(b"{}\n", extra_headers={"content-type": "application/jsonl"})
    for request in seen[:2]:
        assert [request.headers.get_list(name) for name in names] == [[value] for value in mine.values()]
    assert seen[2].headers.get_list("content-type") == ["application/jsonl"]


@pytest.mark.parametrize(
    ("job_id", "path"),
    [("j-1", "/v1/jobs/j-1"), ("a?b", "/v1/jobs/a%3Fb"), ("a#b", "/v1/jobs/a%23b"), ("a b", "/v1/jobs/a%20b"),
     ("50%", "/v1/jobs/50%25"), ("a..b", "/v1/jobs/a..b")],
)  # fmt: skip
def test_job_ids_are_escaped_in_the_url(job_id: str, path: str) -> None:
    seen: list[httpx.Request] = []
    with _recording_client(seen) as client:
        client.jobs.get(job_id)
        list(client.jobs.results(job_id))
    assert [r.url.raw_path.decode() for r in seen] == [path, path + "/results?format=jsonl"]


@pytest.mark.parametrize("job_id", ["", ".", "..", "a/b"])
def test_job_ids_that_would_leave_the_job_are_refused(job_id: str) -> None:
    seen: list[httpx.Request] = []
    with _recording_client(seen) as client:
        for call in (client.jobs.get, client.jobs.cancel, client.jobs.wait, lambda j: list(client.jobs.results(j))):
            with pytest.raises(ValueError, match="invalid job id"):
                call(job_id)
    assert seen == []


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [("http://h:8000/v1", "http://h:8000/"), ("http://h:8000/v1/", "http://h:8000/"),
     ("http://h/prefix/v1", "http://h/prefix/"), ("http://h/v10", "http://h/v10/"), ("http://h", "http://h/")],
)  # fmt: skip
def test_a_base_url_ending_in_v1_means_the_server_root(base_url: str, expected: str) -> None:
    """The OpenAI habit (`.../v1`) would request /v1/v1/models: the SDK's paths carry the /v1 themselves."""
    seen: list[httpx.Request] = []
    with _recording_client(seen, body={"object": "list", "data": []}) as client:
        client = client.with_options(base_url=base_url)
        assert str(client.base_url) == expected
        client.models()
    assert str(seen[0].url) == expected + "v1/models"


@pytest.mark.parametrize(
    ("options", "match"),
    [({"jitter": 3}, "jitter"), ({"jitter": -0.1}, "jitter"), ({"jitter": float("nan")}, "jitter"),
     ({"initial": -1}, "initial"), ({"initial": float("inf")}, "initial"), ({"max": -0.5}, "max"),
     ({"max_retry_after": -1}, "max_retry_after"), ({"initial": float("nan")}, "initial")],
)  # fmt: skip
def test_backoff_refuses_settings_that_give_negative_or_no_delays(options: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Backoff(**options)


def test_backoff_takes_its_edge_settings() -> None:
    assert Backoff(initial=0, max=0, jitter=1).delay(3, rand=0.99) == 0
    assert Backoff(jitter=0).delay(0, rand=0.5) == 0.5
    assert Backoff(max=float("inf"), max_retry_after=float("inf")).delay(0, 120.0, rand=0.0) == 120.0


def test_a_408_is_a_request_timeout_error_after_its_retries() -> None:
    from rlaifv_client import RequestTimeoutError

    seen: list[httpx.Request] = []
    body = {"error": {"message": "request body not received in time", "type": "invalid_request_error",
                      "code": "body_timeout"}}  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(408, json=body)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    fast = Backoff(initial=0.001, max=0.001)
    with (
        Client(base_url="http://svc", backoff=fast, http_client=http) as client,
        pytest.raises(RequestTimeoutError) as caught,
    ):
        client.best_of_n(question="q")
    assert len(seen) == 3 and caught.value.code == "body_timeout" and caught.value.status_code == 408
    assert isinstance(caught.value, APIStatusError) and isinstance(caught.value, builtins.TimeoutError)


def test_a_closed_client_says_so() -> None:
    from rlaifv_client import ClientClosedError

    seen: list[httpx.Request] = []
    client = _recording_client(seen)
    client.close()
    for call in (client.health, lambda: client.jobs.get("j1"), lambda: list(client.jobs.results("j1"))):
        with pytest.raises(ClientClosedError, match="client is closed"):
            call()
    with Client(base_url="http://svc") as owner:
        copy = owner.with_options(max_retries=0)
    with pytest.raises(ClientClosedError, match="closed"):
        copy.models()  # its pool closed with the client it was copied from
    assert seen == [] and issubclass(ClientClosedError, RLAIFVError)


async def test_a_closed_async_client_says_so() -> None:
    from rlaifv_client import ClientClosedError

    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"status": "ok"})))
    async with AsyncClient(base_url="http://svc", http_client=http) as client:
        assert (await client.health()).ok
    with pytest.raises(ClientClosedError, match="client is closed"):
        await client.health()
    with pytest.raises(ClientClosedError, match="client is closed"):
        async for _ in client.jobs.results("j1"):
            pass
    owned = AsyncClient(base_url="http://svc")
    await owned.aclose()
    with pytest.raises(ClientClosedError, match="closed"):
        await owned.with_options(max_retries=0).models()


def test_messages_take_pydantic_models_such_as_an_openai_reply() -> None:
    """Users pass an OpenAI reply's message back in: it is dumped without its unset (None) fields."""
    import pydantic
    from openai.types.chat import ChatCompletionMessage

    class Message(pydantic.BaseModel):
        role: str
        content: str | list[dict[str, object]] | None = None
        name: str | None = None

    user = Message(role="user", content=[{"type": "image_url", "image_url": {"url": PNG}}])
    reply = ChatCompletionMessage(role="assistant", content="A cat.")
    body = best_of_n_body(messages=[user, reply, {"role": "user", "content": "Sure?"}])
    expected = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": expected}}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict"):
        best_of_n_body(messages=["hi"])  # type: ignore[list-item]


def test_images_beside_messages_are_refused_before_anything_is_sent() -> None:
    """The README said every method takes image= with messages=: the server refused it (400 `images`) after the
    SDK had read and sent the image."""
    messages = [{"role": "user", "content": "Describe the image."}]
    for given in ({"image": PNG}, {"images": [PNG]}):
        with pytest.raises(InvalidArgumentError, match="image_url parts") as refused:
            best_of_n_body(messages=messages, **given)
        assert refused.value.param == "images"
    assert "images" not in best_of_n_body(messages=messages, images=[])


# -- images: base64, schemes, long values, PIL modes ----------------------------------------


def test_bare_base64_is_an_image_as_in_messages() -> None:
    bare = base64.b64encode(PNG).decode()
    assert encode_image(bare) == bare
    assert best_of_n_body(image=bare, question="q")["images"] == [bare]
    assert encode_image("\n" + bare[:20] + "\n" + bare[20:]) == "\n" + bare[:20] + "\n" + bare[20:]


@pytest.mark.parametrize("value", ["ftp://example.org/a.png", "s3://bucket/a.png", "GS://bucket/a.png"])
def test_unsupported_url_schemes_are_named(value: str) -> None:
    scheme = value.split(":")[0].lower()
    with pytest.raises(ImageInputError, match=f"unsupported image URL scheme '{scheme}'"):
        encode_image(value)
    with pytest.raises(ImageInputError, match=f"unsupported image URL scheme '{scheme}'"):
        best_of_n_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": value}}]}])


@pytest.mark.parametrize("value", ["/data/img/000001", "images/batch7/0001", "abcdefghijklmnop"])
def test_a_missing_path_in_the_base64_alphabet_is_still_a_path(value: str) -> None:
    """It was sent as base64, to fail on the server (once per job item) with no word of a missing file."""
    with pytest.raises(ImageInputError, match="image file not found"):
        encode_image(value)


def test_a_drive_letter_is_a_path_not_a_scheme() -> None:
    with pytest.raises(ImageInputError, match="image file not found"):
        encode_image("C:\\no\\such\\cat.png")


@pytest.mark.parametrize(
    "value",
    ["/no/such/dir/" + "x" * 5000 + ".png", base64.b64encode(PNG * 20000).decode()[:-1], "?" * 10**6],
)
def test_image_errors_do_not_repeat_a_long_value(value: str) -> None:
    with pytest.raises(ImageInputError) as caught:
        encode_image(value)
    assert len(str(caught.value)) < 200 and "…" in str(caught.value)


@pytest.mark.parametrize(
    ("mode", "color", "stored", "pixel"),
    [("CMYK", (0, 0, 0, 0), "RGB", (255, 255, 255)), ("YCbCr", (255, 128, 128), "RGB", (255, 255, 255)),
     ("HSV", (0, 0, 255), "RGB", (255, 255, 255)),
     ("F", 200.7, "L", 200), ("F", -3.0, "L", 0), ("I", 1000, "I;16", 1000), ("I", -5, "I;16", 0),
     ("I", 2**28, "L", 16), ("I;16L", 700, "I;16", 700), ("RGBa", (10, 20, 30, 255), "RGBA", (10, 20, 30, 255)),
     ("La", (10, 255), "LA", (10, 255)), ("RGBX", (1, 2, 3, 0), "RGB", (1, 2, 3)),
     ("I;16", 1234, "I;16", 1234), ("LA", (5, 6), "LA", (5, 6)), ("1", 1, "1", 255)],
)  # fmt: skip
def test_pil_images_in_modes_png_cannot_store_are_converted(
    mode: str, color: object, stored: str, pixel: object
) -> None:
    """CMYK (not from a JPEG), float and 32-bit integer images become the PNG mode the server would read them as."""
    from PIL import Image

    url = encode_image(Image.new(mode, (2, 2), color))  # type: ignore[arg-type]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert (decoded.mode, decoded.getpixel((1, 1))) == (stored, pixel)


def test_a_pa_image_keeps_its_alpha() -> None:
    from PIL import Image

    image = Image.new("PA", (2, 2))
    image.putpalette([0, 0, 0, 9, 8, 7])
    image.putpixel((0, 0), (1, 100))
    decoded = Image.open(io.BytesIO(base64.b64decode(encode_image(image).split(",", 1)[1])))
    assert decoded.convert("RGBA").getpixel((0, 0)) == (9, 8, 7, 100)


# -- copies ---------------------------------------------------------------------------------


def test_a_shallow_copy_is_a_with_options_sibling() -> None:
    """`copy.copy` shares the pool without owning it and has its own `jobs`: closing either leaves the other working."""
    import copy

    seen: list[httpx.Request] = []
    original = _recording_client(seen, max_retries=0)
    sibling = copy.copy(original)
    assert type(sibling) is Client and sibling.max_retries == 0 and sibling.api_key == "sk-sdk"
    original.close()
    sibling.jobs.get("j1")  # through the sibling, not the closed original
    assert sibling.jobs is not original.jobs and len(seen) == 1
    with Client(base_url="http://svc") as owner:  # owns its pool: a copy's close() must leave it open
        copy.copy(owner).close()
        assert not owner._http.is_closed


async def test_a_shallow_copy_of_an_async_client_is_a_with_options_sibling() -> None:
    import copy

    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"status": "ok"})))
    original = AsyncClient(base_url="http://svc", http_client=http)
    sibling = copy.copy(original)
    assert type(sibling) is AsyncClient and sibling.jobs._client is sibling
    await original.aclose()
    assert (await sibling.health()).ok
    async with AsyncClient(base_url="http://svc") as owner:
        await copy.copy(owner).aclose()
        assert not owner._http.is_closed


@pytest.mark.parametrize(
    "make", [lambda: Client(base_url="http://svc"), lambda: AsyncClient(base_url="http://svc")], ids=["sync", "async"]
)
def test_pickling_or_deep_copying_a_client_says_what_to_do_instead(make: Any) -> None:
    """A connection pool cannot cross processes, and a deep copy could only share it: refused by name."""
    import copy
    import pickle

    client = make()
    for attempt in (
        lambda: pickle.dumps(client),
        lambda: copy.deepcopy(client),
        lambda: copy.deepcopy({"config": 1, "client": client}),
        lambda: pickle.dumps(client.jobs),
    ):
        with pytest.raises(TypeError, match=rf"{type(client).__name__} cannot be pickled.*with_options\(\)"):
            attempt()


# -- arguments refused before sending ------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "param"),
    [({"temperature": float("inf")}, "sampling.temperature"), ({"beta": float("nan")}, "reward.beta"),
     ({"top_p": float("-inf")}, "sampling.top_p"), ({"repeat_penalty": float("nan")}, "reward.repeat_penalty"),
     ({"messages": [{"role": "user", "content": "q", "weight": float("nan")}]}, "messages[0].weight")],
)  # fmt: skip
async def test_numbers_json_cannot_carry_are_refused_by_name(arguments: dict[str, Any], param: str) -> None:
    """NaN and infinity: httpx would fail at send time with "Out of range float values", naming no argument."""
    seen: list[httpx.Request] = []
    prompt = {"question": "q"} if "messages" not in arguments else {}
    with _recording_client(seen) as client:
        calls = [
            (lambda: client.best_of_n(**prompt, **arguments), param, param),
            (lambda: client.jobs.submit([{**prompt, "n": 2}, {**prompt, **arguments}]), f"items[1].{param}",
             f"items[1] of a 'best_of_n' job: {param}"),
        ]  # fmt: skip
        if not param.startswith("sampling."):
            calls.append((lambda: client.score(**prompt, **arguments, answers=["a"]), param, param))
        for call, path, start in calls:
            with pytest.raises(InvalidArgumentError, match="must be a finite number, got") as caught:
                call()
            assert caught.value.param == path and str(caught.value).startswith(start), caught.value
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(500)))
    async with AsyncClient(base_url="http://svc", http_client=http) as aclient:
        with pytest.raises(InvalidArgumentError) as caught:
            await aclient.best_of_n(**prompt, **arguments)
        assert caught.value.param == param
        with pytest.raises(InvalidArgumentError) as caught:
            await aclient.jobs.submit([{**prompt, **arguments}])
        assert caught.value.param == f"items[0].{param}"
    assert seen == []


def test_an_image_a_job_item_cannot_read_is_named_by_its_item(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match=r"^items\[1\] of a 'rewards' job: image file not found") as caught:
        job_body("rewards", [{"answers": ["a"]}, {"image": tmp_path / "gone.png", "answers": ["a"]}], None)
    assert caught.value.param == "items[1]"


# -- job items -------------------------------------------------------------------------------


def test_a_job_items_unknown_or_missing_keys_are_named_as_keys() -> None:
    """Not as keyword arguments of an internal builder ("prompt_body() got an unexpected keyword argument")."""
    with pytest.raises(TypeError, match=r"^items\[0\] of a 'best_of_n' job: unknown key 'bogus' \(known: ") as caught:
        job_body("best_of_n", [{"question": "q", "bogus": 1}], None)
    known = str(caught.value).split("(known: ", 1)[1].rstrip(")").split(", ")
    assert {"question", "images", "temperature", "seed", "beta", "custom_id"} <= set(known) and known == sorted(known)
    assert "answers" not in known and "timeout" not in known and "prompt_body" not in str(caught.value)
    with pytest.raises(TypeError, match=r"^items\[1\] of a 'rewards' job: unknown keys 'n', 'timeout' \(known: "):
        job_body("rewards", [{"question": "q", "answers": ["a"]}, {"answers": ["a"], "n": 2, "timeout": 3}], None)
    with pytest.raises(TypeError, match=r"^items\[0\] of a 'rewards' job: missing key 'answers'$"):
        job_body("rewards", [{"question": "q"}], None)
    with pytest.raises(TypeError, match=r"^items\[0\] of a 'rewards' job: answers= takes a list of strings"):
        job_body("rewards", [{"question": "q", "answers": "one"}], None)
    body = job_body("rewards", [{"question": "q", "answers": ["a"], "custom_id": 7, "beta": 0.5}], None)
    assert body["items"] == [{"custom_id": "7", "body": {"question": "q", "reward": {"beta": 0.5}, "answers": ["a"]}}]


# -- object fields ----------------------------------------------------------------------------


def test_an_object_name_a_newer_server_uses_parses() -> None:
    """`object` is an open enum like the others: a renamed object type does not fail the whole response."""
    from rlaifv_client import types

    reward = {"mode": "dpo", "beta": 0.1, "normalize": "mean"}
    candidate = {"index": 0, "text": "a", "reward": 0.0, "implicit_reward": 0.0, "policy_logprob": -1.0,
                 "reference_logprob": -1.0, "num_tokens": 1, "finish_reason": "stop"}  # fmt: skip
    common = {"id": "r", "created": 1, "model": "m", "best_index": 0, "candidates": [candidate], "reward": reward,
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
              "timings": {"queue_s": 0, "score_s": 0, "total_s": 0}}  # fmt: skip
    job = {"id": "j", "kind": "rewards", "status": "queued", "created": 1, "updated": 1, "total": 1, "completed": 0,
           "failed": 0}  # fmt: skip
    assert types.BestOfN.model_validate(common | {"object": "best_of_n.v2", "best": candidate}).object == "best_of_n.v2"
    assert types.Rewards.model_validate(common | {"object": "rewards.v2", "rewards": [0.0]}).object == "rewards.v2"
    model = {"id": "m", "object": "model.v2", "created": 1, "reward": reward}
    models = types.ModelList.model_validate({"object": "page", "data": [model]})
    assert (models.object, models.data[0].object) == ("page", "model.v2")
    jobs = types.JobList.model_validate({"object": "page", "data": [job | {"object": "batch"}], "has_more": False})
    assert (jobs.object, jobs.data[0].object) == ("page", "batch")
    results = types.JobResultList.model_validate({"id": "j", "object": "page", "status": "running", "data": []})
    assert results.object == "page"
    assert types.Job.model_validate(job).object == "job" and types.Model.model_validate(model).object == "model.v2"
    item = types.JobResult.model_validate({"index": 0, "status": "succeeded", "result": common | {"best": candidate}})
    assert type(item.result) is types.BaseType  # no object name: a kind this SDK cannot tell
    item = types.JobResult.model_validate({"index": 0, "status": "succeeded", "result": common | {
        "object": "best_of_n", "best": candidate}})  # fmt: skip
    assert type(item.result) is types.BestOfN
