"""The SDK's job results stream (JSONL, parsed line by line), client ids, and JSONL-file submission."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rlaifv_client import AsyncClient, Client, InvalidRequestError, Rewards

from .conftest import API_KEY, QUESTION, LiveServer

pytestmark = pytest.mark.integration


def _line(i: int) -> str:
    return json.dumps({"index": i, "custom_id": f"row-{i}", "status": "failed", "error": {"message": "x", "type": "t"}})


def test_results_are_parsed_as_the_lines_arrive() -> None:
    """A 10,000-line body: the first result reaches the caller after one line was produced, not the whole body."""
    produced: list[int] = []

    def body() -> Iterator[bytes]:
        for i in range(10_000):
            produced.append(i)
            yield _line(i).encode() + b"\n"

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["format"] == "jsonl" and request.headers["accept"] == "application/x-ndjson"
        return httpx.Response(200, content=body(), headers={"Content-Type": "application/x-ndjson"})

    with Client(base_url="http://test", http_client=httpx.Client(transport=httpx.MockTransport(handler))) as client:
        results = client.jobs.results("job-1")
        first = next(results)
        assert first.index == 0 and first.custom_id == "row-0" and len(produced) < 100
        assert sum(1 for _ in results) == 9_999


@pytest.fixture(scope="module")
def stream_server(server: LiveServer, tiny_bundle: Path, redis_url: str) -> Iterator[LiveServer]:
    with LiveServer(
        tiny_bundle, api_keys=[API_KEY], redis_url=redis_url, jobs_workers=1, jobs_stream="rlaifv:jobs:sdk-stream"
    ) as live:
        yield live


def test_custom_ids_and_file_upload(stream_server: LiveServer, red_png: bytes, tmp_path: Path) -> None:
    image = "data:image/png;base64," + base64.b64encode(red_png).decode()
    with Client(base_url=stream_server.url, api_key=API_KEY) as client:
        items = [
            {"custom_id": f"q{i}", "image": red_png, "question": QUESTION, "answers": ["a", "b"]} for i in range(3)
        ]
        job = client.jobs.wait(client.jobs.submit(items, kind="rewards"), poll_interval=0.05, timeout=60)
        results = list(client.jobs.results(job))
        assert [(r.index, r.custom_id) for r in results] == [(0, "q0"), (1, "q1"), (2, "q2")]
        assert all(isinstance(r.result, Rewards) for r in results)

        lines = [{"custom_id": "a", "body": {"images": [image], "question": QUESTION, "answers": ["x"]}}]
        lines.append({"images": [image], "question": QUESTION, "answers": ["red " * 40]})  # fails when it runs
        path = tmp_path / "batch.jsonl"
        path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        uploaded = client.jobs.submit_file(path, kind="rewards", metadata={"source": "file"})
        assert uploaded.total == 2 and uploaded.metadata == {"source": "file"}
        done = client.jobs.wait(uploaded, poll_interval=0.05, timeout=60)
        assert (done.completed, done.failed) == (1, 1)
        first, second = client.jobs.results(done)
        assert first.custom_id == "a" and second.custom_id is None
        assert second.error is not None and second.error.param == "answers[0]" and second.error.code == "invalid_answer"
        with pytest.raises(InvalidRequestError) as bad:
            client.jobs.submit_file(b'{"question": "q", "answers": ["a"]}\nnot json\n', kind="rewards")
        assert bad.value.param == "items[1]"


async def test_async_results_stream(stream_server: LiveServer, red_png: bytes) -> None:
    async with AsyncClient(base_url=stream_server.url, api_key=API_KEY) as client:
        items = [{"custom_id": f"r{i}", "image": red_png, "question": QUESTION, "answers": ["a"]} for i in range(2)]
        job = await client.jobs.wait(await client.jobs.submit(items, kind="rewards"), poll_interval=0.05, timeout=60)
        assert [r.custom_id async for r in client.jobs.results(job)] == ["r0", "r1"]
