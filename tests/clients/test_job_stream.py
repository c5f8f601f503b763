"""The SDK's job results stream (JSONL, parsed line by line; a cut stream read on from its last result), client ids,
and JSONL-file submission."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlaifv_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Backoff,
    Client,
    InvalidArgumentError,
    InvalidRequestError,
    Rewards,
)

from .conftest import API_KEY, QUESTION, LiveServer
from .test_unit import fake_clock

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


CUT = "peer closed connection without sending complete message body (incomplete chunked read)"
NO_WAIT = Backoff(initial=0, max=0)


class ResultsServer:
    """GET /v1/jobs/{id}/results of `total` results as JSONL, honouring `after` (unless `honour_after` is False: a
    server from before it), each response broken off after as many results as its turn in `cuts` says (half-way
    through the next line; None, or a number past the end: the whole body)."""

    def __init__(self, total: int, cuts: list[int | None], *, honour_after: bool = True, asynchronous: bool = False):
        self.total, self.cuts, self.honour_after, self.asynchronous = total, cuts, honour_after, asynchronous
        self.requests: list[httpx.Request] = []
        self.stall: list[float] = []  # with a fake clock: seconds each response takes before its cut

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        turn = len(self.requests) - 1
        after = request.url.params.get("after")
        start = int(after) + 1 if after is not None and self.honour_after else 0
        lines = [_line(i).encode() + b"\n" for i in range(start, self.total)]
        sent = self.cuts[turn] if turn < len(self.cuts) else None
        cut = sent is not None and sent < len(lines)
        chunks = [*lines[:sent], lines[sent][:10]] if cut else lines
        stall = self.stall[turn] if turn < len(self.stall) else 0.0

        def body() -> Iterator[bytes]:
            yield from chunks
            if cut:
                self.on_cut(stall)
                raise httpx.RemoteProtocolError(CUT)

        async def abody() -> AsyncIterator[bytes]:
            for chunk in body():
                yield chunk

        content: Any = abody() if self.asynchronous else body()
        return httpx.Response(200, content=content, headers={"Content-Type": "application/x-ndjson"})

    def on_cut(self, stall: float) -> None:
        pass

    @property
    def afters(self) -> list[str | None]:
        return [r.url.params.get("after") for r in self.requests]


async def read_results(
    server: ResultsServer, after: int | None = None, **options: Any
) -> tuple[list[int], Exception | None]:
    """The indices `jobs.results` yields from `server` (a sync or an async client, as the server is), and the
    error that ended it (None: it ended cleanly)."""
    read: list[int] = []
    options = {"base_url": "http://t", "backoff": NO_WAIT} | options
    transport = httpx.MockTransport(server)
    try:
        if server.asynchronous:
            async with AsyncClient(http_client=httpx.AsyncClient(transport=transport), **options) as ac:
                async for result in ac.jobs.results("job-1", after=after):
                    read.append(result.index)
        else:
            with Client(http_client=httpx.Client(transport=transport), **options) as client:
                for result in client.jobs.results("job-1", after=after):
                    read.append(result.index)
    except Exception as exc:
        return read, exc
    return read, None


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_cut_stream_is_read_on_from_the_last_result(asynchronous: bool) -> None:
    """Cut twice (after 3, then 4 more results, each cut half-way through a line): every result once, in order,
    the later requests asking for those after the last one read; one call, so one request id."""
    server = ResultsServer(10, [3, 4, None], asynchronous=asynchronous)
    read, error = await read_results(server)
    assert error is None and read == list(range(10))
    assert server.afters == [None, "2", "6"]
    assert len({r.headers["x-request-id"] for r in server.requests}) == 1


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_reading_on_from_a_server_that_ignores_after_yields_no_result_twice(asynchronous: bool) -> None:
    server = ResultsServer(10, [4, 6, None], honour_after=False, asynchronous=asynchronous)
    read, error = await read_results(server)
    assert error is None and read == list(range(10)) and server.afters == [None, "3", "5"]


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_stream_cut_again_without_new_results_gives_up_saying_how_far_it_read(asynchronous: bool) -> None:
    """Cuts that bring nothing new count against max_retries (2: three tries after the last progress); the error
    says how many results were read and where to read on."""
    server = ResultsServer(10, [3, 0, 0, 0], asynchronous=asynchronous)
    read, error = await read_results(server)
    assert read == [0, 1, 2] and server.afters == [None, "2", "2"]
    assert isinstance(error, APIConnectionError) and not isinstance(error, APITimeoutError)
    assert isinstance(error.__cause__, httpx.RemoteProtocolError)
    assert str(error).startswith(
        "the results stream of job job-1 was cut after 3 results; jobs.results(job, after=2) reads on from there: "
        + CUT
    )
    assert error.note is not None and "gave up after 3 attempts" in error.note


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_without_retries_a_cut_stream_is_not_read_on(asynchronous: bool) -> None:
    server = ResultsServer(10, [1], asynchronous=asynchronous)
    read, error = await read_results(server, max_retries=0)
    assert read == [0] and len(server.requests) == 1
    assert isinstance(error, APIConnectionError) and "cut after 1 result;" in str(error)


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_results_after_an_index(asynchronous: bool) -> None:
    server = ResultsServer(10, [2, None], asynchronous=asynchronous)
    read, error = await read_results(server, after=4)
    assert error is None and read == [5, 6, 7, 8, 9] and server.afters == ["4", "6"]
    with Client(base_url="http://t") as client:
        for bad in (-1, True, "3", 1.0):
            with pytest.raises(InvalidArgumentError, match="after must be an item index") as info:
                next(client.jobs.results("job-1", after=bad))
            assert info.value.param == "after"


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_reading_on_keeps_to_the_timeout_measured_from_the_cut(
    asynchronous: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller spends 1000 s on the results of a call whose timeout is 10 s: the cut after them is read on all the
    same (that time is not the server's). The next stream is cut after 9.9 s with nothing new: the retry due in
    0.5 s would end past the 10 s, so it is not made and the error says why (fake clock)."""
    clock, slept = fake_clock(monkeypatch)

    class SlowServer(ResultsServer):
        def on_cut(self, stall: float) -> None:
            clock[0] += stall

    server = SlowServer(10, [3, 0], asynchronous=asynchronous)
    server.stall = [0.0, 9.9]
    calm = Backoff(initial=0.5, max=0.5, jitter=0)
    options: dict[str, Any] = {"base_url": "http://t", "backoff": calm, "timeout": 10}
    read: list[int] = []
    transport = httpx.MockTransport(server)
    with pytest.raises(APIConnectionError) as info:
        if asynchronous:
            async with AsyncClient(http_client=httpx.AsyncClient(transport=transport), **options) as ac:
                async for result in ac.jobs.results("job-1"):
                    read.append(result.index)
                    clock[0] += 1000 / 3
        else:
            with Client(http_client=httpx.Client(transport=transport), **options) as c:
                for result in c.jobs.results("job-1"):
                    read.append(result.index)
                    clock[0] += 1000 / 3
    assert read == [0, 1, 2] and server.afters == [None, "2"] and slept == [0.5]
    assert "past this call's timeout of 10 s" in str(info.value)


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
