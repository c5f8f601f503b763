"""`dpo.disable_dropout`: the policy trains with its dropout off (the reference is scored in eval mode)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_testkit import COLOURS, png

from rlaifv.trainer.data import PreferenceRow
from rlaifv.trainer.dpo import TRAINER_STATE, CheckpointStore, _load_policy, _run_keys, disable_dropout, train_dpo
from rlaifv.trainer.dpo_config import DPOConfig


def _rows(n: int) -> list[PreferenceRow]:
    return [
        PreferenceRow(f"r{k}", png(COLOURS[k % len(COLOURS)]), "describe the image", "a red circle .", "a blue dog .")
        for k in range(n)
    ]


def _with_dropout(tiny_model: Path, folder: Path, rate: float = 0.5) -> Path:
    """The tiny LLaVA with attention dropout in its language model and its vision tower."""
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["attention_dropout"] = rate
    config["vision_config"]["attention_dropout"] = rate
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_dropout_modules_and_rates_are_zeroed_but_lora_dropout_is_kept() -> None:
    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_dropout = 0.1  # passed to the attention function in train mode (transformers)
            self.dropout = 0.2  # CLIP's and SigLIP's name for it
            self.use_dropout = True  # not a rate
            self.hidden = torch.nn.Dropout(0.3)
            self.lora_dropout = torch.nn.ModuleDict({"default": torch.nn.Dropout(0.4)})  # peft's

    model = torch.nn.Sequential(Attention(), torch.nn.Dropout2d(0.5), torch.nn.Dropout(0.0))
    assert disable_dropout(model) == 4
    attention = model[0]
    assert (attention.attention_dropout, attention.dropout, attention.hidden.p, model[1].p) == (0.0, 0.0, 0.0, 0.0)
    assert attention.use_dropout is True
    assert attention.lora_dropout["default"].p == 0.4
    assert disable_dropout(model) == 0  # nothing left on


def test_a_lora_policy_loses_the_models_dropout_and_keeps_lora_dropout(tiny_model: Path, tmp_path: Path) -> None:
    from rlaifv.reward.logprobs import answer_logprobs
    from rlaifv.reward.models import load_processor
    from rlaifv.trainer.dpo import EncodedPair, encode_prompts

    model = _with_dropout(tiny_model, tmp_path / "dropout-model")
    policy = _load_policy(DPOConfig(lora=True, lora_dropout=0.3, cpu=True), model, "cpu", None)
    layers = policy.config.text_config.num_hidden_layers + policy.config.vision_config.num_hidden_layers
    assert disable_dropout(policy) == layers  # each attention module's rate
    lora = [m for name, m in policy.named_modules() if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in name]
    assert lora and all(m.p == 0.3 for m in lora)
    assert not any(m.p for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m not in lora)

    row = _rows(1)[0]
    prompts = encode_prompts(load_processor(model), [EncodedPair(row.id, row.image, row.question, "", "", [], [])])
    policy.train()
    with policy.disable_adapter(), torch.no_grad():
        first, second = (answer_logprobs(policy, prompts, [[[5, 6, 7]]], 0)[0][0] for _ in range(2))
    assert torch.equal(first, second)  # train mode, yet no mask drawn


@pytest.mark.slow
def test_step_0_rewards_are_0_unless_dropout_is_left_on(tiny_model: Path, tmp_path: Path) -> None:
    """The reference is scored in eval mode; a policy scored with dropout on had rewards (and margins) of noise
    before any update. A learning rate of 1e-9 keeps every step at the starting weights."""
    model = _with_dropout(tiny_model, tmp_path / "dropout-model")
    config = DPOConfig(learning_rate=1e-9, beta=1.0, batch_size=1, cpu=True)

    def rewards(config: DPOConfig, output: Path) -> list[float]:
        result = train_dpo(config, _rows(4), model_path=model, output_dir=output, progress=False)
        assert len(result.history) == 4
        return [abs(h[k]) for h in result.history for k in ("chosen_reward", "rejected_reward", "margin")]

    assert max(rewards(config, tmp_path / "off")) < 1e-3  # float rounding only (measured: under 1e-5)
    config.disable_dropout = False
    assert max(rewards(config, tmp_path / "on")) > 1e-2  # measured: 0.005-0.25


def test_disable_dropout_decides_the_weights_so_changing_it_is_not_resumed(tmp_path: Path) -> None:
    on, off = DPOConfig(cpu=True), DPOConfig(cpu=True, disable_dropout=False)
    assert "disable_dropout" not in DPOConfig.BOOKKEEPING
    folder = tmp_path / "checkpoints" / "step-0000002"
    folder.mkdir(parents=True)
    (folder / TRAINER_STATE).write_text(
        json.dumps({"key": "dropout left on", "updates": 2, "settings": off.training_settings()})
    )
    store = CheckpointStore(tmp_path / "checkpoints", "dropout off", keep=1, settings=on.training_settings())
    assert store.changed_settings(store.others()) == ["disable_dropout"]  # what the warning names

    identities = [["policy", "reference", "model-a"]]
    keys = {flag: _run_keys(config, ["data"], identities, 1, dropout_turned_off=False) for flag, config in
            (("on", on), ("off", off))}  # fmt: skip
    assert keys["on"][0] != keys["off"][0]  # another setting, another run
    before = _as_before_the_setting(on)
    earlier = hashlib.sha256(json.dumps(["data", before, 1, identities[0][2:]]).encode()).hexdigest()
    assert keys["on"][1] == keys["off"][1] == earlier  # the earlier version's key, where nothing was turned off
    assert _run_keys(on, ["data"], identities, 1, dropout_turned_off=True) == keys["on"][:1]


# The settings that keyed a run before disable_dropout (DPOConfig's fields less BOOKKEEPING at 4d30879), pinned here:
# the run keys of that version are what a resume must still match.
BEFORE_THE_SETTING = (
    "beta", "nll_weight", "token_kl", "learning_rate", "epochs", "batch_size", "gradient_accumulation_steps",
    "warmup_ratio", "lr_scheduler", "weight_decay", "max_grad_norm", "lora", "lora_r", "lora_alpha", "lora_dropout",
    "lora_targets", "freeze_vision", "freeze_projector", "max_answer_tokens", "dtype", "mixed_precision", "cpu",
    "seed", "end_of_turn",
)  # fmt: skip


def _as_before_the_setting(config: DPOConfig, left_out: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {name: value for name, value in dataclasses.asdict(config).items() if name in BEFORE_THE_SETTING}


def _killed_after_step_2(run: Path, copy: Path) -> None:
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "policy")
    (copy / "dpo_report.json").unlink()
    for folder in (copy / "checkpoints").iterdir():
        if folder.name > "step-0000002":
            shutil.rmtree(folder)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the run is done")
def test_a_run_of_a_version_before_the_setting_resumes_where_it_turns_no_dropout_off(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions before disable_dropout trained with dropout on and keyed runs by settings without it: their
    checkpoints and finished policies are this run's where the setting changes nothing (a model without dropout,
    or disable_dropout=false), and another run's where it turns dropout off."""
    dropping = _with_dropout(tiny_model, tmp_path / "dropout-model")
    config = DPOConfig(learning_rate=1e-3, batch_size=1, cpu=True, checkpoint_every_steps=2)
    with monkeypatch.context() as earlier:  # the earlier version: its settings, its dropout left on
        earlier.setattr(DPOConfig, "training_settings", _as_before_the_setting)
        earlier.setattr("rlaifv.trainer.dpo.disable_dropout", lambda model: 0)
        for model, name in ((tiny_model, "plain"), (dropping, "dropping")):
            with pytest.warns(UserWarning, match="the run is done"):
                train_dpo(config, _rows(4), model_path=model, output_dir=tmp_path / name, progress=False)
            _killed_after_step_2(tmp_path / name, tmp_path / f"{name}-killed")

    def resumed_from(model: Path, run: str, config: DPOConfig = config) -> int:
        train_dpo(config, _rows(4), model_path=model, output_dir=tmp_path / run, progress=False)
        return int(json.loads((tmp_path / run / "dpo_report.json").read_text())["resumed_from_step"])

    with pytest.warns(UserWarning, match="is this run's trained policy"):  # finished: not trained again
        train_dpo(config, _rows(4), model_path=tiny_model, output_dir=tmp_path / "plain", progress=False)
    assert resumed_from(tiny_model, "plain-killed") == 2
    shutil.copytree(tmp_path / "dropping-killed", tmp_path / "dropping-killed-2")
    assert resumed_from(dropping, "dropping-killed", DPOConfig(**{**config.to_dict(), "disable_dropout": False})) == 2
    with pytest.warns(UserWarning, match=r"not resumed from \(settings changed: dpo\.disable_dropout;"):
        assert resumed_from(dropping, "dropping-killed-2") == 0


def test_the_setting_is_turned_off_with_set() -> None:
    from rlaifv.trainer.iterate_config import apply_overrides, build_config

    assert DPOConfig().disable_dropout is True
    config = build_config(DPOConfig, apply_overrides({}, ["disable_dropout=false"]), "dpo")
    assert config.disable_dropout is False
