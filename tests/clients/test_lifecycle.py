"""The SDK against a server in its life cycle: loading (`rlaifv serve` answers 503 `not_ready` while its model loads),
ready, rate limiting past the caller's timeout, gone and back.

A call's timeout bounds it as a whole, retries and their waits included; a loading server is waited out within
it (not counted against `max_retries`: the server used to hold the connection until loaded, and such calls
succeeded); a wait the server asks for that would end past it fails at once, saying so. `wait_until_ready` polls
/readyz. The unit tests run on a fake clock; the last ones on the real app loading in the background.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import rlaifv_client
from rlaifv.testing.server import free_port
from rlaifv_client import AsyncClient, Backoff, Client, RateLimitError, ServerError, WaitTimeoutError

from .conftest import LIMITS, QUESTION
from .test_unit import fake_clock

NOT_READY = {"error": {"message": "the model is not loaded yet", "type": "service_unavailable", "code": "not_ready"}}
RATE_LIMITED = {"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "code": "rate_limited"}}
MODELS = {"object": "list", "data": []}


def not_ready(retry_after: str = "5") -> httpx.Response:
    return httpx.Response(503, json=NOT_READY, headers={"Retry-After": retry_after})


def scripted(answers: list[Callable[[], httpx.Response]], seen: list[tuple[float, httpx.Request]], clock: list[float]):
    """A handler answering `answers` in turn (the last one for ever), recording each request with the fake time."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((clock[0], request))
        return answers[min(len(seen) - 1, len(answers) - 1)]()

    return handler


# -- a loading server is waited out within the call's timeout ---------------------------------------------


def test_a_loading_server_is_waited_out_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten 503 not_ready (Retry-After 5) then 200: the default 2 retries no longer end the call after 10 s (they
    did: a call made while `rlaifv serve` loads failed, where the server that held the connection served it)."""
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []
    answers = [not_ready] * 10 + [lambda: httpx.Response(200, json=MODELS)]
    http = httpx.Client(transport=httpx.MockTransport(scripted(answers, seen, clock)))
    with Client(base_url="http://svc", http_client=http, backoff=Backoff(jitter=0)) as client:
        assert client.models().data == []
    assert slept == [5.0] * 10 and len(seen) == 11
    reads = [request.extensions["timeout"]["read"] for _, request in seen]
    assert reads == [180.0 - 5.0 * i for i in range(11)]  # each retry gets what is left of the call's 180 s
    assert {request.headers["x-request-id"] for _, request in seen} == {seen[0][1].headers["x-request-id"]}


async def test_a_loading_server_is_waited_out_within_the_timeout_async(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []
    answers = [not_ready] * 4 + [lambda: httpx.Response(200, json=MODELS)]
    http = httpx.AsyncClient(transport=httpx.MockTransport(scripted(answers, seen, clock)))
    async with AsyncClient(base_url="http://svc", http_client=http, backoff=Backoff(jitter=0)) as client:
        assert (await client.models()).data == []
    assert slept == [5.0] * 4 and len(seen) == 5


def test_a_server_still_loading_at_the_deadline_fails_then_naming_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never past the call's 12 s: the attempts at 0, 5 and 10 s, then the error, not a sleep to 15 s."""
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []
    http = httpx.Client(transport=httpx.MockTransport(scripted([not_ready], seen, clock)))
    with (
        Client(base_url="http://svc", http_client=http, timeout=12, max_retries=10, backoff=Backoff(jitter=0)) as c,
        pytest.raises(ServerError) as caught,
    ):
        c.score(question=QUESTION, answers=["a"])
    assert [at for at, _ in seen] == [100.0, 105.0, 110.0] and slept == [5.0, 5.0] and clock[0] == 110.0
    assert caught.value.code == "not_ready"
    assert caught.value.note == (
        "not retried: the server asked to retry after 5 s (Retry-After), past this call's timeout of 12 s "
        "(2.0 s left after 3 attempts, and a retry needs 1 s after its wait)"
    )


def test_a_retry_with_too_little_time_left_after_its_wait_is_not_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Retry-After of 9 s with 10 s left: the retry would have had 0.01 s and failed as a timeout, hiding the
    server's 503; it needs a second (a quarter of a shorter timeout) after its wait."""
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []
    busy = lambda: httpx.Response(503, headers={"Retry-After": "9.5"}, json={"error": {"code": "queue_full"}})  # noqa: E731
    http = httpx.Client(transport=httpx.MockTransport(scripted([busy], seen, clock)))
    with (
        Client(base_url="http://svc", http_client=http, timeout=10, max_retries=3, backoff=Backoff(jitter=0)) as c,
        pytest.raises(ServerError) as caught,
    ):
        c.score(question=QUESTION, answers=["a"])
    assert len(seen) == 1 and slept == []
    assert caught.value.status_code == 503 and "a retry needs 1 s after its wait" in (caught.value.note or "")
    assert str(caught.value).endswith(caught.value.note)


def test_without_retries_or_a_timeout_a_loading_server_counts_as_any_503(monkeypatch: pytest.MonkeyPatch) -> None:
    """`max_retries=0` still means one attempt; `timeout=None` has no deadline to wait up to: the count holds."""
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []
    http = httpx.Client(transport=httpx.MockTransport(scripted([not_ready], seen, clock)))
    with Client(base_url="http://svc", http_client=http, backoff=Backoff(jitter=0)) as client:
        with pytest.raises(ServerError) as caught:
            client.with_options(max_retries=0).models()
        assert len(seen) == 1 and caught.value.note is None and slept == []
        with pytest.raises(ServerError) as caught:
            client.with_options(timeout=None).models()
        assert len(seen) == 4 and caught.value.note == "gave up after 3 attempts in 10.0 s"


# -- a wait past the caller's deadline is not slept -------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["30", "600"])  # within the 60 s cap, and past it
def test_a_429_asking_for_longer_than_the_timeout_left_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, retry_after: str
) -> None:
    """A rate limit lifting in 30 s, for a call with 10 s: it slept 30 s (capped at 60) past the caller's deadline
    and tried again; now it raises at once, the error naming the wait and the timeout."""
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []
    limited = lambda: httpx.Response(429, json=RATE_LIMITED, headers={"Retry-After": retry_after})  # noqa: E731
    http = httpx.Client(transport=httpx.MockTransport(scripted([limited], seen, clock)))
    with (
        Client(base_url="http://svc", http_client=http, timeout=10, max_retries=5) as client,
        pytest.raises(RateLimitError) as caught,
    ):
        client.score(question=QUESTION, answers=["a"])
    assert slept == [] and len(seen) == 1
    assert caught.value.retry_after == float(retry_after)
    assert f"the server asked to retry after {retry_after} s (Retry-After), past this call's timeout of 10 s" in str(
        caught.value
    )


async def test_a_429_asking_for_longer_than_the_timeout_left_fails_at_once_async(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []
    limited = lambda: httpx.Response(429, json=RATE_LIMITED, headers={"Retry-After": "3"})  # noqa: E731
    http = httpx.AsyncClient(transport=httpx.MockTransport(scripted([limited], seen, clock)))
    async with AsyncClient(base_url="http://svc", http_client=http, timeout=5, max_retries=5) as client:
        with pytest.raises(RateLimitError) as caught:
            await client.models()
    assert 3.0 <= slept[0] <= 3.75 and len(seen) == 2  # the first wait fits in 5 s, the second does not
    assert "past this call's timeout of 5 s" in str(caught.value)


def test_backoff_that_would_pass_the_deadline_is_not_slept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection refused again and again, backoff 2, 4, 8 s, in a 10 s call: tries at 0, 2 and 6 s only."""
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []

    def refuse() -> httpx.Response:
        raise httpx.ConnectError("refused", request=seen[-1][1])

    http = httpx.Client(transport=httpx.MockTransport(scripted([refuse], seen, clock)))
    backoff = Backoff(initial=2, max=8, jitter=0)
    with (
        Client(base_url="http://svc", http_client=http, timeout=10, max_retries=9, backoff=backoff) as client,
        pytest.raises(rlaifv_client.APIConnectionError) as caught,
    ):
        client.models()
    assert [at for at, _ in seen] == [100.0, 102.0, 106.0] and slept == [2.0, 4.0]
    assert "the next retry was due in 8 s, past this call's timeout of 10 s (4.0 s left" in str(caught.value)


# -- wait_until_ready ---------------------------------------------------------------------------------------


def test_wait_until_ready_polls_through_every_start_up_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not listening yet, an ingress's 502 page, the server loading, then ready: one poll a second, no retries."""
    clock, slept = fake_clock(monkeypatch)
    seen: list[tuple[float, httpx.Request]] = []

    def refuse() -> httpx.Response:
        raise httpx.ConnectError("refused", request=seen[-1][1])

    loading = {"status": "unavailable", "checks": {"model": "loading", "redis": "ok"}}
    answers = [
        refuse,
        lambda: httpx.Response(502, text="<html>bad gateway</html>"),
        lambda: httpx.Response(503, json=loading),
        lambda: httpx.Response(200, json={"status": "ok", "checks": {"model": "ok"}}),
    ]
    http = httpx.Client(transport=httpx.MockTransport(scripted(answers, seen, clock)))
    with Client(base_url="http://svc", http_client=http) as client:
        health = client.wait_until_ready(timeout=30)
    assert health.ok and [at for at, _ in seen] == [100.0, 101.0, 102.0, 103.0] and slept == [1.0] * 3
    assert {request.url.path for _, request in seen} == {"/readyz"}
    assert [request.extensions["timeout"]["read"] for _, request in seen] == [30.0, 29.0, 28.0, 27.0]


async def test_wait_until_ready_gives_up_at_its_deadline_naming_what_is_awaited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock, _ = fake_clock(monkeypatch)
    loading = {"status": "unavailable", "checks": {"model": "loading", "redis": "ok"}}
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(503, json=loading)))
    async with AsyncClient(base_url="http://svc", http_client=http) as client:
        with pytest.raises(WaitTimeoutError, match=r"^server http://svc/ not ready within 5 s \(model: loading\)$"):
            await client.wait_until_ready(timeout=5, poll_interval=2)
    assert clock[0] == 105.0


def test_wait_until_ready_raises_what_polling_again_cannot_mend() -> None:
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404, json={"detail": "Not Found"})))
    with Client(base_url="http://svc/rlaifv", http_client=http) as client, pytest.raises(rlaifv_client.NotFoundError):
        client.wait_until_ready(timeout=5)
    with pytest.raises(ValueError, match="poll_interval"):
        Client(base_url="http://svc").wait_until_ready(poll_interval=0)


# -- the real server, loading in the background as `rlaifv serve` runs it ----------------------------------


class LoadingServer:
    """`create_app(load_in_background=True)` under uvicorn (the stack `rlaifv serve` runs): it answers at once, and
    its model load waits for `release`."""

    def __init__(self, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import uvicorn

        from rlaifv.service import engines
        from rlaifv.service.app import create_app
        from rlaifv.service.serve_cli import HTTP_OPTIONS
        from rlaifv.service.settings import Settings

        self.release, load = threading.Event(), engines.load_engine

        def gated_load(*args: Any, **kwargs: Any) -> Any:
            self.release.wait(timeout=120)
            return load(*args, **kwargs)

        monkeypatch.setattr(engines, "load_engine", gated_load)
        port = free_port()
        settings = Settings(bundle=bundle, host="127.0.0.1", port=port, torch_threads=1, **LIMITS)
        self.app = create_app(settings, load_in_background=True)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_config=None, **HTTP_OPTIONS)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> LoadingServer:
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the server did not start"
            self.release.wait(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def loading_server(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoadingServer]:
    with LoadingServer(tiny_bundle, monkeypatch) as live:
        yield live


def release_after(server: LoadingServer, answers: int, seen: list[int]) -> dict[str, list[Any]]:
    """Event hooks that let the model load once the client has had `answers` 503s: the client's waiting, not a
    timer, decides the outcome."""

    def on_response(response: httpx.Response) -> None:
        seen.append(response.status_code)
        if seen.count(503) >= answers:
            server.release.set()

    return {"response": [on_response]}


@pytest.mark.integration
@pytest.mark.slow
def test_a_call_made_while_the_server_loads_succeeds_once_it_is_ready(
    loading_server: LoadingServer, red_png: bytes
) -> None:
    """Three 503 not_ready (more than the 2 retries) before the model loads: the call still succeeds."""
    seen: list[int] = []
    http = httpx.Client(event_hooks=release_after(loading_server, 3, seen), timeout=60)
    fast = Backoff(initial=0.05, max=0.2, max_retry_after=0.2)  # the server's Retry-After (5 s), cut for the test
    with Client(base_url=loading_server.url, http_client=http, backoff=fast) as client:
        assert client.ready().checks["model"] == "loading"
        seen.clear()
        result = client.score(image=red_png, question=QUESTION, answers=["a", "b"])
    assert len(result.rewards) == 2 and seen[:3] == [503, 503, 503] and seen[-1] == 200


@pytest.mark.integration
@pytest.mark.slow
async def test_wait_until_ready_returns_once_the_model_has_loaded(loading_server: LoadingServer) -> None:
    seen: list[int] = []

    async def on_response(response: httpx.Response) -> None:
        release_after(loading_server, 2, seen)["response"][0](response)

    http = httpx.AsyncClient(event_hooks={"response": [on_response]}, timeout=60)
    async with AsyncClient(base_url=loading_server.url, http_client=http) as client:
        health = await asyncio.wait_for(client.wait_until_ready(timeout=120, poll_interval=0.05), timeout=150)
        models = await client.models()
    assert health.ok and seen.count(503) >= 2 and models.data[0].id
