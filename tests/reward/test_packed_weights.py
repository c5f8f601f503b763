"""Packed bfloat16 linears (`reward.packed_weights`) against the plain `nn.Linear` product.

The packed product runs oneDNN's kernels on a weight laid out once; it must give the plain product's
numbers (bf16 tolerance: the bits matched on the CPUs measured, but a kernel choice may differ elsewhere),
step aside whenever a gradient is needed, and follow a weight that changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from rlaifv.reward.errors import PackingUnavailableError
from rlaifv.reward.packed_weights import PackedLinears, _PackedForward, pack_linears, packing_supported

needs_packing = pytest.mark.skipif(not packing_supported(), reason="this CPU has neither AVX512_BF16 nor AMX")
BF16 = {"rtol": 1.6e-2, "atol": 1e-2}


def _linear(out_features: int = 96, in_features: int = 64, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)


@needs_packing
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (8, 64), (595, 64), (2, 5, 64)])
def test_a_packed_linear_equals_the_plain_product(shape: tuple[int, ...], bias: bool) -> None:
    layer = _linear(bias=bias)
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.no_grad():
        plain = layer(x)
        handle = PackedLinears(layer)
        assert handle.count == 1 and isinstance(layer.forward, _PackedForward) and layer.forward.applies(x)
        packed = layer(x)
    assert packed.shape == plain.shape and packed.dtype == torch.bfloat16
    torch.testing.assert_close(packed, plain, **BF16)


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
def test_only_plain_bf16_cpu_linears_are_packed_and_each_model_once() -> None:
    class Scaled(nn.Linear):
        """A subclass computes something else with its weight: never packed."""

    model = nn.Sequential(_linear(), nn.Linear(96, 32), Scaled(32, 8).to(torch.bfloat16), nn.ReLU())
    handles = pack_linears([model, model, None], "on")
    assert len(handles) == 1 and handles[0].count == 1
    assert handles[0].extra_bytes == 96 * 64 * 2
    assert "forward" not in model[1].__dict__ and "forward" not in model[2].__dict__


def test_modes() -> None:
    float_model = nn.Sequential(nn.Linear(8, 8))
    assert pack_linears([float_model], "off") == []
    assert pack_linears([float_model], "auto") == []  # nothing in bf16 (or no bf16 kernels): nothing to do, no error
    with pytest.raises(PackingUnavailableError):
        pack_linears([float_model], "on")  # asked for, and impossible: say so at start-up
    bf16_model = nn.Sequential(_linear())
    assert bool(pack_linears([bf16_model], "auto")) == packing_supported()  # auto: wherever oneDNN can


@needs_packing
@pytest.mark.parametrize("lora", [False, True])
def test_a_packed_pair_scores_and_samples_like_the_plain_one(
    lora: bool, tiny_bundle: Path, tiny_lora_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlaifv.reward import load_bundle
    from rlaifv.reward.sampling import SamplingParams

    packed_calls = []
    current = _PackedForward.current

    def counting(self: _PackedForward) -> torch.Tensor:
        packed_calls.append(1)
        return current(self)

    monkeypatch.setattr(_PackedForward, "current", counting)

    pair = load_bundle(tiny_lora_bundle if lora else tiny_bundle, dtype="bfloat16")
    layers = pair.pack_weights("on")
    models = [pair.policy] if lora else [pair.policy, pair.reference]
    # Every bf16 nn.Linear (a LoRA adapter's own A/B products stay float32 in peft, hence plain).
    assert layers == sum(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for x in models for m in x.modules())
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
        assert packed == pytest.approx(plain, abs=0.05)  # sums of ~10 bf16 log-probs
    packed_calls.clear()
    ranking = pair.best_of_n(
        [Image.new("RGB", (32, 32), (0, 200, 0))], "What is in the image?", n=4, sampling=SamplingParams(seed=3)
    )
    assert len(ranking.candidates) == 4 and packed_calls
    assert pair.pack_weights("off") == 0 and pair.packed == []
    assert all("forward" not in m.__dict__ for m in pair.policy.modules())
