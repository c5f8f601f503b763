"""Best-of-N over another model: one of our servers (another tiny bundle) is the generator, a second one scores.

Two real uvicorn servers: the scorer's candidates must be exactly what the generator answers to the same request,
and their rewards exactly what the scorer's /v1/rewards gives for those texts."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from rlaifv.testing.http_stub import serving
from tests.service.conftest import TEST_LIMITS, LiveServer

pytestmark = pytest.mark.integration

QUESTION = "What is in the image?"
GENERATOR = "tiny-generator"


@pytest.fixture(scope="module")
def generator_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle with other weights than the scorer's (seed 7), so the two models differ."""
    from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "generator", spec=TinyVLMSpec(seed=7))


@pytest.fixture(scope="module")
def generator(generator_bundle: Path) -> Iterator[LiveServer]:
    server = LiveServer(generator_bundle, model_name=GENERATOR).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scorer(service_bundle: Path, generator: LiveServer) -> Iterator[LiveServer]:
    server = LiveServer(service_bundle, generator_url=generator.url + "/v1").start()
    yield server
    server.stop()


def user_turn(image: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTION}],
        }
    ]


def generator_answers(server: LiveServer, image: str, n: int, seed: int, max_tokens: int = 8) -> list[dict]:
    """What the generator answers when asked directly, as the scorer asks it."""
    body = {"model": GENERATOR, "messages": user_turn(image), "n": n, "seed": seed, "max_tokens": max_tokens}
    body |= {"temperature": 1.0, "top_p": 1.0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def scored(server: LiveServer, image: str, answers: list[str]) -> list[dict]:
    body = {"images": [image], "question": QUESTION, "answers": answers}
    r = httpx.post(server.url + "/v1/rewards", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["candidates"]


def best_of_n(server: LiveServer, image: str, n: int, seed: int, max_tokens: int = 8) -> httpx.Response:
    body = {"images": [image], "question": QUESTION, "n": n, "sampling": {"seed": seed, "max_tokens": max_tokens}}
    return httpx.post(server.url + "/v1/best-of-n", json=body, timeout=60)


def assert_same_scores(got: list[dict], expected: list[dict]) -> None:
    assert [c["text"] for c in got] == [c["text"] for c in expected]
    for mine, theirs in zip(got, expected, strict=True):
        for key in ("reward", "implicit_reward", "policy_logprob", "reference_logprob"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), key
        assert mine["num_tokens"] == theirs["num_tokens"]


def test_best_of_n_candidates_are_the_generators_answers_scored_by_the_pair(
    scorer: LiveServer, generator: LiveServer, red_url: str
) -> None:
    r = best_of_n(scorer, red_url, n=4, seed=5)
    assert r.status_code == 200, r.text
    body = r.json()
    direct = generator_answers(generator, red_url, n=4, seed=5)
    texts = [c["message"]["content"] for c in direct]
    assert all(t.strip() for t in texts), "pick a seed whose answers are not empty"
    assert [c["text"] for c in body["candidates"]] == texts
    assert [c["finish_reason"] for c in body["candidates"]] == [c["finish_reason"] for c in direct]
    assert_same_scores(body["candidates"], scored(scorer, red_url, texts))
    rewards = [c["reward"] for c in body["candidates"]]
    assert body["best_index"] == max(range(4), key=lambda i: (rewards[i], -i))
    host = generator.url.removeprefix("http://")
    assert body["generator"] == {"model": GENERATOR, "url": host}
    assert body["scorer"] == body["model"] == "tiny-llava"
    assert body["timings"]["generate_s"] > 0
    # The generator's model differs from the scorer's: the scorer's own samples are other answers.
    own = httpx.post(generator.url + "/v1/best-of-n", json={"images": [red_url], "question": QUESTION}, timeout=60)
    assert own.json()["scorer"] == GENERATOR and own.json()["generator"] is None
    metrics = httpx.get(scorer.url + "/metrics").text
    assert "rlaifv_generator_request_duration_seconds_count" in metrics


def test_sampling_filters_reach_the_generator(scorer: LiveServer, generator: LiveServer, red_url: str) -> None:
    """top_k and min_p (vLLM's extensions) are forwarded: min_p=1 makes the generator answer greedily."""
    sampling = {"seed": 3, "max_tokens": 8, "temperature": 1.5, "min_p": 1.0, "top_k": 50}
    body = {"images": [red_url], "question": QUESTION, "n": 3, "sampling": sampling}
    r = httpx.post(scorer.url + "/v1/best-of-n", json=body, timeout=60)
    assert r.status_code == 200, r.text
    direct = {"model": GENERATOR, "messages": user_turn(red_url), "n": 1, "max_tokens": 8, "temperature": 0}
    greedy = httpx.post(generator.url + "/v1/chat/completions", json=direct, timeout=60).json()["choices"]
    assert {c["text"] for c in r.json()["candidates"]} == {greedy[0]["message"]["content"]}


def test_a_continued_assistant_message_reaches_the_generator(
    scorer: LiveServer, generator: LiveServer, red_url: str
) -> None:
    """continue_final_message (vLLM's extension) is forwarded: the generator continues the prefill and the pair
    scores the continuation after the same open turn."""
    turns = [*user_turn(red_url), {"role": "assistant", "content": "a red"}]
    body = {"messages": turns, "n": 2, "seed": 4, "max_tokens": 8, "temperature": 1.0}
    body |= {"continue_final_message": True, "add_generation_prompt": False}
    through = httpx.post(scorer.url + "/v1/chat/completions", json={"model": "tiny-llava", **body}, timeout=60)
    direct = httpx.post(generator.url + "/v1/chat/completions", json={"model": GENERATOR, **body}, timeout=60)
    assert through.status_code == 200 and direct.status_code == 200, (through.text, direct.text)
    got = sorted(c["message"]["content"] for c in through.json()["choices"])
    assert got == sorted(c["message"]["content"] for c in direct.json()["choices"])
    assert any(text.startswith(" ") for text in got)  # continuations, joined to "a red"


def test_openai_chat_through_the_generator(scorer: LiveServer, generator: LiveServer, red_url: str) -> None:
    body = {"model": "tiny-llava", "messages": user_turn(red_url), "n": 2, "best_of": 3, "seed": 9, "max_tokens": 8}
    r = httpx.post(scorer.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    completion = r.json()
    texts = [c["message"]["content"] for c in generator_answers(generator, red_url, n=3, seed=9)]
    expected = scored(scorer, red_url, texts)
    assert completion["rewards"] == pytest.approx([c["reward"] for c in expected], abs=1e-5)
    order = sorted(range(3), key=lambda i: (-expected[i]["reward"], i))[:2]
    assert [c["message"]["content"] for c in completion["choices"]] == [texts[i] for i in order]
    assert completion["generator"]["model"] == GENERATOR and completion["scorer"] == "tiny-llava"

    from openai import OpenAI

    client = OpenAI(base_url=scorer.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=GENERATOR, messages=user_turn(red_url), n=1, seed=9, max_tokens=8, extra_body={"best_of": 3}
    )
    assert reply.choices[0].message.content == completion["choices"][0]["message"]["content"]
    assert reply.model_extra["generator"]["model"] == GENERATOR

    refused = httpx.post(scorer.url + "/v1/chat/completions", json=body | {"logprobs": True}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"


def test_generator_refusing_n_gets_one_request_per_candidate_and_its_4xx_reaches_the_client(
    generator_bundle: Path, service_bundle: Path, red_url: str
) -> None:
    single = LiveServer(generator_bundle, model_name=GENERATOR, max_n=1, max_tokens=8)
    with single, LiveServer(service_bundle, generator_url=single.url + "/v1") as scorer:
        r = best_of_n(scorer, red_url, n=3, seed=5)
        assert r.status_code == 200, r.text
        texts = [generator_answers(single, red_url, n=1, seed=5 + i)[0]["message"]["content"] for i in range(3)]
        assert [c["text"] for c in r.json()["candidates"]] == texts

        too_long = best_of_n(scorer, red_url, n=2, seed=5, max_tokens=12)
        assert too_long.status_code == 400, too_long.text
        error = too_long.json()["error"]
        assert error["code"] == "generator_rejected"
        assert "max_tokens must be <= 8" in error["message"] and single.url.removeprefix("http://") in error["message"]


def test_generator_down_is_503_and_back_up_is_200_without_a_restart(
    generator_bundle: Path, service_bundle: Path, red_url: str
) -> None:
    first = LiveServer(generator_bundle, model_name=GENERATOR).start()
    host = first.url.removeprefix("http://")
    with LiveServer(service_bundle, generator_url=first.url + "/v1") as scorer:
        assert best_of_n(scorer, red_url, n=2, seed=1).status_code == 200
        first.stop()

        down = best_of_n(scorer, red_url, n=2, seed=1)
        assert down.status_code == 503, down.text
        error = down.json()["error"]
        assert error["code"] == "generator_unavailable" and f"generator {host} is unreachable" in error["message"]
        assert down.headers["retry-after"]
        ready = httpx.get(scorer.url + "/readyz").json()
        assert ready["status"] == "ok" and ready["checks"]["generator"].startswith("unavailable")
        assert scored(scorer, red_url, ["a red circle."])  # the pair still scores given answers
        assert 'rlaifv_generator_errors_total{reason="unreachable"} 1.0' in httpx.get(scorer.url + "/metrics").text

        with LiveServer(generator_bundle, model_name=GENERATOR, port=first.port):
            up = best_of_n(scorer, red_url, n=2, seed=1)
            assert up.status_code == 200, up.text
            # the probe has 2 s: on a loaded CI machine one may lapse, so the next is asked (no fixed wait)
            deadline = time.monotonic() + 30
            while (state := httpx.get(scorer.url + "/readyz").json()["checks"]["generator"]) != "ok":
                assert state.startswith("unavailable: no answer within") and time.monotonic() < deadline, state


def test_start_up_fails_clearly_when_the_generator_is_unusable(service_bundle: Path, generator: LiveServer) -> None:
    from fastapi.testclient import TestClient

    from rlaifv.service.app import create_app
    from rlaifv.service.generator import GeneratorStartupError
    from rlaifv.service.settings import Settings
    from rlaifv.testing.server import free_port

    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    app = create_app(Settings(bundle=service_bundle, generator_url=nowhere, **TEST_LIMITS))
    with (
        pytest.raises(GeneratorStartupError, match=rf"generator {nowhere} is not usable: .*unreachable"),
        TestClient(app),
    ):
        pass
    app = create_app(Settings(bundle=service_bundle, generator_url=generator.url + "/v1", generator_model="nope"))
    unknown = rf"does not serve model 'nope' \(its /models lists: {GENERATOR}\)"
    with pytest.raises(GeneratorStartupError, match=unknown), TestClient(app):
        pass


class GeneratorStub:
    """An OpenAI-compatible generator over real HTTP on a free loopback port, in a thread of its own: `Handler`
    (a subclass of `StubHandler`) answers its chat requests."""

    def __init__(self, handler: type[StubHandler]) -> None:
        handler.stub = self
        self._handler, self._served = handler, contextlib.ExitStack()

    def __enter__(self) -> Self:
        server = self._served.enter_context(serving(self._handler, daemon_threads=True))
        self.url = f"http://127.0.0.1:{server.server_port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self._served.close()


class StubHandler(BaseHTTPRequestHandler):
    """A stub's requests: its model list on GET, quietly."""

    stub: Any

    def reply(self, status: int, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.reply(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})

    def log_message(self, *args: Any) -> None:
        pass


class ScriptedGenerator(GeneratorStub):
    """Answers scripted per request, in order (empty answers included: what our own tiny generator cannot be made
    to write)."""

    def __init__(self, script: list[list[str]]) -> None:
        self.script, self.requests = list(script), []

        class Handler(StubHandler):
            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self.stub.requests.append(request)
                texts = self.stub.script.pop(0) if self.stub.script else [""] * request["n"]
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                    for i, t in enumerate(texts[: request["n"]])
                ]
                body = {"id": "x", "object": "chat.completion", "created": 0, "model": "stub", "choices": choices}
                self.reply(200, body)

        super().__init__(Handler)


def test_empty_answers_are_topped_up_so_a_chat_gets_its_n_choices(service_bundle: Path, red_url: str) -> None:
    """A generator that writes empty answers (they cannot be scored): the scorer asks once more for the missing
    ones, with seeds not used yet, so a chat with n choices gets n; still short, it is a 502 saying so."""
    script = [["", "a red circle", ""], ["a red square", "a blue circle"], ["", ""]]
    with ScriptedGenerator(script) as fake, LiveServer(service_bundle, generator_url=fake.url) as scorer:
        body = {"model": "tiny-llava", "messages": user_turn(red_url), "n": 3, "seed": 11, "max_tokens": 8}
        r = httpx.post(scorer.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        texts = sorted(c["message"]["content"] for c in r.json()["choices"])
        assert texts == ["a blue circle", "a red circle", "a red square"]
        assert [(q["n"], q["seed"]) for q in fake.requests] == [(3, 11), (2, 14)]
        short = httpx.post(scorer.url + "/v1/chat/completions", json=body | {"n": 2}, timeout=60)
        assert short.status_code == 502, short.text
        assert short.json()["error"]["code"] == "generator_empty"
        assert "returned 0 non-empty answers, 2 needed" in short.json()["error"]["message"]


class HeldGenerator(GeneratorStub):
    """Holds every chat request open until released, and records a caller that closes its connection meanwhile
    (what an abort looks like to vLLM)."""

    def __init__(self) -> None:
        self.asked, self.dropped, self.release = threading.Event(), threading.Event(), threading.Event()

        class Handler(StubHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                self.stub.asked.set()
                while not self.stub.release.is_set():
                    readable, _, _ = select.select([self.connection], [], [], 0.5)
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):
                        self.stub.dropped.set()
                        return
                self.reply(503)

        super().__init__(Handler)

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        super().__exit__(*exc)


@pytest.mark.parametrize("route", ["/v1/best-of-n", "/v1/chat/completions"])
def test_a_client_leaving_while_the_generator_writes_closes_the_generators_request(
    route: str, service_bundle: Path, red_url: str
) -> None:
    """The generator's answers were waited for to the end (up to RLAIFV_GENERATOR_TIMEOUT_S, twice with the
    top-up) for a client already gone: its tokens paid for by nobody, the request's images held meanwhile."""
    import json

    if route == "/v1/best-of-n":
        body: dict[str, Any] = {"images": [red_url], "question": QUESTION, "n": 2}
    else:
        body = {"model": "tiny-llava", "messages": user_turn(red_url), "n": 2, "stream": True}
    payload = json.dumps(body).encode()
    with HeldGenerator() as held, LiveServer(service_bundle, generator_url=held.url, generator_timeout_s=120) as scorer:
        port = int(scorer.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            head = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            client.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            assert held.asked.wait(30), "the generator was never asked"
        assert held.dropped.wait(30), "the scorer kept the generator's request open for a client gone"
        labels = {"route": route, "method": "POST", "status": "499"}
        deadline = time.monotonic() + 30
        while not sample(scorer, "rlaifv_http_requests_total", labels):  # logged once the handler has ended
            assert time.monotonic() < deadline, "the departure was not counted as 499"
        assert sample(scorer, "rlaifv_requests_rejected_total", {"reason": "client_disconnected"}) == 1


def sample(server: LiveServer, name: str, labels: dict[str, str]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0
