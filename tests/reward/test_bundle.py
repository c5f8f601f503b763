"""Bundles round-trip and fail with messages that name the problem."""

import json
import shutil

import pytest
from PIL import Image

from rlaifv.reward import BundleError, load_bundle
from rlaifv.reward.bundle import MANIFEST, read_manifest
from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_tiny_vlm

ANSWERS = ["a red circle.", "a blue square and a cat."]


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target


def _edit_manifest(folder, **changes):
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_round_trip_gives_the_same_rewards(tiny_bundle, bundle_copy):
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    a = load_bundle(tiny_bundle).score(image, "What is in the image?", ANSWERS)
    b = load_bundle(bundle_copy).score(image, "What is in the image?", ANSWERS)
    assert a.rewards == pytest.approx(b.rewards, abs=1e-7)
    manifest = read_manifest(bundle_copy)
    assert manifest.beta == 0.1 and manifest.normalize == "mean" and manifest.policy_type == "full"


def test_manifest_settings_reach_the_pair(bundle_copy):
    _edit_manifest(bundle_copy, beta=0.5, normalize="sum", name="custom")
    pair = load_bundle(bundle_copy)
    assert (pair.reward.beta, pair.reward.normalize, pair.name) == (0.5, "sum", "custom")


def test_missing_manifest(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match=r"rlaifv.json is missing"):
        load_bundle(tmp_path / "b")


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"beta": -1}, "beta"),
        ({"normalize": "median"}, "normalize"),
        ({"policy_type": "qlora"}, "policy_type"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_field_is_named(bundle_copy, change, field):
    _edit_manifest(bundle_copy, **change)
    with pytest.raises(BundleError, match=f"field '{field}'"):
        load_bundle(bundle_copy)


def test_invalid_json(bundle_copy):
    (bundle_copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_missing_model_folder_is_named(bundle_copy):
    shutil.rmtree(bundle_copy / "policy")
    with pytest.raises(BundleError, match=r"policy folder .* does not exist"):
        load_bundle(bundle_copy)


def test_mismatched_tokenizers(bundle_copy):
    shutil.rmtree(bundle_copy / "policy")
    build_tiny_vlm(bundle_copy / "policy", TinyVLMSpec(words=("other", "words", "entirely")))
    with pytest.raises(BundleError, match="tokenizers differ"):
        load_bundle(bundle_copy)


def test_non_safetensors_checkpoint_is_refused(bundle_copy):
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(bundle_copy / "policy" / "model.safetensors"))
    (bundle_copy / "policy" / "model.safetensors").unlink()
    torch.save(weights, bundle_copy / "policy" / "pytorch_model.bin")
    with pytest.raises(BundleError, match=r"no safetensors weights \(found pytorch_model.bin"):
        load_bundle(bundle_copy)


def test_lora_type_mismatch(bundle_copy):
    _edit_manifest(bundle_copy, policy_type="lora")
    with pytest.raises(BundleError, match=r"has no adapter_config\.json"):
        load_bundle(bundle_copy)
