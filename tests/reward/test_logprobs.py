"""The log-prob primitive against plain full-sequence forwards (float32, 1e-4)."""

import pytest
import torch
from PIL import Image

from rlaifv.reward.logprobs import answer_distributions, answer_logprobs, full_forward_logprobs
from rlaifv.reward.sampling import SamplingParams

TOL = 1e-4


def _prompts(pair):
    red = Image.new("RGB", (32, 32), (220, 20, 20))
    blue = Image.new("RGB", (48, 40), (20, 20, 220))
    return [
        pair.encode([red], "What is in the image?"),
        pair.encode([blue], "Describe this picture please, is there a blue square on the left?"),
    ]


def test_shared_prefix_equals_full_forward(tiny_pair):
    prompts = _prompts(tiny_pair)
    assert len(prompts[0]) != len(prompts[1])  # exercises left padding across prompts
    answers = [
        tiny_pair.encode_answers(["a red circle.", "there is a cat and a dog on the left.", "yes"]),
        tiny_pair.encode_answers(["no.", "a blue square"]),
    ]
    with torch.no_grad():
        shared = answer_logprobs(tiny_pair.policy, prompts, answers, tiny_pair.pad_id)
        for prompt, group, results in zip(prompts, answers, shared, strict=True):
            for answer, got in zip(group, results, strict=True):
                want = full_forward_logprobs(tiny_pair.policy, prompt, answer)
                assert got.shape == want.shape == (len(answer),)
                assert torch.allclose(got, want, atol=TOL), (got - want).abs().max()


def test_answer_distributions_are_the_log_probs_before_the_gather(tiny_pair):
    """Whole distributions per answer position: normalised, and at the answer's tokens the log-probs."""
    prompts = _prompts(tiny_pair)
    answers = [tiny_pair.encode_answers(["a red circle.", "yes"]), [[tiny_pair.eot_id]]]
    with torch.no_grad():
        picked = answer_logprobs(tiny_pair.policy, prompts, answers, tiny_pair.pad_id)
        full = answer_distributions(tiny_pair.policy, prompts, answers, tiny_pair.pad_id)
    vocab = tiny_pair.policy.get_output_embeddings().weight.shape[0]
    for group, dists, logprobs in zip(answers, full, picked, strict=True):
        for answer, dist, want in zip(group, dists, logprobs, strict=True):
            assert dist.shape == (len(answer), vocab) and dist.dtype == torch.float32
            assert torch.allclose(dist.exp().sum(-1), torch.ones(len(answer)), atol=1e-5)
            got = dist.gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
            assert torch.allclose(got, want, atol=TOL), (got - want).abs().max()


def test_single_token_answer_and_empty_groups(tiny_pair):
    prompts = _prompts(tiny_pair)
    with torch.no_grad():
        out = answer_logprobs(tiny_pair.policy, prompts, [[[tiny_pair.eot_id]], []], tiny_pair.pad_id)
        want = full_forward_logprobs(tiny_pair.policy, prompts[0], [tiny_pair.eot_id])
    assert out[1] == []
    assert torch.allclose(out[0][0], want, atol=TOL)


def test_generation_logprobs_equal_teacher_forced(tiny_pair):
    prompts = _prompts(tiny_pair)
    params = [
        SamplingParams(temperature=1.3, top_p=0.9, max_tokens=12, seed=3),
        SamplingParams(temperature=0.7, top_k=5, max_tokens=7, seed=4),
        SamplingParams(temperature=1.5, min_p=0.1, max_tokens=9, seed=5),
    ]
    samples = tiny_pair.sample([*prompts, prompts[0]], [4, 3, 3], params)
    assert [len(g) for g in samples] == [4, 3, 3]
    with torch.no_grad():
        for prompt, group, p in zip([*prompts, prompts[0]], samples, params, strict=True):
            for sample in group:
                assert 1 <= len(sample.token_ids) <= p.max_tokens
                want = full_forward_logprobs(tiny_pair.policy, prompt, sample.token_ids)
                assert torch.allclose(sample.logprobs, want, atol=TOL), (sample.logprobs - want).abs().max()


def test_sampling_is_reproducible_by_seed_and_never_emits_blocked_tokens(tiny_pair):
    prompts = _prompts(tiny_pair)[:1]
    params = [SamplingParams(temperature=1.5, max_tokens=16, seed=11)]
    first = tiny_pair.sample(prompts, [6], params)[0]
    again = tiny_pair.sample(prompts, [6], params)[0]
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    blocked = set(tiny_pair.blocked_ids)
    assert tiny_pair.tokenizer.convert_tokens_to_ids("<image>") in blocked
    for sample in first:
        assert not blocked & set(sample.token_ids)
        if sample.finish_reason == "stop":
            assert sample.token_ids[-1] in tiny_pair.stop_ids


def test_a_prompts_samples_do_not_depend_on_its_batch(tiny_pair):
    """The service micro-batches requests: a seeded request must get the same answers alone or batched."""
    prompts = _prompts(tiny_pair)
    mine = SamplingParams(temperature=1.2, top_p=0.95, max_tokens=10, seed=21)
    other = SamplingParams(temperature=0.8, top_k=7, min_p=0.05, max_tokens=14, seed=99)
    alone = tiny_pair.sample(prompts[1:], [5], [mine])[0]
    batched = tiny_pair.sample([prompts[0], prompts[1], prompts[0]], [3, 5, 2], [other, mine, mine])[1]
    assert [s.token_ids for s in batched] == [s.token_ids for s in alone]
    for a, b in zip(alone, batched, strict=True):
        assert torch.allclose(a.logprobs, b.logprobs, atol=TOL)
        assert a.finish_reason == b.finish_reason


def test_greedy_is_deterministic_without_seed(tiny_pair):
    prompts = _prompts(tiny_pair)[:1]
    params = [SamplingParams(temperature=0.0, max_tokens=8)]
    a = tiny_pair.sample(prompts, [3], params)[0]
    assert len({tuple(s.token_ids) for s in a}) == 1


@pytest.mark.parametrize("n", [1, 5])
def test_best_of_n_is_argmax_and_terms_are_consistent(tiny_pair, n):
    image = Image.new("RGB", (32, 32), (0, 200, 0))
    ranking = tiny_pair.best_of_n(image, "What is in the image?", n=n, seed=5, max_tokens=10)
    assert len(ranking.candidates) == n
    rewards = ranking.rewards
    assert ranking.best_index == max(range(n), key=lambda i: (rewards[i], -i))
    for c in ranking.candidates:
        expect = tiny_pair.reward.beta * (c.policy_logprob - c.reference_logprob) / c.num_tokens
        assert c.reward == pytest.approx(expect, abs=1e-9)
        assert c.num_tokens == len(c.token_ids)
    # Rescoring the sampled tokens through the scoring path gives the same terms.
    prompt = tiny_pair.encode([image], "What is in the image?")
    answers = [[c.token_ids for c in ranking.candidates]]
    pol = tiny_pair.sequence_logprobs([prompt], answers, reference=False)[0]
    ref = tiny_pair.sequence_logprobs([prompt], answers, reference=True)[0]
    for c, p, r in zip(ranking.candidates, pol, ref, strict=True):
        assert c.policy_logprob == pytest.approx(p, abs=TOL)
        assert c.reference_logprob == pytest.approx(r, abs=TOL)


@pytest.mark.parametrize("temperature", [1e-9, 1e-3, 0.009])
def test_tiny_temperatures_sample_without_nan(tiny_pair, temperature):
    prompts = _prompts(tiny_pair)[:1]
    greedy = tiny_pair.sample(prompts, [1], [SamplingParams(temperature=0.0, max_tokens=6)])[0][0]
    tiny = tiny_pair.sample(prompts, [2], [SamplingParams(temperature=temperature, max_tokens=6, seed=1)])[0]
    for sample in tiny:
        assert torch.isfinite(sample.logprobs).all()
    if temperature < 1e-5:
        assert [s.token_ids for s in tiny] == [greedy.token_ids] * 2
