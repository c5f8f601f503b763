"""The scheduler with the real engine: micro-batching, deadlines, cancellation, queue bound (no HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import Engine, GenerateRequest, ScoreRequest
from service.errors import ClientDisconnected, DeadlineExceeded, Overloaded
from service.metrics import Metrics
from service.scheduler import Scheduler


@pytest.fixture
def engine(in_process_pair):
    eng = Engine(in_process_pair)
    yield eng
    eng.shutdown()


def image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (10, 200, 10))


def score_request(pair, answers):
    return ScoreRequest([image()], "What is in the image?", None, answers, pair.reward, 16)


def generate_request(pair, n=3, seed=0):
    from reward.sampling import SamplingParams

    return GenerateRequest(
        [image()], "What is in the image?", None, n, SamplingParams(max_tokens=6, seed=seed), pair.reward
    )


def make(engine, **kw) -> Scheduler:
    opts = {"max_queue": 16, "max_batch": 8, "batch_window_s": 0.05, "retry_after_s": 1, "metrics": Metrics()} | kw
    return Scheduler(engine, **opts)


def batch_sizes(metrics: Metrics, kind: str) -> tuple[float, float]:
    count = metrics.registry.get_sample_value("rlaifv_batch_size_count", {"kind": kind})
    total = metrics.registry.get_sample_value("rlaifv_batch_size_sum", {"kind": kind})
    return count or 0.0, total or 0.0


async def test_queued_requests_share_one_batch_and_match_unbatched(engine, in_process_pair) -> None:
    sched = make(engine)
    answers = [["a red circle."], ["a dog.", "two cats."], ["yes", "no", "a blue square."], ["a green tree."]]
    tasks = [asyncio.create_task(sched.submit(score_request(in_process_pair, a), timeout_s=30)) for a in answers]
    await asyncio.sleep(0)  # all four are queued before the batcher starts
    sched.start()
    outcomes = await asyncio.gather(*tasks)
    assert batch_sizes(sched.metrics, "score") == (1.0, 4.0)
    for a, outcome in zip(answers, outcomes, strict=True):
        alone = in_process_pair.score(image(), "What is in the image?", a)
        assert outcome.result.ranking.rewards == pytest.approx(alone.rewards, abs=1e-5)
        assert outcome.result.batch_size == 4
    await sched.close(1)


async def _staggered(sched, pair, count: int, gap_s: float):
    tasks = []
    for i in range(count):
        tasks.append(asyncio.create_task(sched.submit(score_request(pair, [f"answer {i}"]), timeout_s=30)))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks)


async def test_a_burst_spread_over_more_than_the_window_still_forms_one_batch(engine, in_process_pair) -> None:
    """The window restarts at each arrival: 6 requests 20 ms apart (100 ms in all) join a 30 ms window."""
    sched = make(engine, batch_window_s=0.03, batch_max_wait_s=1.0)
    sched.start()
    outcomes = await _staggered(sched, in_process_pair, 6, 0.02)
    assert batch_sizes(sched.metrics, "score") == (1.0, 6.0)
    assert {o.result.batch_size for o in outcomes} == {6}
    await sched.close(1)


async def test_the_longest_wait_caps_a_forming_batch(engine, in_process_pair) -> None:
    sched = make(engine, batch_window_s=0.05, batch_max_wait_s=0.05)
    sched.start()
    await _staggered(sched, in_process_pair, 6, 0.02)
    count, total = batch_sizes(sched.metrics, "score")
    assert total == 6.0 and count >= 2  # 6 arrivals over 100 ms cannot all wait in one 50 ms batch
    await sched.close(1)


class SlowEngine(Engine):
    """The real engine, plus 200 ms per batch: long enough for requests to queue behind a running batch."""

    def run_batch(self, requests):
        import time

        time.sleep(0.2)
        return super().run_batch(requests)


async def test_a_batch_after_a_batch_waits_for_the_clients_just_answered(in_process_pair) -> None:
    """Closed-loop clients answered by one batch come back after the requests queued meanwhile: the next batch
    waits for both (3 returning + 2 queued = 5) instead of splitting into batches of 2 and 3 that alternate."""
    engine = SlowEngine(in_process_pair)
    sched = make(engine, batch_window_s=0.005, batch_max_wait_s=1.0)

    async def client(i: int, rounds: int) -> None:
        for _ in range(rounds):
            await sched.submit(score_request(in_process_pair, [f"answer {i}"]), timeout_s=30)
            await asyncio.sleep(0.03)  # the client reads the answer, then sends its next request

    first = [asyncio.create_task(client(i, 2)) for i in range(3)]
    await asyncio.sleep(0)
    sched.start()
    await asyncio.sleep(0.05)  # batch 1 (3 requests) is running; two more requests queue behind it
    late = [asyncio.create_task(client(i, 1)) for i in range(3, 5)]
    await asyncio.gather(*first, *late)
    assert batch_sizes(sched.metrics, "score") == (2.0, 8.0)  # [3, 5], not [3, 2, 3]
    await sched.close(1)
    engine.shutdown()


async def test_kinds_are_batched_separately(engine, in_process_pair) -> None:
    sched = make(engine)
    reqs = [
        generate_request(in_process_pair, seed=1),
        score_request(in_process_pair, ["a"]),
        generate_request(in_process_pair, seed=2),
    ]
    tasks = [asyncio.create_task(sched.submit(r, timeout_s=30)) for r in reqs]
    await asyncio.sleep(0)
    sched.start()
    outcomes = await asyncio.gather(*tasks)
    assert [len(o.result.ranking.candidates) for o in outcomes] == [3, 1, 3]
    assert batch_sizes(sched.metrics, "generate")[0] >= 1 and batch_sizes(sched.metrics, "score") == (1.0, 1.0)
    await sched.close(1)


async def test_bad_request_in_batch_fails_alone(engine, in_process_pair) -> None:
    from reward.errors import AnswerError

    sched = make(engine)
    good = asyncio.create_task(sched.submit(score_request(in_process_pair, ["a red circle."]), timeout_s=30))
    bad = asyncio.create_task(sched.submit(score_request(in_process_pair, ["red " * 40]), timeout_s=30))
    await asyncio.sleep(0)
    sched.start()
    assert len((await good).result.ranking.candidates) == 1
    with pytest.raises(AnswerError):
        await bad
    await sched.close(1)


async def test_queue_bound_raises_overloaded_at_once(engine, in_process_pair) -> None:
    sched = make(engine, max_queue=1, retry_after_s=7)  # not started: nothing leaves the queue
    first = asyncio.create_task(sched.submit(score_request(in_process_pair, ["a"]), timeout_s=30))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await sched.submit(score_request(in_process_pair, ["b"]), timeout_s=30)
    assert info.value.headers["Retry-After"] == "7"
    first.cancel()


async def test_deadline_passes_while_queued(engine, in_process_pair) -> None:
    sched = make(engine)  # not started
    with pytest.raises(DeadlineExceeded):
        await sched.submit(score_request(in_process_pair, ["a"]), timeout_s=0.05)
    sched.start()  # the expired item is dropped, the next one is served
    outcome = await sched.submit(score_request(in_process_pair, ["b"]), timeout_s=30)
    assert outcome.result.batch_size == 1
    assert batch_sizes(sched.metrics, "score") == (1.0, 1.0)
    await sched.close(1)


async def test_client_gone_is_dropped_before_the_model(engine, in_process_pair) -> None:
    sched = make(engine)  # not started
    gone = asyncio.Event()
    gone.set()
    with pytest.raises(ClientDisconnected):
        await sched.submit(score_request(in_process_pair, ["a"]), timeout_s=30, disconnected=gone.wait)
    sched.start()
    outcome = await sched.submit(score_request(in_process_pair, ["b"]), timeout_s=30)
    assert outcome.result.batch_size == 1
    assert batch_sizes(sched.metrics, "score") == (1.0, 1.0)  # the abandoned request never ran
    assert (
        sched.metrics.registry.get_sample_value("rlaifv_requests_rejected_total", {"reason": "client_disconnected"})
        == 1
    )
    await sched.close(1)


async def test_close_refuses_new_work(engine, in_process_pair) -> None:
    from service.errors import Unavailable

    sched = make(engine)
    sched.start()
    await sched.close(1)
    with pytest.raises(Unavailable):
        await sched.submit(score_request(in_process_pair, ["a"]), timeout_s=30)
