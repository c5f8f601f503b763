"""The scheduler against a fake engine on a virtual clock: batching, waits, deadlines, cancellation, queue bound.

The fake engine takes `batch_s` of *loop* time per batch and records each batch.
Tests run under looptime: the event loop's clock jumps to the next timer when
everything waits, so "20 ms apart" is exact and a test takes milliseconds.
The real engine's batched results are checked in test_engine.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from rlaifv.reward.results import Candidate, Ranking
from rlaifv.reward.scoring import RewardConfig
from rlaifv.service.engines import Engine, EngineResult, Request, ScoreRequest
from rlaifv.service.errors import ClientDisconnected, DeadlineExceeded, Overloaded, Unavailable
from rlaifv.service.metrics import Metrics
from rlaifv.service.scheduler import Scheduler

pytestmark = pytest.mark.looptime


class FakeEngine:
    """Answers each request with one candidate per answer; `bad` answers fail their request alone."""

    def __init__(self, batch_s: float = 0.0) -> None:
        self.batch_s = batch_s
        self.batches: list[list[str]] = []
        self.durations: dict[str, float] = {}  # a batch holding one of these answers takes at least this long
        self.running = self.most_running = 0

    name = "fake"
    reward = RewardConfig()
    max_positions = None
    concurrent_batches = 1

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        return list(text.encode())

    async def run(self, requests: Sequence[Request]) -> list[EngineResult | Exception]:
        labels = [r.answers[0] if isinstance(r, ScoreRequest) else "generate" for r in requests]
        self.batches.append(labels)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(max(self.batch_s, *(self.durations.get(label, 0.0) for label in labels)))
        finally:
            self.running -= 1
        out: list[EngineResult | Exception] = []
        for request in requests:
            if isinstance(request, ScoreRequest) and "bad" in request.answers:
                out.append(ValueError("bad answer"))
                continue
            texts = request.answers if isinstance(request, ScoreRequest) else ["x"] * request.n
            candidates = [Candidate(text=t, reward=0.0, implicit_reward=0.0, policy_logprob=0.0,
                                    reference_logprob=0.0, num_tokens=1) for t in texts]  # fmt: skip
            out.append(EngineResult(Ranking(candidates=candidates, best_index=0), 1, len(requests)))
        return out

    async def warmup(self) -> float:
        return 0.0

    def shutdown(self) -> None:
        pass


def score(label: str) -> ScoreRequest:
    return ScoreRequest([], "q", None, [label], RewardConfig(), 16)


def generate() -> Request:
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines import GenerateRequest

    return GenerateRequest([], "q", None, 2, SamplingParams(), RewardConfig())


def make(engine: FakeEngine, **kw) -> Scheduler:
    opts = {"max_queue": 16, "max_batch": 8, "batch_window_s": 0.05, "retry_after_s": 1, "metrics": Metrics()} | kw
    return Scheduler(engine, **opts)


async def staggered(sched: Scheduler, labels: list[str], gap_s: float):
    tasks = []
    for label in labels:
        tasks.append(asyncio.create_task(sched.submit(score(label), timeout_s=30)))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks)


def test_the_fake_engine_is_an_engine() -> None:
    assert isinstance(FakeEngine(), Engine)


async def test_queued_requests_share_one_batch() -> None:
    engine = FakeEngine()
    sched = make(engine)
    tasks = [asyncio.create_task(sched.submit(score(str(i)), timeout_s=30)) for i in range(4)]
    await asyncio.sleep(0)
    sched.start()
    outcomes = await asyncio.gather(*tasks)
    assert engine.batches == [["0", "1", "2", "3"]]
    assert [o.result.ranking.candidates[0].text for o in outcomes] == ["0", "1", "2", "3"]
    await sched.close(1)


async def test_a_burst_spread_over_more_than_the_window_still_forms_one_batch() -> None:
    """The window restarts at each arrival: 6 requests 20 ms apart (100 ms in all) join a 30 ms window."""
    engine = FakeEngine()
    sched = make(engine, batch_window_s=0.03, batch_max_wait_s=1.0)
    sched.start()
    outcomes = await staggered(sched, [str(i) for i in range(6)], 0.02)
    assert engine.batches == [[str(i) for i in range(6)]]
    assert {o.result.batch_size for o in outcomes} == {6}
    await sched.close(1)


async def test_a_gap_longer_than_the_window_closes_the_batch() -> None:
    engine = FakeEngine()
    sched = make(engine, batch_window_s=0.03, batch_max_wait_s=1.0)
    sched.start()
    await staggered(sched, ["0", "1", "2"], 0.04)
    assert engine.batches == [["0"], ["1"], ["2"]]
    await sched.close(1)


async def test_the_longest_wait_caps_a_forming_batch() -> None:
    """Arrivals at 0, 20, ..., 100 ms with a 50 ms cap: the first batch closes at 50 ms with three."""
    engine = FakeEngine()
    sched = make(engine, batch_window_s=0.05, batch_max_wait_s=0.05)
    sched.start()
    await staggered(sched, [str(i) for i in range(6)], 0.02)
    assert engine.batches[0] == ["0", "1", "2"]
    assert sum(len(b) for b in engine.batches) == 6 and len(engine.batches) >= 2
    await sched.close(1)


async def test_max_batch_splits_a_burst() -> None:
    engine = FakeEngine()
    sched = make(engine, max_batch=3)
    tasks = [asyncio.create_task(sched.submit(score(str(i)), timeout_s=30)) for i in range(7)]
    await asyncio.sleep(0)
    sched.start()
    await asyncio.gather(*tasks)
    assert [len(b) for b in engine.batches] == [3, 3, 1]
    await sched.close(1)


async def closed_loop(sched: Scheduler) -> None:
    """Three clients send two requests each (30 ms to read an answer); two more clients join while batch 1 runs."""

    async def client(i: int, rounds: int) -> None:
        for _ in range(rounds):
            await sched.submit(score(f"c{i}"), timeout_s=30)
            await asyncio.sleep(0.03)

    first = [asyncio.create_task(client(i, 2)) for i in range(3)]
    await asyncio.sleep(0)
    sched.start()
    await asyncio.sleep(0.05)  # batch 1 (3 requests) is running; two more requests queue behind it
    late = [asyncio.create_task(client(i, 1)) for i in range(3, 5)]
    await asyncio.gather(*first, *late)
    await sched.close(1)


async def test_a_batch_after_a_batch_waits_for_the_clients_just_answered() -> None:
    """Closed-loop clients answered by one batch come back after the requests queued meanwhile: the next batch
    waits for both (3 returning + 2 queued = 5) instead of splitting into batches of 2 and 3 that alternate."""
    engine = FakeEngine(batch_s=0.2)
    await closed_loop(make(engine, batch_window_s=0.005, batch_max_wait_s=1.0))
    assert [len(b) for b in engine.batches] == [3, 5]  # not [3, 2, 3]


async def test_without_the_wait_for_returning_clients_batches_split() -> None:
    """The same traffic with batch_max_wait_s = the window: the returning clients miss the second batch."""
    engine = FakeEngine(batch_s=0.2)
    await closed_loop(make(engine, batch_window_s=0.005, batch_max_wait_s=0.005))
    assert [len(b) for b in engine.batches] == [3, 2, 3]


async def test_kinds_are_batched_separately() -> None:
    engine = FakeEngine()
    sched = make(engine)
    tasks = [asyncio.create_task(sched.submit(r, timeout_s=30)) for r in (generate(), score("a"), generate())]
    await asyncio.sleep(0)
    sched.start()
    outcomes = await asyncio.gather(*tasks)
    assert [len(o.result.ranking.candidates) for o in outcomes] == [2, 1, 2]
    assert engine.batches == [["generate"], ["a"], ["generate"]]
    await sched.close(1)


async def test_bad_request_in_batch_fails_alone() -> None:
    engine = FakeEngine()
    sched = make(engine)
    good = asyncio.create_task(sched.submit(score("fine"), timeout_s=30))
    bad = asyncio.create_task(sched.submit(score("bad"), timeout_s=30))
    await asyncio.sleep(0)
    sched.start()
    assert (await good).result.batch_size == 2
    with pytest.raises(ValueError, match="bad answer"):
        await bad
    await sched.close(1)


async def test_an_engine_bug_fails_the_batch_and_serving_goes_on() -> None:
    class Broken(FakeEngine):
        async def run(self, requests):
            if len(self.batches) == 0:
                self.batches.append(["boom"])
                raise RuntimeError("engine bug")
            return await super().run(requests)

    sched = make(Broken())
    sched.start()
    with pytest.raises(RuntimeError, match="engine bug"):
        await sched.submit(score("a"), timeout_s=30)
    assert (await sched.submit(score("b"), timeout_s=30)).result.batch_size == 1
    await sched.close(1)


async def test_an_engine_answering_too_few_requests_fails_its_batch_and_frees_its_images() -> None:
    """With batches run as tasks, an error after the engine call ended the task: its requests waited until their
    deadlines (504), their images stayed counted (later image requests got 429) and liveness saw nothing."""

    class Short(FakeEngine):
        async def run(self, requests):
            first = not self.batches
            outcomes = await super().run(requests)
            return outcomes[:-1] if first else outcomes

    from PIL import Image

    sched = make(Short(), batch_window_s=0.05, max_queued_pixels=10_000)
    sched.start()
    image = Image.new("RGB", (50, 50))
    first = [ScoreRequest([image], "q", None, [label], RewardConfig(), 16) for label in ("a", "b")]
    outcomes = await asyncio.gather(*(sched.submit(r, timeout_s=30) for r in first), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and "answered 1 of 2" in str(o) for o in outcomes), outcomes
    assert sched.pixels_held == 0 and sched.in_flight == 0 and sched.stalled(60) is None
    assert (await sched.submit(score("c"), timeout_s=30)).result.batch_size == 1
    await sched.close(1)


async def test_queue_bound_raises_overloaded_at_once() -> None:
    sched = make(FakeEngine(), max_queue=1, retry_after_s=7)  # not started: nothing leaves the queue
    first = asyncio.create_task(sched.submit(score("a"), timeout_s=30))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await sched.submit(score("b"), timeout_s=30)
    assert info.value.headers["Retry-After"] == "7"
    assert sched.metrics.registry.get_sample_value("rlaifv_requests_rejected_total", {"reason": "queue_full"}) == 1
    first.cancel()


async def test_the_images_waiting_requests_hold_are_bounded() -> None:
    """Decoded images are held from arrival to answer: past the pixel budget a request with images is a 429,
    one without is not, and the budget frees as requests finish; a lone request over it is still let in."""
    from PIL import Image

    def with_images(label: str, side: int, count: int = 1) -> ScoreRequest:
        return ScoreRequest([Image.new("RGB", (side, side))] * count, "q", None, [label], RewardConfig(), 16)

    engine = FakeEngine(batch_s=1.0)
    sched = make(engine, max_queued_pixels=3 * 100 * 100, max_batch=1)
    sched.start()
    alone = await sched.submit(with_images("huge", 200), timeout_s=30)  # 4x the budget, but nothing else held
    assert alone.result.ranking.best.text == "huge" and sched.pixels_held == 0
    held = [asyncio.create_task(sched.submit(with_images(f"r{i}", 100), timeout_s=30)) for i in range(3)]
    await asyncio.sleep(0)
    assert sched.pixels_held == 3 * 100 * 100
    with pytest.raises(Overloaded, match="hold 30,000 decoded image pixels and this one 100 more") as info:
        await sched.submit(with_images("one more", 10), timeout_s=30)
    assert info.value.headers["Retry-After"] == "1"
    text_only = await sched.submit(score("no images"), timeout_s=30)  # waits its turn behind the three
    assert text_only.result.ranking.best.text == "no images"
    await asyncio.gather(*held)
    assert sched.pixels_held == 0
    # a request that timed out in a running batch holds its images until the batch ends
    late = asyncio.create_task(sched.submit(with_images("late", 100), timeout_s=0.5))
    await asyncio.sleep(0.6)
    with pytest.raises(DeadlineExceeded) as ran:
        await late
    assert type(ran.value) is DeadlineExceeded  # it ran: not "queued too long", a job would only rerun it
    assert sched.pixels_held == 100 * 100
    await asyncio.sleep(0.5)
    assert sched.pixels_held == 0
    huge = asyncio.create_task(sched.submit(with_images("huge again", 200), timeout_s=30))
    await asyncio.sleep(0)
    assert (await sched.submit(score("text"), timeout_s=30)).result.ranking.best.text == "text"  # never refused
    await huge
    await sched.close(0)


async def test_deadline_passes_while_queued_and_the_request_never_runs() -> None:
    """Still queued at its deadline: `QueuedTooLong` (a 504 as any deadline), which tells a batch job's worker that
    nothing ran and the item may go again."""
    from rlaifv.service.errors import QueuedTooLong

    engine = FakeEngine()
    sched = make(engine)  # not started
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(QueuedTooLong) as info:
        await sched.submit(score("late"), timeout_s=0.05)
    assert info.value.status == 504 and info.value.code == "deadline_exceeded"
    assert loop.time() - start == pytest.approx(0.05)
    sched.start()
    outcome = await sched.submit(score("on time"), timeout_s=30)
    assert outcome.result.batch_size == 1
    assert engine.batches == [["on time"]]


async def test_deadline_counts_the_time_queued_behind_a_slow_batch() -> None:
    engine = FakeEngine(batch_s=1.0)
    sched = make(engine, batch_window_s=0.0)
    sched.start()
    running = asyncio.create_task(sched.submit(score("first"), timeout_s=30))
    await asyncio.sleep(0.01)
    with pytest.raises(DeadlineExceeded):
        await sched.submit(score("second"), timeout_s=0.5)  # the model is busy for 1 s
    await running
    await asyncio.sleep(0)
    assert engine.batches == [["first"]]
    await sched.close(1)


async def test_client_gone_is_dropped_before_the_model() -> None:
    engine = FakeEngine()
    sched = make(engine)  # not started
    gone = asyncio.Event()
    gone.set()
    with pytest.raises(ClientDisconnected):
        await sched.submit(score("a"), timeout_s=30, disconnected=gone.wait)
    sched.start()
    await sched.submit(score("b"), timeout_s=30)
    assert engine.batches == [["b"]]  # the abandoned request never ran
    rejected = sched.metrics.registry.get_sample_value
    assert rejected("rlaifv_requests_rejected_total", {"reason": "client_disconnected"}) == 1
    await sched.close(1)


async def three_queued(batch_s: float) -> tuple[Scheduler, list[asyncio.Task]]:
    """A started scheduler running one request per batch, `batch_s` each, with three requests queued."""
    sched = make(FakeEngine(batch_s=batch_s), max_batch=1)
    sched.start()
    tasks = [asyncio.create_task(sched.submit(score(str(i)), timeout_s=30)) for i in range(3)]
    await asyncio.sleep(0)
    return sched, tasks


async def test_close_lets_queued_work_finish_then_refuses_new_work() -> None:
    sched, tasks = await three_queued(0.1)
    await sched.close(10)
    assert [len((await t).result.ranking.candidates) for t in tasks] == [1, 1, 1]
    with pytest.raises(Unavailable):
        await sched.submit(score("a"), timeout_s=30)


async def test_close_returns_when_the_last_batch_ends_not_at_a_later_tick() -> None:
    """Shutdown waits on the drain itself (a polled wait ended up to one poll interval late)."""
    sched, tasks = await three_queued(0.107)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await sched.close(10)
    assert loop.time() - began == pytest.approx(3 * 0.107, abs=1e-6)
    assert all(t.done() and not t.exception() for t in tasks)


async def test_close_fails_what_the_grace_period_cannot_finish() -> None:
    sched, tasks = await three_queued(1.0)
    await sched.close(1.5)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[-1], Unavailable)


async def test_a_batch_running_past_the_stall_limit_fails_liveness_until_it_returns() -> None:
    """A model call hung in a driver never returns: only a restart frees the replica, so /healthz says so."""
    engine = FakeEngine(batch_s=100.0)
    sched = make(engine, batch_window_s=0.0)
    sched.start()
    assert sched.stalled(60) is None  # idle is alive
    running = asyncio.create_task(sched.submit(score("slow"), timeout_s=300))
    await asyncio.sleep(59)
    assert sched.stalled(60) is None
    await asyncio.sleep(2)
    assert sched.stalled(60) == "one batch has run 61 s (limit 60 s)"
    assert sched.stalled(0) is None  # 0: never
    await running
    assert sched.stalled(60) is None
    await sched.close(1)
    assert sched.stalled(60) is None  # a closed scheduler is draining, not stuck


async def test_a_scheduler_whose_loop_died_fails_liveness() -> None:
    sched = make(FakeEngine())

    async def broken() -> list:
        raise RuntimeError("bug")

    sched._collect = broken  # type: ignore[method-assign]
    sched.start()
    await asyncio.sleep(0.01)
    assert sched.stalled(60) == "scheduler stopped (RuntimeError)"


async def test_close_answers_the_running_batch_too_and_says_when_to_retry() -> None:
    """A request on the model when the grace ran out waited until the HTTP server cancelled its handler: a bare
    500 with a traceback, never the 503 the docs promise."""
    engine = FakeEngine(batch_s=10.0)
    sched = make(engine, max_batch=1, retry_after_s=3)
    sched.start()
    tasks = [asyncio.create_task(sched.submit(score(str(i)), timeout_s=30)) for i in range(2)]
    await asyncio.sleep(0.1)
    assert sched.in_flight == 1 and sched.depth == 1
    await sched.close(1.0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Unavailable) and r.code == "shutting_down" for r in results), results
    assert all(r.headers["Retry-After"] == "3" for r in results)
    assert sched.depth == 0 and sched.pixels_held == 0


@pytest.mark.parametrize("leaves", ["disconnects", "times_out"])
async def test_a_request_that_leaves_the_queue_frees_its_place_its_images_and_the_gauge(leaves: str) -> None:
    """Queued requests whose clients had left kept their place and their images until the batcher reached them:
    live clients got 429 "4 requests already waiting" with nobody waiting, and the queue gauge stayed up."""
    from PIL import Image

    from rlaifv.service.engines import ScoreRequest

    engine = FakeEngine(batch_s=5.0)
    sched = make(engine, max_batch=1, max_queue=2, max_queued_pixels=3 * 100 * 100)
    sched.start()
    running = asyncio.create_task(sched.submit(score("running"), timeout_s=60))
    await asyncio.sleep(0.1)
    image = Image.new("RGB", (100, 100))
    gone = asyncio.Event()
    waiting = [
        asyncio.create_task(
            sched.submit(
                ScoreRequest([image], "q", None, [f"w{i}"], RewardConfig(), 16),
                timeout_s=1.0 if leaves == "times_out" else 60,
                disconnected=gone.wait,
            )
        )
        for i in range(2)
    ]
    await asyncio.sleep(0.1)
    depth = sched.metrics.registry.get_sample_value
    assert sched.depth == 2 and sched.pixels_held == 2 * 100 * 100 and depth("rlaifv_queue_depth") == 2
    gone.set() if leaves == "disconnects" else await asyncio.sleep(1.0)
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, ClientDisconnected | DeadlineExceeded) for r in results), results
    assert sched.depth == 0 and sched.pixels_held == 0 and depth("rlaifv_queue_depth") == 0  # while still running
    assert not running.done()
    accepted = asyncio.create_task(sched.submit(score("next"), timeout_s=60))  # was 429: the queue looked full
    await asyncio.gather(running, accepted)
    assert engine.batches == [["running"], ["next"]]
    await sched.close(1)


async def test_close_answers_a_batch_still_forming() -> None:
    """A batch being collected (up to the batch wait) was in no list `close` read: it saw no work, stopped the
    loop, and the request waited for its deadline (504), or for uvicorn to cancel it."""
    engine = FakeEngine()
    sched = make(engine, batch_window_s=2.0, max_batch=8)
    sched.start()
    task = asyncio.create_task(sched.submit(score("a"), timeout_s=30))
    await asyncio.sleep(0.5)  # taken for a batch that waits 2 s for company
    assert sched.depth == 0 and sched.in_flight == 0 and not task.done()
    await sched.close(0.0)
    with pytest.raises(Unavailable):
        await task
    assert engine.batches == []


async def test_close_lets_a_forming_batch_run_within_the_grace() -> None:
    engine = FakeEngine()
    sched = make(engine, batch_window_s=2.0, max_batch=8)
    sched.start()
    task = asyncio.create_task(sched.submit(score("a"), timeout_s=30))
    await asyncio.sleep(0.5)
    await sched.close(5.0)
    assert len((await task).result.ranking.candidates) == 1 and engine.batches == [["a"]]


async def test_the_depth_gauge_counts_a_request_held_for_the_next_batch() -> None:
    engine = FakeEngine(batch_s=1.0)
    sched = make(engine)
    sched.start()
    tasks = [asyncio.create_task(sched.submit(r, timeout_s=30)) for r in (score("a"), generate())]
    await asyncio.sleep(0.5)  # "a" runs; the generate request waits, held for the next batch
    gauge = sched.metrics.registry.get_sample_value
    assert sched.depth == 1 and gauge("rlaifv_queue_depth") == 1
    await asyncio.gather(*tasks)
    assert gauge("rlaifv_queue_depth") == 0
    await sched.close(1)


@pytest.mark.parametrize("leaves", ["disconnects", "times_out"])
async def test_a_request_that_leaves_a_running_batch_is_withdrawn_from_it(leaves: str) -> None:
    """The batch ran its abandoned rows to the end (N samples, a reference pass) for nobody: the engine is told."""
    engine = FakeEngine(batch_s=10.0)
    sched = make(engine, max_batch=2, batch_window_s=0.01)
    sched.start()
    gone = asyncio.Event()
    staying, leaving = score("stays"), score("leaves")
    kept = asyncio.create_task(sched.submit(staying, timeout_s=30))
    kwargs = {"timeout_s": 30.0, "disconnected": gone.wait} if leaves == "disconnects" else {"timeout_s": 1.0}
    left = asyncio.create_task(sched.submit(leaving, **kwargs))
    await asyncio.sleep(0.5)
    assert sched.in_flight == 2 and not leaving.withdrawal.is_set()
    gone.set()
    with pytest.raises(ClientDisconnected if leaves == "disconnects" else DeadlineExceeded):
        await left
    assert leaving.withdrawal.is_set() and not staying.withdrawal.is_set()
    assert (await kept).result.ranking.candidates[0].text == "stays"
    await sched.close(1)


async def finished_at(task: asyncio.Task) -> float:
    await task
    return asyncio.get_running_loop().time()


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_an_engine_that_batches_across_calls_serves_a_short_request_beside_a_long_one(concurrency: int) -> None:
    """vLLM batches continuously: with one batch at a time a 1-token request waited 4-6 s behind a best-of-16
    of 256 tokens. With two, the short one runs beside it; with one (the transformers engine), it waits."""
    engine = FakeEngine()
    engine.durations = {"long": 10.0, "short": 0.1}
    sched = make(engine, concurrency=concurrency)
    sched.start()
    start = asyncio.get_running_loop().time()
    long = asyncio.create_task(sched.submit(score("long"), timeout_s=60))
    await asyncio.sleep(0.2)
    short = asyncio.create_task(finished_at(asyncio.create_task(sched.submit(score("short"), timeout_s=60))))
    done = await short - start
    await long
    assert engine.batches == [["long"], ["short"]]
    if concurrency == 2:
        assert done == pytest.approx(0.35, abs=0.01) and engine.most_running == 2  # window 0.05 + 0.1
    else:
        assert done > 10.05 and engine.most_running == 1  # after the long batch
    await sched.close(1)


async def test_no_more_batches_run_at_once_than_the_engine_takes_and_the_queue_batches_meanwhile() -> None:
    metrics = Metrics()
    engine = FakeEngine(batch_s=5.0)
    sched = make(engine, concurrency=2, batch_window_s=0.0, metrics=metrics)
    sched.start()
    first = []
    for label in ("a", "b"):  # two batches (no window): both slots taken
        first.append(asyncio.create_task(sched.submit(score(label), timeout_s=60)))
        await asyncio.sleep(0.1)
    rest = [asyncio.create_task(sched.submit(score(label), timeout_s=60)) for label in ("c", "d", "e")]
    await asyncio.sleep(4.0)
    assert engine.most_running == 2 and sched.depth == 3  # c, d and e wait for a slot
    outcomes = await asyncio.gather(*first, *rest)
    assert [o.queue_s for o in outcomes][2:] == [pytest.approx(4.8, abs=0.01)] * 3  # queued at 0.2 s, taken at 5.0 s
    sizes = metrics.registry.get_sample_value("rlaifv_batch_size_sum", {"kind": "score"})
    count = metrics.registry.get_sample_value("rlaifv_batch_size_count", {"kind": "score"})
    assert (count, sizes) == (3, 5)  # a, b, then c + d + e as one batch (each request its own engine call)
    await sched.close(1)


async def test_close_answers_every_running_batch_and_liveness_watches_the_oldest() -> None:
    engine = FakeEngine(batch_s=100.0)
    sched = make(engine, concurrency=3, batch_window_s=0.0, retry_after_s=2)
    sched.start()
    tasks = [asyncio.create_task(sched.submit(score(str(i)), timeout_s=300)) for i in range(2)]
    await asyncio.sleep(30)
    tasks.append(asyncio.create_task(sched.submit(score("2"), timeout_s=300)))
    await asyncio.sleep(31)
    assert sched.in_flight == 3 and sched.stalled(60) == "one batch has run 61 s (limit 60 s)"
    await sched.close(1.0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Unavailable) and r.code == "shutting_down" for r in results), results
    assert engine.running == 0  # the engine calls were cancelled, not left running


def test_concurrency_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        make(FakeEngine(), concurrency=0)


async def test_a_short_request_in_a_long_ones_batch_is_answered_when_it_is_done() -> None:
    """Joining a long best-of-N's batch (it came within the batch window), a short request waited for the whole
    batch, although vLLM had finished it at once: an engine batching across calls gets each request on its own."""
    engine = FakeEngine()
    engine.durations = {"long": 10.0, "short": 0.1}
    sched = make(engine, concurrency=2, batch_window_s=0.05)
    sched.start()
    start = asyncio.get_running_loop().time()
    long = asyncio.create_task(sched.submit(score("long"), timeout_s=60))
    short = asyncio.create_task(finished_at(asyncio.create_task(sched.submit(score("short"), timeout_s=60))))
    assert await short - start == pytest.approx(0.15, abs=0.01)  # the window, then its own 0.1 s
    outcome = await long
    assert engine.batches == [["long"], ["short"]] and outcome.queue_s == pytest.approx(0.05, abs=0.01)
    await sched.close(1)


async def test_requests_in_flight_are_a_gauge() -> None:
    """The scheduler's running requests were visible only in-process: a probe of clients leaving had nothing on
    /metrics to see the work end by."""

    class Gated(FakeEngine):
        def __init__(self) -> None:
            super().__init__()
            self.entered, self.release = asyncio.Event(), asyncio.Event()

        async def run(self, requests: Sequence[Request]) -> list[EngineResult | Exception]:
            self.entered.set()
            await self.release.wait()
            return await super().run(requests)

    engine, metrics = Gated(), Metrics()
    sched = make(engine, metrics=metrics)
    tasks = [asyncio.create_task(sched.submit(score(str(i)), timeout_s=30)) for i in range(3)]
    sched.start()
    await engine.entered.wait()
    assert metrics.registry.get_sample_value("rlaifv_requests_in_flight") == 3
    engine.release.set()
    await asyncio.gather(*tasks)
    assert metrics.registry.get_sample_value("rlaifv_requests_in_flight") == 0
    await sched.close(1)
