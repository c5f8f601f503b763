"""The iterative RLAIF-V loop as one resumable command.

    for round r = 1..k:
        prompts   <- prompt source (round r's slice, seeded)
        feedback  <- sample N candidates from the round's policy, verify claims    round-rr/feedback.parquet
        pairs     <- score gap >= 1, <= k per prompt, length-balanced             round-rr/pairs.parquet
        DPO       <- train from the round's policy (reference cached)             round-rr/dpo/
        eval      <- optional hook on a bundle of this round                      round-rr/eval.json
        DONE      <- round-rr/report.json + round-rr/DONE
    export the chosen round as a bundle (reference = the initial model)          bundle/

Rerunning the same command resumes: finished rounds (DONE) are skipped, and an
interrupted round reuses whatever stage files it completed. Settings are
stored in `run.json`; resuming with different training settings is refused
(only the number of rounds and export choices may change).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaifv.trainer.data import PromptSource, read_preferences, sha256_file, write_json, write_preferences
from rlaifv.trainer.dpo_config import DPOConfig
from rlaifv.trainer.errors import RunStateError, TrainerError
from rlaifv.trainer.feedback_config import FeedbackConfig
from rlaifv.trainer.iterate_config import RESUMABLE_CHANGES, IterateConfig

RUN_FILE = "run.json"
REPORT_FILE = "report.json"
DONE_FILE = "DONE"


@dataclass
class RoundContext:
    """What an eval hook gets after a round: `bundle_dir` loads with `reward.bundle.load_bundle`."""

    round: int
    round_dir: Path
    bundle_dir: Path
    policy_dir: Path
    policy_type: str
    reference_dir: Path


EvalHook = Callable[[RoundContext], dict[str, float | None]]
"""A round's evaluation: metric -> value, None where it could not be measured (never the 'best' round by it)."""
RoundCallback = Callable[[dict[str, Any]], None]


@dataclass
class IterateResult:
    output_dir: Path
    bundle_dir: Path
    exported_round: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    resumed_rounds: list[int] = field(default_factory=list)


def round_dir(output_dir: Path, index: int) -> Path:
    return output_dir / f"round-{index:02d}"


def _as_started(output_dir: Path, config: IterateConfig) -> IterateConfig:
    """`config` with each DPO setting its run file lacks at the value the version that wrote it trained with
    (`DPOConfig.EARLIER_VALUES`), once a round of the run is finished: its later rounds train as its first did (a
    model with dropout mixed rounds trained with and without it). Before any round finishes a run takes new
    settings, these too."""
    if not any(output_dir.glob(f"round-*/{DONE_FILE}")):
        return config
    try:
        recorded = json.loads((output_dir / RUN_FILE).read_text())["config"]["dpo"]
    except (OSError, ValueError, KeyError, TypeError):
        return config  # `_check_run_file` says what is wrong with it
    if not isinstance(recorded, dict):
        return config
    earlier = {
        name: value
        for name, value in DPOConfig.EARLIER_VALUES.items()
        if name not in recorded and getattr(config.dpo, name) != value
    }
    if not earlier:
        return config
    shown = ", ".join(f"dpo.{name}={json.dumps(value)}" for name, value in earlier.items())
    warnings.warn(
        f"{output_dir} was started by a version before {', '.join(f'dpo.{n}' for n in earlier)}: its later rounds"
        f" train as its first did ({shown}); use a new output folder to train with the newer settings",
        stacklevel=3,
    )
    return dataclasses.replace(config, dpo=dataclasses.replace(config.dpo, **earlier))


def _check_run_file(output_dir: Path, config: IterateConfig, source: PromptSource) -> bool:
    """Write run.json, or compare with the existing one; returns True when resuming."""
    from rlaifv.trainer.dpo import model_fingerprint

    path = output_dir / RUN_FILE
    settings = config.to_dict()
    fingerprint = model_fingerprint(config.model) if Path(config.model).is_dir() else None
    folders = {f"feedback.{name}": folder for name, folder in config.feedback.model_folders().items()}
    folder_fingerprints = {name: model_fingerprint(folder) for name, folder in folders.items()}
    current = {
        "config": settings,
        "prompt_source": source.describe(),
        "model_fingerprint": fingerprint,
        "folder_fingerprints": folder_fingerprints,
    }
    if not path.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, current)
        return False
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunStateError(
            f"{path} cannot be read ({exc}): it records the run's settings; restore it, or use a new output folder"
        ) from None
    if not isinstance(previous, dict) or not isinstance(previous.get("config", {}), dict):
        raise RunStateError(f"{path} is not a run file: restore it, or use a new output folder")
    old, new = dict(previous.get("config", {})), dict(settings)
    for compared in (old, new):
        for key in RESUMABLE_CHANGES:
            compared.pop(key, None)
        for section, bookkeeping in (("dpo", DPOConfig.BOOKKEEPING), ("feedback", FeedbackConfig.BOOKKEEPING)):
            if isinstance(compared.get(section), dict):
                compared[section] = {k: v for k, v in compared[section].items() if k not in bookkeeping}
    same_model = _same_model(previous.get("model_fingerprint"), fingerprint, Path(config.model))
    if same_model:
        old.pop("model", None)
        new.pop("model", None)
    previous_folders = previous.get("folder_fingerprints")
    replaced = []
    for name, folder in folders.items():
        known = previous_folders.get(name) if isinstance(previous_folders, dict) else None
        same = _same_model(known, folder_fingerprints[name], folder)
        if same:  # the same model moved or copied elsewhere: the path is no setting of its own
            section, _, key = name.partition(".")
            for compared in (old, new):
                if isinstance(compared.get(section), dict):
                    compared[section].pop(key, None)
        elif same is False:
            replaced.append(name)
    new = _without_added_defaults(old, new, config)
    changed = _changed(old, new)
    if same_model is False and "model" not in changed:  # retrained or replaced in place: the path alone is the same
        changed = sorted([*changed, "model"])
    changed = sorted({*changed, *replaced})
    recorded = previous.get("config", {}).get("dpo")
    if isinstance(recorded, dict):  # a setting `_as_started` held at its earlier value stays unrecorded, as it was
        kept = {k for k, v in DPOConfig.EARLIER_VALUES.items() if k not in recorded and settings["dpo"].get(k) == v}
        current["config"] = {**settings, "dpo": {k: v for k, v in settings["dpo"].items() if k not in kept}}
    same_source = json.loads(json.dumps(current["prompt_source"], default=str))
    old_source = previous.get("prompt_source")
    if isinstance(old_source, dict) and isinstance(same_source, dict) and "prompts" not in old_source:
        same_source.pop("prompts", None)  # a run file written before the prompts' own hash was kept
    if _by_content(previous.get("prompt_source")) != _by_content(same_source):
        changed.append("prompt_source")
    if changed:
        finished = sorted(p.parent.name for p in output_dir.glob(f"round-*/{DONE_FILE}"))
        if finished:
            raise RunStateError(
                f"{output_dir} was started with different settings ({', '.join(changed)}) and {finished[0]} is"
                " finished with them; use a new output folder to change them"
            )
        _discard_stale(output_dir, changed)
    write_json(path, current)
    return True


def _same_model(previous: Any, current: str | None, model: Path) -> bool | None:
    """Whether the run's model folder holds the model it was started with (`model_identity`'s rule: a model
    retrained or replaced at the same path is another model); None when either side has no fingerprint (a hub id,
    a run file without one), where the path decides. A run file of a version that fingerprinted weight files by
    size and mtime is compared by that rule (then rewritten with the content's fingerprint)."""
    from rlaifv.trainer.dpo import FINGERPRINT_PREFIX, legacy_model_fingerprint

    if not previous or not current:
        return None
    if not str(previous).startswith(FINGERPRINT_PREFIX):
        return bool(previous == legacy_model_fingerprint(model))
    return bool(previous == current)


# A round's stages in order, with what each leaves in the round's folder that is reused without a settings check:
# a stage is built on those before it. The saved feedback batches (feedback.partial) check their own settings and
# prompts, and are kept when they still hold (a raised prompts_per_round goes on from them).
_STAGES = (
    ("feedback", ("feedback.parquet",)),
    ("pairs", ("pairs.parquet",)),
    ("dpo", ("dpo",)),
    ("eval", ("eval.json", "bundle")),
)


def _stale_from(changed: list[str]) -> int:
    """The first stage (index in _STAGES) the changed settings decide in round 1: DPO settings DPO on (but the
    end-of-turn token, which also stops the sampling), pairs settings the pairs on, the reference mode only the
    eval (round 1's DPO reference is the initial model either way), anything else (feedback, model, prompts, seed)
    every stage."""
    sections = {"feedback" if name == "dpo.end_of_turn" else name.split(".", 1)[0] for name in changed}
    later: set[str] = set()
    for stage, section in ((3, "reference_mode"), (2, "dpo"), (1, "pairs")):
        later.add(section)
        if sections <= later:
            return stage
    return 0


def _discard_stale(output_dir: Path, changed: list[str]) -> None:
    """Settings changed before any round finished: what the first round's stages made with the earlier settings
    and the new ones decide is removed (named in a warning), so the run starts again in its folder instead of being
    refused there: the feedback (hours of sampling) stays when only pairs or DPO settings changed."""
    names = [name for _, files in _STAGES[_stale_from(changed) :] for name in files]
    if "dpo.end_of_turn" in changed:  # it stops the sampling but is not part of the saved batches' key
        names.append("feedback.partial")
    removed = []
    for name in names:
        target = round_dir(output_dir, 1) / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        else:
            continue
        removed.append(f"{target.parent.name}/{name}")
    warnings.warn(
        f"{output_dir}: settings changed before any round finished ({', '.join(changed)}): the run starts again"
        " with them" + (f"; made with the earlier ones and removed: {', '.join(removed)}" if removed else ""),
        stacklevel=3,
    )


def _changed(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The settings that differ, by their full names (`feedback.llm_retries`, not `feedback`)."""
    names = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            names += _changed(old[key], new[key], f"{prefix}{key}.")
        else:
            names.append(prefix + key)
    return names


def _without_added_defaults(old: dict[str, Any], new: dict[str, Any], config: Any) -> dict[str, Any]:
    """`new` less the settings a newer version added at their defaults (absent from `old`, a run file written
    before them): the run they describe is the same, so it resumes."""
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    kept = {}
    for key, value in new.items():
        section = getattr(config, key, None)
        if isinstance(value, dict) and isinstance(old.get(key), dict) and dataclasses.is_dataclass(section):
            value = _without_added_defaults(old[key], value, section)
        elif key not in old and (
            (key in defaults and value == defaults[key]) or value == getattr(config, "EARLIER_VALUES", {}).get(key, ...)
        ):  # a setting added since at its default, or at the value the version before it trained with
            continue
        kept[key] = value
    return kept


def _by_content(description: Any) -> Any:
    """A prompt source's description with file paths dropped where a hash names the content: the same file
    reached by another path (relative, absolute, another working folder) is the same source."""
    if isinstance(description, dict):
        hashed = "sha256" in description
        return {k: _by_content(v) for k, v in description.items() if not (hashed and k == "path")}
    if isinstance(description, list):
        return [_by_content(v) for v in description]
    return description


def _recorded(output_dir: Path, path: str | Path) -> str:
    """How a round report records `path`: relative to the run folder when inside it, so that a moved run folder
    (a resumable change) finds its own rounds' policies; absolute otherwise (the initial model)."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        return str(resolved)


def policy_of(output_dir: Path, report: dict[str, Any]) -> Path:
    """A finished round's policy folder in the run folder as it is now. Reports written before paths were kept
    relative hold an absolute one, of the folder the run had then: this run's own round is read when it is there
    (the run was moved or copied since, and that path may now be another run's), else the path as written."""
    recorded = Path(report["policy_dir"])
    if not recorded.is_absolute():
        return output_dir / recorded
    own = round_dir(output_dir, report["round"]) / "dpo" / "policy"
    return own if own.is_dir() else recorded


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _load_policy(config: IterateConfig, initial: Path, previous: dict[str, Any] | None) -> Any:
    """The round's starting policy, for sampling and self-feedback."""
    from rlaifv.reward.models import load_adapter, load_model

    device = "cpu" if config.dpo.cpu else None
    if previous is None:
        return load_model(initial, device=device)
    policy = policy_of(Path(config.output_dir), previous)
    if previous["policy_type"] == "lora":
        return load_adapter(load_model(initial, device=device), policy)
    return load_model(policy, device=device)


def _export_round_bundle(config: IterateConfig, rdir: Path, report: dict[str, Any]) -> None:
    """The round's bundle for its eval: a manifest pointing at the round's policy and the initial model (made again
    before each eval: it names them by absolute path, and the run folder may have moved since)."""
    from rlaifv.trainer.export import export_bundle

    export_bundle(
        rdir / "bundle",
        policy_dir=rdir / "dpo" / "policy",
        reference_dir=Path(config.model),
        policy_type=report["policy_type"],
        beta=config.dpo.beta,
        name=f"{config.bundle_name}-round-{report['round']}",
        normalize=config.normalize,
        end_of_turn=config.dpo.end_of_turn,
        provenance={"round": report["round"]},
        copy=False,
    )


def run_round(
    index: int,
    config: IterateConfig,
    source: PromptSource,
    previous: dict[str, Any] | None,
    *,
    eval_hook: EvalHook | None = None,
    labeler: Any = None,
    splitter: Any = None,
    writer: Any = None,
) -> dict[str, Any]:
    """Run (or finish) round `index` (1-based); returns its report. `previous` is the last round's report."""
    from rlaifv.reward.models import load_processor
    from rlaifv.trainer.dpo import DPO_REPORT, train_dpo
    from rlaifv.trainer.feedback import (
        FEEDBACK_FILE,
        FEEDBACK_PARTIAL,
        FeedbackShards,
        collect_feedback,
        feedback_keys,
        feedback_summary,
        read_feedback,
        write_feedback,
    )
    from rlaifv.trainer.preference_pairs import build_pairs, why_no_pairs

    started = time.time()
    output_dir = Path(config.output_dir)
    initial = Path(config.model)
    rdir = round_dir(output_dir, index)
    rdir.mkdir(parents=True, exist_ok=True)
    seed = config.seed * 1000 + index
    report: dict[str, Any] = {"round": index, "seed": seed, "stages_reused": []}
    previous_policy = policy_of(output_dir, previous) if previous is not None else None

    # 1-2. prompts and feedback
    feedback_path = rdir / FEEDBACK_FILE
    if feedback_path.is_file():
        feedback = read_feedback(feedback_path)
        report["stages_reused"].append("feedback")
        FeedbackShards(rdir / FEEDBACK_PARTIAL, "").clear()  # a run stopped between the file and clearing them
    else:
        prompts = source.prompts(index - 1, config.prompts_per_round, config.seed)
        if not prompts:
            raise TrainerError(f"round {index}: the prompt source returned no prompts")
        processor = load_processor(initial)
        policy = _load_policy(config, initial, previous)
        feedback_config = dataclasses.replace(config.feedback, seed=seed)
        starting = [initial] if previous_policy is None else [initial, previous_policy]
        # an earlier version's saved batches too, while the models' files are as they were then
        keys = feedback_keys(feedback_config, starting)
        shards = FeedbackShards(rdir / FEEDBACK_PARTIAL, keys, feedback_config.to_dict())
        feedback = collect_feedback(
            policy,
            processor,
            prompts,
            feedback_config,
            labeler=labeler,
            splitter=splitter,
            writer=writer,
            end_of_turn=config.dpo.end_of_turn,
            progress=config.progress,
            shards=shards,
        )
        del policy
        _free()
        write_feedback(feedback_path, feedback)
        shards.clear()
    report["feedback"] = feedback_summary(feedback) | {"sha256": sha256_file(feedback_path)}

    # 3. pairs
    pairs_path = rdir / "pairs.parquet"
    rows, stats = build_pairs(feedback, dataclasses.replace(config.pairs, seed=seed))
    if not rows:
        raise TrainerError(
            f"round {index}: no preference pairs: {why_no_pairs(stats, config.pairs)}"
            + (
                " (rerun with the settings changed: before a round finishes a run takes new ones, and pairs.* keep"
                " the feedback)"
                if index == 1
                else f" (this run's settings are fixed in {output_dir / RUN_FILE} since round 1 finished: rerun with"
                " them changed in a new output folder)"
            )
        )
    labeler_name = "self" if labeler is None and config.feedback.labeler == "self" else str(config.feedback.labeler)
    origin = {
        "generator": f"round-{index - 1:02d}" if previous else "initial",
        "labeler": labeler_name,
        "type": "rlaifv-iterate",
    }
    write_preferences(pairs_path, rows, ds_name=config.bundle_name, origin=origin)
    report["pairs"] = stats.to_dict() | {"sha256": sha256_file(pairs_path)}

    # 4. DPO
    dpo_dir = rdir / "dpo"
    if (dpo_dir / DPO_REPORT).is_file() and (dpo_dir / "policy").is_dir():
        dpo_report = json.loads((dpo_dir / DPO_REPORT).read_text())
        report["stages_reused"].append("dpo")
    else:
        lora = config.dpo.lora
        if lora or previous_policy is None:
            model_path, init_adapter = initial, (previous_policy if lora else None)
        else:
            model_path, init_adapter = previous_policy, None
        reference_path = model_path if config.reference_mode == "previous" else initial
        # LoRA rounds continue one adapter over the base: the previous round's policy is that starting adapter.
        reference_is_start = lora and init_adapter is not None and config.reference_mode == "previous"
        train_dpo(
            dataclasses.replace(config.dpo, seed=seed),
            read_preferences(pairs_path, progress=config.progress),
            model_path=model_path,
            output_dir=dpo_dir,
            reference_path=reference_path,
            init_adapter=init_adapter,
            reference_is_start=reference_is_start,
            progress=config.progress,
            clear_checkpoints=True,  # a finished round is never trained again: its checkpoints were kept for good
        )
        _free()
        dpo_report = json.loads((dpo_dir / DPO_REPORT).read_text())
    report["dpo"] = {
        k: dpo_report[k] for k in ("metrics", "optimizer_steps", "num_pairs", "reference", "reference_cache")
    }
    if Path(report["dpo"]["reference"]).is_dir():  # not a LoRA round's "adapter over base"
        report["dpo"]["reference"] = _recorded(output_dir, report["dpo"]["reference"])
    report["policy_dir"] = _recorded(output_dir, dpo_dir / "policy")
    report["policy_type"] = "lora" if config.dpo.lora else "full"

    # 5. a bundle of this round + eval
    _export_round_bundle(config, rdir, report)
    if eval_hook is not None:
        _evaluate(report, rdir, initial, eval_hook)
    report["seconds"] = time.time() - started
    write_json(rdir / REPORT_FILE, report)
    (rdir / DONE_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
    return report


def _finished_report(rdir: Path) -> dict[str, Any] | None:
    """A finished round's report; None when the round is not finished, or its report cannot be read (written in
    place by earlier versions: a stop could cut it short, and every rerun stopped on it), warned: the round is then
    finished again from its stage files."""
    if not (rdir / DONE_FILE).is_file():
        return None
    try:
        report = json.loads((rdir / REPORT_FILE).read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"{rdir / REPORT_FILE} cannot be read ({exc}): the round is finished again", stacklevel=3)
        return None
    return report if isinstance(report, dict) else None


def _evaluate(report: dict[str, Any], rdir: Path, initial: Path, eval_hook: EvalHook) -> None:
    """The round's `eval` (its eval.json when an earlier run measured it)."""
    eval_path = rdir / "eval.json"
    if eval_path.is_file():
        metrics = json.loads(eval_path.read_text())
        report["stages_reused"].append("eval")
    else:
        policy = policy_of(rdir.parent, report)
        context = RoundContext(report["round"], rdir, rdir / "bundle", policy, report["policy_type"], initial)
        metrics = {k: None if v is None else float(v) for k, v in eval_hook(context).items()}
        write_json(eval_path, metrics)
        _free()
    report["eval"] = metrics


def choose_round(config: IterateConfig, reports: list[dict[str, Any]]) -> int:
    if config.export_round == "last":
        last: int = reports[-1]["round"]
        return last
    if config.export_round == "best":
        scored: list[tuple[float, int]] = [
            (r["eval"][config.best_metric], r["round"])
            for r in reports
            if (r.get("eval") or {}).get(config.best_metric) is not None  # None: the round's eval could not say
        ]
        if not scored:
            raise RunStateError(
                f"export_round 'best': no round has eval metric {config.best_metric!r} (is an eval hook set?)"
            )
        sign = 1 if config.best_mode == "max" else -1
        return max(scored, key=lambda s: (sign * s[0], -s[1]))[1]
    return int(config.export_round)


def run_iterate(
    config: IterateConfig,
    source: PromptSource,
    *,
    eval_hook: EvalHook | None = None,
    on_round_end: RoundCallback | None = None,
    labeler: Any = None,
    splitter: Any = None,
    writer: Any = None,
) -> IterateResult:
    """Run (or resume) all rounds and export the chosen one to `output_dir/bundle`.

    `source` is any `PromptSource`; `eval_hook(ctx) -> {metric: value}` runs after
    each round; `on_round_end(report)` after each round's DONE marker (it may raise
    to stop the run; rerunning resumes). `labeler`/`splitter`/`writer` override
    the configured ones (e.g. a labeler object the caller already holds).
    """
    from tqdm.auto import tqdm

    from rlaifv.trainer.dpo import model_fingerprint
    from rlaifv.trainer.export import export_bundle

    output_dir = Path(config.output_dir)
    if not isinstance(source, PromptSource):
        raise TrainerError("source must have prompts(round_index, count, seed) and describe() methods")
    started = time.time()
    config = _as_started(output_dir, config)
    _check_run_file(output_dir, config, source)
    reports: list[dict[str, Any]] = []
    resumed: list[int] = []
    previous: dict[str, Any] | None = None
    for index in tqdm(range(1, config.rounds + 1), desc="rounds", unit="round", disable=not config.progress):
        rdir = round_dir(output_dir, index)
        report = _finished_report(rdir)
        if report is not None:
            resumed.append(index)
            if eval_hook is not None and "eval" not in report:  # finished before the run had an eval hook
                if not (rdir / "eval.json").is_file():
                    _export_round_bundle(config, rdir, report)
                _evaluate(report, rdir, Path(config.model), eval_hook)
                write_json(rdir / REPORT_FILE, report)
        else:
            report = run_round(
                index, config, source, previous, eval_hook=eval_hook, labeler=labeler, splitter=splitter, writer=writer
            )
            if on_round_end is not None:
                on_round_end(report)
        reports.append(report)
        previous = report

    exported = choose_round(config, reports)
    chosen = reports[exported - 1]
    bundle_dir = output_dir / "bundle"
    provenance = {
        "trainer": "rlaifv train iterate",
        "initial_model": {"path": str(Path(config.model).resolve()), "fingerprint": model_fingerprint(config.model)},
        "prompt_source": source.describe(),
        "settings": config.to_dict(),
        "exported_round": exported,
        "rounds": [
            {
                "round": r["round"],
                "feedback": r["feedback"],
                "pairs": r["pairs"],
                "dpo_metrics": r["dpo"]["metrics"],
                "eval": r.get("eval"),
            }
            for r in reports
        ],
    }
    reference_dir: str | Path = config.model
    if config.export_reference == "round" and config.reference_mode == "previous" and exported > 1:
        reference_dir = policy_of(output_dir, reports[exported - 2])  # the round's DPO reference (full: no LoRA)
    export_bundle(
        bundle_dir,
        policy_dir=policy_of(output_dir, chosen),
        reference_dir=reference_dir,
        policy_type=chosen["policy_type"],
        beta=config.dpo.beta,
        name=config.bundle_name,
        normalize=config.normalize,
        end_of_turn=config.dpo.end_of_turn,
        provenance=json.loads(json.dumps(provenance, default=str)),
    )
    run_report = {
        "kind": "iterate",
        "rounds": reports,
        "resumed_rounds": resumed,
        "exported_round": exported,
        "bundle": str(bundle_dir),
        "seconds_this_run": time.time() - started,
    }
    write_json(output_dir / REPORT_FILE, run_report)
    return IterateResult(output_dir, bundle_dir, exported, reports, resumed)
