"""Concurrent requests over HTTP: all succeed with correct results; a tiny queue bound gives 429s, nothing hangs."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.integration

QUESTION = "What is in the image?"


async def test_32_concurrent_requests_all_correct(live_server, in_process_pair, red_png: bytes, red_url: str) -> None:
    answers = [
        ["a red circle.", "a dog."],
        ["two blue squares.", "a cat.", "yes"],
        ["no", "a big red star in the sky."],
    ]
    expected = [in_process_pair.score(red_png, QUESTION, a).rewards for a in answers]
    before = _batch_totals(live_server.url)

    async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as client:

        async def one(i: int) -> tuple[int, httpx.Response]:
            if i % 2:
                return i, await client.post(
                    "/v1/rewards", json={"images": [red_url], "question": QUESTION, "answers": answers[i % 3]}
                )
            body = {"images": [red_url], "question": QUESTION, "n": 4, "sampling": {"seed": i, "max_tokens": 8}}
            return i, await client.post("/v1/best-of-n", json=body)

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), timeout=120)

    for i, r in results:
        assert r.status_code == 200, r.text
        body = r.json()
        if i % 2:
            assert body["rewards"] == pytest.approx(expected[i % 3], abs=1e-5)
        else:
            rewards = [c["reward"] for c in body["candidates"]]
            assert len(rewards) == 4
            assert body["best_index"] == max(range(4), key=lambda k: (rewards[k], -k))
    batches, batched = (a - b for a, b in zip(_batch_totals(live_server.url), before, strict=True))
    assert 16 <= batched <= 32  # every best-of-n ran on the model; a repeated /v1/rewards body may hit the cache
    assert batches < batched, "32 requests queued at once behind one model thread must share batches"


def _batch_totals(url: str) -> tuple[float, float]:
    """(batches run, requests in them) over both kinds, from the server's histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    count = sum(s.value for s in samples if s.name == "rlaifv_batch_size_count")
    total = sum(s.value for s in samples if s.name == "rlaifv_batch_size_sum")
    return count, total


async def test_tiny_queue_overflow_gets_429_and_nothing_hangs(make_server, red_url: str) -> None:
    server = make_server(max_queue=2, max_batch=1, batch_window_ms=0, retry_after_s=3)
    body = {"images": [red_url], "question": QUESTION, "n": 8, "sampling": {"max_tokens": 16, "seed": 0}}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        responses = await asyncio.wait_for(
            asyncio.gather(*(client.post("/v1/best-of-n", json=body) for _ in range(24))), timeout=120
        )
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) > 0 and statuses.count(200) >= 2
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "3"
                assert r.json()["error"]["code"] == "queue_full"
        # the server recovers: a request after the burst is served
        after = await client.post("/v1/best-of-n", json=body)
        assert after.status_code == 200
    assert 'rlaifv_requests_rejected_total{reason="queue_full"}' in httpx.get(server.url + "/metrics").text


def test_client_that_leaves_is_dropped_before_the_model(make_server, red_url: str) -> None:
    """Batcher paused (so the request must wait), client gives up, batcher resumed: the request never runs."""
    import time

    server = make_server()
    scheduler = server.app.state.serving.scheduler
    loop = scheduler._task.get_loop()
    loop.call_soon_threadsafe(scheduler._task.cancel)
    deadline = time.monotonic() + 10
    while not scheduler._task.done():
        assert time.monotonic() < deadline
        time.sleep(0.01)

    def sample(name: str) -> float:
        return server.app.state.metrics.registry.get_sample_value(name, {"kind": "generate"}) or 0.0

    before = sample("rlaifv_batch_size_count")
    body = {"images": [red_url], "question": QUESTION, "n": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/best-of-n", json=body, timeout=httpx.Timeout(10, read=0.5))
    registry = server.app.state.metrics.registry
    while not registry.get_sample_value("rlaifv_requests_rejected_total", {"reason": "client_disconnected"}):
        assert time.monotonic() < deadline + 10, "the server did not notice the client leaving"
        time.sleep(0.01)
    labels = {"route": "/v1/best-of-n", "method": "POST"}
    while not registry.get_sample_value("rlaifv_http_requests_total", labels | {"status": "499"}):  # not a 500
        assert time.monotonic() < deadline + 10, "the departure was not counted as 499"
        time.sleep(0.01)
    assert not registry.get_sample_value("rlaifv_http_requests_total", labels | {"status": "500"})
    loop.call_soon_threadsafe(scheduler.start)
    r = httpx.post(server.url + "/v1/best-of-n", json=body, timeout=60)
    assert r.status_code == 200
    assert sample("rlaifv_batch_size_count") == before + 1  # only the second request reached the model
    assert sample("rlaifv_batch_size_sum") == sample("rlaifv_batch_size_count")
