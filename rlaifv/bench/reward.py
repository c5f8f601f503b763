"""`rlaifv bench reward`: naive vs shared-prefix scoring of best-of-N candidates, side by side.

Naive: every candidate is a full forward (image + prompt + answer) through the
policy and again through the reference: 2N prefix encodings. Shared-prefix:
the policy log-probs come from generation itself, and the reference runs the
prefix once and scores all N answers from its forked KV cache. Both are timed
in the same run, on the same model and candidates, and must agree.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch

from rlaifv.reward.logprobs import answer_logprobs, full_forward_logprobs
from rlaifv.reward.model_pair import ModelPair
from rlaifv.reward.sampling import SamplingParams
from rlaifv.reward.scoring import RewardConfig, implicit_reward
from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_tiny_bundle


@dataclass
class BenchResult:
    name: str
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class RewardBenchReport(TypedDict):
    """What `run_reward_benchmark` measured, as `rlaifv bench reward` prints it."""

    n: int
    prefix_tokens: int
    answer_tokens: int
    params_m: float
    naive: BenchResult
    shared: BenchResult
    speedup: float
    generation_s: float
    end_to_end_speedup: float
    max_abs_sum_diff: float
    max_abs_reward_diff: float
    reward: RewardConfig
    threads: int


def bench_spec(hidden: int = 384, layers: int = 4, image_size: int = 192, patch: int = 8) -> TinyVLMSpec:
    """~600 image+prompt tokens (24x24 patches + prompt), big enough that timings mean something on a CPU."""
    return TinyVLMSpec(
        image_size=image_size,
        patch_size=patch,
        vision_hidden=128,
        vision_layers=2,
        vision_heads=4,
        text_hidden=hidden,
        text_layers=layers,
        text_heads=6,
        text_kv_heads=2,
        intermediate=hidden * 3,
        max_positions=2048,
    )


def _time(fn: Callable[[], object], repeats: int) -> float:
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_reward_benchmark(
    n: int = 8, answer_tokens: int = 64, repeats: int = 3, hidden: int = 384, layers: int = 4
) -> RewardBenchReport:
    """Return timings and ratios, and how far apart the two paths' results are: the policy-minus-reference
    log-prob sums, and the rewards they make at the bundle's beta and normalisation."""
    from PIL import Image

    from rlaifv.reward.bundle import load_bundle

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_bundle(Path(tmp) / "bench", spec=bench_spec(hidden, layers))
        pair: ModelPair = load_bundle(folder)
    image = Image.new("RGB", (192, 192), (120, 60, 200))
    prompt = pair.encode([image], "Describe the image in detail, listing every object and its colour.")
    params = SamplingParams(temperature=1.0, max_tokens=answer_tokens, seed=0)
    # Forbid early stops so every candidate has exactly `answer_tokens` tokens.
    pair.stop_ids = [-1]
    samples = pair.sample([prompt], [n], [params])[0]
    answers = [s.token_ids for s in samples]
    scored_tokens = sum(len(a) for a in answers)

    def naive() -> list[float]:
        with torch.no_grad(), pair.reference_model() as ref:
            pol = [float(full_forward_logprobs(pair.policy, prompt, a).sum()) for a in answers]
            refs = [float(full_forward_logprobs(ref, prompt, a).sum()) for a in answers]
        return [p - r for p, r in zip(pol, refs, strict=True)]

    def shared() -> list[float]:
        pol = [float(s.logprobs.sum()) for s in samples]  # from generation: no policy pass
        with torch.no_grad(), pair.reference_model() as ref:
            refs = [float(t.sum()) for t in answer_logprobs(ref, [prompt], [answers], pair.pad_id)[0]]
        return [p - r for p, r in zip(pol, refs, strict=True)]

    a, b = naive(), shared()
    max_sum_diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
    rewards = [
        # each path gives log pi - log pi_ref already: the ratio goes in as the policy side, 0 as the reference
        [implicit_reward(d, 0.0, len(t), pair.reward) for d, t in zip(path, answers, strict=True)]
        for path in (a, b)
    ]
    max_reward_diff = max(abs(x - y) for x, y in zip(*rewards, strict=True))
    naive_s = _time(naive, repeats)
    shared_s = _time(shared, repeats)
    gen_s = _time(lambda: pair.sample([prompt], [n], [params]), 1)
    return {
        "n": n,
        "prefix_tokens": len(prompt),
        "answer_tokens": answer_tokens,
        "params_m": sum(p.numel() for p in pair.policy.parameters()) / 1e6,
        "naive": BenchResult("naive: 2N full forwards", naive_s, scored_tokens),
        "shared": BenchResult("shared prefix + generation log-probs", shared_s, scored_tokens),
        "speedup": naive_s / shared_s,
        "generation_s": gen_s,
        "end_to_end_speedup": (gen_s + naive_s) / (gen_s + shared_s),
        "max_abs_sum_diff": max_sum_diff,
        "max_abs_reward_diff": max_reward_diff,
        "reward": pair.reward,
        "threads": torch.get_num_threads(),
    }
