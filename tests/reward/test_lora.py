"""A LoRA policy over the reference (one base in memory) scores like two separate full models."""

import pytest
import torch
from PIL import Image

from rlaifv.reward import load_bundle
from rlaifv.reward.bundle import write_bundle


@pytest.fixture(scope="module")
def merged_two_model_bundle(tiny_lora_bundle, tmp_path_factory):
    """The same policy as tiny_lora_bundle, but merged into a full second model."""
    pair = load_bundle(tiny_lora_bundle)
    merged_dir = tmp_path_factory.mktemp("merged") / "policy"
    merged = pair.policy.merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    pair.processor.save_pretrained(merged_dir)
    folder = tmp_path_factory.mktemp("merged") / "bundle"
    write_bundle(folder, policy=merged_dir, reference=tiny_lora_bundle / "reference")
    return folder


def test_lora_pair_keeps_one_base_and_matches_two_models(tiny_lora_bundle, merged_two_model_bundle):
    lora = load_bundle(tiny_lora_bundle)
    two = load_bundle(merged_two_model_bundle)
    assert lora.is_lora and lora.reference is None
    assert not two.is_lora
    image = Image.new("RGB", (32, 32), (10, 120, 240))
    answers = ["a blue circle.", "there is a red square and a cat.", "no"]
    a = lora.score(image, "What is in the image?", answers)
    b = two.score(image, "What is in the image?", answers)
    for x, y in zip(a.candidates, b.candidates, strict=True):
        assert x.policy_logprob == pytest.approx(y.policy_logprob, abs=1e-4)
        assert x.reference_logprob == pytest.approx(y.reference_logprob, abs=1e-4)
        assert x.reward == pytest.approx(y.reward, abs=1e-4)
    # The adapter matters: policy and reference differ, so rewards are not all zero.
    assert max(abs(c.reward) for c in a.candidates) > 1e-6


def test_lora_reference_is_the_base_with_adapter_disabled(tiny_lora_bundle):
    pair = load_bundle(tiny_lora_bundle)
    base = load_bundle(tiny_lora_bundle).policy.get_base_model()  # noqa: F841 - a second load must not alter the first
    image = Image.new("RGB", (32, 32), (10, 120, 240))
    prompt = pair.encode([image], "What is in the image?")
    answers = [pair.encode_answers(["a blue circle."])]
    with torch.no_grad():
        ref = pair.sequence_logprobs([prompt], answers, reference=True)[0][0]
        pol = pair.sequence_logprobs([prompt], answers, reference=False)[0][0]
        # Disabling is scoped: the policy is active again afterwards.
        assert pair.sequence_logprobs([prompt], answers, reference=False)[0][0] == pytest.approx(pol, abs=1e-6)
    assert ref != pytest.approx(pol, abs=1e-6)


def test_an_adapter_saved_under_older_module_names_loads_and_a_mismatched_one_is_refused(tmp_path):
    """PEFT only warns about LoRA weights it cannot place and leaves them at B = 0: a policy equal to its reference.
    Qwen2-VL's decoder moved from `model.layers` to `model.language_model.layers` (transformers 4.52): such an
    adapter is read through the model's own renamings; one whose names fit nothing is refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rlaifv.reward.errors import ModelLoadError
    from rlaifv.reward.models import load_adapter, load_model
    from rlaifv.testing.tiny_families import build_tiny_family
    from rlaifv.trainer.shapes.tiny_vlm import random_lora

    base = build_tiny_family("qwen2_vl", tmp_path / "base")
    adapter = random_lora(base, tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")

    def renamed(folder: str, old: str, new: str):
        shutil.copytree(adapter, tmp_path / folder)
        moved = {k.replace(old, new): v for k, v in weights.items()}
        assert set(moved) != set(weights)
        save_file(moved, tmp_path / folder / "adapter_model.safetensors", metadata={"format": "pt"})
        return tmp_path / folder

    older = renamed("older", "base_model.model.model.language_model.", "base_model.model.model.")
    expected = {n: p for n, p in load_adapter(load_model(base), adapter).named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in load_adapter(load_model(base), older).named_parameters() if "lora_" in n}
    assert expected.keys() == loaded.keys() and all(torch.equal(expected[n], loaded[n]) for n in expected)
    with pytest.raises(ModelLoadError, match=r"lacks \d+ of the LoRA weights"):
        load_adapter(load_model(base), renamed("elsewhere", "self_attn", "cross_attn"))
