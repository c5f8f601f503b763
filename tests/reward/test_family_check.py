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
    check_unverified_family,
    compare_with_generate,
    needs_probe,
    probe,
    refuse_unless_exact,
)
from rlaifv.reward.model_pair import ModelPair
from rlaifv.reward.models import load_model, load_processor
from rlaifv.reward.sampling import SamplingParams
from rlaifv.testing.tiny_families import build_tiny_family
from rlaifv.testing.tiny_text import build_text_model
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
    with pytest.raises(ModelLoadError, match=f"{name}.*could not run it through the shared-prefix engine") as info:
        refuse_unless_exact(model, lambda: compare_with_generate(model, prompts, pad_id=0, stop_ids=[2]))
    assert REFUSED[name] in str(info.value)
