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


def test_a_re_export_stopped_halfway_leaves_no_bundle_until_one_completes(tiny_bundle, tmp_path, monkeypatch):
    """The export replaced policy/ and reference/ one after the other and wrote the manifest last: stopped between
    them, the earlier manifest named the new policy beside the old reference, and `rlaifv bundle check` passed it.
    Now the folder holds no manifest until an export completes; files of the user's own stay."""
    from rlaifv.reward.bundle import check_bundle, write_bundle

    policy, reference = tiny_bundle / "policy", tiny_bundle / "reference"
    out = tmp_path / "bundle"
    write_bundle(out, policy=policy, reference=reference, name="first")
    (out / "notes.md").write_text("mine")
    copies = []
    real_copytree = shutil.copytree

    def stopped_at_the_second_copy(*args, **kwargs):
        copies.append(args[0])
        if len(copies) == 2:
            raise KeyboardInterrupt
        return real_copytree(*args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", stopped_at_the_second_copy)
    with pytest.raises(KeyboardInterrupt):  # the re-export swaps the two models
        write_bundle(out, policy=reference, reference=policy, name="second")
    monkeypatch.undo()
    with pytest.raises(BundleError):
        check_bundle(out)
    write_bundle(out, policy=reference, reference=policy, name="second")
    assert check_bundle(out).name == "second"
    assert (out / "policy" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert (out / "reference" / "model.safetensors").read_bytes() == (policy / "model.safetensors").read_bytes()
    assert (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_model_already_in_the_bundle_folder_stays_and_a_linked_folder_is_written_through(tiny_bundle, tmp_path):
    """`rlaifv bench engine` puts the policy in the bundle folder, then writes the bundle around it; a bundle
    folder that is a link is written where it points (the service reads it there)."""
    from rlaifv.reward.bundle import check_bundle, write_bundle

    out = tmp_path / "lora"
    shutil.copytree(tiny_bundle / "policy", out / "policy")
    write_bundle(out, policy=out / "policy", reference=tiny_bundle / "reference")
    assert check_bundle(out).policy == "policy"
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    write_bundle(link, policy=tiny_bundle / "policy", reference=tiny_bundle / "reference", name="linked")
    assert link.is_symlink() and check_bundle(real).name == "linked"
