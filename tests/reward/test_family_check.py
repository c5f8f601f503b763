"""The load-time check for model families the engine has no rules for (`reward.family_check`).

Tiny random-weight models of real unregistered families, saved and loaded through `from_pretrained`: one the
default rules serve exactly (PaliGemma: 1-indexed positions, a bidirectional prefix), one the engine cannot run
(BLIP-2), and one it runs with log-probs that are not the model's own (`chunked_llama`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlaifv.reward.errors import ModelLoadError
from rlaifv.reward.family_check import (
    EngineCannotRunError,
    check_unverified_family,
    compare_with_generate,
    needs_probe,
    probe,
)
from rlaifv.reward.model_pair import ModelPair
from rlaifv.reward.models import load_model, load_processor
from rlaifv.reward.sampling import SamplingParams
from rlaifv.testing.tiny_families import build_tiny_family
from rlaifv.testing.tiny_text import TEXT_FAMILIES, build_text_family, build_text_model
from rlaifv.testing.tiny_unregistered import (
    REFUSED,
    SERVED_EXACTLY,
    SURVEY,
    build_tiny_blip2,
    build_tiny_paligemma,
    chunked_llama,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _pair(folder: Path) -> ModelPair:
    model = load_model(folder, device="cpu")
    return ModelPair(model, load_processor(folder), reference=model)


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_paligemma(tmp_path_factory.mktemp("paligemma"))


@pytest.fixture(scope="module")
def text_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_model(tmp_path_factory.mktemp("llama"))


def test_an_unregistered_family_the_default_rules_serve_exactly_loads_and_serves(paligemma: Path) -> None:
    pair = _pair(paligemma)
    result = probe(pair.policy, pair.processor, accepts_images=True, pad_id=pair.pad_id, stop_ids=pair.stop_ids)
    assert result.model_type == "paligemma" and result.exact
    assert result.scoring < 1e-4 and result.sampling < 1e-4, result
    ranking = pair.best_of_n(_image(), "Describe the image.", n=2, sampling=SamplingParams(seed=3, max_tokens=4))
    assert len(ranking.candidates) == 2


def test_a_family_the_engine_cannot_run_is_refused_at_load_naming_the_model_type(tmp_path: Path) -> None:
    folder = build_tiny_blip2(tmp_path / "blip2")
    with pytest.raises(
        ModelLoadError,
        match=r"'blip-2' has no rules.*could not run it through the shared-prefix engine: .*past_key_values",
    ):
        _pair(folder)


def test_a_family_whose_log_probs_the_engine_gets_wrong_is_refused_with_the_difference(text_llama: Path) -> None:
    model = chunked_llama(text_llama)
    with pytest.raises(
        ModelLoadError,
        match=r"'chunked_llama' has no rules.*disagrees with the model's own generate: scoring log-probs differ by",
    ):
        ModelPair(model, load_processor(text_llama), reference=model)


def test_a_text_only_model_is_probed_with_text_prompts(text_llama: Path) -> None:
    pair = _pair(text_llama)
    result = check_unverified_family(
        pair.policy, pair.processor, accepts_images=False, pad_id=pair.pad_id, stop_ids=pair.stop_ids
    )
    assert result is not None and result.model_type == "llama" and result.exact


def test_registered_families_are_not_probed(tmp_path: Path) -> None:
    folder = build_tiny_family("llava", tmp_path / "llava")
    model = load_model(folder, device="cpu")
    assert not needs_probe(model)
    assert check_unverified_family(model, load_processor(folder), accepts_images=True, pad_id=0, stop_ids=[2]) is None


def _image():
    from PIL import Image

    return Image.new("RGB", (40, 40), (200, 30, 30))


def _check(folder: Path, *args: str):
    from typer.testing import CliRunner

    from rlaifv.cli.main import app

    return CliRunner().invoke(app, ["bundle", "check", str(folder), "--device", "cpu", *args])


def test_bundle_check_probes_both_models_of_a_lora_bundle_of_a_registered_family(tmp_path: Path) -> None:
    from rlaifv.reward.bundle_create import create_bundle
    from rlaifv.trainer.shapes.tiny_vlm import build_tiny_vlm, random_lora

    reference = build_tiny_vlm(tmp_path / "reference")
    create_bundle(tmp_path / "bundle", policy=random_lora(reference, tmp_path / "lora"), reference=reference)
    result = _check(tmp_path / "bundle", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"policy", "reference"}
    for role in report.values():
        assert role["model_type"] == "llava" and role["exact"] and role["scoring"] < 1e-4, report
    text = _check(tmp_path / "bundle")
    assert text.exit_code == 0 and "policy     llava (LLaVA-1.5 rules)" in text.output and "exact" in text.output


def test_bundle_check_of_an_unregistered_family(paligemma: Path, tmp_path: Path) -> None:
    from rlaifv.reward.bundle_create import create_bundle

    create_bundle(tmp_path / "bundle", policy=paligemma, reference=paligemma)
    result = _check(tmp_path / "bundle")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("policy     paligemma (no family rules)"), result.output
    assert "reference  paligemma (no family rules)" in result.stdout


def test_bundle_check_exits_1_naming_a_family_the_engine_cannot_serve(tmp_path: Path) -> None:
    from rlaifv.reward.bundle_create import create_bundle

    blip2 = build_tiny_blip2(tmp_path / "blip2")
    create_bundle(tmp_path / "bundle", policy=blip2, reference=blip2)
    result = _check(tmp_path / "bundle")
    assert result.exit_code == 1
    assert "'blip-2' has no rules" in result.output


@pytest.mark.parametrize("name", SERVED_EXACTLY)
def test_other_transformers_families_the_default_rules_serve_exactly(name: str) -> None:
    """What README's "Serve your own models" states: these pass the load-time comparison (float32)."""
    model, prompts = SURVEY[name]()
    result = compare_with_generate(model, prompts, pad_id=0, stop_ids=[2])
    assert result.model_type == name and result.scoring < 1e-5 and result.sampling < 1e-5, result


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_transformers_families_the_engine_cannot_run_are_refused_for_their_reason(name: str) -> None:
    """`generate` runs them (the truth is computed first); the engine fails on each for the reason REFUSED names."""
    model, prompts = SURVEY[name]()
    with pytest.raises(ModelLoadError, match=name) as info:
        compare_with_generate(model, prompts, pad_id=0, stop_ids=[2])
    assert REFUSED[name] in str(info.value)


def test_a_model_whose_cache_holds_states_is_refused_even_when_the_check_only_warns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LFM2's convolution states cannot be forked for N samples: with family_check=warn it loaded, then failed
    at warm-up with a bare `AttributeError` ('LinearAttentionLayer' has no 'is_initialized')."""
    from rlaifv.reward import family_check
    from rlaifv.reward.family_check import UnforkableCacheError

    model, prompts = SURVEY["lfm2_vl"]()
    monkeypatch.setattr(family_check, "probe_prompts", lambda processor, accepts_images: prompts)
    with pytest.raises(UnforkableCacheError, match="cannot fork for N samples"):
        check_unverified_family(model, None, accepts_images=True, pad_id=0, stop_ids=[2], on_failure="warn")


def _as(cls_body: dict, folder: Path, **kwargs):
    """The tiny text Llama in `folder` loaded as a subclass with `cls_body` (a model with one flaw)."""
    from transformers import LlamaForCausalLM

    return type("Flawed", (LlamaForCausalLM,), cls_body).from_pretrained(str(folder), **kwargs).eval()


def test_the_model_own_decoding_defaults_are_not_part_of_its_greedy_truth(text_llama: Path) -> None:
    """Instruct checkpoints ship repetition penalties and the like; generate applies them even when greedy, the
    engine's raw log-probs never do: the check compares the raw paths, and leaves the config as it was."""
    model = load_model(text_llama, device="cpu")
    config = model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size, config.num_beams = 1.3, 2, 3
    ModelPair(model, load_processor(text_llama), reference=model)
    assert model.generation_config is config and config.num_beams == 3


def test_probe_prompts_put_prompts_of_one_image_shape_and_different_lengths_in_one_padded_batch(
    paligemma: Path, text_llama: Path
) -> None:
    from rlaifv.reward.families import vision_signature
    from rlaifv.reward.family_check import probe_prompts

    images = probe_prompts(load_processor(paligemma), accepts_images=True)
    assert len(images[0]) != len(images[1]) and vision_signature(images[0]) == vision_signature(images[1])
    assert vision_signature(images[2]) != vision_signature(images[0]) or len(images[2]) != len(images[0])
    texts = probe_prompts(load_processor(text_llama), accepts_images=False)
    assert len({len(p) for p in texts}) == len(texts)


def test_a_model_that_attends_to_its_padding_is_refused(text_llama: Path) -> None:
    def forward(self, *args, attention_mask=None, **kwargs):
        return super(type(self), self).forward(*args, **kwargs)

    model = _as({"forward": forward}, text_llama)
    with pytest.raises(ModelLoadError, match="disagrees with the model's own generate"):
        ModelPair(model, load_processor(text_llama), reference=model)


def test_nan_log_probs_are_refused_not_ignored(text_llama: Path) -> None:
    """bfloat16: a near tie may let a greedy sample leave generate's path, so NaN must not hide in a max."""

    def forward(self, *args, **kwargs):
        out = super(type(self), self).forward(*args, **kwargs)
        if out.logits.shape[0] > 1:
            out.logits[1:] = float("nan")
        return out

    model = _as({"forward": forward}, text_llama, dtype=torch.bfloat16)
    with pytest.raises(ModelLoadError, match="disagrees"):
        ModelPair(model, load_processor(text_llama), reference=model)


def test_a_policy_still_in_train_mode_is_probed_as_it_will_serve(tmp_path: Path) -> None:
    folder = build_text_model(tmp_path / "dropout")
    model = load_model(folder, device="cpu")
    model.config.attention_dropout = 0.5
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model.train()
    ModelPair(model, load_processor(folder), reference=model)
    assert model.training


def test_a_model_whose_own_generate_fails_is_refused_saying_so(text_llama: Path) -> None:
    def generate(self, *args, **kwargs):
        raise TypeError("generate() got an unexpected keyword argument 'input_ids'")

    model = _as({"generate": generate}, text_llama)
    with pytest.raises(ModelLoadError, match="could not run the model's own generate, its ground truth: TypeError"):
        ModelPair(model, load_processor(text_llama), reference=model)


def test_half_precision_bound_comes_from_the_model_own_padding_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16: a model the engine serves right passes; the same model under rules missing one input (Mllama
    without its continued cross-attention mask: 0.04 off) fails, where a fixed 0.25 bound let it through."""
    import dataclasses

    from rlaifv.reward import families
    from rlaifv.reward.family_check import HALF_FLOOR

    folder = build_tiny_family("mllama", tmp_path / "mllama")
    model, processor = load_model(folder, device="cpu", dtype="bfloat16"), load_processor(folder)
    kwargs = {"accepts_images": True, "pad_id": processor.tokenizer.pad_token_id, "stop_ids": [2]}
    right = probe(model, processor, **kwargs)
    assert right.exact and HALF_FLOOR <= right.tolerance < 0.25, right
    monkeypatch.setitem(families.FAMILIES, "mllama", dataclasses.replace(families.FAMILIES["mllama"], continued=()))
    wrong = probe(model, processor, **kwargs)
    assert not wrong.exact, wrong


def test_family_check_warn_logs_the_refusal_and_serves(
    text_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RLAIFV_FAMILY_CHECK=warn: an operator who has checked a model otherwise may serve it; the log says why
    the check would have refused it."""
    from rlaifv.reward.bundle import load_bundle
    from rlaifv.reward.bundle_create import create_bundle

    model = chunked_llama(text_llama)
    with caplog.at_level("WARNING", logger="rlaifv.reward.family_check"):
        ModelPair(model, load_processor(text_llama), reference=model, family_check="warn")
    assert "family_check=warn" in caplog.text and "disagrees with the model's own generate" in caplog.text
    blip2 = build_tiny_blip2(tmp_path / "blip2")
    create_bundle(tmp_path / "bundle", policy=blip2, reference=blip2)
    with pytest.raises(ModelLoadError):
        load_bundle(tmp_path / "bundle")
    # One the engine cannot run at all is refused all the same: served, it failed at the first request.
    with pytest.raises(EngineCannotRunError, match="could not run it through the shared-prefix engine"):
        load_bundle(tmp_path / "bundle", family_check="warn")


@pytest.mark.parametrize("kind", sorted(TEXT_FAMILIES))
def test_text_only_architectures_pass_the_check_and_serve(kind: str, tmp_path: Path) -> None:
    """A text-only pair of another architecture loads through the check and ranks answers: sliding windows
    shorter than the prompt, soft-capped logits, attention sinks, mixtures of experts."""
    folder = build_text_family(kind, tmp_path / kind)
    pair = _pair(folder)
    result = probe(pair.policy, pair.processor, accepts_images=False, pad_id=pair.pad_id, stop_ids=pair.stop_ids)
    assert result.model_type == kind and result.scoring < 1e-4 and result.sampling < 1e-4, result
    ranking = pair.best_of_n([], "Say something short.", n=3, sampling=SamplingParams(seed=2, max_tokens=5))
    assert len(ranking.candidates) == 3


def test_an_unknown_mrope_family_in_half_precision_is_refused_for_its_positions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's own refusal (positions it has no rules for) is not reported as generate failing."""
    from rlaifv.reward import families

    folder = build_tiny_family("glm4v", tmp_path / "glm4v")
    monkeypatch.delitem(families.FAMILIES, "glm4v")
    model, processor = load_model(folder, device="cpu", dtype="bfloat16"), load_processor(folder)
    with pytest.raises(ModelLoadError, match="multimodal rope positions") as info:  # the vLLM engine's reference
        check_unverified_family(model, processor, accepts_images=True, pad_id=0, stop_ids=[2])
    assert "own generate" not in str(info.value)
