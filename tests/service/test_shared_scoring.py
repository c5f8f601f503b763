"""Identical concurrent /v1/rewards requests share one scoring (reward cache on), which goes on while any of them
still waits: the first request's client leaving cancelled it, and the others scored again from scratch (200 at
about twice the latency, a second scoring on the engine)."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rlaifv.service.log_format import request_id_var
from tests.service.conftest import logs_to

pytestmark = pytest.mark.integration

WAIT_S = 30.0


class HeldEngine:
    """The server's engine, each run held at a gate the test opens, and its reward cache's lookups and writes
    counted: the test knows when the scoring is in the engine and when each request has looked in the cache (a
    request that found nothing waits for the identical one's scoring from there on, with no await between)."""

    def __init__(self, server: Any) -> None:
        serving = server.app.state.serving
        self.loop = serving.scheduler._task.get_loop()
        self.engine, self.cache = serving.scheduler.engine, serving.cache
        self.runs: list[list[Any]] = []  # the requests of each engine run
        self.entered = threading.Event()
        self.gate = asyncio.Event()  # waited for on the server's loop
        self.lookups, self.writes = 0, 0
        self.looked = threading.Condition()
        real_run, real_get, real_set = self.engine.run, self.cache.get, self.cache.set

        async def run(requests: list[Any]) -> Any:
            self.runs.append(requests)
            self.entered.set()
            await self.gate.wait()
            return await real_run(requests)

        async def get(key: str) -> str | None:
            value = await real_get(key)
            with self.looked:
                self.lookups += 1
                self.looked.notify_all()
            return value

        async def set_(key: str, value: str) -> None:
            self.writes += 1
            await real_set(key, value)

        self.engine.run, self.cache.get, self.cache.set = run, get, set_

    def open(self) -> None:
        self.loop.call_soon_threadsafe(self.gate.set)

    async def scoring_started(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT_S), "the scoring never reached the engine"

    async def looked_up(self, count: int) -> None:
        def wait() -> bool:
            with self.looked:
                return self.looked.wait_for(lambda: self.lookups >= count, WAIT_S)

        assert await asyncio.to_thread(wait), f"{self.lookups} cache lookups, {count} expected"


class AccessLines(logging.Handler):
    """The statuses of the server's access lines, as the middleware logs them (after each handler has ended)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.statuses: queue.Queue[int] = queue.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "rlaifv.access" and getattr(record, "path", None) == "/v1/rewards":
            self.statuses.put(record.__dict__["status"])

    async def next(self) -> int:
        return await asyncio.to_thread(self.statuses.get, timeout=WAIT_S)


class Waits(logging.Handler):
    """(request id, the id of the request whose scoring it waits on) of each wait logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str | None, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("waiting on the scoring"):
            self.seen.append((request_id_var.get(), getattr(record, "shared_with", None)))


@pytest.fixture
def access() -> Iterator[AccessLines]:
    with logs_to(AccessLines()) as handler:
        assert isinstance(handler, AccessLines)
        yield handler


def body(image: str, question: str) -> dict[str, Any]:
    return {"images": [image], "question": question, "answers": ["yes", "no"]}


async def leaving_client(server: Any, request: dict[str, Any]) -> asyncio.StreamWriter:
    """A client that sends its request and can leave without reading the answer (close the writer)."""
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    payload = json.dumps(request).encode()
    head = f"POST /v1/rewards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
    writer.write(head.encode() + b"\r\n\r\n" + payload)
    await writer.drain()
    return writer


async def leave(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def a_first_request_and_one_waiting(
    server: Any, held: HeldEngine, client: httpx.AsyncClient, request: dict[str, Any]
) -> tuple[asyncio.StreamWriter, asyncio.Future[httpx.Response]]:
    """A first request (its client able to leave) whose scoring is held in the engine, and an identical one
    waiting for it."""
    leader = await leaving_client(server, request)
    await held.scoring_started()
    follower = asyncio.ensure_future(client.post("/v1/rewards", json=request))
    await held.looked_up(2)
    return leader, follower


def counted(server: Any, name: str, labels: dict[str, str]) -> float:
    return server.app.state.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_the_first_clients_departure_leaves_the_scoring_to_the_identical_request_waiting(
    make_server: Any, access: AccessLines, red_url: str
) -> None:
    """The leader's client leaves mid-scoring: its request is a 499 (counted once), the follower gets the same
    scoring's response (cached), the engine scores once and the cache is written once."""
    server = make_server()
    held = HeldEngine(server)
    request = body(red_url, "Is there a cat, shared?")
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
        leader, follower = await a_first_request_and_one_waiting(server, held, client, request)
        images = server.app.state.serving.images
        both = images.in_hand
        await leave(leader)
        assert await access.next() == 499  # the leader's request ended before the scoring did
        assert not held.runs[0][0].withdrawal.is_set(), "the engine was told to drop the shared scoring"
        assert images.in_hand == both > 0, "the images still being scored left the pixel budget with the leader"
        held.open()
        response = await follower
        assert response.status_code == 200, response.text
        assert response.json()["cached"] is True, "the follower scored again"
        assert images.in_hand == 0
        again = await client.post("/v1/rewards", json=request)
        assert again.status_code == 200 and again.json()["cached"] is True
    assert [len(run) for run in held.runs] == [1] and held.writes == 1
    assert counted(server, "rlaifv_requests_rejected_total", {"reason": "client_disconnected"}) == 1
    http = {"route": "/v1/rewards", "method": "POST"}
    assert counted(server, "rlaifv_http_requests_total", http | {"status": "499"}) == 1
    assert counted(server, "rlaifv_http_requests_total", http | {"status": "200"}) == 2


async def test_a_waiting_identical_requests_departure_leaves_the_scoring_alone(
    make_server: Any, access: AccessLines, red_url: str
) -> None:
    server = make_server()
    held = HeldEngine(server)
    request = body(red_url, "Is there a cat, still shared?")
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
        leader = asyncio.ensure_future(client.post("/v1/rewards", json=request))
        await held.scoring_started()
        follower = await leaving_client(server, request)
        await held.looked_up(2)
        await leave(follower)
        assert await access.next() == 499
        held.open()
        response = await leader
    assert response.status_code == 200 and response.json()["cached"] is False, response.text
    assert [len(run) for run in held.runs] == [1] and not held.runs[0][0].withdrawal.is_set()
    assert held.writes == 1


@pytest.mark.parametrize("followers", [0, 2])
async def test_the_scoring_stops_at_once_when_the_last_waiting_client_leaves(
    make_server: Any, access: AccessLines, red_url: str, followers: int
) -> None:
    """A lone request's departure stops the engine's work before its 499 is logged, as before the scoring was
    shared; with identical requests waiting, the last of them to leave does it. Nothing is cached."""
    server = make_server()
    held = HeldEngine(server)
    request = body(red_url, f"Is there a cat, {followers} waiting?")
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
        clients = [await leaving_client(server, request)]
        await held.scoring_started()
        clients += [await leaving_client(server, request) for _ in range(followers)]
        await held.looked_up(1 + followers)
        for writer in clients[:-1]:
            await leave(writer)
            assert await access.next() == 499
            assert not held.runs[0][0].withdrawal.is_set(), "a client left while another still waited"
        await leave(clients[-1])
        assert await access.next() == 499
        assert held.runs[0][0].withdrawal.is_set(), "the engine went on scoring for nobody"
        held.open()
        after = await client.post("/v1/rewards", json=request)
    assert after.status_code == 200 and after.json()["cached"] is False
    assert len(held.runs) == 2 and held.writes == 1
    assert counted(server, "rlaifv_requests_rejected_total", {"reason": "client_disconnected"}) == 1 + followers


async def test_a_request_that_left_is_not_counted_again_when_the_scoring_it_started_runs_out_of_time(
    make_server: Any, access: AccessLines, red_url: str
) -> None:
    """The shared scoring's deadline is its first request's: it was counted as `deadline` inside the scoring too,
    so a first request that had left was counted twice (gone and late), three rejections for two requests."""
    server = make_server(request_timeout_s=1.0)
    held = HeldEngine(server)  # never opened: every scoring runs out of time
    request = body(red_url, "Is there a cat, too late?")
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
        leader, follower = await a_first_request_and_one_waiting(server, held, client, request)
        await leave(leader)
        assert await access.next() == 499
        response = await follower
    assert response.status_code == 504, response.text
    assert counted(server, "rlaifv_requests_rejected_total", {"reason": "client_disconnected"}) == 1
    assert counted(server, "rlaifv_requests_rejected_total", {"reason": "deadline"}) == 1


async def test_a_scoring_refused_for_its_input_is_refused_to_the_identical_requests_waiting(
    make_server: Any, red_url: str
) -> None:
    """Each identical request waiting scored again after the first one's 400, one after another: the last of
    four waited four scorings for the same 400."""
    server = make_server(max_tokens=2)
    held = HeldEngine(server)
    request = {"images": [red_url], "question": "Is there a cat?", "answers": ["an answer over two tokens " * 3]}
    misses = counted(server, "rlaifv_reward_cache_total", {"result": "miss"})
    with logs_to(Waits()) as waits:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            first = asyncio.ensure_future(client.post("/v1/rewards", json=request, headers={"X-Request-ID": "first"}))
            await held.scoring_started()
            waiting = [
                asyncio.ensure_future(client.post("/v1/rewards", json=request, headers={"X-Request-ID": f"w{i}"}))
                for i in range(3)
            ]
            await held.looked_up(4)
            held.open()
            responses = [await first, *[await each for each in waiting]]
    assert [r.status_code for r in responses] == [400] * 4, [r.text for r in responses]
    assert {r.json()["error"]["code"] for r in responses} == {"invalid_answer"}
    assert len(held.runs) == 1, "the identical requests scored again"
    # Each waiting request was counted neither hit nor miss, and its log did not say whose scoring it waited on.
    assert counted(server, "rlaifv_reward_cache_total", {"result": "miss"}) == misses + 4
    assert sorted(waits.seen) == [("w0", "first"), ("w1", "first"), ("w2", "first")]  # type: ignore[attr-defined]


async def test_identical_job_items_share_a_scoring_that_runs_past_their_deadline(
    make_server: Any, red_url: str
) -> None:
    """Identical items of one batch job start together: one whose own deadline passed while it waited on another's
    scoring failed for good, or (sent again as a QueuedTooLong) scored afresh and ran past it again, one after
    another. Each now waits as long as the scoring runs and fails as it did: it ran, so no job sends it again."""
    from rlaifv.service.errors import DeadlineExceeded, QueuedTooLong
    from rlaifv.service.protocol import RewardsRequest

    server = make_server(request_timeout_s=1.0)
    held = HeldEngine(server)  # never opened: the scoring runs past the deadline
    serving = server.app.state.serving
    item = RewardsRequest(**body(red_url, "Is there a cat, in a job twice?"))

    async def two_items() -> list[Any]:
        return await asyncio.gather(*(serving.rewards(item, None) for _ in range(2)), return_exceptions=True)

    outcomes = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(two_items(), held.loop))
    assert all(isinstance(o, DeadlineExceeded) and not isinstance(o, QueuedTooLong) for o in outcomes), outcomes
    assert len(held.runs) == 1 and held.lookups == 2


@pytest.mark.parametrize("ending", ["scored", "ran past", "never ran"])
async def test_a_job_item_waits_on_an_identical_scoring_as_long_as_it_runs(make_server: Any, ending: str) -> None:
    """Identical items of one batch job start together: one whose own deadline passed while it waited on another's
    scoring failed for good, or (sent again) scored afresh and ran past it again, one after another. It now waits as
    long as the scoring runs, and fails as that did when it ran past its deadline; one that never ran (a
    QueuedTooLong) leaves the item to score again, as a job sends it again."""
    import time

    from rlaifv.service.errors import DeadlineExceeded, QueuedTooLong
    from rlaifv.service.shared_work import SharedWork

    server = make_server(request_timeout_s=1.0)
    serving = server.app.state.serving
    loop = serving.scheduler._task.get_loop()
    response = object()

    async def scoring(gate: asyncio.Event) -> Any:
        await gate.wait()
        if ending == "ran past":
            raise DeadlineExceeded("request not served within 1 s", code="deadline_exceeded")
        if ending == "never ran":
            raise QueuedTooLong("request not served within 1 s", code="deadline_exceeded")
        return response

    async def wait_as_a_job_item() -> Any:
        gate, entered = asyncio.Event(), asyncio.Event()
        serving._scoring["k"] = shared = SharedWork(scoring(gate), serving.metrics)
        shared.task.add_done_callback(lambda _: serving._scoring.pop("k", None))
        real, waits = shared.result_if_any, []

        async def noted(**wait: Any) -> Any:
            waits.append(wait["left_s"])
            entered.set()
            return await real(**wait)

        shared.result_if_any = noted  # type: ignore[method-assign]
        waiting = asyncio.ensure_future(serving._scored_meanwhile("k", time.perf_counter() - 5.0, None))  # 1 s gone
        await entered.wait()  # the item waits on the scoring: now it ends
        gate.set()
        try:
            return await waiting
        finally:
            assert waits == [float("inf")], "the item gave up on the scoring before it ended"

    done = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(wait_as_a_job_item(), loop))
    if ending == "ran past":
        with pytest.raises(DeadlineExceeded) as failed:
            await done
        assert not isinstance(failed.value, QueuedTooLong)
    else:
        assert await done is (response if ending == "scored" else None)


async def test_the_cache_holds_the_response_before_any_request_has_it(make_server: Any, red_url: str) -> None:
    """A client's next identical request, to any replica, finds the entry: written after the responses (to spare
    them a slow Redis SET), a replica asked at once missed and scored again (CI saw it)."""
    server = make_server()
    held = HeldEngine(server)
    held.open()
    serving, cache = server.app.state.serving, held.cache
    done_at_write: list[bool] = []
    real_set = cache.set

    async def set_(key: str, value: str) -> None:
        done_at_write.append(serving._scoring[key].task.done())  # done: its waiters have the response already
        await real_set(key, value)

    cache.set = set_
    request = body(red_url, "Is there a cat, written first?")
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
        first = await client.post("/v1/rewards", json=request)
    assert first.status_code == 200 and done_at_write == [False]
