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
    metrics = httpx.get(live_server.url + "/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("rlaifv_batch_size_sum")]
    assert sizes


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
