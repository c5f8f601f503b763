"""One-token bfloat16 steps on the CPU (`reward.decode_attention`) against float64 attention and the plain path.

The routed calls change only where the kernel computes (float32 for one query per key head on CPUs without AMX,
a key head's query heads as its queries for GQA): outputs agree with float64 within bfloat16's output rounding;
every other call is transformers' own SDPA function, bit for bit. Both CPU rules are tested on any CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlaifv.reward import decode_attention
from rlaifv.reward.logprobs import full_forward_logprobs
from rlaifv.reward.models import load_model, load_processor
from rlaifv.reward.prompt import encode_prompt, end_of_turn_id
from rlaifv.reward.sampling import SamplingParams, sample_answers
from rlaifv.reward.shared_prefix import attention_configs
from rlaifv.testing.tiny_families import build_tiny_family

BF16_ROUNDING = 2**-8  # of the largest output: bfloat16 inputs and outputs (and, for GQA, probabilities) rounded


class _Module:
    """What transformers' SDPA function reads off an attention layer."""

    def __init__(self, groups: int) -> None:
        self.num_key_value_groups = groups
        self.is_causal = True


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """float64 attention; q (B, H, 1, d), k/v (B, Hkv, K, d), allowed (B, K) -> (B, 1, H, d)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, dim=1), v.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    calls: list[tuple[torch.dtype, tuple[int, ...]]] = []
    kernel = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((query.dtype, tuple(query.shape)))
        return kernel(query, *args, **kwargs)

    monkeypatch.setattr(decode_attention.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["one-query-head-per-key-head", "gqa", "mqa"])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_one_token_step_equals_float64_attention(
    kv_heads: int, mask: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decode_attention, "has_amx_tiles", lambda: False)  # a CPU without AMX
    torch.manual_seed(0)
    heads, dim, keys = 4, 16, 37
    q = torch.randn(batch, heads, 1, dim).bfloat16()
    k, v = (torch.randn(batch, kv_heads, keys, dim).bfloat16() for _ in range(2))
    allowed = None if mask == "none" else torch.rand(batch, keys) > 0.3
    if allowed is not None:
        allowed[:, -1] = True  # the step's own token
    attn_mask: torch.Tensor | None = None
    if allowed is not None:
        attn_mask = allowed[:, None, None, :]
        if mask == "additive":
            attn_mask = torch.zeros(attn_mask.shape, dtype=torch.bfloat16).masked_fill(~attn_mask, float("-inf"))
    calls = _spy(monkeypatch)
    monkeypatch.setattr(decode_attention, "sdpa_attention_forward", None)  # never delegated
    out, weights = decode_attention.attention(_Module(heads // kv_heads), q, k, v, attn_mask, scaling=dim**-0.5)
    assert weights is None and out.shape == (batch, 1, heads, dim) and out.dtype == torch.bfloat16
    want_out = _reference(q, k, v, allowed)
    assert float((out.double() - want_out).abs().max()) < BF16_ROUNDING * float(want_out.abs().max())
    groups = heads // kv_heads
    want = (torch.float32, (batch, heads, 1, dim)) if groups == 1 else (torch.bfloat16, (batch, kv_heads, groups, dim))
    assert calls == [want]


@pytest.mark.parametrize(
    "case",
    ["several-tokens", "float32", "dropout", "per-head-mask", "one-query-head-per-key-head-with-amx"],
)
def test_other_calls_are_transformers_sdpa_unchanged(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Including one query per key head where the CPU has AMX tiles: its bfloat16 kernel is the fast one there."""
    monkeypatch.setattr(decode_attention, "has_amx_tiles", lambda: case.endswith("-with-amx"))
    torch.manual_seed(1)
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    width = 3 if case == "several-tokens" else 1
    q = torch.randn(2, 4, width, 8, dtype=dtype)
    k, v = (torch.randn(2, 4, 11, 8, dtype=dtype) for _ in range(2))
    mask = torch.rand(2, 4, width, 11) > 0.2 if case == "per-head-mask" else None
    dropout = 0.5 if case == "dropout" else 0.0
    delegated: list[int] = []

    def delegate(*args: Any, **kwargs: Any) -> Any:
        delegated.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "sdpa_attention_forward", delegate)
    torch.manual_seed(2)
    got, _ = decode_attention.attention(_Module(1), q, k, v, mask, dropout=dropout)
    assert delegated == [1]
    torch.manual_seed(2)
    want, _ = sdpa_attention_forward(_Module(1), q, k, v, mask, dropout=dropout)
    assert torch.equal(got, want)


def test_it_applies_to_bfloat16_cpu_models_without_gradient_only(tmp_path: Path) -> None:
    folder = build_tiny_family("llava", tmp_path / "llava")
    model = load_model(folder, device="cpu", dtype="bfloat16")
    with torch.no_grad():
        assert decode_attention.pays(model)
    with torch.enable_grad():
        assert not decode_attention.pays(model)
    with torch.no_grad():
        assert not decode_attention.pays(load_model(folder, device="cpu", dtype="float32"))


# Llama (LLaVA), Qwen2-VL (GQA, mrope), Mistral with a sliding window (LLaVA-NeXT), Gemma3 (sliding layers, its
# own scale), a Qwen2 decoder (InternVL), the native OmniLMM.
@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "llava_next", "gemma3", "internvl", "omnilmm"])
def bf16_family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    folder = build_tiny_family(request.param, tmp_path_factory.mktemp(request.param))
    model = load_model(folder, device="cpu", dtype="bfloat16")
    processor = load_processor(folder)
    images = [[Image.new("RGB", (48, 48), (200, 30, 30))], [Image.new("RGB", (48, 48), (30, 60, 200))]]
    prompts = [
        encode_prompt(processor, group, q) for group, q in zip(images, ("Describe it.", "What is it?"), strict=True)
    ]
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"model": model, "prompts": prompts, "eot": end_of_turn_id(tokenizer), "pad": pad}


@torch.no_grad()
def test_one_answer_per_prompt_samples_through_it_like_a_plain_forward(
    bf16_family: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two prompts of different lengths (the shorter left-padded), one answer each: the plain decode path, whose
    one-token steps take the routed attention in every decoder layer; each sampled token's log-prob agrees with a
    plain bfloat16 forward over prompt + answer (within bfloat16 rounding through the layers)."""
    model, prompts = bf16_family["model"], bf16_family["prompts"]
    monkeypatch.setattr(decode_attention, "has_amx_tiles", lambda: False)  # every family routed, any CPU
    routed: list[int] = []
    covered = decode_attention._covered

    def spy(query: torch.Tensor, *args: Any) -> bool:
        result = covered(query, *args)
        routed.append(int(result))
        return result

    monkeypatch.setattr(decode_attention, "_covered", spy)
    params = [SamplingParams(seed=5 + b, max_tokens=8) for b in range(2)]
    samples = sample_answers(model, prompts, [1, 1], params, stop_ids=[-1], pad_id=bf16_family["pad"])
    layers = len(attention_configs(model)) and sum(
        isinstance(getattr(m, "layer_idx", None), int) and getattr(m, "is_causal", False) for m in model.modules()
    )
    assert layers and routed == [1] * 7 * layers  # 7 one-token steps through every decoder layer
    for prompt, (sample,) in zip(prompts, samples, strict=True):
        assert len(sample.token_ids) == 8
        want = full_forward_logprobs(model, prompt, sample.token_ids)
        assert float((sample.logprobs - want.float()).abs().max()) < 5e-2
