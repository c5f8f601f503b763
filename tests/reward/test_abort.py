"""A pair asked to stop (`ModelPair.abort`) ends its sampling at the next decoding step; so do the rows of a task
withdrawn by its owner (`GenerateTask.withdrawn`), while the rest of its batch runs on."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from rlaifv.reward.errors import Aborted, RewardError, Withdrawn
from rlaifv.reward.sampling import SamplingParams


def test_sampling_stops_at_the_next_step_once_aborted(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlaifv.reward import load_bundle, sampling

    pair = load_bundle(tiny_bundle)  # its own: the session's pair must not stay aborted
    prompt = pair.encode([Image.new("RGB", (32, 32), (200, 0, 0))], "What is in the image?")
    params = [SamplingParams(max_tokens=4, seed=0)]
    assert len(pair.sample([prompt], [2], params)[0]) == 2
    pair.abort.set()
    with pytest.raises(Aborted, match="stopped before its prefill"):
        pair.sample([prompt], [2], params)
    pair.abort.clear()
    real_step, steps = sampling.step, []

    def step(*args, **kwargs):  # the abort comes while the batch is sampling
        steps.append(1)
        if len(steps) == 2:
            pair.abort.set()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sampling, "step", step)
    with pytest.raises(Aborted, match="stopped at step 2 of 4"):
        pair.sample([prompt], [2], params)
    assert issubclass(Aborted, RewardError)


def test_an_aborted_batch_is_not_rerun_request_by_request(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's "isolate the culprit" fallback ran each request of an aborted batch alone: a prefill each,
    then the abort again (9 prefills for 8 requests), seconds of a shutdown's grace on a GPU."""
    from rlaifv.reward import load_bundle
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines import GenerateRequest
    from rlaifv.service.engines.transformers import TransformersEngine

    pair = load_bundle(tiny_bundle)
    engine = TransformersEngine(pair)
    calls = []
    real = pair.generate_or_withdraw
    monkeypatch.setattr(pair, "generate_or_withdraw", lambda tasks: calls.append(len(tasks)) or real(tasks))
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    requests = [
        GenerateRequest([image], f"question {i}?", None, 2, SamplingParams(max_tokens=4, seed=i), pair.reward)
        for i in range(4)
    ]
    pair.abort.set()
    results = engine.run_batch(requests)
    assert all(isinstance(r, Aborted) for r in results) and calls == [4]


def test_a_task_withdrawn_while_sampling_stops_its_rows_and_is_not_scored(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from rlaifv.reward import load_bundle, sampling
    from rlaifv.reward.model_pair import GenerateTask

    pair = load_bundle(tiny_bundle)
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    params = SamplingParams(max_tokens=12, seed=0, logit_bias={i: -100 for i in pair.stop_ids})  # no early end
    leaving, staying = threading.Event(), threading.Event()
    tasks = [
        GenerateTask(pair.encode([image], "What is in the image?"), 3, params, pair.reward, withdrawn=leaving),
        GenerateTask(pair.encode([image], "What colour is it?"), 1, params, pair.reward, withdrawn=staying),
    ]
    real_step, rows = sampling.step, []

    def step(model, state, feed):  # the first task's client leaves while the batch samples
        rows.append(int(feed.shape[0]))
        if len(rows) == 3:
            leaving.set()
        return real_step(model, state, feed)

    scored = []
    real_logprobs = pair.sequence_logprobs

    def sequence_logprobs(prompts, answers, *, reference):
        scored.append([len(group) for group in answers])
        return real_logprobs(prompts, answers, reference=reference)

    monkeypatch.setattr(sampling, "step", step)
    monkeypatch.setattr(pair, "sequence_logprobs", sequence_logprobs)
    withdrawn, ranking = pair.generate_or_withdraw(tasks)
    assert isinstance(withdrawn, Withdrawn) and len(ranking.candidates) == 1
    assert rows[:3] == [4, 4, 4] and set(rows[3:]) == {1}  # its 3 rows left at the step that saw it
    assert scored == [[1]]  # only the task still wanted reached the reference pass
    assert len(ranking.candidates[0].text.split()) >= 1

    rows.clear(), scored.clear()
    withdrawn, ranking = pair.generate_or_withdraw(tasks)  # withdrawn before its batch: never sampled
    assert isinstance(withdrawn, Withdrawn) and rows and set(rows) == {1} and scored == [[1]]
    with pytest.raises(Withdrawn):
        pair.generate_batch(tasks)
    staying.set()
    assert all(isinstance(o, Withdrawn) for o in pair.generate_or_withdraw(tasks)) and rows


@pytest.mark.parametrize("kind", ["generate", "score"])
def test_a_task_withdrawn_between_passes_leaves_the_passes_after_it(
    kind: str, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Withdrawal was read once, after sampling: the reference pass and the claims labeller (most of a 'claims'
    request's time) ran on for a client that had left after it."""
    import threading

    from rlaifv.reward import load_bundle
    from rlaifv.reward.model_pair import GenerateTask, ScoreTask

    pair = load_bundle(tiny_bundle)
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    leaving, staying = threading.Event(), threading.Event()
    prompts = [pair.encode([image], "What is in the image?"), pair.encode([image], "What colour is it?")]
    pairs = list(zip(prompts, (leaving, staying), strict=True))
    if kind == "generate":
        params = SamplingParams(max_tokens=6, seed=0)
        tasks: list = [GenerateTask(p, 2, params, pair.reward, withdrawn=w) for p, w in pairs]
        run = pair.generate_or_withdraw
    else:
        answers = pair.encode_answers(["a red circle.", "a blue square."])
        texts = ["a red circle.", "a blue square."]
        tasks = [ScoreTask(p, answers, texts, pair.reward, withdrawn=w) for p, w in pairs]
        run = pair.score_or_withdraw
    passes, claimed = [], []
    real_logprobs, real_claims = pair.sequence_logprobs, pair._apply_claims

    def sequence_logprobs(prompts, answers, *, reference):
        passes.append((reference, len(answers)))
        if not reference:  # the client leaves during the policy pass of given answers
            leaving.set()
        return real_logprobs(prompts, answers, reference=reference)

    def apply_claims(tasks, groups):
        claimed.append(len(tasks))
        return real_claims(tasks, groups)

    monkeypatch.setattr(pair, "sequence_logprobs", sequence_logprobs)
    monkeypatch.setattr(pair, "_apply_claims", apply_claims)
    if kind == "generate":
        real_finish = pair._finish_answers

        def finish_answers(prompts, answers):  # the client leaves once its answers were sampled and read
            leaving.set()
            return real_finish(prompts, answers)

        monkeypatch.setattr(pair, "_finish_answers", finish_answers)
    withdrawn, ranking = run(tasks)
    assert isinstance(withdrawn, Withdrawn) and len(ranking.candidates) == 2
    assert (True, 1) in passes and (True, 2) not in passes  # the reference pass ran for the staying task only
    assert claimed == [1]


def test_a_task_withdrawn_during_the_reference_pass_gets_no_token_logprobs_pass(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`logprobs` answers need a forward pass each (`_token_logprobs`): it ran for a client gone meanwhile."""
    import threading

    from rlaifv.reward import load_bundle
    from rlaifv.reward.model_pair import GenerateTask

    pair = load_bundle(tiny_bundle)
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    leaving, staying = threading.Event(), threading.Event()
    params = SamplingParams(max_tokens=6, seed=0)
    prompts = [pair.encode([image], "What is in the image?"), pair.encode([image], "What colour is it?")]
    tasks = [
        GenerateTask(p, 2, params, pair.reward, top_logprobs=2, withdrawn=w)
        for p, w in zip(prompts, (leaving, staying), strict=True)
    ]
    real_logprobs, real_tokens = pair.sequence_logprobs, pair._token_logprobs
    asked: list[object] = []

    def sequence_logprobs(prompts, answers, *, reference):
        out = real_logprobs(prompts, answers, reference=reference)
        leaving.set()  # the client leaves during the reference pass
        return out

    def token_logprobs(prompt, *args, **kwargs):
        asked.append(prompt)
        return real_tokens(prompt, *args, **kwargs)

    monkeypatch.setattr(pair, "sequence_logprobs", sequence_logprobs)
    monkeypatch.setattr(pair, "_token_logprobs", token_logprobs)
    withdrawn, ranking = pair.generate_or_withdraw(tasks)
    assert isinstance(withdrawn, Withdrawn) and ranking.candidates[0].token_logprobs
    assert asked == [prompts[1]]
