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


def test_a_re_export_stopped_halfway_leaves_the_earlier_bundle_whole(tiny_bundle, tmp_path, monkeypatch):
    """The export replaced policy/ and reference/ in the live folder one after the other and wrote the manifest
    last: stopped between them, the earlier manifest named the new policy beside the old reference, and
    `rlaifv bundle check` passed it."""
    from rlaifv.reward.bundle import check_bundle, write_bundle

    policy, reference = tiny_bundle / "policy", tiny_bundle / "reference"
    out = tmp_path / "bundle"
    write_bundle(out, policy=policy, reference=reference, name="first")
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
    assert check_bundle(out).name == "first"
    for key, source in (("policy", policy), ("reference", reference)):
        assert (out / key / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

    for leftover in (".bundle.writing", ".bundle.old"):  # what a SIGKILL leaves: removed by the next export
        (tmp_path / leftover / "policy").mkdir(parents=True)
    write_bundle(out, policy=reference, reference=policy, name="second")
    assert check_bundle(out).name == "second"
    assert (out / "policy" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "policy", "reference"])


def test_a_folder_holding_other_files_is_not_replaced_by_a_bundle(tmp_path, tiny_bundle) -> None:
    """A bundle is now written whole in place of the folder: one holding files of its own (no manifest) is refused,
    not emptied."""
    from rlaifv.reward.bundle import write_bundle
    from rlaifv.reward.errors import BundleError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="holds files but no bundle"):
        write_bundle(mine, policy=tiny_bundle / "policy", reference=tiny_bundle / "reference")
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    write_bundle(tmp_path / "empty", policy=tiny_bundle / "policy", reference=tiny_bundle / "reference")
    assert (tmp_path / "empty" / "rlaifv.json").is_file()
