"""The vllm engine under faults, against fakes of vLLM (no server): a malformed answer is a 502 naming the server,
never a 500; a failed call cancels its request's other calls; a server that stops answering without closing its
connections (SIGSTOP, a lost host) is found down by its /health, its requests end with 503 within the documented
bound and the next ones fail at once, until /health answers again, while a busy server whose /health is slow is
never down; one request is bounded as a whole. The timing tests run in virtual time (looptime).
`tests/service/test_vllm_engine.py` kills and pauses real vLLM servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlaifv.reward.sampling import SamplingParams
from rlaifv.service.engines.base import GenerateRequest, ScoreRequest
from rlaifv.service.engines.vllm import VllmEngine
from rlaifv.service.errors import BadGateway, EngineUnavailable
from rlaifv.service.metrics import Metrics
from rlaifv.service.settings import Settings
from rlaifv.testing.tiny_text import build_tiny_text_bundle

Handler = Callable[[httpx.Request], Any]


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_text_bundle(tmp_path_factory.mktemp("faults") / "bundle")


def vllm(request: httpx.Request) -> httpx.Response:
    """/v1/completions as vLLM answers it: one token (id 7, log-prob -1) per sample, -1 at every prompt position."""
    body = json.loads(request.content)
    if body.get("prompt_logprobs") is not None:
        choices = [
            {"index": i, "prompt_logprobs": [None, *({str(t): {"logprob": -1.0}} for t in prompt[1:])]}
            for i, prompt in enumerate(body["prompt"])
        ]
    else:
        sample = {"tokens": ["token_id:7"], "token_logprobs": [-1.0], "top_logprobs": None}
        choices = [{"index": i, "text": "", "stop_reason": None, "logprobs": sample} for i in range(body["n"])]
    return httpx.Response(200, json={"choices": choices})


def healthy(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200)


def _engine(bundle: Path, policy: Handler, reference: Handler = vllm, health: Handler = healthy, **settings: Any):
    engine = VllmEngine(
        bundle,
        Settings(
            bundle=bundle,
            engine="vllm",
            vllm_policy_url="http://policy:1/v1",
            vllm_reference_url="http://ref:2/v1",
            **settings,
        ),
        Metrics(),
    )
    for server, handler in ((engine.policy, policy), (engine.reference, reference)):
        server.model = server.role
        server._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        server._probe_client = httpx.AsyncClient(transport=httpx.MockTransport(health))
    return engine


def _errors(engine: VllmEngine, reason: str) -> float:
    metrics = engine.policy.metrics
    assert metrics is not None
    return sum(
        s.value
        for m in metrics.vllm_errors.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["reason"] == reason
    )


def _requests(engine: VllmEngine, **sampling: Any) -> dict[str, GenerateRequest | ScoreRequest]:
    return {
        "generate": GenerateRequest([], "q", None, 2, SamplingParams(max_tokens=4, **sampling), engine.reward),
        "score": ScoreRequest([], "q", None, ["a red circle", "yes"], engine.reward, 8),
    }


def _choices(mutate: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], Any]:
    def broken(data: dict[str, Any]) -> Any:
        for choice in data["choices"]:
            mutate(choice)
        return data

    return broken


def _entries(value: Any) -> Callable[[dict[str, Any]], None]:
    """Every prompt_logprobs position's entry for its token replaced by `value`."""

    def mutate(choice: dict[str, Any]) -> None:
        if choice.get("prompt_logprobs"):
            choice["prompt_logprobs"] = [None, *({k: value for k in e} for e in choice["prompt_logprobs"][1:])]

    return mutate


@pytest.mark.parametrize(
    ("server", "kind", "answer"),
    [
        ("policy", "generate", lambda data: {"choices": [1, "x"]}),
        ("policy", "generate", _choices(lambda c: c.update(logprobs="none"))),
        ("policy", "generate", _choices(lambda c: c["logprobs"].update(token_logprobs=[None]))),
        ("policy", "generate", _choices(lambda c: c["logprobs"].update(top_logprobs=[{"token_id:7": "x"}]))),
        ("reference", "generate", _choices(_entries("abc"))),
        ("reference", "score", _choices(lambda c: c.update(prompt_logprobs={"a": 1}))),
        ("policy", "score", _choices(_entries({"rank": 1}))),
        ("policy", "score", lambda data: {"choices": [{"index": "0"}, {"index": 1}]}),
    ],
)
async def test_a_malformed_answer_is_a_502_naming_the_server(
    text_bundle: Path, server: str, kind: str, answer: Callable[[dict[str, Any]], Any]
) -> None:
    """A 2xx whose choices are of the wrong shape (not objects, a null log-prob, a string where a number goes) was
    read as if well formed: a TypeError or AttributeError became a 500 with a traceback."""

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answer(json.loads(vllm(request).content)))

    handlers = {"policy": vllm, "reference": vllm, server: broken}
    engine = _engine(text_bundle, handlers["policy"], handlers["reference"])
    [result] = await engine.run([_requests(engine)[kind]])
    await engine.aclose()
    assert isinstance(result, BadGateway), repr(result)
    assert result.code == "engine_error" and f"vLLM {server} server" in result.message
    assert _errors(engine, "bad_response") == 1


@pytest.mark.parametrize("kind", ["generate", "score"])
async def test_a_failed_call_cancels_the_other_calls_of_its_request(text_bundle: Path, kind: str) -> None:
    """The policy failed while the reference still scored: the client had its 503, and the reference's request ran on
    (up to RLAIFV_VLLM_TIMEOUT_S, holding a connection and vLLM's work) for an answer no one read."""
    held, cancelled = asyncio.Event(), asyncio.Event()

    async def reference(request: httpx.Request) -> httpx.Response:
        held.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    async def policy(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("prompt_logprobs") is None:
            data = json.loads(vllm(request).content)  # samples cut by the stop string: the policy scores them too
            for choice in data["choices"]:
                choice.update(stop_reason="x", text="a")
            return httpx.Response(200, json=data)
        await held.wait()
        return httpx.Response(500, json={"error": {"message": "EngineCore encountered an issue"}})

    engine = _engine(text_bundle, policy, reference)
    request = _requests(engine, stop=["x"])[kind]
    [result] = await asyncio.wait_for(engine.run([request]), 30)  # a guard: the reference never answers
    assert isinstance(result, EngineUnavailable) and "policy" in result.message, repr(result)
    assert cancelled.is_set()  # closed by the time the client has its answer
    await engine.aclose()


class Pausable:
    """A vLLM server that can be paused (SIGSTOP: connections accepted by the kernel, nothing answered) and resumed
    (SIGCONT: what it held is answered then). Requests take `work_s`, /health `health_s`; `sent` counts requests."""

    def __init__(self, work_s: float = 0.0, health_s: float = 0.0) -> None:
        self.work_s, self.health_s = work_s, health_s
        self.running = asyncio.Event()
        self.running.set()
        self.sent = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        health = request.url.path == "/health"
        if not health:
            self.sent += 1
        await self.running.wait()
        await asyncio.sleep(self.health_s if health else self.work_s)
        await self.running.wait()
        return httpx.Response(200) if health else httpx.Response(200, json={"choices": []})


@pytest.mark.looptime
@pytest.mark.parametrize("paused_after_s", [0.0, 7.0, 23.0])
async def test_a_paused_server_is_found_down_within_the_bound_and_used_again(
    text_bundle: Path, paused_after_s: float
) -> None:
    """SIGSTOP: connections open, no answers. Each request waited RLAIFV_VLLM_TIMEOUT_S (120 s; the request deadline,
    also 120 s, often came first: a 504), and so did every request after it. Now the request in flight ends at most
    WATCH_S + silent_s after the server stopped (20 s at the default timeout, docs/vllm.md), the next ones fail within
    PROBE_TIMEOUT_S without being sent, and the server is used again once it answers."""
    from rlaifv.service.engines.vllm import PROBE_TIMEOUT_S, WATCH_S

    fake = Pausable(work_s=60)
    engine = _engine(text_bundle, fake, health=fake)
    server, loop = engine.policy, asyncio.get_running_loop()
    assert server.timeout_s == 120 and server.silent_s == 15
    start = loop.time()
    loop.call_later(paused_after_s, fake.running.clear)
    with pytest.raises(EngineUnavailable, match=r"stopped answering \(no answer to /health for 15 s\)") as down:
        await server.complete({"prompt": [1]})
    found = loop.time() - start - paused_after_s
    assert server.silent_s <= found <= WATCH_S + server.silent_s
    assert down.value.headers["Retry-After"].isdigit()
    start, before = loop.time(), fake.sent
    with pytest.raises(EngineUnavailable, match="is down"):  # one /health check, nothing sent
        await server.complete({"prompt": [1]})
    assert loop.time() - start <= PROBE_TIMEOUT_S and fake.sent == before
    assert (await engine.probe()).startswith("policy unavailable")
    assert _errors(engine, "down") == 2

    fake.running.set()  # SIGCONT, or a restart on the same port: used again without restarting the service
    fake.work_s = 0
    assert await server.complete({"prompt": [1]}) == {"choices": []}
    assert await engine.probe() == "ok"
    if server._watcher is not None:
        await server._watcher  # the watch ends with the last request: no task left behind
    assert server._watcher is None and not server._flights and not server._checks
    await engine.aclose()


@pytest.mark.looptime
@pytest.mark.parametrize("health_s", [2.5, 9.0])
async def test_a_slow_health_ends_no_request(text_bundle: Path, health_s: float) -> None:
    """A busy server (its API process preparing images for N requests) answers /health late while the work goes
    on: two checks past 2 s cut every request in flight with 503, and each next request failed whenever its own
    2 s check ran late too."""
    fake = Pausable(work_s=20, health_s=health_s)
    engine = _engine(text_bundle, fake, health=fake)
    server, loop = engine.policy, asyncio.get_running_loop()
    start = loop.time()
    results = await asyncio.gather(*(server.complete({"prompt": [i]}) for i in range(4)))
    assert results == [{"choices": []}] * 4 and loop.time() - start == pytest.approx(20)
    start = loop.time()
    assert await server.complete({"prompt": [1]}) == {"choices": []}
    assert loop.time() - start == pytest.approx(20) and server._down is None
    assert _errors(engine, "down") == 0
    await engine.aclose()


@pytest.mark.looptime
async def test_a_health_never_answered_is_no_failure_while_requests_are(text_bundle: Path) -> None:
    """The server answers requests (it is alive) while /health does not: only a server that answers nothing is
    down."""
    fake = Pausable(work_s=4)

    async def never(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    engine = _engine(text_bundle, fake, health=never)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 60:
        assert await engine.policy.complete({"prompt": [1]}) == {"choices": []}
    assert _errors(engine, "down") == 0
    await engine.aclose()


@pytest.mark.looptime
async def test_one_lost_health_check_ends_no_request(text_bundle: Path) -> None:
    """A check that never gets an answer (its connection lost) while the next ones do is not silence."""
    checks = [0]

    async def health(request: httpx.Request) -> httpx.Response:
        checks[0] += 1
        if checks[0] % 2:  # every other check gets no answer
            await asyncio.Event().wait()
        return httpx.Response(200)

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)  # a long best-of-N
        return httpx.Response(200, json={"choices": []})

    engine = _engine(text_bundle, slow, health=health)
    assert await engine.policy.complete({"prompt": [1]}) == {"choices": []}
    assert checks[0] >= 4
    await engine.aclose()


@pytest.mark.looptime
async def test_a_slow_readiness_probe_fails_no_request(text_bundle: Path) -> None:
    """/readyz may say not ready when /health is slow, but the server is not down for it: a probe that missed 2 s
    marked the server down, and the next request failed at once if its own check was slow too."""
    fake = Pausable(health_s=2.5)
    engine = _engine(text_bundle, fake, health=fake)
    loop = asyncio.get_running_loop()
    start = loop.time()
    state = await engine.probe()
    assert state.startswith("policy unavailable") and "no answer to /health within 2 s" in state
    assert loop.time() - start == pytest.approx(2)
    start = loop.time()
    assert await engine.policy.complete({"prompt": [1]}) == {"choices": []}
    assert loop.time() - start == 0  # not checked first: the server is not down
    assert engine.policy._down is None and _errors(engine, "down") == 0
    await engine.aclose()


@pytest.mark.looptime
@pytest.mark.parametrize("failure", ["refused", "http503"])
async def test_a_refused_or_failing_server_is_down_at_once(text_bundle: Path, failure: str) -> None:
    """A refused connection, or a /health other than 200 (vLLM's engine core died): the requests in flight end at
    the next check, new ones fail at once without being sent, and the server is used again when /health says 200."""
    from rlaifv.service.engines.vllm import RECHECK_S, WATCH_S

    broken, sent = [False], [0]

    async def requests(request: httpx.Request) -> httpx.Response:
        sent[0] += 1
        if broken[0] and failure == "refused":
            raise httpx.ConnectError("connection refused")
        await asyncio.sleep(60)
        return httpx.Response(200, json={"choices": []})

    def health(request: httpx.Request) -> httpx.Response:
        if not broken[0]:
            return httpx.Response(200)
        if failure == "refused":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(503)

    engine = _engine(text_bundle, requests, health=health)
    server, loop = engine.policy, asyncio.get_running_loop()
    start = loop.time()
    loop.call_later(1, broken.__setitem__, 0, True)
    with pytest.raises(EngineUnavailable, match="stopped answering"):
        await server.complete({"prompt": [1]})
    assert loop.time() - start == pytest.approx(WATCH_S)
    start, before = loop.time(), sent[0]
    with pytest.raises(EngineUnavailable, match="is down"):
        await server.complete({"prompt": [1]})
    assert loop.time() - start == 0 and sent[0] == before
    broken[0] = False
    await asyncio.sleep(RECHECK_S)
    start = loop.time()
    assert await server.complete({"prompt": [1]}) == {"choices": []}
    assert loop.time() - start == pytest.approx(60)
    await engine.aclose()


@pytest.mark.looptime
async def test_one_request_is_bounded_as_a_whole(text_bundle: Path) -> None:
    """httpx's timeout bounds each read: a server sending a byte now and then held a request for ever."""

    class Trickle(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                yield b" "
                await asyncio.sleep(1)

    engine = _engine(text_bundle, lambda request: httpx.Response(200, stream=Trickle()), vllm_timeout_s=30)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(EngineUnavailable, match="did not answer within 30 s"):
        await asyncio.wait_for(engine.policy.complete({"prompt": [1]}), 300)
    assert loop.time() - start == pytest.approx(30, abs=1)
    assert _errors(engine, "timeout") == 1
    await engine.aclose()
