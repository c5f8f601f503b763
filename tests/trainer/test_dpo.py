"""DPO on the shared log-prob function: parity with the service's reward, direction of learning, caching."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from pathlib import Path

import pytest
import torch
from trainer_testkit import (
    COLOURS,
    check_served_reward_is_trained_reward,
    png,
    preference_rows,
    write_rlaifv_parquet,
)

from rlaifv.trainer.data import PreferenceRow
from rlaifv.trainer.dpo import (
    REFERENCE_CACHE,
    _pair_sums,
    compute_reference_logprobs,
    dpo_terms,
    encode_pairs,
    encode_prompts,
    reference_distributions,
    train_dpo,
)
from rlaifv.trainer.dpo_config import DPOConfig
from rlaifv.trainer.errors import ConfigError, RunStateError
from rlaifv.trainer.export import export_bundle

# Chosen answers use one set of words, rejected ones another; held-out pairs recombine them.
GOOD = ["red", "circle", "green", "tree", "big", "cat", "white", "house"]
BAD = ["blue", "square", "black", "dog", "small", "car", "yellow", "star"]


def _toy_rows(n: int, offset: int = 0) -> list[PreferenceRow]:
    rows = []
    for i in range(n):
        k = i + offset
        chosen = f"a {GOOD[k % 8]} {GOOD[(3 * k + 1) % 8]} ."
        rejected = f"a {BAD[k % 8]} {BAD[(3 * k + 1) % 8]} ."
        rows.append(PreferenceRow(f"r{k}", png(COLOURS[k % len(COLOURS)]), "describe the image", chosen, rejected))
    return rows


HELD_OUT = [
    PreferenceRow("h0", png((90, 90, 90)), "what is this", "a green cat .", "a black star ."),
    PreferenceRow("h1", png((10, 120, 60)), "describe the image", "the big house", "the small car"),
    PreferenceRow("h2", png((160, 20, 90)), "what is this", "a white tree", "a yellow dog"),
]


def _margins(bundle: Path, rows: list[PreferenceRow]) -> list[float]:
    from rlaifv.reward import load_bundle

    pair = load_bundle(bundle)
    margins = []
    for row in rows:
        ranking = pair.score(row.image, row.question, [row.chosen, row.rejected])
        margins.append(ranking.candidates[0].reward - ranking.candidates[1].reward)
    return margins


def test_dpo_terms_math() -> None:
    policy = torch.tensor([[-2.0, -5.0]])
    reference = torch.tensor([[-3.0, -4.0]])
    terms = dpo_terms(policy, reference, torch.tensor([[4, 2]]), beta=0.1, nll_weight=0.5)
    logit = 0.1 * ((-2 + 3) - (-5 + 4))
    assert terms.chosen_rewards.item() == pytest.approx(0.1) and terms.rejected_rewards.item() == pytest.approx(-0.1)
    assert terms.dpo_loss.item() == pytest.approx(math.log1p(math.exp(-logit)))
    assert terms.loss.item() == pytest.approx(math.log1p(math.exp(-logit)) + 0.5 * 2.0 / 4)


def test_token_kl_term_is_added_with_its_weight() -> None:
    policy, reference, lengths = torch.tensor([[-2.0, -5.0]]), torch.tensor([[-3.0, -4.0]]), torch.tensor([[4, 2]])
    plain = dpo_terms(policy, reference, lengths, beta=0.1, nll_weight=0.5)
    kl = torch.tensor([[0.02, 0.06]])
    terms = dpo_terms(policy, reference, lengths, beta=0.1, nll_weight=0.5, token_kl=kl, token_kl_weight=3.0)
    assert plain.token_kl is None and terms.token_kl.item() == pytest.approx(0.04)
    assert terms.loss.item() == pytest.approx(plain.loss.item() + 3.0 * 0.04)


@pytest.mark.slow
def test_token_kl_is_zero_against_itself_and_positive_against_another_model(tiny_model: Path, tmp_path: Path) -> None:
    """The KL path's summed log-probs equal the plain path's; KL(model || model) = 0; KL to a trained model > 0."""
    from rlaifv.reward.models import load_model, load_processor

    processor = load_processor(tiny_model)
    model = load_model(tiny_model)
    pairs, _ = encode_pairs(HELD_OUT, processor.tokenizer, eot_id=processor.tokenizer.eos_token_id)
    prompts = encode_prompts(processor, pairs)
    pad = processor.tokenizer.pad_token_id or 0
    with torch.no_grad():
        plain, lengths, none = _pair_sums(model, prompts, pairs, pad)
        own = reference_distributions(model, prompts, pairs, pad)
        sums, _, kl_self = _pair_sums(model, prompts, pairs, pad, own)
    assert none is None and lengths.tolist() == [[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]
    assert torch.allclose(sums, plain, atol=1e-4) and torch.allclose(kl_self, torch.zeros_like(kl_self), atol=1e-6)
    config = DPOConfig(learning_rate=5e-3, epochs=2, batch_size=4, cpu=True)
    result = train_dpo(config, _toy_rows(8), model_path=tiny_model, output_dir=tmp_path / "dpo", progress=False)
    trained = load_model(result.policy_dir)
    with torch.no_grad():
        _, _, kl = _pair_sums(trained, prompts, pairs, pad, own)
    assert kl.shape == (len(pairs), 2) and bool((kl > 1e-5).all()), kl


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_token_kl_holds_the_policy_nearer_the_reference(tiny_model: Path, tmp_path: Path, lora: bool) -> None:
    """Same data and steps: with the KL term the trained policy's per-token KL to the reference is smaller, and the
    report carries the term; the first step sees policy == reference, so its KL is 0."""
    from rlaifv.reward.models import load_model, load_processor

    processor = load_processor(tiny_model)
    pairs, _ = encode_pairs(HELD_OUT, processor.tokenizer, eot_id=processor.tokenizer.eos_token_id)
    prompts = encode_prompts(processor, pairs)
    pad = processor.tokenizer.pad_token_id or 0
    reference = load_model(tiny_model)
    with torch.no_grad():
        ref = reference_distributions(reference, prompts, pairs, pad)
    kls = {}
    for weight in (0.0, 5.0):
        config = DPOConfig(
            learning_rate=2e-2 if lora else 5e-3, epochs=3, batch_size=4, cpu=True, token_kl=weight, lora=lora
        )
        out = tmp_path / f"kl{weight}"
        result = train_dpo(config, _toy_rows(8), model_path=tiny_model, output_dir=out, progress=False)
        if weight:
            assert result.history[0]["token_kl"] == pytest.approx(0.0, abs=1e-6)
            assert "train_token_kl" in json.loads((out / "dpo_report.json").read_text())["metrics"]
        else:
            assert "token_kl" not in result.history[0]
        if lora:
            from peft import PeftModel

            policy = PeftModel.from_pretrained(load_model(tiny_model), str(result.policy_dir))
        else:
            policy = load_model(result.policy_dir)
        with torch.no_grad():
            kls[weight] = float(_pair_sums(policy, prompts, pairs, pad, ref)[2].mean())
    assert 0 < kls[5.0] < kls[0.0], kls


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_implicit_reward_equals_the_service_reward(tiny_model: Path, tmp_path: Path, lora: bool) -> None:
    """The DPO loss's beta*(pi - ref) for a pair == what reward/ returns (normalize='sum') for it."""
    check_served_reward_is_trained_reward(tiny_model, _toy_rows(4), HELD_OUT, tmp_path, lora=lora)


@pytest.mark.slow
def test_dpo_moves_the_held_out_margin_the_right_way(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    before = _margins(_bundle_of(tiny_model, tiny_model, tmp_path / "before"), HELD_OUT)
    assert before == pytest.approx([0.0] * len(HELD_OUT), abs=1e-6)  # policy == reference: no reward yet
    config = DPOConfig(learning_rate=2e-3, epochs=4, batch_size=4, warmup_ratio=0.0, cpu=True)
    result = train_dpo(config, _toy_rows(16), model_path=tiny_model, output_dir=tmp_path / "dpo", progress=False)
    # the first step sees policy == reference: loss exactly log 2, margin 0 (reference handled right)
    assert result.history[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.history[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[-1]["margin"] > 0 and result.history[-1]["dpo_loss"] < math.log(2)
    # the rate each logged step was taken with: the full rate at once without warm-up, and not yet 0 at the last
    assert result.history[0]["lr"] == pytest.approx(2e-3) and 0 < result.history[-1]["lr"] < 2e-3
    bundle = _bundle_of(result.policy_dir, tiny_model, tmp_path / "bundle")
    after = _margins(bundle, HELD_OUT)
    assert all(m > 0 for m in after), after
    old, new = load_file(tiny_model / "model.safetensors"), load_file(result.policy_dir / "model.safetensors")
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert any("language_model" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)  # frozen by default


def _bundle_of(policy: Path, reference: Path, folder: Path) -> Path:
    return export_bundle(folder, policy_dir=policy, reference_dir=reference, policy_type="full", beta=0.1)


@pytest.mark.slow
def test_lora_dpo_with_nll_and_accumulation(tiny_model: Path, tmp_path: Path) -> None:
    config = DPOConfig(
        learning_rate=1e-2,
        epochs=3,
        batch_size=2,
        gradient_accumulation_steps=2,
        lora=True,
        lora_r=4,
        nll_weight=0.5,
        cpu=True,
    )
    result = train_dpo(config, _toy_rows(8), model_path=tiny_model, output_dir=tmp_path / "dpo", progress=False)
    assert result.optimizer_steps == 3 * 2  # 4 batches per epoch / 2 accumulation steps
    assert (result.policy_dir / "adapter_config.json").is_file()
    assert result.history[-1]["nll"] < result.history[0]["nll"]
    folder = tmp_path / "b"
    bundle = export_bundle(folder, policy_dir=result.policy_dir, reference_dir=tiny_model, policy_type="lora", beta=0.1)
    assert sum(m > 0 for m in _margins(bundle, HELD_OUT)) >= 2


@pytest.mark.slow
def test_reference_logprobs_are_cached_and_reused(tiny_model: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rows = _toy_rows(4)
    config = DPOConfig(learning_rate=1e-3, epochs=1, batch_size=2, cpu=True)
    first = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)
    assert not first.reference_cache_hit
    cache = pq.read_table(tmp_path / REFERENCE_CACHE)
    assert cache.num_rows == 4 and set(cache.column_names) >= {"image", "chosen_ids", "ref_chosen", "ref_rejected"}
    (tmp_path / "dpo_report.json").unlink()  # stopped before its policy was saved whole: the rerun trains again
    second = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)
    assert second.reference_cache_hit
    report = json.loads((tmp_path / "dpo_report.json").read_text())
    assert report["reference_cache"]["hit"] is True
    # a different pair set does not reuse it
    third = train_dpo(config, rows[:3], model_path=tiny_model, output_dir=tmp_path, progress=False)
    assert not third.reference_cache_hit
    # cached sums are the reference's sums (the initial model, via the shared function)
    from rlaifv.reward.models import load_model, load_processor

    processor = load_processor(tiny_model)
    pairs, _ = encode_pairs(rows[:3], processor.tokenizer, eot_id=processor.tokenizer.eos_token_id)
    kept: list[int] = []
    done = compute_reference_logprobs(
        load_model(tiny_model), processor, pairs, progress=False, batch_size=1, keep=kept.append, keep_every=2
    )
    assert (done, kept) == (3, [2])  # a long pass keeps its progress every keep_every batches
    cached = pq.read_table(tmp_path / REFERENCE_CACHE)["ref_chosen"].to_pylist()
    assert cached == pytest.approx([p.ref_chosen for p in pairs], abs=1e-5)


@pytest.mark.slow
def test_parquet_to_bundle_through_the_cli(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rlaifv.reward import load_bundle
    from rlaifv.trainer.cli import train_app

    rows = preference_rows([(r.chosen, r.rejected) for r in _toy_rows(6)])
    data = write_rlaifv_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", rows)
    out = tmp_path / "run"
    args = ["dpo", str(data), "--model", str(tiny_model), "-o", str(out), "--lr", "1e-3", "--batch-size", "2", "--cpu"]
    result = CliRunner().invoke(train_app, [*args, "--no-progress", "--token-kl", "0.5", "--set", "dpo.nll_weight=0.1"])
    assert result.exit_code == 0, result.output
    pair = load_bundle(out / "bundle")
    manifest = json.loads((out / "bundle" / "rlaifv.json").read_text())
    assert manifest["provenance"]["data"][0]["sha256"] == __import__("hashlib").sha256(data.read_bytes()).hexdigest()
    assert manifest["provenance"]["settings"]["nll_weight"] == 0.1
    assert manifest["provenance"]["settings"]["token_kl"] == 0.5
    assert manifest["provenance"]["metrics"]["train_loss"] > 0 and "train_token_kl" in manifest["provenance"]["metrics"]
    assert pair.score(png((1, 2, 3)), "describe the image", ["a red circle", "a blue dog"]).best_index in (0, 1)


def test_cli_reports_bad_data_cleanly(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import train_app

    rows = preference_rows([("a red circle", "")])
    data = write_rlaifv_parquet(tmp_path / "bad.parquet", rows)
    result = CliRunner().invoke(train_app, ["dpo", str(data), "--model", str(tiny_model), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "row 0, column 'rejected'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/nope"], "--model folder {tmp}/nope does not exist"),
        (["--model", "{model}", "--reference", "{tmp}"], "--reference folder {tmp} has no config.json"),
        (["--model", "{model}", "--lora", "--reference", "{tmp}"], "a separate --reference ({tmp}) is for full"),
        (["--model", "{model}", "--reference", "{other}"], "tokenizers differ"),
        (["--model", "{model}", "--set", "dpo.epochs=1.5"], "setting dpo.epochs: Input should be a valid integer"),
        (
            ["--model", "{model}", "--set", "feedback.num_samples=3"],
            "--set feedback.num_samples: train dpo takes dpo.*",
        ),
        (["--model", "{model}", "-o", "{tmp}/data/run"], "is inside the data folder {tmp}/data"),
    ],
)
def test_cli_refuses_a_run_that_cannot_work_before_reading_data(
    tiny_model: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    """Without reading the data first (minutes for a big dataset); a LoRA's ignored --reference is refused too."""
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import train_app

    (tmp_path / "data").mkdir()
    write_rlaifv_parquet(tmp_path / "data" / "part.parquet", preference_rows([("a red circle", "a dog")]))
    from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_tiny_vlm

    other = build_tiny_vlm(tmp_path / "other", TinyVLMSpec(words=("zebra", "mango"))) if "{other}" in args else ""
    fill = {"tmp": str(tmp_path), "model": str(tiny_model), "other": str(other)}
    argv = ["dpo", str(tmp_path / "data"), *[a.format(**fill) for a in args]]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out")]
    result = CliRunner().invoke(train_app, argv)
    assert result.exit_code == 2, result.output
    assert message.format(**fill) in result.output and "Traceback" not in result.output
    assert "preference rows" not in result.output  # refused before the data was read


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": 0},
        {"epochs": 0},
        {"batch_size": 0},
        {"warmup_ratio": 1.0},
        {"lr_scheduler": "cyclic"},
        {"nll_weight": -1},
        {"token_kl": -0.5},
        {"checkpoint_every_steps": -1},
        {"keep_checkpoints": -2},
        {"lora_alpha": 0},  # scaled the adapter to nothing: a run that trained nothing
        {"lora_dropout": 1.5},
        {"lora_targets": "["},  # were tracebacks after the data was read
    ],
)
def test_dpo_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        DPOConfig(**kwargs)


def test_full_fine_tuning_needs_float32_master_weights() -> None:
    """bf16 weights under plain AdamW lose DPO-sized updates to rounding: refused, naming the working setting."""
    with pytest.raises(ConfigError, match="mixed_precision=bf16"):
        DPOConfig(dtype="bfloat16")
    assert DPOConfig(dtype="bfloat16", lora=True).dtype == "bfloat16"
    assert DPOConfig(mixed_precision="bf16").dtype == "float32"


def test_default_learning_rates_follow_rlaifv() -> None:
    assert DPOConfig().lr == 5e-7 and DPOConfig(lora=True).lr == 1e-5 and DPOConfig(learning_rate=0.1).lr == 0.1


def _killed_after(run: Path, copy: Path, checkpoint: str) -> None:
    """`copy` holds what a run killed right after saving `checkpoint` would have left: no later checkpoint,
    no policy, no report."""
    import shutil

    shutil.copytree(run, copy)
    shutil.rmtree(copy / "policy")
    (copy / "dpo_report.json").unlink()
    for folder in (copy / "checkpoints").iterdir():
        if folder.name > checkpoint:
            shutil.rmtree(folder)


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    got, expected = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return got.keys() == expected.keys() and all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)


@pytest.mark.slow
def test_epoch_checkpoints_resume_to_the_same_weights(tiny_model: Path, tmp_path: Path) -> None:
    config = DPOConfig(learning_rate=1e-3, epochs=2, batch_size=2, cpu=True, checkpoint_every_epoch=True)
    rows = _toy_rows(4)
    with pytest.warns(UserWarning, match=r"the run is done .* 1 checkpoint\(s\) stay in .*checkpoints \(0\.\d GB\)"):
        full = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "a", progress=False)
    assert [f.name for f in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-0000002"]
    _killed_after(tmp_path / "a", tmp_path / "b", "step-0000002")
    resumed = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)
    report = json.loads((tmp_path / "b" / "dpo_report.json").read_text())
    assert report["resumed_from_epoch"] == 1 and report["resumed_from_step"] == 2
    assert resumed.optimizer_steps == full.optimizer_steps == 4
    assert resumed.history == full.history and resumed.metrics == full.metrics
    assert _same_weights(resumed.policy_dir, full.policy_dir)
    # different training settings do not pick up the checkpoint; other bookkeeping settings do
    other = DPOConfig(learning_rate=2e-3, epochs=2, batch_size=2, cpu=True, checkpoint_every_epoch=True)
    with pytest.warns(
        UserWarning, match=r"1 checkpoint\(s\) in .* not resumed from \(settings changed: dpo.learning_rate"
    ):
        train_dpo(other, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "dpo_report.json").read_text())["resumed_from_step"] == 0


@pytest.mark.slow
def test_step_checkpoints_resume_mid_epoch_under_accumulation_and_keep_the_newest(
    tiny_model: Path, tmp_path: Path
) -> None:
    """5 batches per epoch, 2 per step: steps end after batches 2, 4 and 5 (accelerate closes the epoch's short
    step). A run killed after step 4 (mid-epoch 2) resumes by skipping the 2 batches of epoch 2 it trained on."""
    rows = _toy_rows(5)
    config = DPOConfig(
        learning_rate=1e-3,
        epochs=2,
        batch_size=1,
        gradient_accumulation_steps=2,
        cpu=True,
        checkpoint_every_steps=2,
        keep_checkpoints=0,
    )
    full = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "a", progress=False)
    assert full.optimizer_steps == 6
    saved = sorted(f.name for f in (tmp_path / "a" / "checkpoints").iterdir())
    assert saved == ["step-0000002", "step-0000004"]  # step 6 ends the run: the policy is its save
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["epoch_updates"]) == (1, 1)

    _killed_after(tmp_path / "a", tmp_path / "b", "step-0000004")
    keep_one = dataclasses.replace(config, keep_checkpoints=1, checkpoint_every_steps=1, log_every=2)
    resumed = train_dpo(keep_one, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)
    report = json.loads((tmp_path / "b" / "dpo_report.json").read_text())
    assert (report["resumed_from_epoch"], report["resumed_from_step"], report["optimizer_steps"]) == (1, 4, 6)
    assert resumed.metrics == pytest.approx(full.metrics)
    assert _same_weights(resumed.policy_dir, full.policy_dir)
    # step 5 was saved (every step now) and only the newest checkpoint is kept
    assert [f.name for f in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-0000005"]


@pytest.mark.slow
def test_a_mid_epoch_resume_under_dropout_draws_the_same_masks(tiny_model: Path, tmp_path: Path) -> None:
    """Dropout draws from the global RNG, which the checkpoint restores: the resumed epoch's loader must not draw
    from it again (a loader seeded from the global RNG shifted every later mask, and the weights differed)."""
    import shutil

    model = tmp_path / "dropout-model"
    shutil.copytree(tiny_model, model)
    config_file = model / "config.json"
    settings = json.loads(config_file.read_text())
    settings["text_config"]["attention_dropout"] = 0.5
    config_file.write_text(json.dumps(settings))
    # one pair four times: another seed then changes the masks only, not the order of what is trained on
    rows = [dataclasses.replace(_toy_rows(1)[0], id=f"r{k}") for k in range(4)]
    config = DPOConfig(
        learning_rate=1e-3, epochs=1, batch_size=1, cpu=True, checkpoint_every_steps=2, disable_dropout=False
    )
    full = train_dpo(config, rows, model_path=model, output_dir=tmp_path / "a", progress=False)
    _killed_after(tmp_path / "a", tmp_path / "b", "step-0000002")
    resumed = train_dpo(config, rows, model_path=model, output_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "dpo_report.json").read_text())["resumed_from_step"] == 2
    assert resumed.metrics == pytest.approx(full.metrics)
    assert _same_weights(resumed.policy_dir, full.policy_dir)
    # the masks are drawn at all: another seed trains other weights
    other = train_dpo(
        dataclasses.replace(config, seed=1), rows, model_path=model, output_dir=tmp_path / "c", progress=False
    )
    assert not _same_weights(other.policy_dir, full.policy_dir)


@pytest.mark.slow
def test_a_lora_checkpoint_holds_the_adapter_only_and_resumes_to_the_same_adapter(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The frozen base is the --model folder's: saving it in every checkpoint made a 7B LoRA run's checkpoints 14 GB."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    rows = _toy_rows(4)
    config = DPOConfig(
        learning_rate=1e-2, epochs=1, batch_size=1, lora=True, lora_r=4, cpu=True, checkpoint_every_steps=2
    )
    full = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "a", progress=False)
    saved = tmp_path / "a" / "checkpoints" / "step-0000002" / "model.safetensors"
    with safe_open(saved, "pt") as weights:
        names = list(weights.keys())
    assert names and all("lora_" in name for name in names), names
    assert saved.stat().st_size < (tiny_model / "model.safetensors").stat().st_size / 4

    _killed_after(tmp_path / "a", tmp_path / "b", "step-0000002")
    resumed = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "dpo_report.json").read_text())["resumed_from_step"] == 2
    assert resumed.metrics == pytest.approx(full.metrics)
    got = load_file(resumed.policy_dir / "adapter_model.safetensors")
    expected = load_file(full.policy_dir / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    # a checkpoint that lacks an adapter weight is refused by name, never resumed from the adapter's initial values
    from safetensors.torch import save_file

    _killed_after(tmp_path / "a", tmp_path / "c", "step-0000002")
    partial = tmp_path / "c" / "checkpoints" / "step-0000002" / "model.safetensors"
    state = load_file(partial)
    missing = sorted(state)[0]
    del state[missing]
    save_file(state, partial)
    with pytest.raises(RunStateError, match=f"step-0000002 lacks .*{re.escape(missing)}"):
        train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "c", progress=False)


def test_an_incomplete_or_foreign_checkpoint_is_never_resumed(tmp_path: Path) -> None:
    from rlaifv.trainer.dpo import CheckpointStore

    root = tmp_path / "checkpoints"
    for name, state in [("step-0000009", None), ("step-0000007", "{not json"), ("step-0000005", {"key": "other"})]:
        (root / name).mkdir(parents=True)
        if state is not None:
            (root / name / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    (root / "step-0000003").mkdir()
    (root / "step-0000003" / "trainer_state.json").write_text(json.dumps({"key": "run", "updates": 3}))
    assert CheckpointStore(root, "run", keep=1).latest().folder.name == "step-0000003"
    assert CheckpointStore(root, "another", keep=1).latest() is None


@pytest.mark.slow
def test_two_process_data_parallel_training_by_launcher_only(tiny_model: Path, tmp_path: Path) -> None:
    """The same command under torchrun (2 CPU processes, gloo DDP): pairs sharded, rank 0 exports."""
    import os
    import subprocess
    import sys

    from rlaifv.reward import load_bundle

    root = Path(__file__).resolve().parents[2]
    rows = preference_rows([(r.chosen, r.rejected) for r in _toy_rows(8)])
    data = write_rlaifv_parquet(tmp_path / "data.parquet", rows)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "rlaifv.trainer.cli", "dpo", str(data), "--model", str(tiny_model), "-o", str(out)]
    command += ["--lr", "1e-3", "--epochs", "2", "--batch-size", "2", "--cpu", "--no-progress"]
    command += ["--set", "dpo.checkpoint_every_steps=1", "--set", "dpo.keep_checkpoints=0", "--set", "dpo.log_every=2"]
    env = os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "dpo" / "dpo_report.json").read_text())
    assert report["num_processes"] == 2
    assert report["optimizer_steps"] == 4  # 8 pairs / (2 per batch x 2 processes) x 2 epochs
    assert report["history"][-1]["margin"] > 0
    load_bundle(out / "bundle")
    # Every checkpoint holds both ranks' state; killed after step 3 (mid-epoch 2), the run resumes to the same
    # weights and the same logged history (each rank's own running means are restored).
    checkpoints = sorted((out / "dpo" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000001", "step-0000002", "step-0000003"]
    assert all({"random_states_0.pkl", "random_states_1.pkl"} <= {f.name for f in c.iterdir()} for c in checkpoints)
    _killed_after(out / "dpo", tmp_path / "again" / "dpo", "step-0000003")
    again = [*command[: command.index("-o") + 1], str(tmp_path / "again"), *command[command.index("-o") + 2 :]]
    done = subprocess.run(again, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((tmp_path / "again" / "dpo" / "dpo_report.json").read_text())
    assert resumed["resumed_from_step"] == 3 and resumed["history"] == report["history"]
    assert _same_weights(tmp_path / "again" / "dpo" / "policy", out / "dpo" / "policy")


@pytest.mark.parametrize("lora", [False, True])
def test_the_reference_is_scored_under_the_runs_precision_and_cached_per_precision(
    tiny_model: Path, tmp_path: Path, lora: bool
) -> None:
    """bf16 autocast scores the policy; the reference's sums must be made the same way, not reused from float32."""
    import pyarrow.parquet as pq
    from accelerate.state import AcceleratorState

    rows = _toy_rows(4)
    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process, as accelerate has it
    fp32 = DPOConfig(learning_rate=1e-4, batch_size=4, warmup_ratio=0.0, cpu=True, lora=lora)
    train_dpo(fp32, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)
    exact = pq.read_table(tmp_path / REFERENCE_CACHE)["ref_chosen"].to_pylist()
    AcceleratorState._reset_state(reset_partial_state=True)
    mixed = train_dpo(
        dataclasses.replace(fp32, mixed_precision="bf16"),
        rows,
        model_path=tiny_model,
        output_dir=tmp_path,
        progress=False,
    )
    assert not mixed.reference_cache_hit
    rounded = pq.read_table(tmp_path / REFERENCE_CACHE)["ref_chosen"].to_pylist()
    assert rounded != exact and rounded == pytest.approx(exact, abs=0.5)
    assert mixed.history[0]["margin"] == pytest.approx(0.0, abs=1e-3)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_full_run_after_a_lora_run_in_one_folder_leaves_no_adapter_behind(tiny_model: Path, tmp_path: Path) -> None:
    """The policy folder is written whole each run: adapter files beside a full model made a bundle no loader took."""
    config = DPOConfig(learning_rate=1e-4, batch_size=2, warmup_ratio=0.0, cpu=True)
    train_dpo(
        dataclasses.replace(config, lora=True), _toy_rows(2), model_path=tiny_model, output_dir=tmp_path, progress=False
    )
    assert (tmp_path / "policy" / "adapter_config.json").is_file()
    result = train_dpo(config, _toy_rows(2), model_path=tiny_model, output_dir=tmp_path, progress=False)
    assert not (result.policy_dir / "adapter_config.json").exists()
    assert _margins(_bundle_of(result.policy_dir, tiny_model, tmp_path / "bundle"), HELD_OUT[:1])


@pytest.mark.slow
def test_llava_format_placeholders_and_special_tokens_in_rows_are_removed_not_trained(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A LLaVA-format question ("<image>\\n...") used to fail mid-run (a placeholder without its image) and a literal
    "</s>" in an answer was taught as an end of turn; both are removed up front, a row left without an answer is
    dropped, one left without a question has the image alone as its prompt."""
    from rlaifv.reward.models import load_processor
    from rlaifv.trainer.dpo import without_markup_rows

    clean = _toy_rows(4)
    marked = [
        dataclasses.replace(clean[0], question="<image>\n" + clean[0].question),
        dataclasses.replace(clean[1], chosen=clean[1].chosen + "</s>"),
        clean[2],
        dataclasses.replace(clean[3], rejected="</s>"),
    ]
    rows, changed = without_markup_rows(marked, load_processor(tiny_model))
    assert changed == 3 and rows == clean[:3]
    image_only, _ = without_markup_rows([dataclasses.replace(clean[0], question="<image>")], load_processor(tiny_model))
    assert image_only[0].question == ""  # the image alone is the prompt
    untouched = dataclasses.replace(clean[0], question=" describe the image ")
    assert without_markup_rows([untouched], load_processor(tiny_model)) == ([untouched], 0)  # no markup: as it was
    config = DPOConfig(learning_rate=1e-3, epochs=1, batch_size=2, cpu=True)
    marked.append(dataclasses.replace(clean[2], id="only-image", question="<image>"))
    with pytest.warns(UserWarning, match="4 rows held the model's markup"):
        result = train_dpo(config, marked, model_path=tiny_model, output_dir=tmp_path, progress=False)
    report = json.loads((tmp_path / "dpo_report.json").read_text())
    assert (result.num_pairs, report["markup_removed_rows"]) == (4, 4)


@pytest.mark.slow
def test_sigterm_stops_at_the_next_step_with_a_checkpoint_and_the_same_command_resumes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod evicted mid-run: SIGTERM during step 2 of 6 stops the run once that step is done, with its state saved
    (no checkpoint setting needed); the rerun ends at the weights of a run never stopped."""
    import signal

    from rlaifv.trainer import dpo as dpo_module
    from rlaifv.trainer.errors import TrainingInterrupted

    rows = _toy_rows(6)
    config = DPOConfig(learning_rate=1e-3, epochs=2, batch_size=2, cpu=True)
    full = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "a", progress=False)
    assert full.optimizer_steps == 6 and not (tmp_path / "a" / "checkpoints").exists()

    real, calls = dpo_module.dpo_terms, []

    def terms(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # the handler only notes it: the step finishes
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_module, "dpo_terms", terms)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="after step 2 of 6") as stopped:
        train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)
    assert stopped.value.step == 2 and signal.getsignal(signal.SIGTERM) is before
    assert [f.name for f in (tmp_path / "b" / "checkpoints").iterdir()] == ["step-0000002"]
    monkeypatch.undo()
    resumed = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "dpo_report.json").read_text())["resumed_from_step"] == 2
    assert resumed.history == full.history
    assert _same_weights(resumed.policy_dir, full.policy_dir)


def test_a_run_stopped_by_sigterm_exits_143_not_as_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from rlaifv.trainer.cli import _clean_errors
    from rlaifv.trainer.errors import TrainingInterrupted

    with pytest.raises(typer.Exit) as stopped, _clean_errors():
        raise TrainingInterrupted("after step 3 of 9", step=3)
    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err.startswith("stopped: stopped by SIGTERM after step 3 of 9")


def test_a_first_ctrl_c_stops_where_the_work_is_saved_and_a_second_at_once(capfd: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C stopped at once: a run typed at a terminal lost every step since its last checkpoint. A second stop
    of any kind after it (a launcher forwards one as SIGTERM) is at once; one in the last unit still says so."""
    import signal

    # as at a terminal: pytest-xdist's workers ignore SIGINT, and an ignored SIGINT stays ignored
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_twice_and_late(capfd)
    finally:
        signal.signal(signal.SIGINT, outer)


def _ctrl_c_twice_and_late(capfd: pytest.CaptureFixture[str]) -> None:
    import signal

    import typer

    from rlaifv.trainer.cli import _clean_errors
    from rlaifv.trainer.errors import TrainingInterrupted
    from rlaifv.trainer.interrupt import stop_on_sigterm

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(typer.Exit) as stopped, _clean_errors(), stop_on_sigterm() as stop_asked:
        signal.raise_signal(signal.SIGINT)  # noted: the unit of work goes on
        assert stop_asked()
        raise TrainingInterrupted("after step 3 of 9; state saved", step=3)
    assert stopped.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is before
    err = capfd.readouterr().err
    assert "Ctrl-C again stops at once" in err and "stopped: stopped by Ctrl-C (SIGINT) after step 3 of 9" in err
    for second in (signal.SIGINT, signal.SIGTERM):
        with pytest.raises(KeyboardInterrupt), stop_on_sigterm():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(second)
        assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(typer.Exit) as stopped, _clean_errors(), stop_on_sigterm():
        signal.raise_signal(signal.SIGINT)  # in the last unit: the work finishes, then the stop is said
    assert stopped.value.exit_code == 130
    assert "stopped by Ctrl-C (SIGINT) as the work finished, before the next stage" in capfd.readouterr().err


def test_a_ctrl_c_ignored_by_the_caller_stays_ignored() -> None:
    """A run started in the background by a shell ignores SIGINT: the Ctrl-C meant for the shell's script did not
    stop it before, and must not now."""
    import signal

    from rlaifv.trainer.interrupt import stop_on_sigterm

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_sigterm() as stop_asked:
            signal.raise_signal(signal.SIGINT)
            assert not stop_asked()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_reference_cache_is_written_a_row_group_at_a_time_and_reads_back(tmp_path: Path) -> None:
    """83k pairs of images: written in groups (never one table holding every image a second time)."""
    import pyarrow.parquet as pq

    from rlaifv.trainer.dpo import REFERENCE_CACHE_ROWS, EncodedPair, read_reference_cache, write_reference_cache

    count = 2 * REFERENCE_CACHE_ROWS + 3
    pairs = [EncodedPair(f"p{i}", bytes([i % 256]) * 3, "q", "c", "r", [i, 2], [3], -i / 7, -1.5) for i in range(count)]
    write_reference_cache(tmp_path / "cache.parquet", pairs, "key")
    assert pq.ParquetFile(tmp_path / "cache.parquet").metadata.num_row_groups == 3
    fresh = [dataclasses.replace(p, ref_chosen=None, ref_rejected=None) for p in pairs]
    assert not read_reference_cache(tmp_path / "cache.parquet", "other", fresh)
    assert read_reference_cache(tmp_path / "cache.parquet", "key", fresh)
    assert [(p.ref_chosen, p.ref_rejected) for p in fresh] == [(p.ref_chosen, p.ref_rejected) for p in pairs]
    table = pq.read_table(tmp_path / "cache.parquet")
    assert table["image"].to_pylist() == [p.image for p in pairs] and table["chosen_ids"][5].as_py() == [5, 2]


def test_reference_sums_saved_under_any_of_the_runs_keys_are_read(tmp_path: Path) -> None:
    """A cut-short pass or a cache an earlier version keyed (`saved_identities`) is read; the key it had is told."""
    from rlaifv.trainer.dpo import (
        EncodedPair,
        read_partial_reference,
        read_reference_cache,
        write_partial_reference,
        write_reference_cache,
    )

    pairs = [EncodedPair(f"p{i}", bytes([i]) * 3, "q", "c", "r", [i, 2], [3], -i / 7, -1.5) for i in range(4)]

    def fresh() -> list[EncodedPair]:
        return [dataclasses.replace(p, ref_chosen=None, ref_rejected=None) for p in pairs]

    write_partial_reference(tmp_path / "partial.parquet", pairs[:2], "earlier")
    assert read_partial_reference(tmp_path / "partial.parquet", ["content", "earlier"], fresh()) == 2
    assert read_partial_reference(tmp_path / "partial.parquet", ["content"], fresh()) == 0
    write_reference_cache(tmp_path / "cache.parquet", pairs, "earlier")
    again = fresh()
    assert read_reference_cache(tmp_path / "cache.parquet", ["content", "earlier"], again) == "earlier"
    assert [p.ref_chosen for p in again] == [p.ref_chosen for p in pairs]
    assert read_reference_cache(tmp_path / "cache.parquet", ["content"], fresh()) is None


@pytest.mark.slow
def test_sigterm_in_the_reference_pass_keeps_the_sums_done_and_the_rerun_computes_only_the_rest(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference pass over a large dataset takes hours: SIGTERM in batch 2 of 3 saves the first 2 batches' sums
    and the rerun computes batch 3 only, to the weights of a run never stopped."""
    import signal

    from rlaifv.trainer import dpo as dpo_module
    from rlaifv.trainer.dpo import REFERENCE_PARTIAL
    from rlaifv.trainer.errors import TrainingInterrupted

    rows = _toy_rows(6)
    config = DPOConfig(learning_rate=1e-3, epochs=1, batch_size=3, ref_batch_size=2, cpu=True)
    full = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "a", progress=False)

    real, sizes = dpo_module.encode_prompts, []

    def counting(processor, batch, *args, **kwargs):
        sizes.append(len(batch))
        if len(sizes) == 2 and signal_on[0]:
            signal.raise_signal(signal.SIGTERM)
        return real(processor, batch, *args, **kwargs)

    signal_on = [True]
    monkeypatch.setattr(dpo_module, "encode_prompts", counting)
    with pytest.raises(TrainingInterrupted, match="after 4 of 6 pairs"):
        train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / REFERENCE_PARTIAL).is_file() and sizes == [2, 2]
    signal_on[0], sizes[:] = False, []
    resumed = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)
    assert sizes[0] == 2 and sizes[1:] == [3, 3]  # the last reference batch, then the two training batches
    assert not (tmp_path / "b" / REFERENCE_PARTIAL).exists()
    assert resumed.history == full.history and _same_weights(resumed.policy_dir, full.policy_dir)


def test_a_sigterm_the_last_unit_did_not_act_on_still_stops_the_process(tmp_path: Path) -> None:
    """Asked during the last feedback batch or optimizer step, the work ends normally with everything saved; the
    signal is then delivered again, so `train iterate` stops there instead of starting the next stage."""
    import signal
    import subprocess
    import sys

    script = (
        "import signal; from rlaifv.trainer.interrupt import stop_on_sigterm\n"
        "with stop_on_sigterm() as asked:\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    print('finished the unit', asked(), flush=True)\n"
        "print('next stage')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM and done.stdout == "finished the unit True\n"


@pytest.mark.slow
def test_sigterm_while_loading_stops_before_the_first_step(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the reference sums cached, nothing else checks before step 1: a SIGTERM while the models load stops
    there, not after a step and a checkpoint."""
    import signal

    from rlaifv.trainer import dpo as dpo_module
    from rlaifv.trainer.errors import TrainingInterrupted

    rows = _toy_rows(4)
    config = DPOConfig(learning_rate=1e-3, epochs=1, batch_size=2, cpu=True)
    train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)  # the cache
    (tmp_path / "dpo_report.json").unlink()  # not a finished run: this one trains again
    real = dpo_module._load_policy

    def loading(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_module, "_load_policy", loading)
    with pytest.raises(TrainingInterrupted, match="before step 1 of 2"):
        train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_a_real_process_evicted_mid_run_exits_143_and_the_same_command_finishes_the_run(
    tiny_model: Path, tmp_path: Path
) -> None:
    """End to end, as Kubernetes does it: `rlaifv train dpo` gets SIGTERM from outside once it has trained a
    step, exits 143 with its state saved, and the same command run again resumes and exports the bundle."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    rows = preference_rows([(r.chosen, r.rejected) for r in _toy_rows(40)])
    data = write_rlaifv_parquet(tmp_path / "data.parquet", rows)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "rlaifv.trainer.cli", "dpo", str(data), "--model", str(tiny_model), "-o", str(out)]
    command += ["--lr", "1e-3", "--epochs", "3", "--batch-size", "1", "--cpu", "--no-progress"]
    command += ["--set", "dpo.checkpoint_every_steps=1"]
    env = os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "dpo" / "checkpoints").glob("step-*/trainer_state.json")):
        assert first.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-2000:]
    assert "stopped: stopped by SIGTERM after step" in stderr and not (out / "bundle").exists()
    second = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]
    report = json.loads((out / "dpo" / "dpo_report.json").read_text())
    assert report["resumed_from_step"] >= 1 and report["optimizer_steps"] == 120
    assert (out / "bundle" / "rlaifv.json").is_file()


def test_the_starting_adapter_as_reference_needs_a_lora_run_from_an_adapter_and_no_token_kl(tmp_path: Path) -> None:
    rows = _toy_rows(2)
    for config, adapter in [
        (DPOConfig(cpu=True), tmp_path / "adapter"),
        (DPOConfig(lora=True, cpu=True), None),
        (DPOConfig(lora=True, token_kl=0.1, cpu=True), tmp_path / "adapter"),
    ]:
        with pytest.raises(ConfigError):
            train_dpo(
                config,
                rows,
                model_path=tmp_path,
                output_dir=tmp_path / "o",
                init_adapter=adapter,
                reference_is_start=True,
            )


def test_runs_that_cannot_work_are_refused_before_any_work(tiny_model: Path, tmp_path: Path) -> None:
    """A missing model folder (it was taken for a hub id, minutes of retries), a LoRA run given a reference it
    would ignore, a reference whose tokenizer differs (a bundle that never loads, or an IndexError mid-pass)."""
    from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_tiny_vlm

    rows = _toy_rows(2)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"model folder .*nope does not exist"):
        train_dpo(DPOConfig(cpu=True), rows, model_path=tmp_path / "nope", output_dir=out)
    with pytest.raises(ConfigError, match="full fine-tuning only"):
        train_dpo(DPOConfig(lora=True, cpu=True), rows, model_path=tiny_model, output_dir=out, reference_path=tmp_path)
    other = build_tiny_vlm(tmp_path / "other-words", TinyVLMSpec(words=("zebra", "mango", "violet", "red")))
    with pytest.raises(ConfigError, match="tokenizers differ"):
        train_dpo(DPOConfig(cpu=True), rows, model_path=tiny_model, output_dir=out, reference_path=other)
    assert not out.exists()  # nothing was started


def test_pairs_that_cannot_be_trained_or_served_are_dropped_and_counted(tiny_model: Path, tmp_path: Path) -> None:
    """Over the model's positions (the service refuses those answers), the same answer twice (no gradient), an
    answer of markup only: each dropped with its count in the report, the rest trained."""
    from rlaifv.reward.models import load_model

    limit = load_model(tiny_model).config.text_config.max_position_embeddings
    rows = _toy_rows(4)
    rows.append(dataclasses.replace(rows[0], id="long", question="describe the image " * (limit // 3)))
    rows.append(dataclasses.replace(rows[1], id="same", rejected=rows[1].chosen))
    rows.append(dataclasses.replace(rows[2], id="markup", rejected="</s>"))
    config = DPOConfig(learning_rate=1e-3, epochs=1, batch_size=2, cpu=True)
    with pytest.warns(UserWarning, match=rf"1 pairs do not fit the model's {limit} positions .* row 'long'"):
        result = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)
    report = json.loads((tmp_path / "dpo_report.json").read_text())
    assert result.num_pairs == 4 and (report["rows_read"], report["num_pairs"], report["dropped_pairs"]) == (7, 4, 3)
    assert report["dropped"] == {
        "markup_only_answers": 1,
        "over_max_answer_tokens": 0,
        "identical_answers": 1,
        "over_model_positions": 1,
    }
    again = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)  # a cache hit
    assert again.reference_cache_hit and again.num_pairs == 4


def test_a_checkpoint_of_another_policy_is_not_resumed(tiny_model: Path, tmp_path: Path) -> None:
    """The same output folder with another --model (one corrected after a stop) resumed the first model's weights
    under the second's name: the run's key named only the reference and the pairs."""
    import shutil

    rows = _toy_rows(4)
    config = DPOConfig(learning_rate=1e-3, batch_size=1, cpu=True, checkpoint_every_steps=2, keep_checkpoints=0)
    reference = tmp_path / "reference"
    shutil.copytree(tiny_model, reference)
    train_dpo(config, rows, model_path=tiny_model, reference_path=reference, output_dir=tmp_path / "a", progress=False)
    _killed_after(tmp_path / "a", tmp_path / "b", "step-0000002")
    other = tmp_path / "other-policy"
    shutil.copytree(tiny_model, other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("}", ', "note": "other"}', 1))
    with pytest.warns(UserWarning):
        train_dpo(config, rows, model_path=other, reference_path=reference, output_dir=tmp_path / "b", progress=False)
    report = json.loads((tmp_path / "b" / "dpo_report.json").read_text())
    assert report["resumed_from_step"] == 0
    assert report["model"] == str(other.resolve()) and report["reference"] == str(reference.resolve())  # absolute


def test_an_output_inside_a_model_folder_is_refused_before_copying_it_into_itself(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`-o` inside --model: the bundle copied the model folder into itself, level after level, until the path was
    too long (a full copy of the weights each)."""
    import shutil

    from typer.testing import CliRunner

    from rlaifv.reward.bundle import write_bundle
    from rlaifv.reward.errors import BundleError
    from rlaifv.trainer.cli import train_app

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    result = CliRunner().invoke(
        train_app, ["dpo", str(tmp_path / "nodata"), "--model", str(model), "-o", str(model / "run")]
    )
    assert result.exit_code == 2 and "inside the model folder --model" in result.output, result.output
    with pytest.raises(BundleError, match="inside the model folder"):
        write_bundle(model / "bundle", policy=model, reference=model)
    assert not (model / "bundle").exists()


def test_bundle_weights_get_the_umask_modes(tiny_model: Path, tmp_path: Path) -> None:
    """safetensors writes 0600 and copytree kept it: a bundle trained as one user was unreadable to the service's
    (uid 10001 in the images)."""
    import os
    import shutil

    from rlaifv.reward.bundle import write_bundle

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for weights in model.glob("*.safetensors"):
        weights.chmod(0o600)
    umask = os.umask(0o022)
    try:
        write_bundle(tmp_path / "bundle", policy=model, reference=model)
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "bundle" / "policy").iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes


def test_lora_targets_that_match_nothing_are_one_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    config = DPOConfig(lora=True, lora_targets="nomatch_xyz", cpu=True)
    with pytest.raises(ConfigError, match="lora_targets 'nomatch_xyz'"):
        train_dpo(config, _toy_rows(2), model_path=tiny_model, output_dir=tmp_path / "o", progress=False)


def test_checkpoints_of_other_settings_name_what_changed(tmp_path: Path) -> None:
    """The warning said "a run with other settings" without naming one; a speed-only setting blocked the resume."""
    from rlaifv.trainer.dpo import TRAINER_STATE, CheckpointStore

    old, new = DPOConfig(learning_rate=1e-4, cpu=True), DPOConfig(learning_rate=2e-4, cpu=True, ref_batch_size=2)
    assert "ref_batch_size" not in new.training_settings()  # how many rows score at once: resumable
    root = tmp_path / "checkpoints"
    for name, state in (("step-0000010", {"settings": old.training_settings()}), ("step-0000020", {})):
        (root / name).mkdir(parents=True)
        (root / name / TRAINER_STATE).write_text(json.dumps({"key": "another run", "updates": 10} | state))
    store = CheckpointStore(root, "this run", keep=1, settings=new.training_settings())
    assert store.latest() is None and len(store.others()) == 2
    assert store.changed_settings(store.others()) == ["learning_rate"]  # the one without settings says nothing


def test_a_lora_policy_loads_without_a_library_warning_for_the_user(tiny_model: Path) -> None:
    """peft asks transformers 5 for a deprecated property: `train dpo --lora` printed its FutureWarning."""
    import warnings

    from rlaifv.trainer.dpo import _load_policy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _load_policy(DPOConfig(lora=True, cpu=True), tiny_model, "cpu", None)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_a_run_stopped_after_its_last_step_goes_on_to_the_export(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or SIGTERM, or a Ctrl-C in the last step) after the policy was saved: the rerun trained the
    whole run again from step 0 before it reached the export."""
    import errno

    from typer.testing import CliRunner

    from rlaifv.trainer import dpo as dpo_module
    from rlaifv.trainer import export as export_module
    from rlaifv.trainer.cli import train_app

    rows = preference_rows([(r.chosen, r.rejected) for r in _toy_rows(4)])
    data = write_rlaifv_parquet(tmp_path / "data" / "train.parquet", rows)
    out = tmp_path / "run"
    args = ["dpo", str(data), "--model", str(tiny_model), "-o", str(out), "--lr", "1e-3", "--cpu", "--no-progress"]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "export_bundle", disk_full)
    first = CliRunner().invoke(train_app, args)
    assert first.exit_code == 1 and "No space left on device" in first.output, first.output
    trained = json.loads((out / "dpo" / "dpo_report.json").read_text())
    policy = (out / "dpo" / "policy" / "model.safetensors").read_bytes()
    monkeypatch.undo()

    def trained_again(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(dpo_module, "dpo_terms", trained_again)
    with pytest.warns(UserWarning, match="is this run's trained policy .* it is not trained again"):
        again = CliRunner().invoke(train_app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output[again.output.index("{") :])["optimizer_steps"] == trained["optimizer_steps"]
    assert (out / "bundle" / "policy" / "model.safetensors").read_bytes() == policy
    monkeypatch.undo()

    # the report goes before the policy is written again: one cut short is never taken for the finished run
    from rlaifv.reward import models as models_module

    monkeypatch.setattr(models_module, "save_processor", disk_full)
    with pytest.raises((OSError, RunStateError)):
        train_dpo(
            DPOConfig(learning_rate=2e-3, cpu=True),
            _toy_rows(4),
            model_path=tiny_model,
            output_dir=out / "dpo",
            progress=False,
        )
    assert not (out / "dpo" / "dpo_report.json").exists()


def test_a_model_is_known_by_its_bytes_not_its_file_times(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint named weight files by size and mtime: a model staged again by a copy that keeps no mtimes
    (gsutil, aws s3 cp) was another model, and every reference cache, checkpoint and saved feedback batch of the run
    was thrown away. Bytes changed with the mtime set back are still another model, hashed or remembered."""
    import os
    import shutil

    from rlaifv.trainer import dpo as dpo_module
    from rlaifv.trainer.dpo import model_fingerprint

    staged = tmp_path / "staged"
    staged.mkdir()
    for file in tiny_model.iterdir():
        shutil.copyfile(file, staged / file.name)  # no times kept
    assert model_fingerprint(staged) == model_fingerprint(tiny_model)

    hashed = _counting_hashes(monkeypatch)
    monkeypatch.setattr(dpo_module, "RACY_NS", -(10**12))  # the files were written just now: remembered anyway
    weights = staged / "model.safetensors"
    first = model_fingerprint(staged)
    assert model_fingerprint(staged) == first and hashed == [weights]  # hashed once while unchanged

    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert model_fingerprint(staged) != first and hashed == [weights, weights]


def test_a_save_to_a_full_disk_names_the_folder_and_leaves_no_part_of_it(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk or a read-only folder while saving a checkpoint or the policy was a raw RuntimeError or
    SafetensorError traceback, and left a partial folder behind."""
    import accelerate.checkpointing
    import transformers.modeling_utils
    from safetensors import SafetensorError

    rows = _toy_rows(4)
    config = DPOConfig(learning_rate=1e-3, batch_size=2, cpu=True, checkpoint_every_steps=1)
    real_save, saves = accelerate.checkpointing.save, []

    def full_after_the_weights(obj, path, *args, **kwargs):  # torch's writer on a full disk
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"PK\x03\x04 cut short")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", full_after_the_weights)
    with pytest.raises(RunStateError, match=r"cannot save the checkpoint in .*step-0000001 \(.*PytorchStreamWriter"):
        train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "checkpoints" / "step-0000001").exists()
    monkeypatch.undo()

    def read_only(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x08\x00\x00\x00")
        raise SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", read_only)
    with pytest.raises(RunStateError, match=r"cannot save the policy in .*policy \(.*Read-only file system"):
        train_dpo(
            dataclasses.replace(config, checkpoint_every_steps=0),
            rows,
            model_path=tiny_model,
            output_dir=tmp_path / "b",
            progress=False,
        )
    assert not (tmp_path / "b" / "policy").exists() and not (tmp_path / "b" / "dpo_report.json").exists()


def test_a_damaged_reference_cache_is_computed_again_and_a_damaged_checkpoint_is_named(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A cache file a disk lost the end of stopped every rerun with pyarrow's traceback; a damaged checkpoint with
    safetensors' ("incomplete metadata"), naming no file."""
    rows = _toy_rows(4)
    config = DPOConfig(learning_rate=1e-3, batch_size=1, cpu=True, checkpoint_every_steps=2)
    full = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "a", progress=False)
    cache = tmp_path / "a" / REFERENCE_CACHE
    cache.write_bytes(cache.read_bytes()[:-100])
    (tmp_path / "a" / "dpo_report.json").unlink()  # trained again: the cache is read
    with pytest.warns(UserWarning, match=rf"{REFERENCE_CACHE} cannot be read .*: its reference sums are computed"):
        again = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "a", progress=False)
    assert not again.reference_cache_hit and again.history == full.history

    _killed_after(tmp_path / "a", tmp_path / "b", "step-0000002")
    weights = tmp_path / "b" / "checkpoints" / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(RunStateError, match=r"checkpoint .*step-0000002 cannot be read \(.*\): delete it"):
        train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / "b", progress=False)

    # accelerate resumed without an RNG state it could not read, logging at info level only
    for copy, damage in (("c", b""), ("d", None)):
        _killed_after(tmp_path / "a", tmp_path / copy, "step-0000002")
        states = tmp_path / copy / "checkpoints" / "step-0000002" / "random_states_0.pkl"
        states.write_bytes(damage) if damage is not None else states.unlink()
        unread = r"checkpoint .*step-0000002 cannot be read \(random_states_0.pkl: .*\): delete it"
        with pytest.raises(RunStateError, match=unread):
            train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path / copy, progress=False)


def _counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files `dpo._file_digest` reads and hashes from now on, in order."""
    from rlaifv.trainer import dpo as dpo_module

    hashed: list[Path] = []
    real = dpo_module.hashlib.file_digest

    def counted(handle, name):
        hashed.append(Path(handle.name))
        return real(handle, name)

    monkeypatch.setattr(dpo_module.hashlib, "file_digest", counted)
    return hashed


def _rewritten(weights: Path) -> None:
    """Other bytes (a mantissa bit of the last weights) and a later mtime: the model retrained in place."""
    import os

    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.mark.slow
def test_a_run_stopped_before_content_fingerprints_resumes_while_its_models_files_are_unchanged(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoints and reference cache of an earlier version are keyed by its fingerprint (weight files by size
    and mtime): after the upgrade a stopped run started over, its reference pass and steps lost. They are resumed
    while that fingerprint still describes the files, and saved again under the content's; not once rewritten."""
    import shutil

    import pyarrow.parquet as pq

    from rlaifv.trainer import dpo as dpo_module

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = DPOConfig(
        learning_rate=1e-3, epochs=2, batch_size=2, cpu=True, checkpoint_every_steps=1, keep_checkpoints=0
    )
    rows = _toy_rows(4)
    with monkeypatch.context() as earlier:  # the version before: its fingerprint in every key
        earlier.setattr(dpo_module, "model_fingerprint", dpo_module.legacy_model_fingerprint)
        with pytest.warns(UserWarning, match="the run is done"):
            full = train_dpo(config, rows, model_path=model, output_dir=tmp_path / "full", progress=False)
    _killed_after(tmp_path / "full", tmp_path / "stopped", "step-0000001")
    legacy_key = pq.read_schema(tmp_path / "stopped" / REFERENCE_CACHE).metadata[b"rlaifv_reference_key"].decode()
    shutil.copytree(tmp_path / "stopped", tmp_path / "resumed")

    with pytest.warns(UserWarning, match="the run is done"):
        resumed = train_dpo(config, rows, model_path=model, output_dir=tmp_path / "resumed", progress=False)
    report = json.loads((tmp_path / "resumed" / "dpo_report.json").read_text())
    assert report["resumed_from_step"] == 1 and resumed.reference_cache_hit
    assert resumed.history == full.history and _same_weights(resumed.policy_dir, full.policy_dir)
    # saved again under the content's keys: found after a copy that does not keep mtimes
    key = pq.read_schema(tmp_path / "resumed" / REFERENCE_CACHE).metadata[b"rlaifv_reference_key"].decode()
    assert key == report["reference_cache"]["key"] != legacy_key
    newest = tmp_path / "resumed" / "checkpoints" / "step-0000002" / "trainer_state.json"
    assert json.loads(newest.read_text())["key"] == report["run_key"]

    _rewritten(model / "model.safetensors")
    with pytest.warns(UserWarning, match=r"\d checkpoint\(s\) in .* are not resumed from \(other settings or model"):
        again = train_dpo(config, rows, model_path=model, output_dir=tmp_path / "stopped", progress=False)
    report = json.loads((tmp_path / "stopped" / "dpo_report.json").read_text())
    assert report["resumed_from_step"] == 0 and not again.reference_cache_hit


def test_saved_identities_are_the_contents_then_the_earlier_versions_while_the_files_are_as_they_were(
    tiny_model: Path, tmp_path: Path
) -> None:
    import shutil

    from rlaifv.trainer.dpo import legacy_model_fingerprint, model_fingerprint, saved_identities

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    legacy = legacy_model_fingerprint(model)
    assert saved_identities([model, None, "org/hub-model"]) == [
        [model_fingerprint(model), None, "org/hub-model"],
        [legacy, None, "org/hub-model"],
    ]
    assert saved_identities(["org/hub-model"]) == [["org/hub-model"]]  # one rule only
    _rewritten(model / "model.safetensors")
    assert legacy not in saved_identities([model])[1]


def test_a_model_files_hash_is_kept_for_other_processes_and_runs_while_its_stat_is_unchanged(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank and every run hashed the whole model again (8 ranks x two 15 GB models: 240 GB read per resume):
    a hash is kept in the user's cache, by the file's path, inode, size, mtime and ctime, and read instead."""
    import shutil

    from rlaifv.trainer import dpo as dpo_module
    from rlaifv.trainer.dpo import DIGEST_CACHE, model_fingerprint

    cache = tmp_path / "cache"
    monkeypatch.setenv("RLAIFV_CACHE_DIR", str(cache))
    monkeypatch.setattr(dpo_module, "RACY_NS", -(10**12))  # the files were written just now: kept anyway
    monkeypatch.setattr(dpo_module, "_DIGESTS", {})
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    hashed = _counting_hashes(monkeypatch)
    weights = model / "model.safetensors"
    first = model_fingerprint(model)
    assert hashed == [weights] and len(list((cache / DIGEST_CACHE).iterdir())) == 1
    dpo_module._DIGESTS.clear()  # another process (a rank, a later run): nothing in its memory
    assert model_fingerprint(model) == first and hashed == [weights]  # read from the cache, not hashed

    _rewritten(weights)
    dpo_module._DIGESTS.clear()
    changed = model_fingerprint(model)
    assert changed != first and hashed == [weights, weights]
    dpo_module._DIGESTS.clear()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("RLAIFV_CACHE_DIR", str(blocked))  # a cache that cannot be read or written: hashed
    assert model_fingerprint(model) == changed and hashed == [weights] * 3


def test_under_several_processes_only_the_main_one_fingerprints(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other ranks get the main process's value (or its error), computing nothing."""
    import types

    import accelerate.utils

    from rlaifv.trainer.dpo import _on_main_process
    from rlaifv.trainer.errors import TrainerError

    sent: list[list] = []

    def broadcast(values: list) -> list:  # the main process's values, as torch.distributed delivers them
        if not sent:
            sent.append(list(values))
        values[:] = sent[0]
        return values

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    main = types.SimpleNamespace(num_processes=2, is_main_process=True)
    other = types.SimpleNamespace(num_processes=2, is_main_process=False)
    computed: list[str] = []
    assert _on_main_process(main, lambda: computed.append("main") or ["id"]) == ["id"]
    assert _on_main_process(other, lambda: computed.append("other") or ["wrong"]) == ["id"]
    assert computed == ["main"]

    sent.clear()

    def fails() -> None:
        raise FileNotFoundError("model.safetensors")

    with pytest.raises(FileNotFoundError):
        _on_main_process(main, fails)
    with pytest.raises(TrainerError, match=r"the main process failed: FileNotFoundError: model\.safetensors"):
        _on_main_process(other, lambda: "never")


@pytest.mark.slow
def test_a_step_gradient_is_the_mean_over_its_pairs_however_they_are_batched(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """6 pairs in one step: as one micro-batch, as 4 + 2, or as 2 + 2 + 2 in a window of 4. accelerate divides
    each micro-batch's loss by the accumulation steps also in an epoch's short last window, and an epoch's last
    micro-batch is smaller: the step got 1.1 times (4 + 2) or 0.75 times (3 of 4) the mean gradient, and the
    logged loss was a mean of micro-batch means."""
    from rlaifv.trainer import dpo as dpo_module

    real = dpo_module._optimizer
    gradients: list[torch.Tensor] = []

    def recording(scorer, config):
        optimizer = real(scorer, config)
        step = optimizer.step

        def recorded(self, *args, **kwargs):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            gradients.append(torch.cat([p.grad.detach().flatten().double() for p in params]))
            return step(*args, **kwargs)

        optimizer.step = types.MethodType(recorded, optimizer)  # a bound method, as accelerate wraps it
        return optimizer

    monkeypatch.setattr(dpo_module, "_optimizer", recording)
    rows = _toy_rows(6)
    losses = []
    for batch_size, steps in ((6, 1), (4, 2), (2, 4)):
        config = DPOConfig(
            learning_rate=1e-8, batch_size=batch_size, gradient_accumulation_steps=steps, max_grad_norm=0, cpu=True
        )
        out = tmp_path / f"{batch_size}x{steps}"
        result = train_dpo(config, rows, model_path=tiny_model, output_dir=out, progress=False)
        assert result.optimizer_steps == 1
        losses.append(result.metrics["train_loss"])
    assert len(gradients) == 3
    for other in gradients[1:]:
        assert float((other - gradients[0]).norm() / gradients[0].norm()) < 1e-5  # float32 rounding
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_pairs_over_max_answer_tokens_are_dropped_with_a_warning(tiny_model: Path, tmp_path: Path) -> None:
    """They were counted in the report only, while the other drops warned."""
    rows = _toy_rows(2)
    rows.append(dataclasses.replace(rows[0], id="long", chosen="a red circle . " * 10))
    config = DPOConfig(learning_rate=1e-3, epochs=1, batch_size=2, cpu=True, max_answer_tokens=16)
    with pytest.warns(UserWarning, match=r"^1 pairs with an answer over max_answer_tokens \(16\) dropped"):
        result = train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)
    assert result.num_pairs == 2


def test_answers_the_tokenizer_cannot_spell_are_warned_of(tiny_model: Path, tmp_path: Path) -> None:
    """Texts that differ but tokenize alike (unknown words) were dropped as "the same chosen and rejected answer";
    answers mostly of the unknown token trained without a word."""
    rows = _toy_rows(4)
    rows.append(dataclasses.replace(rows[0], id="alike", chosen="zebra quokka", rejected="walrus narwhal"))
    rows.append(dataclasses.replace(rows[1], id="unknown", chosen="a zebra quokka walrus ."))
    config = DPOConfig(learning_rate=1e-3, epochs=1, batch_size=2, cpu=True)
    with pytest.warns(UserWarning) as caught:
        train_dpo(config, rows, model_path=tiny_model, output_dir=tmp_path, progress=False)
    said = [str(w.message) for w in caught]
    assert any(m.startswith("1 pairs dropped whose chosen and rejected answers are the same tokens") for m in said)
    assert any(m.startswith("1 of 5 pairs have an answer that is mostly the tokenizer's unknown token") for m in said)
