"""The reference scored beside sampling equals the reference scored after it (float32, 1e-5)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from rlaifv.reward.logprobs import answer_logprobs
from rlaifv.reward.model_pair import GenerateTask
from rlaifv.reward.reference_stream import ReferenceStream
from rlaifv.reward.sampling import SamplingParams, sample_answers

TOL = 1e-5


@pytest.fixture()
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _prompts(pair):
    return [
        pair.encode([Image.new("RGB", (32, 32), (220, 20, 20))], "What is in the image?"),
        pair.encode([Image.new("RGB", (48, 40), (20, 20, 220))], "Describe this picture, is there a blue square?"),
    ]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_stream_equals_the_one_pass_reference(tiny_pair, chunk: int) -> None:
    """Chunks of any size, rows that stop early (end of turn) and rows that run to max_tokens."""
    prompts = _prompts(tiny_pair)
    params = [SamplingParams(temperature=1.4, max_tokens=13, seed=5), SamplingParams(temperature=1.0, max_tokens=9)]
    stream = ReferenceStream(tiny_pair.reference, prompts, [3, 2], width=13, pad_id=tiny_pair.pad_id, threads=1)
    stream.chunk = chunk
    with torch.no_grad():
        samples = sample_answers(
            tiny_pair.policy,
            prompts,
            [3, 2],
            params,
            stop_ids=tiny_pair.stop_ids,
            pad_id=tiny_pair.pad_id,
            observer=stream.publish,
        )
        streamed = stream.finish([s.token_ids for group in samples for s in group])
        want = answer_logprobs(
            tiny_pair.reference, prompts, [[s.token_ids for s in g] for g in samples], tiny_pair.pad_id
        )
    flat_want = [w for group in want for w in group]
    assert len(streamed) == len(flat_want) == 5
    lengths = {len(s.token_ids) for group in samples for s in group}
    assert len(lengths) > 1, "the case needs rows of different lengths"
    for got, expected in zip(streamed, flat_want, strict=True):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=TOL), (got - expected).abs().max()


def test_generate_batch_with_and_without_the_stream(tiny_pair, two_threads) -> None:
    """Same samples, same rewards within 1e-5, same pick; a stop string's cut answers are re-scored; the calling
    thread's torch threads are restored."""
    prompts = _prompts(tiny_pair)
    tasks = [
        GenerateTask(prompts[0], 5, SamplingParams(temperature=1.3, max_tokens=20, seed=1), tiny_pair.reward),
        GenerateTask(
            prompts[1], 3, SamplingParams(temperature=1.1, max_tokens=24, seed=2, stop=["e"]), tiny_pair.reward
        ),
    ]
    tiny_pair.overlap_reference = False
    try:
        plain = tiny_pair.generate_batch(tasks)
    finally:
        tiny_pair.overlap_reference = True
    streamed = tiny_pair.generate_batch(tasks)
    assert torch.get_num_threads() == 2
    assert any(c.finish_reason == "stop" and c.text for c in streamed[1].candidates)
    for a, b in zip(plain, streamed, strict=True):
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        assert a.best_index == b.best_index
        for x, y in zip(a.candidates, b.candidates, strict=True):
            assert y.reference_logprob == pytest.approx(x.reference_logprob, abs=TOL)
            assert y.reward == pytest.approx(x.reward, abs=TOL)


def test_stream_errors_reach_the_caller_and_close_stops_it(tiny_pair) -> None:
    prompts = _prompts(tiny_pair)
    broken = ReferenceStream(tiny_pair.reference, prompts, [2, 2], width=4, pad_id=tiny_pair.pad_id, threads=1)
    with pytest.raises(RuntimeError):
        broken.finish([[1, 2], [3], [4, 5, 6, 7, 8, 9], [1]])  # a row longer than the stream's width
    idle = ReferenceStream(tiny_pair.reference, prompts, [1, 1], width=4, pad_id=tiny_pair.pad_id, threads=1)
    idle.close()
    with pytest.raises(ValueError):
        ReferenceStream(tiny_pair.reference, prompts, [1, 1], width=4, pad_id=tiny_pair.pad_id, threads=0)


def test_models_sharing_a_config_score_after_sampling(tiny_pair, two_threads) -> None:
    """Two modules over one config object cannot switch attention apart: no stream, the plain path's numbers."""
    from rlaifv.reward.model_pair import ModelPair
    from rlaifv.reward.shared_prefix import shares_attention_config

    twin = type(tiny_pair.reference)(tiny_pair.reference.config).eval()
    twin.load_state_dict(tiny_pair.reference.state_dict())
    pair = ModelPair(tiny_pair.policy, tiny_pair.processor, reference=twin, reward=tiny_pair.reward)
    assert shares_attention_config(twin, tiny_pair.reference)
    assert not shares_attention_config(tiny_pair.policy, tiny_pair.reference)
    prompt = _prompts(tiny_pair)[0]
    task = GenerateTask(prompt, 4, SamplingParams(temperature=1.2, max_tokens=10, seed=3), tiny_pair.reward)
    stream = pair._reference_stream([prompt], [4], [10], 2)  # policy and twin: separate configs
    assert stream is not None
    stream.close()
    shared = ModelPair(twin, tiny_pair.processor, reference=tiny_pair.reference, reward=tiny_pair.reward)
    assert shared._reference_stream([prompt], [4], [10], 2) is None
    ranking = shared.generate_batch([task])[0]
    assert len(ranking.candidates) == 4


def test_the_numbers_do_not_depend_on_the_samplers_pace(tiny_pair) -> None:
    """Published step by step or all at once (a stream that fell behind): the same chunks, bit for bit."""
    prompts = _prompts(tiny_pair)
    with torch.no_grad():
        samples = tiny_pair.sample(prompts, [2, 2], [SamplingParams(temperature=1.3, max_tokens=14, seed=9)] * 2)
    ids = [s.token_ids for group in samples for s in group]
    width = 14
    buffer = torch.full((len(ids), width), tiny_pair.pad_id, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids])
    for row, x in enumerate(ids):
        buffer[row, : len(x)] = torch.tensor(x)
    results = []
    for steps in (range(1, width + 1), [width]):
        stream = ReferenceStream(tiny_pair.reference, prompts, [2, 2], width=width, pad_id=tiny_pair.pad_id, threads=1)
        stream.chunk = 4
        for ready in steps:
            stream.publish(buffer, torch.minimum(lengths, torch.tensor(ready)), ready)
        results.append(stream.finish(ids))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
