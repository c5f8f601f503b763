"""`rlaifv bundle create|inspect`: bundles from one's own folders load and score, incompatible pairs are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from rlaifv.reward import BundleError, load_bundle
from rlaifv.reward.bundle import MANIFEST, load_pair, read_manifest
from rlaifv.reward.bundle_create import create_bundle, describe_bundle
from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_tiny_vlm

QUESTION = "What is in the image?"
ANSWERS = ["a red circle.", "a blue square and a cat."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(bundle_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("more-sources")
    return {
        **bundle_sources,
        "other_words": build_tiny_vlm(root / "other_words", TinyVLMSpec(words=("other", "words", "entirely"))),
        "big_images": build_tiny_vlm(root / "big_images", TinyVLMSpec(image_size=64)),
        "narrow": build_tiny_vlm(root / "narrow", TinyVLMSpec(text_hidden=32, text_heads=2, text_kv_heads=1)),
    }


def _image() -> Image.Image:
    return Image.new("RGB", (32, 32), (200, 0, 0))


def _rewards(pair) -> list[float]:
    return pair.score(_image(), QUESTION, ANSWERS).rewards


def _weights(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            total += sum(handle.get_tensor(key).numel() for key in handle.keys())  # noqa: SIM118
    return total


def test_copied_bundle_scores_like_its_sources(models, tmp_path):
    out = tmp_path / "bundle"
    manifest = create_bundle(
        out, policy=models["policy"], reference=models["reference"], beta=0.25, normalize="sum", name="mine"
    )
    assert (manifest.policy, manifest.reference, manifest.policy_type) == ("policy", "reference", "full")
    assert (out / "policy" / "model.safetensors").read_bytes() == (models["policy"] / "model.safetensors").read_bytes()
    assert read_manifest(out) == manifest
    provenance = manifest.provenance
    assert provenance["created_by"] == "rlaifv bundle create"
    assert provenance["policy_source"] == str(models["policy"].resolve())
    assert provenance["reference_source"] == str(models["reference"].resolve())
    assert provenance["rlaifv_version"] and provenance["created_at"].startswith("20")

    pair = load_bundle(out)
    assert (pair.name, pair.reward.beta, pair.reward.normalize) == ("mine", 0.25, "sum")
    direct = load_pair(models["policy"], models["reference"], reward=manifest.reward)
    rewards = _rewards(pair)
    assert rewards == pytest.approx(_rewards(direct), abs=1e-6)
    assert rewards[0] != pytest.approx(0.0, abs=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "the staging folder was left behind"


def test_linked_bundle_points_at_the_sources(models, tmp_path):
    out = tmp_path / "linked"
    manifest = create_bundle(out, policy=models["policy"], reference=models["reference"], copy=False)
    assert manifest.policy == str(models["policy"].resolve())
    assert manifest.reference == str(models["reference"].resolve())
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]
    copied = create_bundle(tmp_path / "copied", policy=models["policy"], reference=models["reference"])
    assert copied.provenance["policy_source"] == manifest.provenance["policy_source"]
    assert _rewards(load_bundle(out)) == pytest.approx(_rewards(load_bundle(tmp_path / "copied")), abs=1e-7)
    assert describe_bundle(out).policy.stored == "linked"


def test_lora_policy_is_detected_and_scores(models, tmp_path):
    out = tmp_path / "lora"
    manifest = create_bundle(out, policy=models["lora"], reference=models["reference"], end_of_turn="</s>")
    assert (manifest.policy_type, manifest.end_of_turn) == ("lora", "</s>")
    assert (out / "policy" / "adapter_config.json").is_file()
    rewards = _rewards(load_bundle(out))
    assert len(rewards) == 2 and rewards[0] != pytest.approx(0.0, abs=1e-6)


def _refusal(tmp_path: Path, **kwargs) -> str:
    out = tmp_path / "refused"
    with pytest.raises(BundleError) as info:
        create_bundle(out, **kwargs)
    assert not out.exists(), "a refused bundle must write nothing"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    return str(info.value)


def test_refuses_a_different_tokenizer(models, tmp_path):
    message = _refusal(tmp_path, policy=models["other_words"], reference=models["reference"])
    assert "not compatible" in message
    assert "tokenizer vocabulary: policy has 25 tokens, reference 125" in message
    assert "'▁USER': 20 vs 120" in message
    assert "'▁Other'" in message and "only in reference: '▁A'" in message


def test_refuses_a_different_image_size(models, tmp_path):
    message = _refusal(tmp_path, policy=models["big_images"], reference=models["reference"])
    assert "image preprocessing image_processor.crop_size.height: policy 64, reference 32" in message
    assert "image_processor.size.shortest_edge: policy 64, reference 32" in message
    assert "tokenizer" not in message.split("\n", 1)[1]


def test_refuses_a_lora_adapter_whose_tokenizer_differs(models, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(models["lora"], adapter)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models["other_words"] / name, adapter / name)
    message = _refusal(tmp_path, policy=adapter, reference=models["reference"])
    assert "policy LoRA adapter" in message and "tokenizer vocabulary" in message


def test_refuses_a_lora_adapter_made_on_another_base(models, tmp_path):
    message = _refusal(tmp_path, policy=models["lora"], reference=models["narrow"])
    assert "LoRA base model.language_model.layers.0.self_attn.q_proj: the adapter's input size is 64, " in message
    assert "layers.0.self_attn.o_proj: the adapter's output size is 64, the reference's is 32" in message
    assert "... and 7 more LoRA matrices" in message  # 2 layers x (q, v, o) x (A, B) = 12, 5 shown


def test_refuses_an_unknown_end_of_turn(models, tmp_path):
    message = _refusal(tmp_path, policy=models["policy"], reference=models["reference"], end_of_turn="<|im_end|>")
    assert "end-of-turn token '<|im_end|>' is not in the reference's vocabulary of 125 tokens" in message


def test_refuses_bad_settings(models, tmp_path):
    message = _refusal(tmp_path, policy=models["policy"], reference=models["reference"], beta=0.0)
    assert "beta" in message


def test_refuses_a_non_empty_output_unless_forced(models, tmp_path):
    out = tmp_path / "taken"
    create_bundle(out, policy=models["policy"], reference=models["reference"], beta=0.2)
    with pytest.raises(BundleError, match=r"is not empty \(it holds a bundle\): .* --force"):
        create_bundle(out, policy=models["policy"], reference=models["reference"])
    assert read_manifest(out).beta == 0.2
    create_bundle(out, policy=models["policy"], reference=models["reference"], force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "policy", "reference"])
    assert read_manifest(out).beta == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_force_never_replaces_a_folder_that_is_not_a_bundle(models, tmp_path):
    """`--force` replaced any non-empty folder: `-o myproject --force` deleted the project."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "src").mkdir()
    for force in (False, True):
        with pytest.raises(BundleError, match=r"is not a bundle \(no rlaifv.json; it holds 'notes.txt', 'src'\)"):
            create_bundle(out, policy=models["policy"], reference=models["reference"], force=force)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "src"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_refuses_an_output_inside_a_source(models, tmp_path):
    source = tmp_path / "policy"
    shutil.copytree(models["policy"], source)
    with pytest.raises(BundleError, match="is inside the model folder"):
        create_bundle(source / "bundle", policy=source, reference=models["reference"])
    assert not (source / "bundle").exists()


def test_an_empty_output_folder_is_fine(models, tmp_path):
    (tmp_path / "empty").mkdir()
    create_bundle(tmp_path / "empty", policy=models["policy"], reference=models["reference"])
    assert (tmp_path / "empty" / MANIFEST).is_file()


def test_describe_counts_parameters_from_headers(models, tmp_path):
    out = tmp_path / "described"
    create_bundle(out, policy=models["lora"], reference=models["reference"])
    description = describe_bundle(out)
    assert description.reference.parameters == _weights(models["reference"])
    assert description.policy.parameters == _weights(models["lora"])
    assert (description.reference.model_type, description.reference.architecture) == (
        "llava",
        "LlavaForConditionalGeneration",
    )
    assert description.reference.tokenizer_vocab_size == 125
    assert (description.policy.kind, description.policy.lora_rank) == ("lora", 4)
    assert description.policy.tokenizer_vocab_size is None


def test_cli_create_and_inspect(models, tmp_path):
    from rlaifv.cli.main import app

    runner = CliRunner()
    out = tmp_path / "cli-bundle"
    args = ["bundle", "create", "--policy", str(models["policy"]), "--reference", str(models["reference"])]
    result = runner.invoke(
        app, [*args, "-o", str(out), "--beta", "0.3", "--normalize", "sum", "--name", "cli", "--link"]
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert (manifest.beta, manifest.normalize, manifest.name) == (0.3, "sum", "cli")
    assert manifest.policy == str(models["policy"].resolve())

    text = runner.invoke(app, ["bundle", "inspect", str(out)])
    assert text.exit_code == 0, text.output
    params = _weights(models["reference"])
    assert "name          cli" in text.output and "policy type   full" in text.output
    assert f"parameters    {params:,}" in text.output
    assert "vocab size    125" in text.output and "(linked)" in text.output
    assert '"created_by": "rlaifv bundle create"' in text.output

    as_json = runner.invoke(app, ["bundle", "inspect", str(out), "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["policy"]["parameters"] == _weights(models["policy"]) == params
    assert (data["beta"], data["normalize"], data["policy_type"]) == (0.3, "sum", "full")
    assert data["reference"]["path"] == str(models["reference"].resolve())
    assert data["provenance"]["created_by"] == "rlaifv bundle create"


def test_cli_refusals_exit_1_with_the_reason(models, tmp_path):
    from rlaifv.cli.main import app

    runner = CliRunner()
    args = ["bundle", "create", "--policy", str(models["big_images"]), "--reference", str(models["reference"])]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "image_processor.crop_size.height: policy 64, reference 32" in result.output
    missing = runner.invoke(app, ["bundle", "inspect", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def test_files_another_library_version_wrote_describe_the_same_tokenizer(models, tmp_path):
    """transformers 4 lists extra special tokens as additional_special_tokens, 5 as extra_special_tokens; tokenizers
    before 0.20 wrote a BPE merge as "a b", later ones as ["a", "b"]: re-saving a tokenizer changes neither."""
    from rlaifv.reward.bundle_create import tokenizer_differences, tokenizer_facts

    old, new = _copy(models["reference"], tmp_path / "old"), _copy(models["reference"], tmp_path / "new")
    for folder, key in ((old, "additional_special_tokens"), (new, "extra_special_tokens")):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("extra_special_tokens", None)
        config[key] = ["<image>", "<pad>"] if key == "extra_special_tokens" else ["<pad>", "<image>"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for folder, merges in ((old, ["▁ a", "r e"]), (new, [["▁", "a"], ["r", "e"]])):
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        tokenizer["model"]["merges"] = merges
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert tokenizer_differences(tokenizer_facts(old), tokenizer_facts(new)) == []
    other = _copy(new, tmp_path / "other")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = [["▁", "a"], ["e", "r"]]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert tokenizer_differences(tokenizer_facts(other), tokenizer_facts(new)) == ["BPE merges differ"]


def test_a_hub_qwen_vl_preprocessor_and_its_re_saved_copy_preprocess_alike(tmp_path):
    """The hub's Qwen2-VL preprocessor_config.json (min_pixels/max_pixels, defaults left out) against the same
    processor re-saved by transformers 5 (size.shortest_edge/longest_edge, defaults written): compared as loaded."""
    from transformers import AutoImageProcessor

    from rlaifv.reward.bundle_create import check_compatible
    from rlaifv.testing.tiny_families import build_tiny_family

    reference = build_tiny_family("qwen2_vl", tmp_path / "reference")
    policy = _copy(reference, tmp_path / "policy")
    image = AutoImageProcessor.from_pretrained(str(reference))
    hub = {
        "min_pixels": image.size["shortest_edge"],
        "max_pixels": image.size["longest_edge"],
        "patch_size": image.patch_size,
        "temporal_patch_size": image.temporal_patch_size,
        "merge_size": image.merge_size,
        "image_mean": image.image_mean,
        "image_std": image.image_std,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    processor = json.loads((reference / "processor_config.json").read_text())
    processor.pop("image_processor", None)
    (reference / "processor_config.json").write_text(json.dumps(processor))
    (reference / "preprocessor_config.json").write_text(json.dumps(hub))
    assert check_compatible(policy, reference) == "full"
    hub["max_pixels"] //= 2  # a real difference is still one
    (reference / "preprocessor_config.json").write_text(json.dumps(hub))
    with pytest.raises(BundleError, match="longest_edge"):
        check_compatible(policy, reference)


def test_a_chat_template_kept_only_in_tokenizer_config_serves_and_none_is_refused_at_load(models, tmp_path):
    from rlaifv.reward.errors import ModelLoadError
    from rlaifv.reward.models import load_processor

    folder = _copy(models["reference"], tmp_path / "old-style")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    processor_config = json.loads((folder / "processor_config.json").read_text())
    processor_config.pop("chat_template", None)
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config | {"chat_template": template}))
    assert load_processor(folder).chat_template == template
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ModelLoadError, match="has no chat template"):
        load_processor(folder)


def test_a_policy_whose_embeddings_were_padded_never_samples_a_padding_row(models, tmp_path):
    """resize_token_embeddings(pad_to_multiple_of=64) adds rows no token maps to: blocked in sampling (the
    reference cannot score them)."""
    import torch
    from transformers import AutoModelForImageTextToText

    padded = tmp_path / "padded"
    model = AutoModelForImageTextToText.from_pretrained(str(models["policy"]))
    model.resize_token_embeddings(
        len(json.loads((models["policy"] / "tokenizer.json").read_text())["model"]["vocab"]), pad_to_multiple_of=64
    )
    rows = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        model.get_output_embeddings().weight[-1].fill_(50.0)  # a padding row that would win every draw
    model.save_pretrained(padded)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copy(models["policy"] / name, padded / name)
    create_bundle(tmp_path / "bundle", policy=padded, reference=models["reference"])
    pair = load_bundle(tmp_path / "bundle")
    tokens = len(pair.tokenizer)
    assert rows > tokens and set(range(tokens, rows)) <= set(pair.blocked_ids)
    ranking = pair.best_of_n(_image(), QUESTION, n=2, max_tokens=4, seed=0)
    assert all(c.num_tokens >= 1 for c in ranking.candidates)


def test_a_tokenizer_without_eos_needs_an_end_of_turn(models, tmp_path):
    reference = _copy(models["reference"], tmp_path / "no-eos")
    config = json.loads((reference / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (reference / "tokenizer_config.json").write_text(json.dumps(config))
    message = _refusal(tmp_path, policy=reference, reference=reference)
    assert "has no eos_token" in message and "--end-of-turn" in message
    create_bundle(tmp_path / "bundle", policy=reference, reference=reference, end_of_turn="</s>")
    assert len(load_bundle(tmp_path / "bundle").score(_image(), QUESTION, ANSWERS).rewards) == len(ANSWERS)


def test_the_bundle_folder_is_readable_by_the_serving_user(models, tmp_path):
    """mkdtemp's 0700 stayed the bundle's mode: unreadable to the images' non-root user (uid 10001)."""
    import os

    umask = os.umask(0o022)
    try:
        create_bundle(tmp_path / "b", policy=models["policy"], reference=models["reference"])
    finally:
        os.umask(umask)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755


def test_a_text_only_pair_is_bundled_as_it_is_served(tmp_path):
    """Neither model has an image processor: a text-only pair, which the service serves (it was refused)."""
    from rlaifv.testing.tiny_text import build_tiny_text_bundle

    source = build_tiny_text_bundle(tmp_path / "source")
    manifest = read_manifest(source)
    bundle = tmp_path / "b"
    create_bundle(bundle, policy=source / manifest.policy, reference=source / manifest.reference)
    pair = load_bundle(bundle)
    assert len(pair.score([], "What is two and two?", ["four", "five"]).rewards) == 2


def test_unreadable_weights_leave_no_bundle(models, tmp_path):
    """A truncated or junk weights file is refused before the bundle takes the output's place (a truncated copy
    was accepted, a junk one refused only after the bundle was written)."""
    for name, damage in (("junk", lambda data: b"not a safetensors file"), ("truncated", lambda data: data[:-100])):
        policy = _copy(models["policy"], tmp_path / f"policy-{name}")
        weights = policy / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        with pytest.raises(BundleError, match=r"not a safetensors file|is truncated"):
            create_bundle(tmp_path / f"b-{name}", policy=policy, reference=models["reference"])
        assert not (tmp_path / f"b-{name}").exists()
        assert not list(tmp_path.glob(f".b-{name}.*"))  # no staging folder left either


def test_inspect_refuses_a_manifest_whose_policy_type_is_not_its_folders(models, tmp_path):
    """`bundle inspect` said OK where loading refuses: a manifest saying 'lora' over a full model."""
    create_bundle(tmp_path / "b", policy=models["policy"], reference=models["reference"])
    path = tmp_path / "b" / MANIFEST
    path.write_text(json.dumps(json.loads(path.read_text()) | {"policy_type": "lora"}))
    with pytest.raises(BundleError, match="policy_type 'lora' but the policy folder holds a full model"):
        describe_bundle(tmp_path / "b")


def test_the_console_script_ends_project_errors_with_one_line(models, tmp_path, capsys, monkeypatch):
    """Whatever subcommand raises them: a traceback was printed for an output under a file, a bad bundle given to
    `demo eval`, an unknown `demo build --set`."""
    from rlaifv.cli.main import app

    monkeypatch.delenv("RLAIFV_TRACEBACK", raising=False)
    (tmp_path / "afile").write_text("")
    cases = [
        (["demo", "eval", str(tmp_path / "missing")], "error: bundle folder", 1),
        (["demo", "build", "--set", "nosuch=1"], "error: unknown setting(s): nosuch", 2),  # a usage error
        (
            ["bundle", "create", "--policy", str(models["policy"]), "--reference", str(models["reference"]),
             "-o", str(tmp_path / "afile" / "sub")],
            "error: ",
            1,
        ),
    ]  # fmt: skip
    for argv, message, code in cases:
        with pytest.raises(SystemExit) as exited:
            app(argv)
        err = capsys.readouterr().err
        assert exited.value.code == code and message in err and "Traceback" not in err, (argv, err)


def test_the_command_shows_a_warning_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Python printed file:line and the warning's source line after the message."""
    import warnings

    import typer

    from rlaifv.cli.main import Command

    app = Command()

    @app.command()
    def warn(kind: str = "user") -> None:
        warnings.warn(
            "3 rows repeat a prompt: kept once", UserWarning if kind == "user" else FutureWarning, stacklevel=1
        )

    @app.command()
    def other() -> None:
        typer.echo("no warning")

    for kind, shown in (
        ("user", "warning: 3 rows repeat a prompt: kept once"),
        ("future", "warning (FutureWarning): "),
    ):
        with pytest.raises(SystemExit) as exited:
            app(["warn", "--kind", kind])
        err = capsys.readouterr().err
        assert exited.value.code == 0 and err.startswith(shown) and err.count("\n") == 1, err
    assert warnings.showwarning.__name__ == "showwarning"  # restored after the command


def test_a_lora_trained_over_another_model_than_the_reference_is_named(models, tmp_path):
    """The adapter's adapter_config.json names its base: served over another model of the same architecture, the
    policy is not the model that was trained (bundle check passed it)."""
    import warnings

    from rlaifv.trainer.shapes.tiny_vlm import random_lora

    over_policy = random_lora(models["policy"], tmp_path / "over-policy")
    with pytest.warns(UserWarning, match="was trained over .*whose weights differ from the reference"):
        create_bundle(tmp_path / "b1", policy=over_policy, reference=models["reference"])
    copy = tmp_path / "reference-copy"
    shutil.copytree(models["reference"], copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights elsewhere, and the recorded base itself: no warning
        create_bundle(tmp_path / "b2", policy=models["lora"], reference=copy)
        create_bundle(tmp_path / "b3", policy=models["lora"], reference=models["reference"])
