"""Packed linears (`reward.packed_weights`, bfloat16 and float32) against the plain `nn.Linear` product.

The packed product runs oneDNN's kernels on a weight laid out once; it must give the plain product's
numbers (bf16 tolerance: the bits matched on the CPUs measured, but a kernel choice may differ elsewhere;
float32: the summation order differs), step aside whenever a gradient is needed, and follow a weight that
changes. `auto` packs only where measured faster and where the copies fit in memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from rlaifv.reward import packed_weights
from rlaifv.reward.errors import PackingUnavailableError
from rlaifv.reward.packed_weights import (
    PackedLinears,
    _PackedForward,
    pack_linears,
    packing_supported,
    packs_by_default,
)

needs_packing = pytest.mark.skipif(not packing_supported(), reason="this CPU has neither AVX512_BF16 nor AMX")
TOLERANCE = {torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
BF16 = TOLERANCE[torch.bfloat16]
DTYPES = [
    pytest.param(torch.bfloat16, id="bfloat16", marks=needs_packing),
    pytest.param(
        torch.float32,
        id="float32",
        marks=pytest.mark.skipif(not packing_supported(torch.float32), reason="no AVX2 or AVX-512 oneDNN here"),
    ),
]


def _linear(out_features: int = 96, in_features: int = 64, bias: bool = True, dtype: torch.dtype = torch.bfloat16):
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (8, 64), (595, 64), (2, 5, 64)])
def test_a_packed_linear_equals_the_plain_product(shape: tuple[int, ...], bias: bool, dtype: torch.dtype) -> None:
    layer = _linear(bias=bias, dtype=dtype)
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        plain = layer(x)
        handle = PackedLinears(layer)
        assert handle.count == 1 and isinstance(layer.forward, _PackedForward) and layer.forward.applies(x)
        packed = layer(x)
    assert packed.shape == plain.shape and packed.dtype == dtype
    torch.testing.assert_close(packed, plain, **TOLERANCE[dtype])


@needs_packing
def test_gradients_take_the_plain_product() -> None:
    layer = _linear()
    x = torch.randn(4, 64).to(torch.bfloat16)
    PackedLinears(layer)
    assert not layer.forward.applies(x)  # grad enabled and the weight requires it
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert layer.forward.applies(x)
    assert not layer.forward.applies(x.float())  # another dtype: the plain product (and its error, if any)


@needs_packing
def test_the_packed_copy_follows_a_weight_changed_in_place_or_replaced() -> None:
    layer = _linear()
    x = torch.randn(8, 64).to(torch.bfloat16)
    PackedLinears(layer)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(-2.0)  # an optimiser step: in place, the version counter moves
        after = layer(x)
        torch.testing.assert_close(after, nn.functional.linear(x, layer.weight, layer.bias), **BF16)
        assert not torch.allclose(after, before)
        layer.weight = nn.Parameter(torch.randn(96, 64).to(torch.bfloat16))
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), **BF16)


@needs_packing
def test_suspend_and_remove_give_the_plain_layer_back() -> None:
    layer = _linear()
    x = torch.randn(8, 64).to(torch.bfloat16)
    handle = PackedLinears(layer)
    with torch.no_grad():
        with handle.suspend():
            assert not layer.forward.applies(x)
        assert layer.forward.applies(x)
    handle.remove()
    assert "forward" not in layer.__dict__ and handle.count == 0


@needs_packing
def test_only_plain_cpu_linears_of_packable_dtypes_are_packed_and_each_model_once() -> None:
    class Scaled(nn.Linear):
        """A subclass computes something else with its weight: never packed."""

    float32 = nn.Linear(96, 32)
    model = nn.Sequential(_linear(), float32, Scaled(32, 8).to(torch.bfloat16), nn.Linear(8, 8).half(), nn.ReLU())
    handles = pack_linears([model, model, None], "on")
    with_float32 = packing_supported(torch.float32)
    assert len(handles) == 1 and handles[0].count == 1 + with_float32
    assert handles[0].extra_bytes == 96 * 64 * 2 + with_float32 * 32 * 96 * 4
    assert ("forward" in float32.__dict__) == with_float32
    assert "forward" not in model[2].__dict__ and "forward" not in model[3].__dict__


def test_modes() -> None:
    float_model = nn.Sequential(nn.Linear(8, 8))
    assert pack_linears([float_model], "off") == []
    # auto: where measured faster (float32: AMD CPUs), silently nothing elsewhere
    assert bool(pack_linears([nn.Sequential(nn.Linear(8, 8))], "auto")) == packs_by_default(torch.float32)
    assert bool(pack_linears([nn.Sequential(_linear())], "auto")) == packing_supported()
    assert pack_linears([nn.Sequential(nn.Linear(8, 8).half())], "auto") == []
    # on: wherever oneDNN can, and an error at start-up where it cannot
    if packing_supported(torch.float32):
        assert pack_linears([float_model], "on")[0].count == 1
    else:
        with pytest.raises(PackingUnavailableError):
            pack_linears([float_model], "on")
    with pytest.raises(PackingUnavailableError):
        pack_linears([nn.Sequential(nn.Linear(8, 8).half())], "on")


def test_auto_leaves_weights_plain_where_the_copies_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copies cost as much memory as the weights: auto packs only into at most half of what is left (under a
    container's limit too), `on` packs anyway."""
    dtype = torch.bfloat16 if packing_supported() else torch.float32
    if not packing_supported(dtype):
        pytest.skip("this CPU packs nothing")
    monkeypatch.setattr(packed_weights, "packs_by_default", lambda d: d == dtype)
    weight_bytes = 96 * 64 * dtype.itemsize
    monkeypatch.setattr(packed_weights, "available_memory", lambda: 2 * weight_bytes - 1)
    assert pack_linears([nn.Sequential(_linear(dtype=dtype))], "auto") == []
    assert pack_linears([nn.Sequential(_linear(dtype=dtype))], "on")[0].count == 1
    monkeypatch.setattr(packed_weights, "available_memory", lambda: 2 * weight_bytes)
    assert pack_linears([nn.Sequential(_linear(dtype=dtype))], "auto")[0].count == 1
    monkeypatch.setattr(packed_weights, "available_memory", lambda: None)  # unknown: no guard
    assert pack_linears([nn.Sequential(_linear(dtype=dtype))], "auto")[0].count == 1


def test_available_memory_is_bounded_by_the_machine() -> None:
    available = packed_weights.available_memory()
    if available is None:
        pytest.skip("neither /proc/meminfo nor a cgroup memory file here")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 <= available <= total


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [False, True])
def test_a_packed_pair_scores_and_samples_like_the_plain_one(
    lora: bool, dtype: torch.dtype, tiny_bundle: Path, tiny_lora_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlaifv.reward import load_bundle
    from rlaifv.reward.sampling import SamplingParams

    packed_calls = []
    current = _PackedForward.current

    def counting(self: _PackedForward) -> torch.Tensor:
        packed_calls.append(1)
        return current(self)

    monkeypatch.setattr(_PackedForward, "current", counting)

    pair = load_bundle(tiny_lora_bundle if lora else tiny_bundle, dtype=str(dtype).removeprefix("torch."))
    layers = pair.pack_weights("on")
    models = [pair.policy] if lora else [pair.policy, pair.reference]
    # Every nn.Linear this CPU packs (a LoRA adapter's own A/B products stay float32 in peft).
    packable = {d for d in (torch.bfloat16, torch.float32) if packing_supported(d)}
    assert layers == sum(type(m) is nn.Linear and m.weight.dtype in packable for x in models for m in x.modules())
    assert layers > 0
    prompt = pair.encode([Image.new("RGB", (32, 32), (0, 200, 0))], "What is in the image?")
    answers = [pair.encode_answers(["a green square.", "there is a cat", "no"])]
    for reference in (False, True):
        packed_calls.clear()
        packed = pair.sequence_logprobs([prompt], answers, reference=reference)[0]
        assert packed_calls, "scoring did not run on the packed weights"
        packed_calls.clear()
        with pair.plain_weights():
            plain = pair.sequence_logprobs([prompt], answers, reference=reference)[0]
        assert not packed_calls
        assert packed == pytest.approx(plain, abs=0.05 if dtype == torch.bfloat16 else 1e-4)  # sums of ~10 log-probs
    packed_calls.clear()
    ranking = pair.best_of_n(
        [Image.new("RGB", (32, 32), (0, 200, 0))], "What is in the image?", n=4, sampling=SamplingParams(seed=3)
    )
    assert len(ranking.candidates) == 4 and packed_calls
    assert pair.pack_weights("off") == 0 and pair.packed == []
    assert all("forward" not in m.__dict__ for m in pair.policy.modules())
