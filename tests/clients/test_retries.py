"""Retries against real servers: a queue bound of 1 under concurrent load (429 + Retry-After), a server without its
model (503), nothing listening (connection refused), a socket that never answers (timeout), and bad input (no retry).

Every attempt is observed with httpx event hooks on the client's own connection pool.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from rlaifv.testing.server import free_port
from rlaifv_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    Backoff,
    Client,
    InvalidRequestError,
    RateLimitError,
    ServerError,
)

from .conftest import API_KEY, QUESTION

pytestmark = pytest.mark.integration

# Honour the server's Retry-After (1 s here) exactly as in production; only the exponential part is shortened.
FAST = Backoff(initial=0.05, max=0.2)


@dataclass
class Attempt:
    request_id: str
    number: int
    sent: float
    status: int | None = None
    answered: float | None = None


class AttemptLog:
    """Records every attempt the client makes: request id, retry number, status, send/answer times."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()

    def on_request(self, request: httpx.Request) -> None:
        attempt = Attempt(
            request.headers["x-request-id"], int(request.headers["x-rlaifv-retry-count"]), time.monotonic()
        )
        with self._lock:
            self.attempts.append(attempt)

    def on_response(self, response: httpx.Response) -> None:
        request = response.request
        with self._lock:
            for attempt in reversed(self.attempts):
                if attempt.request_id == request.headers["x-request-id"] and attempt.status is None:
                    attempt.status, attempt.answered = response.status_code, time.monotonic()
                    break

    def sync_hooks(self) -> dict[str, list[Any]]:
        return {"request": [self.on_request], "response": [self.on_response]}

    def async_hooks(self) -> dict[str, list[Any]]:
        async def on_request(request: httpx.Request) -> None:
            self.on_request(request)

        async def on_response(response: httpx.Response) -> None:
            self.on_response(response)

        return {"request": [on_request], "response": [on_response]}

    def by_call(self) -> dict[str, list[Attempt]]:
        calls: dict[str, list[Attempt]] = defaultdict(list)
        for attempt in self.attempts:
            calls[attempt.request_id].append(attempt)
        return calls

    @property
    def statuses(self) -> list[int | None]:
        return [a.status for a in self.attempts]


def check_retried_calls(log: AttemptLog, *, retry_status: int, min_wait: float) -> None:
    """Each call: attempts numbered 0..k under one request id, all but the last answered `retry_status`,
    the last 200, and each retry sent at least `min_wait` after the rejection (Retry-After honoured)."""
    for attempts in log.by_call().values():
        assert [a.number for a in attempts] == list(range(len(attempts)))
        assert [a.status for a in attempts] == [retry_status] * (len(attempts) - 1) + [200]
        for rejected, retry in itertools.pairwise(attempts):
            assert retry.sent - rejected.answered >= min_wait


def test_429_under_load_is_retried_honouring_retry_after_sync(busy_server: Any, red_png: bytes) -> None:
    log = AttemptLog()
    http = httpx.Client(event_hooks=log.sync_hooks(), timeout=60)
    with Client(base_url=busy_server.url, max_retries=20, backoff=FAST, http_client=http) as client:

        def one(seed: int) -> Any:
            return client.best_of_n(image=red_png, question=QUESTION, n=8, max_tokens=16, seed=seed)

        with ThreadPoolExecutor(max_workers=5) as pool:
            results = list(pool.map(one, range(5)))
    http.close()
    assert all(len(r.candidates) == 8 for r in results)
    assert len(log.by_call()) == 5
    assert log.statuses.count(429) >= 1, log.statuses
    check_retried_calls(log, retry_status=429, min_wait=0.99)


async def test_429_under_load_is_retried_honouring_retry_after_async(busy_server: Any, red_png: bytes) -> None:
    log = AttemptLog()
    http = httpx.AsyncClient(event_hooks=log.async_hooks(), timeout=60)
    async with AsyncClient(base_url=busy_server.url, max_retries=20, backoff=FAST, http_client=http) as client:
        calls = [client.best_of_n(image=red_png, question=QUESTION, n=8, max_tokens=16, seed=i) for i in range(6)]
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=90)
    await http.aclose()
    assert [len(r.candidates) for r in results] == [8] * 6
    assert log.statuses.count(429) >= 1, log.statuses
    check_retried_calls(log, retry_status=429, min_wait=0.99)


async def test_429_without_retries_raises_rate_limit_error(busy_server: Any, red_png: bytes) -> None:
    async with AsyncClient(base_url=busy_server.url, max_retries=0) as client:
        calls = [client.best_of_n(image=red_png, question=QUESTION, n=8, max_tokens=16, seed=i) for i in range(6)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert errors and all(isinstance(e, RateLimitError) for e in errors), errors
    assert {(e.status_code, e.code, e.retry_after) for e in errors} == {(429, "queue_full", 1.0)}


def test_503_while_the_model_is_away_is_retried(busy_server: Any, red_png: bytes) -> None:
    """The real server answers 503 (Retry-After: 5) while it has no model; the client waits (cap 1 s) and succeeds."""
    state = busy_server.app.state
    serving = state.serving
    log = AttemptLog()

    def model_back_after_first_503(response: httpx.Response) -> None:
        """The model comes back once the client has seen the 503: the retry, not a timer, decides the outcome."""
        log.on_response(response)
        if response.status_code == 503 and log.attempts[0].request_id == response.request.headers["x-request-id"]:
            state.serving = serving

    hooks = {"request": [log.on_request], "response": [model_back_after_first_503]}
    with Client(
        base_url=busy_server.url,
        max_retries=3,
        backoff=Backoff(initial=0.05, max=0.2, max_retry_after=1.0),
        http_client=httpx.Client(event_hooks=hooks, timeout=60),
    ) as client:
        state.serving = None
        try:
            with pytest.raises(ServerError) as info:
                client.with_options(max_retries=0).score(image=red_png, question=QUESTION, answers=["a"])
            assert (info.value.status_code, info.value.code) == (503, "not_ready")
            state.serving = None
            log.attempts.clear()
            result = client.score(image=red_png, question=QUESTION, answers=["a"])
        finally:
            state.serving = serving
    assert len(result.rewards) == 1
    assert log.statuses == [503, 200]
    check_retried_calls(log, retry_status=503, min_wait=0.99)


def test_connection_refused_is_retried_then_raises() -> None:
    log = AttemptLog()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with (
        Client(base_url=url, max_retries=2, backoff=FAST, http_client=httpx.Client(event_hooks=log.sync_hooks())) as c,
        pytest.raises(APIConnectionError) as info,
    ):
        c.health()
    assert not isinstance(info.value, APITimeoutError)
    assert [a.number for a in log.attempts] == [0, 1, 2]
    assert len(log.by_call()) == 1


async def test_a_timeout_ends_the_call_at_its_timeout() -> None:
    """The call's timeout bounds it, retries included: the attempt that spent it is not retried past it (it was,
    each retry taking the whole timeout again); a timeout with time left is retried (tests/clients/test_unit.py)."""
    import rlaifv_client

    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        log = AttemptLog()
        http = httpx.AsyncClient(event_hooks=log.async_hooks())
        async with AsyncClient(base_url=url, timeout=0.3, max_retries=1, backoff=FAST, http_client=http) as client:
            with pytest.raises(rlaifv_client.TimeoutError) as info:
                await client.models()
        await http.aclose()
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, APIConnectionError)
    assert [a.number for a in log.attempts] == [0]
    assert "past this call's timeout of 0.3 s" in str(info.value)


def test_other_4xx_are_never_retried(server: Any, red_png: bytes) -> None:
    log = AttemptLog()
    http = httpx.Client(event_hooks=log.sync_hooks())
    with Client(base_url=server.url, api_key=API_KEY, max_retries=5, backoff=FAST, http_client=http) as client:
        with pytest.raises(InvalidRequestError):
            client.best_of_n(image=red_png, question=QUESTION, n=100)
        with pytest.raises(AuthenticationError):
            client.with_options(api_key="").models()
    assert log.statuses == [400, 401]
