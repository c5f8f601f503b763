"""The sampler's filters against transformers' logits warpers, applied in vLLM's order (temperature, min-p, top-k,
top-p: what the vLLM engine samples with; transformers itself puts min-p last)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlaifv.reward.sampling import SamplingParams, _transform


@pytest.mark.parametrize(
    "settings",
    [
        {"min_p": 0.05},
        {"min_p": 0.3, "temperature": 0.7},
        {"min_p": 0.1, "top_k": 40, "temperature": 1.5},
        {"min_p": 0.02, "top_p": 0.9},
        {"min_p": 1.0},
        {"top_k": 5, "top_p": 0.8, "temperature": 0.5},
    ],
)
def test_filters_keep_the_tokens_transformers_keeps(settings: dict) -> None:
    params = SamplingParams(**settings)
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 4
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    want = logits.clone()
    for warp in warpers:
        want = warp(None, want)
    got = _transform(logits, params)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got.softmax(-1), want.softmax(-1), atol=1e-6)
    if params.min_p == 1.0:  # only the likeliest token is left in every row
        assert torch.equal(torch.isfinite(got).sum(-1), torch.ones(6, dtype=torch.long))


def test_min_p_is_a_probability() -> None:
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


@pytest.mark.parametrize("top_p", [1e-6, 1e-30, 1e-300, 5e-324])
def test_the_smallest_top_p_keeps_the_likeliest_token(top_p: float) -> None:
    """A top_p that rounds to 0 in float32 dropped every token: NaN probabilities and an arbitrary pick."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    got = _transform(logits, SamplingParams(top_p=top_p))
    assert torch.equal(torch.isfinite(got).sum(-1), torch.ones(4, dtype=torch.long))
    assert torch.equal(got.argmax(-1), logits.argmax(-1))
