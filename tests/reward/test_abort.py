"""A pair asked to stop (`ModelPair.abort`) ends its sampling at the next decoding step."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from rlaifv.reward.errors import Aborted, RewardError
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
    real = pair.generate_batch
    monkeypatch.setattr(pair, "generate_batch", lambda tasks: calls.append(len(tasks)) or real(tasks))
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    requests = [
        GenerateRequest([image], f"question {i}?", None, 2, SamplingParams(max_tokens=4, seed=i), pair.reward)
        for i in range(4)
    ]
    pair.abort.set()
    results = engine.run_batch(requests)
    assert all(isinstance(r, Aborted) for r in results) and calls == [4]
