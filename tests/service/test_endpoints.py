"""Every endpoint against a real uvicorn server with the tiny bundle."""

from __future__ import annotations

import math

import httpx
import pytest

pytestmark = pytest.mark.integration

QUESTION = "What is in the image?"


def expected_reward(c: dict, beta: float = 0.1, normalize: str = "mean") -> float:
    ratio = c["policy_logprob"] - c["reference_logprob"]
    return beta * (ratio / c["num_tokens"] if normalize == "mean" else ratio)


def test_best_of_n_returns_argmax_with_consistent_rewards(client: httpx.Client, red_url: str) -> None:
    r = client.post(
        "/v1/best-of-n",
        json={"images": [red_url], "question": QUESTION, "n": 6, "sampling": {"seed": 3, "max_tokens": 12}},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    rewards = [c["reward"] for c in body["candidates"]]
    assert len(rewards) == 6
    assert body["best_index"] == max(range(6), key=lambda i: (rewards[i], -i))
    assert body["best"] == body["candidates"][body["best_index"]]
    for i, c in enumerate(body["candidates"]):
        assert c["index"] == i
        assert 1 <= c["num_tokens"] <= 12
        assert c["finish_reason"] in ("stop", "length")
        assert math.isclose(c["reward"], expected_reward(c), rel_tol=1e-9, abs_tol=1e-12)
    assert body["usage"]["completion_tokens"] == sum(c["num_tokens"] for c in body["candidates"])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["model"] == "tiny-llava"
    assert body["reward"] == {"mode": "dpo", "beta": 0.1, "normalize": "mean", "claim_score": None}


def test_best_of_n_seed_reproducible_and_reward_options(client: httpx.Client, red_url: str) -> None:
    req = {"images": [red_url], "question": QUESTION, "n": 3, "sampling": {"seed": 11}}
    a = client.post("/v1/best-of-n", json=req).json()
    b = client.post("/v1/best-of-n", json=req).json()
    assert [c["text"] for c in a["candidates"]] == [c["text"] for c in b["candidates"]]
    summed = client.post(
        "/v1/best-of-n", json=req | {"reward": {"mode": "dpo", "beta": 0.5, "normalize": "sum"}}
    ).json()
    assert summed["reward"] == {"mode": "dpo", "beta": 0.5, "normalize": "sum", "claim_score": None}
    for c in summed["candidates"]:
        assert math.isclose(c["reward"], expected_reward(c, 0.5, "sum"), rel_tol=1e-9, abs_tol=1e-12)


def test_best_of_n_accepts_openai_style_messages(client: httpx.Client, red_url: str) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": red_url}}, {"type": "text", "text": QUESTION}],
        }
    ]
    r = client.post("/v1/best-of-n", json={"messages": messages, "n": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["candidates"]) == 2


def test_rewards_match_in_process_api(client: httpx.Client, in_process_pair, red_png: bytes, red_url: str) -> None:
    answers = ["a red circle.", "a blue square and a dog.", "there is a big red square in the image."]
    r = client.post("/v1/rewards", json={"images": [red_url], "question": QUESTION, "answers": answers})
    assert r.status_code == 200, r.text
    body = r.json()
    local = in_process_pair.score(red_png, QUESTION, answers)
    assert len(body["rewards"]) == len(answers)
    for got, want, cand in zip(body["rewards"], local.candidates, body["candidates"], strict=True):
        assert abs(got - want.reward) < 1e-5
        assert abs(cand["policy_logprob"] - want.policy_logprob) < 1e-4
        assert abs(cand["reference_logprob"] - want.reference_logprob) < 1e-4
        assert cand["num_tokens"] == want.num_tokens
        assert cand["finish_reason"] == "given"
    assert body["best_index"] == local.best_index
    assert [c["text"] for c in body["candidates"]] == answers


def test_rewards_cache_returns_identical_scores(client: httpx.Client, red_url: str) -> None:
    req = {"images": [red_url], "question": "Is there a cat?", "answers": ["yes", "no"]}
    first = client.post("/v1/rewards", json=req).json()
    second = client.post("/v1/rewards", json=req).json()
    assert second["cached"] is True
    assert second["rewards"] == first["rewards"]
    other = client.post("/v1/rewards", json=req | {"reward": {"beta": 0.2}}).json()
    assert other["cached"] is False
    assert other["rewards"] == pytest.approx([2 * x for x in first["rewards"]], rel=1e-6)


async def test_identical_concurrent_rewards_requests_are_scored_once(live_server, red_url: str) -> None:
    """16 identical requests at once were 16 scorings, all cache misses: the first is scored, the others share
    its response (marked cached)."""
    import asyncio

    registry = live_server.app.state.metrics.registry
    batches = registry.get_sample_value("rlaifv_batch_size_count", {"kind": "score"}) or 0.0
    req = {"images": [red_url], "question": "Is there a cat at once?", "answers": ["yes", "no", "maybe"]}
    async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
        responses = await asyncio.gather(*(client.post("/v1/rewards", json=req) for _ in range(16)))
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses)
    assert sum(not b["cached"] for b in bodies) == 1 and len({b["id"] for b in bodies}) == 16
    assert all(b["rewards"] == bodies[0]["rewards"] for b in bodies)
    assert registry.get_sample_value("rlaifv_batch_size_count", {"kind": "score"}) == batches + 1


async def test_requests_waiting_for_an_identical_one_keep_their_own_deadline(make_server, red_url: str) -> None:
    """Each of a chain of identical requests waited for the one before with no deadline, then scored afresh with a
    whole one: with a 2 s deadline six answered 504 at 2, 4, 6... 12 s, the work repeated each time."""
    import asyncio
    import time

    server = make_server(request_timeout_s=2)
    engine = server.app.state.serving.scheduler.engine

    async def never(requests):  # a scoring that outlasts every deadline
        await asyncio.Event().wait()

    engine.run = never
    req = {"images": [red_url], "question": "Is there a cat, slowly?", "answers": ["yes", "no"]}

    async def timed(client: httpx.AsyncClient) -> tuple[int, float]:
        start = time.monotonic()
        response = await client.post("/v1/rewards", json=req)
        return response.status_code, time.monotonic() - start

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        answers = await asyncio.gather(*(timed(client) for _ in range(3)))
    assert [status for status, _ in answers] == [504, 504, 504]
    assert max(seconds for _, seconds in answers) < 3.5, answers  # each within its own 2 s (a second one: 4 s)


async def test_the_rewards_deadline_starts_after_the_images_are_fetched(make_server, red_url: str) -> None:
    """As docs/service.md says and best-of-N does: a slow image host does not eat the request's deadline (a
    fetch of 2.5 s against a 2 s deadline was a 504 before any scoring)."""
    import asyncio

    server = make_server(request_timeout_s=2)
    images = server.app.state.serving.images
    real_load = images.load

    async def slow_host(refs):
        await asyncio.sleep(2.5)  # the remote host, not the test, is slow
        return await real_load(refs)

    images.load = slow_host
    req = {"images": [red_url], "question": "Is there a slow cat?", "answers": ["yes", "no"]}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post("/v1/rewards", json=req)
    assert response.status_code == 200, response.text


def test_chat_completions_top_n_by_reward(client: httpx.Client, red_url: str) -> None:
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": red_url}}]
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny-llava",
            "messages": [{"role": "user", "content": content}],
            "n": 2,
            "best_of": 5,
            "max_tokens": 10,
            "seed": 1,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["best_of"] == 5 and len(body["rewards"]) == 5
    top = sorted(body["rewards"], reverse=True)[:2]
    assert [ch["reward"] for ch in body["choices"]] == top
    assert [ch["index"] for ch in body["choices"]] == [0, 1]
    for ch in body["choices"]:
        assert ch["message"]["role"] == "assistant"
        assert ch["finish_reason"] in ("stop", "length")
        assert ch["num_tokens"] <= 10
    assert body["usage"]["completion_tokens"] >= sum(ch["num_tokens"] for ch in body["choices"])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_models_health_ready_metrics(client: httpx.Client, red_url: str) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-llava"]
    assert models["data"][0]["reward"]["beta"] == 0.1
    assert models["data"][0]["input_modalities"] == ["text", "image"]  # a text-only bundle's: ["text"]
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["model"] == "ok"
    for probe in ("/healthz", "/readyz"):  # HEAD, as load balancers probe: the status, no body
        head = client.head(probe)
        assert head.status_code == 200 and head.content == b"", probe
    client.post("/v1/best-of-n", json={"images": [red_url], "question": QUESTION, "n": 2})
    text = client.get("/metrics").text
    for name in (
        'rlaifv_http_requests_total{method="POST",route="/v1/best-of-n",status="200"}',
        "rlaifv_http_request_duration_seconds_bucket",
        "rlaifv_queue_depth",
        "rlaifv_batch_size_bucket",
        "rlaifv_generated_tokens_total",
        "rlaifv_scored_tokens_total",
        "rlaifv_reward_bucket",
        "rlaifv_best_reward_margin_bucket",
        "rlaifv_model_load_seconds",
    ):
        assert name in text, name
    # `api`, not `endpoint`: the Prometheus Operator's own label on every scraped series would rename ours
    assert 'rlaifv_reward_count{api="best_of_n"}' in text and "endpoint=" not in text
    assert "rlaifv_requests_in_flight 0.0" in text and "rlaifv_image_pixels_held 0.0" in text  # all ended


def test_request_id_echoed(client: httpx.Client) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    assert (
        client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
        != "bad id with spaces"
    )


def test_openapi_documents_every_route_with_error_models(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/v1/best-of-n",
        "/v1/rewards",
        "/v1/chat/completions",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    for path in ("/v1/best-of-n", "/v1/rewards", "/v1/chat/completions"):
        op = paths[path]["post"]
        assert "422" not in op["responses"]
        for status in ("200", "400", "401", "429"):
            assert status in op["responses"], (path, status)
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    components = schema["components"]["schemas"]
    assert components["BestOfNRequest"]["examples"]
    assert "description" in components["SamplingOptions"]["properties"]["temperature"]


@pytest.mark.parametrize("claim_score", ["expected", "count"])
def test_claims_reward_mode_matches_in_process(
    client: httpx.Client, in_process_pair, red_png: bytes, red_url: str, claim_score: str
) -> None:
    from rlaifv.reward.scoring import RewardConfig

    answers = ["There is a red circle and a blue square.", "a dog.", "a dog. a dog."]
    reward = {"mode": "claims", "repeat_penalty": 0.5, "claim_score": claim_score}
    r = client.post(
        "/v1/rewards", json={"images": [red_url], "question": QUESTION, "answers": answers, "reward": reward}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reward"]["mode"] == "claims" and body["reward"]["claim_score"] == claim_score
    config = RewardConfig(mode="claims", repeat_penalty=0.5, claim_score=claim_score)
    local = in_process_pair.score(red_png, QUESTION, answers, reward=config)
    assert body["rewards"] == pytest.approx(local.rewards, abs=1e-9)
    assert body["best_index"] == local.best_index
    assert all(x <= 0 for x in body["rewards"])  # minus rejected claims, minus repeats
    for cand, want in zip(body["candidates"], local.candidates, strict=True):
        assert abs(cand["policy_logprob"] - want.policy_logprob) < 1e-4  # the implicit terms are still reported


def test_claims_mode_best_of_n_and_needs_an_image(client: httpx.Client, red_url: str) -> None:
    body = {"images": [red_url], "question": QUESTION, "n": 3, "sampling": {"seed": 2, "max_tokens": 8}}
    r = client.post("/v1/best-of-n", json=body | {"reward": {"mode": "claims"}})
    assert r.status_code == 200, r.text
    rewards = [c["reward"] for c in r.json()["candidates"]]
    assert r.json()["best_index"] == max(range(3), key=lambda i: (rewards[i], -i))
    no_image = client.post("/v1/best-of-n", json=body | {"images": [], "reward": {"mode": "claims"}})
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "reward.mode"
