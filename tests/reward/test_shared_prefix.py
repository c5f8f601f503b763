"""Shared-prefix attention (`reward.shared_prefix`) against the plain path that forks one KV copy per row.

float32, 1e-5: both compute the same softmax over the same keys; only the summation order differs. The
per-family exactness against a plain full forward (1e-4) is `test_families.py`, which runs this path too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rlaifv.reward import shared_prefix
from rlaifv.reward.logprobs import answer_logprobs, continuation_logits, prefill
from rlaifv.reward.models import load_model, load_processor
from rlaifv.reward.prompt import encode_answer, encode_prompt, end_of_turn_id
from rlaifv.reward.sampling import SamplingParams, sample_answers
from rlaifv.reward.shared_prefix import Layout, SharedPrefixLayer, attention, eligible
from rlaifv.testing.tiny_families import build_tiny_family

TOLERANCE = 1e-5
# Llama (LLaVA), 3-axis mrope (Qwen2-VL), Mistral with a sliding window and padded crops (LLaVA-NeXT),
# Gemma3 (sliding layers, its own attention scale), a Qwen2 decoder (InternVL), the native OmniLMM.
FAMILIES = ("llava", "qwen2_vl", "llava_next", "gemma3", "internvl", "omnilmm")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    folder = build_tiny_family(request.param, tmp_path_factory.mktemp(request.param))
    model = load_model(folder, device="cpu")
    processor = load_processor(folder)
    images = [
        [Image.new("RGB", (48, 48), (200, 30, 30))],
        [Image.new("RGB", (96, 40), (30, 180, 60))],
        [Image.new("RGB", (48, 48), (30, 60, 200)), Image.new("RGB", (56, 56), (220, 200, 30))],
    ]
    prompts = [encode_prompt(processor, group, "Describe the image.") for group in images]
    tokenizer = processor.tokenizer
    eot = end_of_turn_id(tokenizer)
    texts = ("a red circle.", "two dogs on the left", "yes")
    answers = [[encode_answer(tokenizer, t, eot_id=eot) for t in texts[: b + 1]] for b in range(len(prompts))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"model": model, "prompts": prompts, "answers": answers, "eot": eot, "pad": pad}


def _both(monkeypatch: pytest.MonkeyPatch, fn: Any) -> tuple[Any, Any]:
    """fn() on the shared-prefix path (asserting it was taken), then on the plain path."""
    from rlaifv.reward import logprobs

    calls = []

    def share(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return shared_prefix.share(*args, **kwargs)

    monkeypatch.setattr(logprobs, "share", share)
    monkeypatch.setattr(shared_prefix, "ENABLED", True)
    shared = fn()
    assert calls, "the shared-prefix path was not taken"
    monkeypatch.setattr(shared_prefix, "ENABLED", False)
    return shared, fn()


@torch.no_grad()
def test_the_family_takes_the_shared_path(family: dict[str, Any]) -> None:
    state = prefill(family["model"], family["prompts"][:1], family["pad"])
    assert eligible(family["model"], state.cache, state.mask.shape[1] + 16)


@torch.no_grad()
def test_scoring_and_continuations_equal_the_plain_path(
    family: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, prompts, answers, pad = family["model"], family["prompts"], family["answers"], family["pad"]
    shared, plain = _both(monkeypatch, lambda: answer_logprobs(model, prompts, answers, pad))
    for got_group, want_group in zip(shared, plain, strict=True):
        for got, want in zip(got_group, want_group, strict=True):
            assert got.shape == want.shape
            assert float((got - want).abs().max()) < TOLERANCE
    shared, plain = _both(monkeypatch, lambda: continuation_logits(model, prompts, answers, pad))
    for got, want in zip(shared, plain, strict=True):
        assert float((got - want).abs().max()) < TOLERANCE


@torch.no_grad()
def test_sampling_equals_the_plain_path(family: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Different N per prompt and different lengths: rows finish at different steps and are dropped."""
    model, prompts = family["model"], family["prompts"]
    params = [SamplingParams(seed=3 + b, max_tokens=m) for b, m in enumerate((7, 3, 5))]
    kwargs = {"stop_ids": [family["eot"]], "pad_id": family["pad"]}
    shared, plain = _both(monkeypatch, lambda: sample_answers(model, prompts, [3, 1, 4], params, **kwargs))
    for got_group, want_group in zip(shared, plain, strict=True):
        assert [s.token_ids for s in got_group] == [s.token_ids for s in want_group]
        for got, want in zip(got_group, want_group, strict=True):
            assert float((got.logprobs - want.logprobs).abs().max()) < TOLERANCE


def test_a_lora_pair_equals_the_plain_path(tiny_lora_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlaifv.reward import load_bundle

    pair = load_bundle(tiny_lora_bundle)
    prompt = pair.encode([Image.new("RGB", (32, 32), (0, 200, 0))], "What is in the image?")
    answers = [pair.encode_answers(["a green square.", "there is a cat", "no"])]
    for reference in (False, True):
        shared, plain = _both(
            monkeypatch, lambda ref=reference: pair.sequence_logprobs([prompt], answers, reference=ref)
        )
        assert shared[0] == pytest.approx(plain[0], abs=TOLERANCE)


def test_the_trainer_keeps_the_plain_path(tiny_pair: Any) -> None:
    """Differentiable log-probs (DPO, SFT) never take the shared path: their numbers stay bit for bit."""
    prompt = tiny_pair.encode([Image.new("RGB", (32, 32))], "What is in the image?")
    with torch.no_grad():
        state = prefill(tiny_pair.policy, [prompt], tiny_pair.pad_id)
        assert eligible(tiny_pair.policy, state.cache, 64)
    with torch.enable_grad():
        assert not eligible(tiny_pair.policy, state.cache, 64)


@torch.no_grad()
def test_a_sliding_window_shorter_than_the_sequence_keeps_the_plain_path(tmp_path: Path) -> None:
    model = load_model(build_tiny_family("gemma3", tmp_path / "gemma3"), device="cpu")
    window = model.config.get_text_config().sliding_window
    ids = torch.arange(5, 25)[None]
    cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    assert eligible(model, cache, window - 1)
    assert not eligible(model, cache, window)


@torch.no_grad()
def test_a_skewed_batch_is_forked_as_copies_when_that_is_smaller(tiny_pair: Any) -> None:
    """One prompt with 8 answers and 7 with one: shared buffers would reserve 8 slots for every prompt."""
    from rlaifv.reward.logprobs import fork

    prompt = tiny_pair.encode([Image.new("RGB", (32, 32))], "What is in the image?")
    state = prefill(tiny_pair.policy, [prompt] * 8, tiny_pair.pad_id)
    rows = torch.tensor([0] * 8 + list(range(1, 8)))
    assert not fork(tiny_pair.policy, state, rows, reserve=256).shared
    state = prefill(tiny_pair.policy, [prompt] * 2, tiny_pair.pad_id)
    assert fork(tiny_pair.policy, state, torch.tensor([0] * 4 + [1] * 4), reserve=256).shared


def test_the_mask_lets_a_query_see_the_real_prefix_and_its_own_earlier_steps() -> None:
    prefix_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    layout = Layout.for_rows(torch.tensor([0, 0, 1]), prefix_mask)
    assert layout.slots == 2 and layout.slot.tolist() == [0, 1, 0] and not layout.canonical
    done, width, groups = 2, 2, 2
    mask = layout.mask(done, width, groups, torch.float32)
    keys = 3 + (done + width) * layout.slots
    assert mask.shape == (2, 1, groups * layout.slots * width, keys)
    for b in range(2):
        for g in range(groups):
            for s in range(layout.slots):
                for i in range(width):
                    q = (g * layout.slots + s) * width + i
                    for k in range(keys):
                        if k < 3:
                            allowed = bool(prefix_mask[b, k])
                        else:
                            step, slot = divmod(k - 3, layout.slots)
                            allowed = slot == s and step <= done + i
                        assert (mask[b, 0, q, k] == 0) == allowed, (b, q, k)
    assert layout.mask(done, width, groups, torch.float32) is mask  # built once per forward, shared by layers
    padding, causal = masks = layout.cascade_masks(width, groups)
    assert padding is not None and padding.shape == (2, 1, 1, 3)
    assert (padding[:, 0, 0] == 0).tolist() == prefix_mask.bool().tolist()
    assert causal is not None and (causal[0, 0] == 0).tolist() == [[True, False], [True, True]] * groups
    assert layout.cascade_masks(width, groups) is masks
    assert Layout.for_rows(torch.tensor([0, 0]), torch.ones(1, 3)).cascade_masks(width, 1) == (None, None)


def _per_row_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The plain path for one row: SDPA over its own prefix ++ answer keys (query heads share key heads)."""
    groups = query.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)
    return F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask[None, None])[0]


@pytest.mark.parametrize("rows", [[0, 0, 1, 1], [0, 0, 0, 1, 1]], ids=["every-slot-used", "uneven"])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "one-query-head-per-key-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_attention_over_shared_buffers_equals_per_row_attention(
    rows: list[int], drop: bool, kv_heads: int, dtype: torch.dtype
) -> None:
    """Two prompts (one left-padded), with and without GQA, multi-token and one-token steps, rows dropped midway,
    buffer growth. The first, multi-token step is the CPU cascade (prefix + own answer, merged; in bfloat16 on
    CPUs without AMX), the rest one masked call each. bfloat16 against float64 on the same inputs: within the
    output's rounding."""
    torch.manual_seed(0)
    heads, dim, prefix = 4, 8, 5
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    prefix_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    owner = torch.tensor(rows)
    assert Layout.for_rows(owner, prefix_mask).canonical == (rows == [0, 0, 1, 1])
    pk, pv = torch.randn(2, kv_heads, prefix, dim, dtype=dtype), torch.randn(2, kv_heads, prefix, dim, dtype=dtype)
    layer = SharedPrefixLayer(pk, pv, Layout.for_rows(owner, prefix_mask), reserve=2)  # grows at step 3
    live_rows = torch.arange(owner.shape[0])  # original row of each live row
    history_k: list[list[torch.Tensor]] = [[] for _ in owner]
    history_v: list[list[torch.Tensor]] = [[] for _ in owner]
    for width in (3, 1, 1, 1):
        if drop and width == 1 and live_rows.shape[0] == owner.shape[0]:
            keep = torch.tensor([0, 2, owner.shape[0] - 1])
            layer.batch_select_indices(keep)
            live_rows = live_rows[keep]
        live = live_rows.shape[0]
        q = torch.randn(live, heads, width, dim, dtype=dtype)
        k, v = (torch.randn(live, kv_heads, width, dim, dtype=dtype) for _ in range(2))
        keys, values = layer.update(k, v)
        out, _ = attention(None, q, keys, values, None, scaling=dim**-0.5)
        assert out.shape == (live, width, heads, dim) and out.dtype == dtype
        for r, row in enumerate(live_rows.tolist()):
            history_k[row].append(k[r])
            history_v[row].append(v[r])
            b = int(owner[row])
            row_k = torch.cat([pk[b], *history_k[row]], dim=1)
            row_v = torch.cat([pv[b], *history_v[row]], dim=1)
            steps = row_k.shape[1] - prefix
            causal = torch.arange(steps)[None, :] <= torch.arange(steps - width, steps)[:, None]
            mask = torch.cat([prefix_mask[b].bool()[None].expand(width, -1), causal], dim=1)
            want = _per_row_attention(q[r].double(), row_k.double(), row_v.double(), mask).transpose(0, 1)
            error = float((out[r].double() - want).abs().max())
            assert error < tolerance, (width, error)
    assert layer.get_seq_length() == prefix + 6


def test_a_whole_answers_pass_on_cpu_runs_as_a_cascade(monkeypatch: pytest.MonkeyPatch) -> None:
    """Multi-token steps from the start of the answers take the cascade; decode steps the one masked call."""
    assert shared_prefix._cascade_pays(torch.float32, 2), "torch lost its CPU flash kernel with log-sum-exp"
    calls: list[int] = []
    cascade = shared_prefix._cascade

    def spy(*args: Any) -> torch.Tensor:
        calls.append(args[4])
        return cascade(*args)

    monkeypatch.setattr(shared_prefix, "_cascade", spy)
    layout = Layout.for_rows(torch.tensor([0, 0]), torch.ones(1, 4, dtype=torch.long))
    layer = SharedPrefixLayer(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), layout, reserve=4)
    for width in (3, 1):
        keys, values = layer.update(torch.randn(2, 2, width, 8), torch.randn(2, 2, width, 8))
        attention(None, torch.randn(2, 2, width, 8), keys, values, None)
    assert calls == [3]


@pytest.mark.parametrize("amx", [False, True])
def test_the_cascade_rule_per_cpu(amx: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 always; bfloat16 without AMX tiles always, with them only from many answers per prompt on."""
    monkeypatch.setattr(shared_prefix, "has_amx_tiles", lambda: amx)
    many = shared_prefix._CASCADE_SLOTS_ON_AMX
    assert shared_prefix._cascade_pays(torch.float32, 2) and shared_prefix._cascade_pays(torch.float32, many)
    assert shared_prefix._cascade_pays(torch.bfloat16, 8) is not amx
    assert shared_prefix._cascade_pays(torch.bfloat16, many - 1) is not amx
    assert shared_prefix._cascade_pays(torch.bfloat16, many)
