"""`rlaifv train iterate`: rounds, interruption and resume, export, provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_testkit import COLOURS, ControlledLabeler, png

from rlaifv.trainer.data import ListPromptSource, PromptItem
from rlaifv.trainer.dpo_config import DPOConfig
from rlaifv.trainer.errors import ConfigError, RunStateError, TrainerError
from rlaifv.trainer.feedback_config import FeedbackConfig
from rlaifv.trainer.iterate import RoundContext, run_iterate
from rlaifv.trainer.iterate_config import IterateConfig, apply_overrides
from rlaifv.trainer.preference_pairs import PairConfig

QUESTIONS = ["describe the image", "what is this", "what is in the picture"]


class Interrupt(Exception):
    pass


def _source() -> ListPromptSource:
    items = [PromptItem(f"p{i}", png(COLOURS[i % len(COLOURS)]), QUESTIONS[i % 3]) for i in range(8)]
    return ListPromptSource(items, description={"kind": "test", "count": 8})


def _config(model: Path, out: Path, **kwargs) -> IterateConfig:
    return IterateConfig(
        model=str(model),
        output_dir=str(out),
        rounds=kwargs.pop("rounds", 2),
        prompts_per_round=3,
        progress=False,
        feedback=FeedbackConfig(num_samples=5, max_tokens=10, drop_truncated=False, temperature=1.0),
        pairs=PairConfig(max_pairs_per_prompt=3, length_balance=False),
        dpo=kwargs.pop("dpo", DPOConfig(learning_rate=1e-3, batch_size=2, cpu=True)),
        **kwargs,
    )


def _labeler() -> ControlledLabeler:
    # A fixed, content-dependent verdict per question: sampled answers get differing scores.
    return ControlledLabeler(lambda q: sum(map(ord, q)) % 3 != 0)


def _eval(ctx: RoundContext) -> dict[str, float]:
    from rlaifv.reward import load_bundle

    pair = load_bundle(ctx.bundle_dir)
    ranking = pair.score(png((5, 5, 5)), "describe the image", ["a red circle", "a blue square"])
    # "unjudged": a metric the round could not measure (MMHal with every judgement failed) is None, kept as such
    return {"round": float(ctx.round), "reward_0": ranking.candidates[0].reward, "unjudged": None}


@pytest.mark.slow
def test_two_rounds_interrupted_between_rounds_resume_and_export(tiny_model: Path, tmp_path: Path) -> None:
    from rlaifv.reward import load_bundle
    from rlaifv.reward.models import load_model

    out = tmp_path / "run"
    config = _config(tiny_model, out, export_round="best", best_metric="round", best_mode="min")
    seen: list[int] = []

    def stop_after_first(report: dict) -> None:
        seen.append(report["round"])
        raise Interrupt

    with pytest.raises(Interrupt):  # no eval hook yet: it is added on resume, and round 1 is measured then
        run_iterate(config, _source(), labeler=_labeler(), on_round_end=stop_after_first)
    assert seen == [1] and (out / "round-01" / "DONE").is_file() and not (out / "round-02").exists()
    assert not (out / "round-01" / "eval.json").exists()
    assert not (out / "bundle").exists()
    round1_mtime = (out / "round-01" / "dpo" / "policy" / "model.safetensors").stat().st_mtime_ns

    result = run_iterate(config, _source(), labeler=_labeler(), eval_hook=_eval)
    assert result.resumed_rounds == [1]
    assert (out / "round-01" / "dpo" / "policy" / "model.safetensors").stat().st_mtime_ns == round1_mtime
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert result.exported_round == 1  # 'best' by the eval metric (min of 'round'): round 1 measured on resume
    assert json.loads((out / "round-01" / "report.json").read_text())["eval"]["round"] == 1.0
    assert all(r["eval"]["unjudged"] is None for r in result.rounds)

    pair = load_bundle(result.bundle_dir)
    manifest = json.loads((result.bundle_dir / "rlaifv.json").read_text())
    provenance = manifest["provenance"]
    assert provenance["exported_round"] == 1 and len(provenance["rounds"]) == 2
    assert all(len(r["pairs"]["sha256"]) == 64 and len(r["feedback"]["sha256"]) == 64 for r in provenance["rounds"])
    assert provenance["settings"]["feedback"]["num_samples"] == 5
    assert provenance["prompt_source"] == {"kind": "test", "count": 8}
    assert provenance["rounds"][1]["eval"]["round"] == 2.0
    # round 2 trained from round 1's policy on new prompts, and its reference was round 1's policy (RLAIF-V)
    round2 = json.loads((out / "round-02" / "report.json").read_text())
    assert round2["dpo"]["reference"].endswith("round-01/dpo/policy")
    assert round2["dpo"]["optimizer_steps"] >= 1
    ids1 = json.loads((out / "round-01" / "report.json").read_text())["feedback"]["prompts"]
    assert ids1 == 3
    assert pair.score(png((1, 1, 1)), "what is this", ["a cat", "a dog"]).candidates[0].num_tokens == 3
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_rounds"] == [1] and report["exported_round"] == 1

    # a third run resumes everything and only re-exports; changing training settings is refused
    again = run_iterate(config, _source(), labeler=_labeler(), eval_hook=_eval)
    assert again.resumed_rounds == [1, 2]
    assert Path(json.loads((again.bundle_dir / "rlaifv.json").read_text())["reference"]).name != "policy"
    # re-exporting round 2 with its own DPO reference (round 1's policy) as the bundle's reference
    last = _config(tiny_model, out, export_round="2", export_reference="round")
    exported = run_iterate(last, _source(), labeler=_labeler(), eval_hook=_eval)
    assert exported.resumed_rounds == [1, 2] and exported.exported_round == 2
    pair2 = load_bundle(exported.bundle_dir)
    policy1 = load_model(out / "round-01" / "dpo" / "policy")
    for a, b in zip(pair2.reference.state_dict().values(), policy1.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    changed = _config(tiny_model, out, dpo=DPOConfig(learning_rate=5e-3, batch_size=2, cpu=True))
    with pytest.raises(RunStateError, match="dpo"):
        run_iterate(changed, _source(), labeler=_labeler())


@pytest.mark.slow
def test_lora_rounds_continue_the_adapter_and_resume_inside_a_round(tiny_model: Path, tmp_path: Path) -> None:
    from rlaifv.reward import load_bundle

    out = tmp_path / "lora"
    config = _config(tiny_model, out, dpo=DPOConfig(learning_rate=1e-2, batch_size=2, lora=True, lora_r=4, cpu=True))
    calls: list[int] = []

    def flaky_eval(ctx: RoundContext) -> dict[str, float]:
        calls.append(ctx.round)
        if ctx.round == 2 and calls.count(2) == 1:
            raise Interrupt  # dies after round 2's DPO, before its DONE marker
        return _eval(ctx)

    with pytest.raises(Interrupt):
        run_iterate(config, _source(), labeler=_labeler(), eval_hook=flaky_eval)
    assert not (out / "round-02" / "feedback.partial").exists()  # cleared once feedback.parquet was written
    (out / "round-02" / "feedback.partial").mkdir()  # as a run stopped between the two would leave it
    (out / "round-02" / "feedback.partial" / "batch-000000000.parquet").write_bytes(b"a copy of every image")
    result = run_iterate(config, _source(), labeler=_labeler(), eval_hook=flaky_eval)
    assert result.resumed_rounds == [1]
    round2 = json.loads((out / "round-02" / "report.json").read_text())
    assert round2["stages_reused"] == ["feedback", "dpo"]
    assert not (out / "round-02" / "feedback.partial").exists()
    # RLAIF-V's round reference with one adapter over the base: round 2 is anchored to round 1's adapter, so
    # its first step starts at margin 0 (against the base it starts at round 1's margins)
    dpo2 = json.loads((out / "round-02" / "dpo" / "dpo_report.json").read_text())
    assert dpo2["reference"].endswith(f"round-01/dpo/policy over {tiny_model}")
    assert dpo2["history"][0]["margin"] == pytest.approx(0.0, abs=1e-4)
    manifest = json.loads((result.bundle_dir / "rlaifv.json").read_text())
    assert manifest["policy_type"] == "lora" and result.exported_round == 2
    pair = load_bundle(result.bundle_dir)
    assert pair.is_lora


def test_lora_with_token_kl_needs_the_base_as_every_rounds_reference(tiny_model: Path) -> None:
    lora_kl = DPOConfig(lora=True, token_kl=0.1, cpu=True)
    with pytest.raises(ConfigError, match="reference_mode=initial"):
        IterateConfig(model=str(tiny_model), output_dir="o", rounds=2, dpo=lora_kl)
    assert IterateConfig(model=str(tiny_model), output_dir="o", rounds=2, dpo=lora_kl, reference_mode="initial")


def test_no_pairs_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tiny_model, tmp_path / "r", rounds=1)
    with pytest.raises(TrainerError, match="round 1: no preference pairs") as info:
        run_iterate(config, _source(), labeler=ControlledLabeler(lambda q: True))
    assert "rerun with the settings changed" in str(info.value)


def test_a_first_round_without_pairs_goes_on_in_its_folder_with_other_pair_settings(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The advice was a new output folder (run.json refused the change), and the feedback was sampled again."""
    import dataclasses

    strict = _config(tiny_model, tmp_path / "r", rounds=1)
    strict = dataclasses.replace(strict, pairs=dataclasses.replace(strict.pairs, min_score_gap=50.0))
    with pytest.raises(TrainerError, match="round 1: no preference pairs"):
        run_iterate(strict, _source(), labeler=_labeler())
    with pytest.warns(UserWarning, match=r"settings changed before any round finished \(pairs.min_score_gap\)"):
        result = run_iterate(_config(tiny_model, tmp_path / "r", rounds=1), _source(), labeler=_labeler())
    report = json.loads((tmp_path / "r" / "round-01" / "report.json").read_text())
    assert report["stages_reused"] == ["feedback"] and report["pairs"]["selected"] >= 1
    assert result.exported_round == 1


def test_iterate_config_validation_and_overrides(tmp_path: Path) -> None:
    base = {"model": "m", "output_dir": "o"}
    with pytest.raises(ConfigError, match="best_metric"):
        IterateConfig.from_dict(base | {"export_round": "best"})
    with pytest.raises(ConfigError, match="outside"):
        IterateConfig.from_dict(base | {"export_round": "7", "rounds": 2})
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): dpo.betta"):
        IterateConfig.from_dict(base | {"dpo": {"betta": 1}})
    with pytest.raises(ConfigError, match="num_samples"):
        IterateConfig.from_dict(base | {"feedback": {"num_samples": 1}})
    with pytest.raises(ConfigError, match="full fine-tuning"):
        IterateConfig.from_dict(base | {"export_reference": "round", "dpo": {"lora": True}})
    overrides = ["dpo.nll_weight=0.2", "rounds=3", "feedback.labeler=/x/judge"]
    config = IterateConfig.from_dict(apply_overrides(base, overrides))
    assert config.dpo.nll_weight == 0.2 and config.rounds == 3 and config.feedback.labeler == "/x/judge"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    assert IterateConfig.from_file(path) == config


@pytest.mark.parametrize(
    ("override", "read_as"),
    [
        ("dpo.lora=False", ("lora", False)),  # as `rlaifv train options` prints it: the string "False" was truthy
        ("dpo.lora=false", ("lora", False)),
        ("dpo.max_answer_tokens=None", ("max_answer_tokens", None)),
        ("dpo.max_answer_tokens=null", ("max_answer_tokens", None)),
        ("dpo.learning_rate=3e-7", ("learning_rate", 3e-7)),
        ("dpo.learning_rate=1", ("learning_rate", 1.0)),
        ("export_round=2", ("export_round", 2)),  # "a number", as the help says
        ("export_round=best", ("export_round", "best")),
    ],
)
def test_overrides_read_json_or_python_literals(override: str, read_as: tuple[str, Any]) -> None:
    base = {"model": "m", "output_dir": "o", "rounds": 3, "best_metric": "f1"}
    config = IterateConfig.from_dict(apply_overrides(base, [override]))
    name, value = read_as
    owner = config if hasattr(config, name) else config.dpo
    assert getattr(owner, name) == value and type(getattr(owner, name)) is type(value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.lora=yes", r"setting dpo.lora: Input should be a valid boolean, got 'yes'"),
        ("dpo.epochs=1.5", r"setting dpo.epochs: Input should be a valid integer, got 1.5"),
        ("dpo.epochs=True", r"setting dpo.epochs: Input should be a valid integer, got True"),
        ("dpo.max_answer_tokens=many", r"setting dpo.max_answer_tokens: .*, got 'many'"),
        ("rounds=two", r"setting rounds: Input should be a valid integer, got 'two'"),
        ("feedback.labeler=7", r"setting feedback.labeler: Input should be a valid string, got 7"),
    ],
)
def test_overrides_of_the_wrong_type_are_refused_naming_the_setting(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IterateConfig.from_dict(apply_overrides({"model": "m", "output_dir": "o"}, [override]))


def test_source_must_follow_the_protocol(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match="prompts"):
        run_iterate(_config(tiny_model, tmp_path / "x"), object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "exactly one of --prompts or --source"),
        (["--source", "no_such_module_xyz:make"], "cannot import prompt source"),
        (["--prompts", "x.parquet", "--eval", "nomodule_q:hook"], "cannot import eval hook"),
        (["--prompts", "x.parquet", "--config", "missing.json"], "cannot read config missing.json"),
        (["--source", "trainer_testkit:png", "--set", "dpo.betta=1"], "unknown setting(s): dpo.betta"),
    ],
)
def test_iterate_cli_errors_are_one_line(tiny_model: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import train_app

    result = CliRunner().invoke(train_app, ["iterate", "--model", str(tiny_model), "-o", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_run_resumes_when_its_model_and_prompts_are_named_by_another_path(tiny_model: Path, tmp_path: Path) -> None:
    """Relative against absolute, another working folder, a link: the same model (by fingerprint) and the same
    prompts (by hash) resume; other prompts do not."""
    from rlaifv.trainer.iterate import _check_run_file

    items = [PromptItem("p0", png((1, 2, 3)), "describe")]

    def source(path: str, sha: str) -> ListPromptSource:
        return ListPromptSource(items, description={"kind": "files", "files": [{"path": path, "sha256": sha}]})

    link = tmp_path / "model-link"
    link.symlink_to(tiny_model, target_is_directory=True)
    run = tmp_path / "run"
    first = IterateConfig(model=str(tiny_model), output_dir=str(run))
    assert _check_run_file(run, first, source("/a/p.parquet", "h")) is False
    assert _check_run_file(run, IterateConfig(model=str(link), output_dir=str(run)), source("p.parquet", "h")) is True
    _finish_a_round(run)
    with pytest.raises(RunStateError, match="prompt_source"):
        _check_run_file(run, IterateConfig(model=str(link), output_dir=str(run)), source("p.parquet", "other"))


def test_prompts_whose_images_changed_behind_their_paths_are_another_source(tiny_model: Path, tmp_path: Path) -> None:
    """A prompt file names its images by path: its own hash stays when an image is replaced, yet the run's rounds
    would sample other prompts. A run file written before the prompts' hash was kept still resumes."""
    from rlaifv.trainer.iterate import RUN_FILE, _check_run_file

    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "a.png").write_bytes(png((10, 20, 30)))
    (folder / "p.jsonl").write_text(json.dumps({"id": "p0", "image": "a.png", "question": "describe"}) + "\n")
    run = tmp_path / "run"
    config = IterateConfig(model=str(tiny_model), output_dir=str(run))
    assert _check_run_file(run, config, ListPromptSource.from_path(folder, progress=False)) is False
    assert _check_run_file(run, config, ListPromptSource.from_path(folder / "p.jsonl", progress=False)) is True

    written = json.loads((run / RUN_FILE).read_text())
    del written["prompt_source"]["prompts"]
    (run / RUN_FILE).write_text(json.dumps(written))
    assert _check_run_file(run, config, ListPromptSource.from_path(folder, progress=False)) is True

    (folder / "a.png").write_bytes(png((200, 20, 30)))
    _finish_a_round(run)
    with pytest.raises(RunStateError, match="prompt_source"):
        _check_run_file(run, config, ListPromptSource.from_path(folder, progress=False))


def _finish_a_round(run: Path) -> None:
    """A run whose first round is done: its settings are then fixed."""
    from rlaifv.trainer.iterate import DONE_FILE

    (run / "round-01").mkdir(parents=True, exist_ok=True)
    (run / "round-01" / DONE_FILE).write_text("")


def _one_prompt() -> ListPromptSource:
    return ListPromptSource([PromptItem("p0", png((1, 2, 3)), "describe")], description={"kind": "test"})


def _written_before(run: Path, section: str, *settings: str) -> None:
    """run.json as a version without `settings` (of `section`) wrote it."""
    from rlaifv.trainer.iterate import RUN_FILE

    written = json.loads((run / RUN_FILE).read_text())
    for key in settings:
        written["config"][section].pop(key, None)
    (run / RUN_FILE).write_text(json.dumps(written))


def test_a_run_resumes_with_other_checkpoint_settings_but_not_other_dpo_settings(
    tiny_model: Path, tmp_path: Path
) -> None:
    """How often state is saved decides no weight; a run.json written before those settings existed resumes too."""
    from rlaifv.trainer.iterate import _check_run_file

    source = _one_prompt()
    run = tmp_path / "run"

    def config(**dpo) -> IterateConfig:
        return IterateConfig(model=str(tiny_model), output_dir=str(run), dpo=DPOConfig(**dpo))

    assert _check_run_file(run, config(), source) is False
    _written_before(run, "dpo", "checkpoint_every_steps", "keep_checkpoints")
    assert _check_run_file(run, config(checkpoint_every_steps=50, keep_checkpoints=3, log_every=10), source) is True
    _finish_a_round(run)
    with pytest.raises(RunStateError, match="dpo"):
        _check_run_file(run, config(beta=0.2), source)


def test_a_run_written_before_a_setting_existed_resumes_while_that_setting_keeps_its_default(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The feedback's llm_* settings came later: a run started before them stopped at its next round."""
    from rlaifv.trainer.feedback_config import FeedbackConfig
    from rlaifv.trainer.iterate import _check_run_file

    source = _one_prompt()
    run = tmp_path / "run"

    def config(**feedback) -> IterateConfig:
        return IterateConfig(model=str(tiny_model), output_dir=str(run), feedback=FeedbackConfig(**feedback))

    assert _check_run_file(run, config(), source) is False
    _written_before(run, "feedback", "llm_timeout_s", "llm_max_tokens")
    assert _check_run_file(run, config(), source) is True
    _written_before(run, "feedback", "llm_timeout_s", "llm_name")
    _finish_a_round(run)
    llm = {"question_writer": "llm", "llm_url": "http://127.0.0.1:9/v1"}
    with pytest.raises(RunStateError, match=r"feedback\.llm_name"):  # not at its default: another run, named
        _check_run_file(run, config(llm_name="other-8b", **llm), source)


def test_a_run_started_before_disable_dropout_trains_its_later_rounds_as_its_first(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Its later rounds took the new default (dropout off) while its first trained with dropout on: a model with
    dropout mixed the two in one run."""
    from rlaifv.trainer.iterate import RUN_FILE, _as_started, _check_run_file

    source = _one_prompt()
    run = tmp_path / "run"
    config = IterateConfig(model=str(tiny_model), output_dir=str(run))
    assert config.dpo.disable_dropout is True
    assert _check_run_file(run, config, source) is False
    _written_before(run, "dpo", "disable_dropout")
    assert _as_started(run, config) == config  # no round finished: a run takes new settings
    _finish_a_round(run)
    for _ in range(2):  # and again on the next resume: the run file still says nothing of it
        with pytest.warns(UserWarning, match=r"before dpo\.disable_dropout.*dpo\.disable_dropout=false"):
            resumed = _as_started(run, config)
        assert resumed.dpo.disable_dropout is False and resumed.dpo.beta == config.dpo.beta
        assert _check_run_file(run, resumed, source) is True
        assert "disable_dropout" not in json.loads((run / RUN_FILE).read_text())["config"]["dpo"]
    with pytest.warns(UserWarning, match="before dpo"):  # the other settings are compared as ever
        other = _as_started(run, IterateConfig(model=str(tiny_model), output_dir=str(run), dpo=DPOConfig(beta=0.3)))
    with pytest.raises(RunStateError, match=r"dpo\.beta"):
        _check_run_file(run, other, source)
    fresh = tmp_path / "fresh"  # a run of this version records the setting and keeps it
    config = IterateConfig(model=str(tiny_model), output_dir=str(fresh))
    assert _check_run_file(fresh, config, source) is False
    _finish_a_round(fresh)
    assert _as_started(fresh, config) == config
    assert json.loads((fresh / RUN_FILE).read_text())["config"]["dpo"]["disable_dropout"] is True


def test_a_run_stopped_by_its_llm_goes_on_with_more_retries(tiny_model: Path, tmp_path: Path) -> None:
    """How the LLM URL is waited on decides no score: a run stopped by "LLM reply failed" was refused in its folder
    with more retries (or, before its first round finished, would have sampled its feedback again)."""
    from rlaifv.trainer.feedback import feedback_key
    from rlaifv.trainer.feedback_config import FeedbackConfig
    from rlaifv.trainer.iterate import _check_run_file

    source = _one_prompt()
    run = tmp_path / "run"

    def config(**llm) -> FeedbackConfig:
        return FeedbackConfig(question_writer="llm", llm_url="http://127.0.0.1:9/v1", **llm)

    def iterate(feedback: FeedbackConfig) -> IterateConfig:
        return IterateConfig(model=str(tiny_model), output_dir=str(run), feedback=feedback)

    assert _check_run_file(run, iterate(config()), source) is False
    _finish_a_round(run)
    patient = config(llm_retries=7, llm_timeout_s=300, llm_concurrency=2)
    assert _check_run_file(run, iterate(patient), source) is True
    assert feedback_key(patient, [tiny_model]) == feedback_key(config(), [tiny_model])  # its saved batches resume
    assert feedback_key(config(llm_name="other-8b"), [tiny_model]) != feedback_key(config(), [tiny_model])


def test_best_round_skips_rounds_whose_eval_could_not_say() -> None:
    """A metric of None (e.g. MMHal with every judgement failed) is no evidence: such a round is never 'best'."""
    from rlaifv.trainer.iterate import choose_round

    config = IterateConfig.from_dict(
        {"model": "m", "output_dir": "o", "rounds": 3, "export_round": "best", "best_metric": "score"}
    )
    reports = [{"round": 1, "eval": {"score": 2.0}}, {"round": 2, "eval": {"score": None}}, {"round": 3, "eval": None}]
    assert choose_round(config, reports) == 1
    with pytest.raises(RunStateError, match="no round has eval metric"):
        choose_round(config, reports[1:])


def test_iterate_refuses_a_model_that_is_no_folder_before_writing_its_run_file(tmp_path: Path) -> None:
    """A typo in --model was tried as a hub id for minutes, after run.json was written: the corrected command was
    then refused in that folder ("started with different settings (model)")."""
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import train_app

    (tmp_path / "p.jsonl").write_text("")
    out = tmp_path / "run"
    args = ["iterate", "--model", str(tmp_path / "m_lava"), "--prompts", str(tmp_path / "p.jsonl"), "-o", str(out)]
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 2 and "--model folder" in result.output and "does not exist" in result.output
    assert not (out / "run.json").exists()


def test_a_finished_round_keeps_no_dpo_checkpoints(tiny_model: Path, tmp_path: Path) -> None:
    """A round that is DONE is never trained again, yet its checkpoints stayed (a full 7B's optimizer state each)
    with a warning that a rerun would resume from them."""
    import warnings

    out = tmp_path / "run"
    dpo = DPOConfig(learning_rate=1e-3, batch_size=1, cpu=True, checkpoint_every_steps=1, keep_checkpoints=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_iterate(_config(tiny_model, out, rounds=1, dpo=dpo), _source(), labeler=_labeler(), eval_hook=_eval)
    assert (out / "round-01" / "dpo" / "dpo_report.json").is_file()
    assert not (out / "round-01" / "dpo" / "checkpoints").exists()
    assert not any("checkpoint(s) stay" in str(w.message) for w in caught)


def test_the_exported_rewards_normalisation_may_change_when_resuming(tiny_model: Path, tmp_path: Path) -> None:
    """`normalize` shapes only the exported bundle's reward, yet it was refused on resume."""
    from rlaifv.trainer.iterate import _check_run_file

    source = _one_prompt()
    run = tmp_path / "run"
    assert _check_run_file(run, IterateConfig(model=str(tiny_model), output_dir=str(run)), source) is False
    resumed = IterateConfig(model=str(tiny_model), output_dir=str(run), normalize="sum")
    assert _check_run_file(run, resumed, source) is True


def test_a_section_seed_iterate_replaces_is_named() -> None:
    """Each round derives its feedback, pairs and DPO seeds from the run's seed: a dpo.seed given was dropped
    without a word."""
    with pytest.warns(UserWarning, match=r"dpo\.seed=5 is not used: set seed instead"):
        IterateConfig.from_dict({"model": "m", "output_dir": "o", "seed": 1, "dpo": {"seed": 5}})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IterateConfig.from_dict({"model": "m", "output_dir": "o", "seed": 3, "dpo": {"seed": 3}, "pairs": {"seed": 0}})


EVAL = ["eval.json", "bundle"]


@pytest.mark.parametrize(
    ("changes", "removed", "kept"),
    [
        ({"reference_mode": "initial"}, EVAL, ["feedback.parquet", "pairs.parquet", "dpo"]),
        ({"dpo": DPOConfig(beta=0.2)}, ["dpo", *EVAL], ["feedback.parquet", "pairs.parquet"]),
        ({"pairs": PairConfig(min_score_gap=0.5)}, ["pairs.parquet", "dpo", *EVAL], ["feedback.parquet"]),
        ({"seed": 3}, ["feedback.parquet", "pairs.parquet", "dpo", *EVAL], ["feedback.partial"]),
        ({"dpo": DPOConfig(end_of_turn="</s>")}, ["feedback.parquet", "feedback.partial", "pairs.parquet"], []),
    ],
)
def test_settings_may_change_until_a_round_finishes_and_only_what_they_decide_is_made_again(
    tiny_model: Path, tmp_path: Path, changes: dict, removed: list[str], kept: list[str]
) -> None:
    """A first round that failed (no pairs with these settings, a DPO setting to mend) could not be retried in
    its folder: every change was refused and the advice was a new folder, with the feedback sampled again."""
    from rlaifv.trainer.iterate import RUN_FILE, _check_run_file

    source = _one_prompt()
    run = tmp_path / "run"
    assert _check_run_file(run, IterateConfig(model=str(tiny_model), output_dir=str(run)), source) is False
    round1 = run / "round-01"
    for name in ("feedback.partial", "dpo", "bundle"):
        (round1 / name).mkdir(parents=True)
        (round1 / name / "x").write_text("earlier")
    for name in ("feedback.parquet", "pairs.parquet", "eval.json"):
        (round1 / name).write_text("earlier")
    config = IterateConfig(model=str(tiny_model), output_dir=str(run), **changes)
    with pytest.warns(UserWarning, match="settings changed before any round finished") as caught:
        assert _check_run_file(run, config, source) is True
    message = str(caught[0].message)
    assert all(f"round-01/{name}" in message for name in removed)
    assert [name for name in removed if (round1 / name).exists()] == []
    assert all((round1 / name).exists() for name in kept)
    assert json.loads((run / RUN_FILE).read_text())["config"] == config.to_dict()  # the new settings are the run's
    assert _check_run_file(run, config, source) is True  # and resume as they are


def test_iterate_help_states_each_flags_default() -> None:
    """Only --rounds said its default; the others left the user to `rlaifv train options`."""
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import train_app

    shown = " ".join(CliRunner().invoke(train_app, ["iterate", "--help"], env={"COLUMNS": "250"}).output.split())
    for said in ("Rounds (default 4)", "per round (default 64)", "per prompt (default 10)", "(default 'self')"):
        assert said in shown, said


def _replace_weights_in_place(model: Path) -> None:
    """The model retrained and saved over itself: other bytes at the same path."""
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_a_model_replaced_at_the_same_path_is_another_model(tiny_model: Path, tmp_path: Path) -> None:
    """The path was compared, not the model: a model retrained in place resumed the run silently (its rounds made
    by the earlier model), and run.json took the new fingerprint so no later run could tell."""
    import shutil
    import warnings

    from rlaifv.trainer.iterate import RUN_FILE, _check_run_file

    model = shutil.copytree(tiny_model, tmp_path / "model")
    source = _one_prompt()
    run = tmp_path / "run"
    config = IterateConfig(model=str(model), output_dir=str(run))
    assert _check_run_file(run, config, source) is False
    _finish_a_round(run)
    written = (run / RUN_FILE).read_text()
    _replace_weights_in_place(model)
    with pytest.raises(RunStateError, match=r"different settings \(model\)"):
        _check_run_file(run, config, source)
    assert (run / RUN_FILE).read_text() == written
    with pytest.raises(RunStateError, match=r"\(model\)"):  # refused again: the run file still names the first model
        _check_run_file(run, config, source)

    (run / "round-01" / "DONE").unlink()  # before a round finishes, the run starts again with the new model
    (run / "round-01" / "feedback.parquet").write_text("made by the earlier model")
    with pytest.warns(UserWarning, match=r"settings changed before any round finished \(model\)"):
        assert _check_run_file(run, config, source) is True
    assert not (run / "round-01" / "feedback.parquet").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _check_run_file(run, config, source) is True


@pytest.mark.parametrize("setting", ["labeler", "llm_model"])
def test_a_labeler_or_claims_model_is_known_by_its_content_not_its_path(
    tiny_model: Path, tmp_path: Path, setting: str
) -> None:
    """feedback.labeler and feedback.llm_model were compared as text: one replaced in place resumed silently (later
    rounds labelled by another model), while the same model copied elsewhere, or named by an absolute path, was
    refused as another."""
    import shutil

    from rlaifv.trainer.feedback_config import FeedbackConfig
    from rlaifv.trainer.iterate import _check_run_file

    def config(folder: Path) -> IterateConfig:
        feedback = {"labeler": str(folder)} if setting == "labeler" else {"splitter": "llm", "llm_model": str(folder)}
        return IterateConfig(model=str(tiny_model), output_dir=str(run), feedback=FeedbackConfig(**feedback))

    first = shutil.copytree(tiny_model, tmp_path / "first")
    source = _one_prompt()
    run = tmp_path / "run"
    assert _check_run_file(run, config(first), source) is False
    _finish_a_round(run)
    copy = shutil.copytree(first, tmp_path / "copy")
    assert _check_run_file(run, config(copy), source) is True  # the same model elsewhere
    assert _check_run_file(run, config(first.resolve()), source) is True
    _replace_weights_in_place(copy)
    with pytest.raises(RunStateError, match=rf"different settings \(feedback\.{setting}\)"):
        _check_run_file(run, config(copy), source)
    assert _check_run_file(run, config(first), source) is True


def test_a_moved_run_folder_resumes_from_its_own_policies(tiny_model: Path, tmp_path: Path) -> None:
    """Round reports held absolute policy paths: a run folder moved (a change a run resumes from) loaded round 2's
    starting policy and the exported reference from where it had been: gone, or another run's files by then."""
    from rlaifv.trainer.iterate import policy_of

    def stop(report: dict) -> None:
        raise Interrupt

    first = tmp_path / "first"
    config = _config(tiny_model, first, export_round="2", export_reference="round")
    with pytest.raises(Interrupt):
        run_iterate(config, _source(), labeler=_labeler(), on_round_end=stop)
    assert json.loads((first / "round-01" / "report.json").read_text())["policy_dir"] == "round-01/dpo/policy"
    moved = first.rename(tmp_path / "moved")

    result = run_iterate(
        _config(tiny_model, moved, export_round="2", export_reference="round"), _source(), labeler=_labeler()
    )
    assert result.resumed_rounds == [1] and result.exported_round == 2
    round2 = json.loads((moved / "round-02" / "report.json").read_text())
    assert round2["dpo"]["reference"] == "round-01/dpo/policy" and round2["policy_dir"] == "round-02/dpo/policy"
    round1_policy = (moved / "round-01" / "dpo" / "policy" / "model.safetensors").read_bytes()
    assert (result.bundle_dir / "reference" / "model.safetensors").read_bytes() == round1_policy

    # a report written before paths were relative: this run's own round, where the old absolute path is not it
    old = {"round": 1, "policy_dir": str(first / "round-01" / "dpo" / "policy")}
    assert policy_of(moved, old) == moved / "round-01" / "dpo" / "policy"
    assert policy_of(tmp_path / "elsewhere", old) == first / "round-01" / "dpo" / "policy"


def test_a_run_file_of_the_mtime_fingerprint_resumes_while_its_model_is_unchanged(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Run files written before models were known by their bytes hold a fingerprint of sizes and mtimes: such a run
    resumes (and takes the new fingerprint) while those match, and is refused once its model was replaced."""
    import shutil

    from rlaifv.trainer.dpo import legacy_model_fingerprint, model_fingerprint
    from rlaifv.trainer.iterate import RUN_FILE, _check_run_file

    model = shutil.copytree(tiny_model, tmp_path / "model")
    source = _one_prompt()
    run = tmp_path / "run"
    config = IterateConfig(model=str(model), output_dir=str(run))

    def written_by_the_earlier_version() -> None:
        written = json.loads((run / RUN_FILE).read_text())
        written["model_fingerprint"] = legacy_model_fingerprint(model)
        (run / RUN_FILE).write_text(json.dumps(written))

    assert _check_run_file(run, config, source) is False
    _finish_a_round(run)
    written_by_the_earlier_version()
    assert _check_run_file(run, config, source) is True
    assert json.loads((run / RUN_FILE).read_text())["model_fingerprint"] == model_fingerprint(model)
    written_by_the_earlier_version()
    _replace_weights_in_place(model)
    with pytest.raises(RunStateError, match=r"\(model\)"):
        _check_run_file(run, config, source)


def test_a_run_file_rewritten_on_a_full_disk_stays_whole(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.json was written in place: cut short by a full disk (or a kill), it was unreadable to every rerun."""
    import errno

    from rlaifv.trainer.iterate import RUN_FILE, _check_run_file

    source, run = _one_prompt(), tmp_path / "run"
    assert _check_run_file(run, IterateConfig(model=str(tiny_model), output_dir=str(run)), source) is False
    written = (run / RUN_FILE).read_text()
    real = Path.write_text

    def disk_full(self: Path, data: str, *args, **kwargs) -> int:
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _check_run_file(run, IterateConfig(model=str(tiny_model), output_dir=str(run), normalize="sum"), source)
    monkeypatch.undo()
    assert (run / RUN_FILE).read_text() == written and sorted(p.name for p in run.iterdir()) == [RUN_FILE]


def test_the_shapes_report_finds_each_rounds_policy_by_its_path_in_the_run(tmp_path: Path) -> None:
    """Round reports name their policy relative to the run folder: read from elsewhere, the report's models were
    only the reference and the exported policy."""
    from rlaifv.reward.bundle import BundleManifest, write_manifest
    from rlaifv.trainer.shapes.report import models_of_bundle

    run = tmp_path / "run"
    (run / "round-01" / "dpo" / "policy").mkdir(parents=True)
    (run / "round-01" / "report.json").write_text(
        json.dumps({"round": 1, "policy_dir": "round-01/dpo/policy", "policy_type": "full"})
    )
    (run / "bundle").mkdir()
    manifest = BundleManifest(policy="policy", reference="reference", provenance={"rounds": [{"round": 1}]})
    write_manifest(run / "bundle", manifest)
    labels = {label: path for label, path, _ in models_of_bundle(run / "bundle")}
    assert labels["round 1"] == run / "round-01" / "dpo" / "policy"


def test_a_damaged_round_report_is_made_again_and_a_damaged_run_file_is_named(tiny_model: Path, tmp_path: Path) -> None:
    """Written in place by earlier versions, a report cut short stopped every rerun with a JSON traceback."""
    out = tmp_path / "run"
    config = _config(tiny_model, out, rounds=1)
    first = run_iterate(config, _source(), labeler=_labeler())
    (out / "round-01" / "report.json").write_text('{"round": 1, "feed')
    with pytest.warns(UserWarning, match=r"round-01/report.json cannot be read .*: the round is finished again"):
        again = run_iterate(config, _source(), labeler=_labeler())
    assert again.rounds[0]["stages_reused"] == ["feedback", "dpo"]
    assert again.rounds[0]["dpo"] == first.rounds[0]["dpo"]
    (out / "run.json").write_text('{"config": {')
    with pytest.raises(RunStateError, match=r"run.json cannot be read .*restore it, or use a new output folder"):
        run_iterate(config, _source(), labeler=_labeler())


@pytest.mark.parametrize("damaged", [[], {"config": None}, {"config": ["model"]}])
def test_a_run_file_of_another_shape_is_named(tiny_model: Path, tmp_path: Path, damaged: object) -> None:
    """A run.json holding JSON of another shape (`"config": null`) ended in a TypeError traceback."""
    from rlaifv.trainer.iterate import RUN_FILE, _check_run_file

    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text(json.dumps(damaged))
    with pytest.raises(RunStateError, match=r"run.json is not a run file: restore it, or use a new output folder"):
        _check_run_file(run, IterateConfig(model=str(tiny_model), output_dir=str(run)), _one_prompt())
