"""The transformers engine behind the scheduler: a batch gives each request what it gets alone."""

from __future__ import annotations

import asyncio

import pytest

from rlaifv.service.engines import Engine
from rlaifv.service.engines.transformers import TransformersEngine
from rlaifv.service.metrics import Metrics
from rlaifv.service.scheduler import Scheduler


@pytest.fixture
def engine(in_process_pair):
    eng = TransformersEngine(in_process_pair)
    yield eng
    eng.shutdown()


def image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (10, 200, 10))


def score_request(pair, answers):
    from rlaifv.service.engines import ScoreRequest

    return ScoreRequest([image()], "What is in the image?", None, answers, pair.reward, 16)


def test_transformers_engine_is_an_engine(engine) -> None:
    assert isinstance(engine, Engine)
    assert engine.reward == engine.pair.reward and engine.max_positions == engine.pair.max_positions


async def test_queued_requests_share_one_batch_and_match_unbatched(engine, in_process_pair) -> None:
    sched = Scheduler(engine, max_queue=16, max_batch=8, batch_window_s=0.05, retry_after_s=1, metrics=Metrics())
    answers = [["a red circle."], ["a dog.", "two cats."], ["yes", "no", "a blue square."], ["a green tree."]]
    tasks = [asyncio.create_task(sched.submit(score_request(in_process_pair, a), timeout_s=30)) for a in answers]
    await asyncio.sleep(0)
    sched.start()
    outcomes = await asyncio.gather(*tasks)
    for a, outcome in zip(answers, outcomes, strict=True):
        alone = in_process_pair.score(image(), "What is in the image?", a)
        assert outcome.result.ranking.rewards == pytest.approx(alone.rewards, abs=1e-5)
        assert outcome.result.batch_size == 4
    await sched.close(1)


async def test_a_bad_request_fails_alone_with_the_cores_error(engine, in_process_pair) -> None:
    from rlaifv.reward.errors import AnswerError

    good, bad = score_request(in_process_pair, ["a red circle."]), score_request(in_process_pair, ["red " * 40])
    outcomes = await engine.run([good, bad])
    assert len(outcomes[0].ranking.candidates) == 1 and outcomes[0].batch_size == 1
    assert isinstance(outcomes[1], AnswerError)


async def test_warmup_runs_both_kinds(engine) -> None:
    assert await engine.warmup() > 0


def generate_request(pair, question: str, max_tokens: int, given: str | None):
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines import GenerateRequest

    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=0)
    return GenerateRequest([image()], question, None, 2, params, pair.reward, max_tokens_param=given)


async def test_the_default_answer_length_shrinks_to_fit_a_long_prompt(engine, in_process_pair) -> None:
    """As OpenAI and vLLM: no max_tokens given -> what fits; a given one that does not fit -> 400 naming it."""
    from rlaifv.reward.errors import InvalidInputError

    limit = in_process_pair.max_positions
    prompt = len(in_process_pair.encode([image()], "red " * 470))
    room = limit - prompt
    assert 1 <= room < 64
    fitted, given, too_long = await engine.run(
        [
            generate_request(in_process_pair, "red " * 470, 64, None),
            generate_request(in_process_pair, "red " * 470, 64, "max_tokens"),
            generate_request(in_process_pair, "red " * (limit + 10), 64, None),
        ]
    )
    assert all(c.num_tokens <= room for c in fitted.ranking.candidates), [
        c.num_tokens for c in fitted.ranking.candidates
    ]
    assert isinstance(given, InvalidInputError) and given.param == "max_tokens"
    renamed = generate_request(in_process_pair, "red " * 470, 64, "max_completion_tokens")
    (named,) = await engine.run([renamed])  # the message names the field the client set, as `param` does
    assert isinstance(named, InvalidInputError) and named.param == "max_completion_tokens"
    assert "+ max_completion_tokens (64) exceeds" in named.message
    assert isinstance(too_long, InvalidInputError) and too_long.param == "question"


async def test_an_unexpected_error_encoding_one_request_fails_only_that_request(
    engine, in_process_pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: whatever a request's encoding raises, the requests batched with it are served."""
    encode = in_process_pair.encode

    def fragile(images, question=None, **kwargs):
        if question == "boom":
            raise RuntimeError("a bug this input finds")
        return encode(images, question, **kwargs)

    monkeypatch.setattr(in_process_pair, "encode", fragile)
    good = score_request(in_process_pair, ["a red circle."])
    bad = score_request(in_process_pair, ["a red circle."])
    bad.question = "boom"
    first, second, third = await engine.run([good, bad, good])
    assert isinstance(second, RuntimeError)
    assert first.ranking.rewards == third.ranking.rewards and first.batch_size == 2


def test_a_prompt_that_fills_the_positions_names_no_max_tokens_the_client_never_sent() -> None:
    """It said "prompt (256 tokens) + max_tokens (64) exceeds ..." with the server's default in place of a value."""
    from rlaifv.reward.errors import ContextLengthError
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service.engines import GenerateRequest

    request = GenerateRequest([], "q", None, 2, SamplingParams(max_tokens=64), RewardConfig())
    assert request.fitted(250, 256).max_tokens == 6
    with pytest.raises(ContextLengthError) as info:
        request.fitted(256, 256)
    assert info.value.param == "question" and "max_tokens" not in str(info.value)
    assert "leaves no room for an answer in the model's 256 positions" in str(info.value)
    request.max_tokens_param = "max_tokens"
    with pytest.raises(ContextLengthError, match=r"\+ max_tokens \(64\)"):
        request.fitted(250, 256)
