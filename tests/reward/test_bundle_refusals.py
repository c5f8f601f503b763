"""What `rlaifv bundle create|inspect|check` refuse, and how: before copying, naming the source file, one line.

Each case here was accepted by `bundle create` and failed later (at `serve`, with a traceback), or failed with a
traceback or a message naming a deleted temporary folder.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlaifv.reward import BundleError, load_bundle
from rlaifv.reward.bundle import MANIFEST, read_manifest
from rlaifv.reward.bundle_create import create_bundle, describe_bundle
from rlaifv.reward.errors import ModelLoadError
from rlaifv.trainer.shapes.tiny_vlm import build_tiny_vlm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(bundle_sources: dict[str, Path]) -> dict[str, Path]:
    return bundle_sources


@pytest.fixture(scope="module")
def bundle(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "good"
    create_bundle(out, policy=models["policy"], reference=models["reference"])
    return out


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def _refusal(tmp_path: Path, **kwargs) -> str:
    out = tmp_path / "refused"
    with pytest.raises(BundleError) as info:
        create_bundle(out, **kwargs)
    assert not out.exists(), "a refused bundle must write nothing"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    return str(info.value)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _without_tensors(source: Path, target: Path, part: str) -> Path:
    from safetensors.torch import load_file, save_file

    folder = _copy(source, target)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if part not in k}, str(folder / "model.safetensors"), {"format": "pt"})
    return folder


def _write_header(path: Path, header: object) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


# -- 2: weights the model needs but the folder lacks -------------------------------------------------------------


def test_a_model_missing_its_vision_tower_is_refused_at_load_and_at_create(models, tmp_path):
    """A merged checkpoint without its vision tower loaded with random tower weights and served."""
    from rlaifv.reward.models import load_model

    policy = _without_tensors(models["policy"], tmp_path / "no-tower", "vision_tower")
    with pytest.raises(ModelLoadError, match=r"lacks 39 of the tensors .* model\.vision_tower\."):
        load_model(policy, device="cpu")
    message = _refusal(tmp_path, policy=policy, reference=models["reference"])
    assert f"policy folder {policy}" in message and "lacks 39 of the tensors" in message


def test_tied_and_ignored_weights_are_not_missing(tmp_path):
    """The text-only tiny model ties its LM head to the embeddings: no lm_head tensor on disk, nothing missing."""
    from rlaifv.reward.models import load_model, missing_weights
    from rlaifv.testing.tiny_text import build_tiny_text_bundle

    source = build_tiny_text_bundle(tmp_path / "text")
    folder = source / read_manifest(source).policy
    assert missing_weights(folder) == []
    load_model(folder, device="cpu")


# -- 3: `rlaifv serve` runs the pre-load checks -------------------------------------------------------------------


def _break(kind: str, folder: Path, tmp_path: Path) -> None:
    if kind == "no policy folder":
        shutil.rmtree(folder / "policy")
    elif kind == "config.json":
        (folder / "policy" / "config.json").write_text("{not json")
    elif kind == "truncated":
        weights = folder / "policy" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "tokenizer.json":
        (folder / "policy" / "tokenizer.json").write_text("[1, 2]")
    elif kind == "moved link":
        target = _copy(folder / "policy", tmp_path / "linked-policy")
        _edit_json(folder / MANIFEST, policy=str(target))
        shutil.rmtree(target)
    elif kind == "end_of_turn":
        _edit_json(folder / MANIFEST, end_of_turn="<nope>")
    elif kind == "no chat template":
        _drop_chat_template(folder / "reference")
    elif kind == "no image processor":
        for role in ("policy", "reference"):
            (folder / role / "processor_config.json").unlink()


def _drop_chat_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink()
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((folder / name).read_text())
        config.pop("chat_template", None)
        (folder / name).write_text(json.dumps(config))


BROKEN = {
    "no policy folder": r"policy folder .*/policy does not exist",
    "config.json": r"policy/config.json is not valid JSON",
    "truncated": r"policy/model.safetensors is truncated",
    "tokenizer.json": r"policy/tokenizer.json is not a JSON object",
    "moved link": r"linked-policy does not exist",
    # what `bundle create` refuses, found by serve before loading (they were a traceback in uvicorn's lifespan, exit 3)
    "end_of_turn": r"b/rlaifv.json is invalid: field 'end_of_turn': end-of-turn token '<nope>' is not in the "
    r"reference's vocabulary of 125 tokens \(.*/reference/tokenizer.json; its special tokens: .*</s>",
    "no chat template": r"reference folder .*/reference has no chat template",
    "no image processor": r"reference folder .*/reference holds a vision-language model \(model_type 'llava'\) but "
    r"has no image processor",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_serve_refuses_a_broken_bundle_in_one_line_before_loading(kind, bundle, tmp_path, monkeypatch):
    import os
    import re

    from rlaifv.cli.main import app

    folder = _copy(bundle, tmp_path / "b")
    _break(kind, folder, tmp_path)
    for name in [n for n in os.environ if n.startswith("RLAIFV_")]:
        monkeypatch.delenv(name)
    started: list[bool] = []

    def create_app(*args, **kwargs):
        started.append(True)
        raise SystemExit(9)

    monkeypatch.setattr("rlaifv.service.serve_cli.bind", lambda *args, **kwargs: [])  # the port is taken first
    monkeypatch.setattr("rlaifv.service.app.create_app", create_app)
    result = CliRunner().invoke(app, ["serve", "--bundle", str(folder)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert re.search(BROKEN[kind], result.output), result.output
    assert not started
    with pytest.raises(BundleError, match=BROKEN[kind]):
        load_bundle(folder)


# -- 4: pairs the service refuses ---------------------------------------------------------------------------------


def test_refuses_a_reference_without_a_chat_template(models, tmp_path):
    reference = _copy(models["reference"], tmp_path / "no-template")
    _drop_chat_template(reference)
    message = _refusal(tmp_path, policy=models["policy"], reference=reference)
    assert "has no chat template" in message and str(reference) in message


def test_refuses_a_vision_pair_without_an_image_processor(models, tmp_path):
    """Without processor_config.json the pair was taken for a text-only one; the service cannot load it."""
    reference = _copy(models["reference"], tmp_path / "ref-no-processor")
    policy = _copy(models["policy"], tmp_path / "policy-no-processor")
    for folder in (reference, policy):
        (folder / "processor_config.json").unlink()
    message = _refusal(tmp_path, policy=policy, reference=reference)
    assert "model_type 'llava'" in message and "no image processor" in message


def test_refuses_a_policy_whose_config_changes_the_image_features(models, tmp_path):
    policy = _copy(models["policy"], tmp_path / "full-features")
    _edit_json(policy / "config.json", vision_feature_select_strategy="full")
    message = _refusal(tmp_path, policy=policy, reference=models["reference"])
    assert "model config vision_feature_select_strategy: policy 'full', reference 'default'" in message


def test_refuses_a_sharded_policy_missing_a_shard(models, tmp_path):
    from transformers import AutoModelForImageTextToText

    from rlaifv.reward.models import copy_processor_files

    policy = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(str(models["policy"])).save_pretrained(policy, max_shard_size="100KB")
    copy_processor_files(models["policy"], policy)
    shards = sorted(policy.glob("model-*.safetensors"))
    assert len(shards) > 2
    create_bundle(tmp_path / "whole", policy=policy, reference=models["reference"])
    shards[1].unlink()
    message = _refusal(tmp_path, policy=policy, reference=models["reference"])
    assert f"{policy / 'model.safetensors.index.json'} names missing shard(s): {shards[1].name}" in message


# -- 5: a LoRA adapter made for another model class -----------------------------------------------------------------


def test_refuses_a_lora_adapter_whose_base_class_is_not_the_reference(models, tmp_path):
    adapter = _copy(models["lora"], tmp_path / "other-base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["auto_mapping"]["base_model_class"] = "Qwen2VLForConditionalGeneration"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    message = _refusal(tmp_path, policy=adapter, reference=models["reference"])
    assert "made for Qwen2VLForConditionalGeneration" in message and "LlavaForConditionalGeneration" in message
    config.pop("auto_mapping")  # no class named: the shape check alone decides
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert create_bundle(tmp_path / "unnamed", policy=adapter, reference=models["reference"]).policy_type == "lora"


# -- 6: relative outputs --------------------------------------------------------------------------------------------


def test_a_relative_output_with_dotdot_from_inside_a_model_folder(models, tmp_path, monkeypatch):
    policy = _copy(models["policy"], tmp_path / "work" / "policy")
    monkeypatch.chdir(policy)
    create_bundle("../b_rel", policy=".", reference=models["reference"])
    assert (tmp_path / "work" / "b_rel" / MANIFEST).is_file()
    assert not (policy / "b_rel").exists()
    with pytest.raises(BundleError, match=f"output folder {policy / 'sub'} is inside the model folder {policy}"):
        create_bundle("sub/x/..", policy=".", reference=models["reference"])


# -- 7: odd but valid JSON ------------------------------------------------------------------------------------------


def test_odd_json_in_model_files_is_one_error_naming_the_file(models, bundle, tmp_path):
    cases = {
        "config.json": ("[]", "config.json is not a JSON object"),
        "tokenizer.json": ("[1, 2]", "tokenizer.json is not a JSON object"),
    }
    for name, (text, message) in cases.items():
        policy = _copy(models["policy"], tmp_path / f"p-{name}")
        (policy / name).write_text(text)
        assert message in _refusal(tmp_path, policy=policy, reference=models["reference"])
        described = _copy(bundle, tmp_path / f"b-{name}")
        (described / "policy" / name).write_text(text)
        with pytest.raises(BundleError, match=str(described / "policy" / name)):
            describe_bundle(described)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ([1, 2], "its header is not a JSON object"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": "0,4"}}, "tensor 'a' has no valid data_offsets"),
        ({"a": 1}, "tensor 'a' is not described by an object"),
    ],
)
def test_odd_safetensors_headers_name_the_file(header, message, models, tmp_path):
    policy = _copy(models["policy"], tmp_path / "p")
    _write_header(policy / "model.safetensors", header)
    assert f"{policy / 'model.safetensors'} is not a safetensors file: {message}" in _refusal(
        tmp_path, policy=policy, reference=models["reference"]
    )


def test_a_non_utf8_manifest_is_named(bundle, tmp_path):
    folder = _copy(bundle, tmp_path / "b")
    (folder / MANIFEST).write_bytes(b"\xff\xfe{}")
    with pytest.raises(BundleError, match=r"rlaifv.json is not valid JSON"):
        read_manifest(folder)


def test_bundle_check_ends_in_one_error_line(bundle, tmp_path):
    import torch

    from rlaifv.cli.main import app

    tokenizer = _copy(bundle, tmp_path / "tok")
    (tokenizer / "policy" / "tokenizer.json").write_text("{not json")
    end_of_turn = _copy(bundle, tmp_path / "eot")
    _edit_json(end_of_turn / MANIFEST, end_of_turn="<nope>")
    truncated = _copy(bundle, tmp_path / "trunc")
    weights = truncated / "reference" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cases = [
        ([str(tokenizer)], "tok/policy/tokenizer.json is not valid JSON"),
        ([str(end_of_turn)], "eot/rlaifv.json is invalid: field 'end_of_turn': end-of-turn token '<nope>' is not in"),
        ([str(truncated)], "trunc/reference/model.safetensors is truncated"),
        ([str(bundle), "--device", "tpu"], "error: --device: unknown device 'tpu'"),
        ([str(bundle), "--dtype", "int8"], "error: --dtype: unknown dtype 'int8'"),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(bundle), "--device", "cuda"], "error: --device: 'cuda' but CUDA is not available"))
    for args, message in cases:
        result = CliRunner().invoke(app, ["bundle", "check", *args])
        assert result.exit_code == (2 if "--device" in args or "--dtype" in args else 1), (args, result.output)
        assert message in result.output and result.output.count("\n") == 1, (args, result.output)


# -- 8: checked before copying; settings refused at the option -----------------------------------------------------


def test_a_truncated_source_is_named_not_the_staging_folder(models, tmp_path):
    policy = _copy(models["policy"], tmp_path / "truncated")
    weights = policy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    message = _refusal(tmp_path, policy=policy, reference=models["reference"])
    assert message.startswith(f"{weights} is truncated"), message


def test_an_infinite_beta_is_refused_at_the_option(models, bundle, tmp_path):
    from rlaifv.cli.main import app

    args = ["bundle", "create", "--policy", str(models["policy"]), "--reference", str(models["reference"])]
    for beta in ("inf", "1e309", "nan"):
        result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b"), "--beta", beta])
        assert result.exit_code == 1 and "error: --beta: " in result.output, result.output
        assert not (tmp_path / "b").exists()
    folder = _copy(bundle, tmp_path / "inf")
    (folder / MANIFEST).write_text((folder / MANIFEST).read_text().replace('"beta": 0.1', '"beta": Infinity'))
    with pytest.raises(BundleError, match="field 'beta'"):
        read_manifest(folder)


# -- nits -----------------------------------------------------------------------------------------------------------


def test_a_policy_equal_to_its_reference_warns(models, tmp_path):
    with pytest.warns(UserWarning, match="every reward will be 0"):
        create_bundle(tmp_path / "b", policy=models["reference"], reference=models["reference"])


@pytest.mark.parametrize("name", ["   ", "bad\nname", "tab\tname"])
def test_a_blank_or_control_character_name_is_refused(name, models, tmp_path):
    from rlaifv.cli.main import app

    assert "name" in _refusal(tmp_path, policy=models["policy"], reference=models["reference"], name=name)
    args = ["bundle", "create", "--policy", str(models["policy"]), "--reference", str(models["reference"])]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b"), "--name", name])
    assert result.exit_code == 1 and "error: --name: " in result.output, result.output


def test_a_file_given_as_the_bundle_folder(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(BundleError, match="is a file, not a bundle folder"):
        read_manifest(tmp_path / "afile")


def test_a_dangling_link_in_a_model_folder_is_named(models, tmp_path):
    policy = _copy(models["policy"], tmp_path / "linked")
    (policy / "extra.json").symlink_to(tmp_path / "gone.json")
    message = _refusal(tmp_path, policy=policy, reference=models["reference"])
    assert message == f"policy folder {policy} has a broken link: extra.json -> {tmp_path / 'gone.json'}"


def test_weights_linked_to_where_only_the_vllm_servers_look_pass_the_check_without_weights(models, tmp_path):
    """With the vLLM engine the service reads configs and tokenizer files; the weights are the servers'."""
    from rlaifv.reward.bundle import check_bundle, write_bundle

    bundle = tmp_path / "b"
    write_bundle(bundle, policy=models["policy"], reference=models["reference"])
    weights = next((bundle / "policy").glob("*.safetensors"))
    weights.unlink()
    weights.symlink_to(tmp_path / "on-the-vllm-volume.safetensors")
    check_bundle(bundle, weights=False)
    with pytest.raises(BundleError, match="broken link"):
        check_bundle(bundle)
    tokenizer = next(p for p in (bundle / "policy").iterdir() if p.name.startswith("tokenizer"))
    tokenizer.unlink()
    tokenizer.symlink_to(tmp_path / "gone.json")
    with pytest.raises(BundleError, match="broken link"):  # the service reads these itself
        check_bundle(bundle, weights=False)


def _family_builders() -> dict[str, object]:
    from rlaifv.testing.tiny_families import FAMILIES, build_tiny_family
    from rlaifv.testing.tiny_text import build_text_model
    from rlaifv.testing.tiny_unregistered import build_tiny_blip2, build_tiny_paligemma

    builders: dict[str, object] = {name: (lambda f, name=name: build_tiny_family(name, f)) for name in FAMILIES}
    return builders | {"blip2": build_tiny_blip2, "paligemma": build_tiny_paligemma, "text": build_text_model}


@pytest.mark.parametrize("family", list(_family_builders()))
def test_the_early_check_finds_nothing_missing_in_any_family_and_one_tensor_removed(family, tmp_path):
    """`bundle create` asks transformers (a meta-device load from the headers) what it would fill with random values:
    nothing for a complete folder of any family, whatever its checkpoint names (renamed on load, tied, fused)."""
    from safetensors.torch import load_file, save_file

    from rlaifv.reward.models import missing_weights

    folder = Path(_family_builders()[family](tmp_path / family))  # type: ignore[operator]
    assert missing_weights(folder) == []
    weights = sorted(folder.glob("*.safetensors"))[0]
    tensors = load_file(str(weights))
    victim = sorted(tensors)[len(tensors) // 2]
    save_file({k: v for k, v in tensors.items() if k != victim}, str(weights), {"format": "pt"})
    missing = missing_weights(folder)
    assert missing is not None and len(missing) == 1 and missing[0].endswith(victim.split(".", 1)[1]), missing


def test_a_single_file_beside_a_stale_shard_index_loads_as_transformers_loads_it(tmp_path):
    """A re-save without shards leaves the old index behind (save_pretrained removes the shards, not the index):
    transformers loads model.safetensors; the header check refused the folder for the index's missing shards."""
    from rlaifv.reward.models import check_model_folder, load_model

    folder = build_tiny_vlm(tmp_path / "m")
    model = load_model(folder, device="cpu")
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "model.safetensors.index.json").is_file()
    check_model_folder(folder)
    load_model(folder, device="cpu")


# -- 9: what an output may replace, what inspect calls linked, sources given by mistake --------------------------------


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("force", [True, False])
def test_an_output_holding_the_sources_is_refused_and_nothing_is_deleted(copy, force, models, tmp_path, monkeypatch):
    """`-o zoo --force` with both sources inside zoo renamed zoo aside and deleted it: the sources and the user's
    other files with it (refused only with --link)."""
    zoo = tmp_path / "zoo"
    _copy(models["policy"], zoo / "pol")
    _copy(models["reference"], zoo / "ref")
    (zoo / "notes.txt").write_text("keep me")
    before = _tree(zoo)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        BundleError, match=r"output folder .*/zoo overlaps the model folder .*/zoo/pol, which is inside"
    ):
        create_bundle("zoo", policy="zoo/pol", reference="zoo/ref", copy=copy, force=force)
    assert _tree(zoo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


def test_force_replaces_a_linked_output_not_what_it_points_to(models, bundle, tmp_path):
    kept = _copy(bundle, tmp_path / "kept")
    link = tmp_path / "current"
    link.symlink_to(kept)
    with pytest.raises(BundleError, match="is a link: pass --force"):
        create_bundle(link, policy=models["policy"], reference=models["reference"], beta=0.5)
    create_bundle(link, policy=models["policy"], reference=models["reference"], beta=0.5, force=True)
    assert not link.is_symlink() and read_manifest(link).beta == 0.5
    assert _tree(kept) == _tree(bundle) and read_manifest(kept).beta == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "kept"]


def test_write_bundle_refuses_a_source_inside_the_folder_its_copy_replaces(models, tmp_path):
    from rlaifv.reward.bundle import write_bundle

    inner = _copy(models["policy"], tmp_path / "b" / "policy" / "checkpoint")
    with pytest.raises(BundleError, match=r"checkpoint is inside .*/b/policy, which the bundle's copy replaces"):
        write_bundle(tmp_path / "b", policy=inner, reference=models["reference"])
    assert (inner / "model.safetensors").is_file() and not (tmp_path / "b" / MANIFEST).exists()


def test_an_output_below_a_file_is_named(models, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(BundleError, match=r"output .*/afile/x: .*/afile is a file, not a folder"):
        create_bundle(tmp_path / "afile" / "x", policy=models["policy"], reference=models["reference"])


def test_inspect_calls_linked_what_lies_outside_the_bundle(models, bundle, tmp_path):
    """Only an absolute path in the manifest was 'linked': `../` paths and linked folders showed as 'copied'."""
    sources = _copy(bundle, tmp_path / "store")
    dotdot = tmp_path / "deep" / "dotdot"
    dotdot.mkdir(parents=True)
    (dotdot / MANIFEST).write_text(
        json.dumps({"policy": "../../store/policy", "reference": str(sources / "reference")})
    )
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "policy").symlink_to(sources / "policy")
    _copy(sources / "reference", linked / "reference")
    (linked / MANIFEST).write_text(json.dumps({"policy": "policy", "reference": str(linked / "reference")}))
    first, second = describe_bundle(dotdot), describe_bundle(linked)
    assert (first.policy.stored, first.reference.stored) == ("linked", "linked")
    assert (second.policy.stored, second.reference.stored) == ("linked", "copied")  # absolute but inside: copied
    assert (describe_bundle(bundle).policy.stored, describe_bundle(bundle).reference.stored) == ("copied", "copied")


def test_a_bundle_given_as_a_source_names_its_model_folders(models, bundle, tmp_path):
    message = _refusal(tmp_path, policy=bundle, reference=models["reference"])
    assert message == (
        f"policy folder {bundle} is a bundle (it holds rlaifv.json), not a model folder: use its policy folder, "
        f"{bundle / 'policy'}"
    )
    message = _refusal(tmp_path, policy=models["policy"], reference=bundle)
    assert message.endswith(f"use its reference folder, {bundle / 'reference'}")


@pytest.mark.parametrize(
    ("config", "command"),
    [
        ({"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "rlaifv convert llava"),
        ({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "rlaifv convert llava"),
        ({"model_type": "omnilmm", "num_query": 4}, "rlaifv convert omnilmm"),
    ],
)
def test_an_unconverted_original_checkpoint_names_the_converter(config, command, models, tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps(config))
    (original / "pytorch_model.bin").write_bytes(b"")
    message = _refusal(tmp_path, policy=original, reference=models["reference"])
    assert message.startswith(f"policy folder {original} is ") and f"`{command} {original}" in message, message


def test_a_relative_lora_base_is_read_from_the_current_folder_as_peft_does(models, tmp_path, monkeypatch):
    """PEFT hands base_model_name_or_path to from_pretrained unchanged: a relative one is read from the current
    folder; the warning says so (it read as if it were where the adapter is)."""
    from rlaifv.trainer.shapes.tiny_vlm import random_lora

    adapter = random_lora(models["policy"], tmp_path / "adapter")
    _copy(models["policy"], tmp_path / "cwd" / "base")
    _edit_json(adapter / "adapter_config.json", base_model_name_or_path="base")
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.warns(UserWarning) as warned:
        create_bundle(tmp_path / "out", policy=adapter, reference=models["reference"])
    message = str(warned[0].message)
    assert (
        f"trained over base (its adapter_config.json, a relative path read from the current folder {tmp_path / 'cwd'}"
        in message
    )
    assert f"i.e. {tmp_path / 'cwd' / 'base'}), whose weights differ from the reference" in message


def test_the_output_is_checked_again_after_the_copy(models, tmp_path, monkeypatch):
    """The copy of a large model takes minutes: files put in the (empty) output meanwhile are not replaced."""
    from rlaifv.reward import bundle_create

    out = tmp_path / "out"
    out.mkdir()
    write = bundle_create.write_bundle

    def write_then_fill(*args, **kwargs):
        manifest = write(*args, **kwargs)
        (out / "notes.txt").write_text("written while the bundle was copied")
        return manifest

    monkeypatch.setattr(bundle_create, "write_bundle", write_then_fill)
    with pytest.raises(BundleError, match=r"is not a bundle \(no rlaifv.json; it holds 'notes.txt'\)"):
        create_bundle(out, policy=models["policy"], reference=models["reference"], force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and _tree(out) == ["notes.txt"]


def test_serve_listens_before_checking_and_loading_the_bundle(bundle, monkeypatch):
    """The port is taken before the seconds of imports and bundle checks: a restarting server's clients wait in
    the listen backlog for its 503 not_ready (which the SDK waits out) instead of being refused."""
    import os
    import socket

    from rlaifv.cli.main import app
    from rlaifv.testing.server import free_port

    for name in [n for n in os.environ if n.startswith("RLAIFV_")]:
        monkeypatch.delenv(name)
    port = free_port()
    connected: list[bool] = []

    def check_bundle(*args, **kwargs):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            connected.append(True)
        raise SystemExit(9)

    monkeypatch.setattr("rlaifv.service.serve_cli.check_bundle", check_bundle)
    result = CliRunner().invoke(app, ["serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)])
    assert result.exit_code == 9, result.output
    assert connected == [True]
    with pytest.raises(ConnectionRefusedError):  # given back when the check failed, not held until the exit
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
