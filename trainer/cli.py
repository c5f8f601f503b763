"""`rlaifv train dpo|iterate|options` and `rlaifv feedback`.

The root `rlaifv` app (service/cli.py) mounts `train_app` and registers
`feedback` as a command. Heavy libraries load inside the commands only, so
`rlaifv --help` stays instant. Every setting of the config dataclasses can be
set with `--set section.key=value` (see `rlaifv train options`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from rlaifv.trainer.iterate_config import IterateConfig, describe_settings

# The loop's defaults as `rlaifv train options` lists them, for the flags' help (no torch is imported for them).
_DEFAULTS = {name: default for name, default, _ in describe_settings(IterateConfig)}

train_app = typer.Typer(
    help="Train policies: DPO on preference data, or the iterative RLAIF-V loop.",
    no_args_is_help=True,
    add_completion=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any setting, e.g. --set dpo.nll_weight=0.2 (see `rlaifv train options`)."),
]


def _report(output: Path) -> dict[str, Any]:
    """An earlier run's report.json in `output` ({} when there is none, or it is unreadable)."""
    try:
        report = json.loads((output / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _feedback_made(output: Path) -> dict[str, Any]:
    """What made the feedback.parquet in `output`: the record in its own metadata, or, in a file an earlier version
    wrote, its report's ({} when there is no such file, or it cannot be read: it is made again)."""
    import warnings

    from rlaifv.trainer.errors import DataError
    from rlaifv.trainer.feedback import FEEDBACK_FILE, feedback_made

    path = output / FEEDBACK_FILE
    if not path.is_file():
        return {}
    try:
        made = feedback_made(path)
    except DataError as exc:
        warnings.warn(f"{exc}: the feedback is sampled again", stacklevel=2)
        return {}
    if made is None:
        made = _report(output).get("made")
    return made if isinstance(made, dict) else {}


@contextmanager
def _clean_errors(progress: bool = True) -> Iterator[None]:
    """Known errors become one red line, not a traceback, and exit code 1; 2 for a setting or option that is wrong
    (`ConfigError`: a usage error, as `rlaifv serve` and the eval commands say; a run stopped by SIGTERM: 143; by a
    first Ctrl-C: 130).
    `progress=False` also silences transformers' own bars (loading and saving weights)."""
    from rlaifv.reward.errors import RewardError
    from rlaifv.trainer.errors import ConfigError, TrainerError, TrainingInterrupted

    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        yield
    except TrainingInterrupted as exc:  # asked for, not an error: 128 + the signal, as if it had ended the process
        typer.secho(f"stopped: {exc}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(exc.exit_code) from None
    except (TrainerError, RewardError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None
    except (OSError, UnicodeError) as exc:  # a path that is a folder, a file that is not there or not text...
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        typer.secho(f"error: {exc.__class__.__name__}{where}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _import_object(spec: str, option: str, what: str) -> Any:
    """`package.module:name` -> the object it names."""
    from rlaifv.trainer.errors import ConfigError

    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"{option} {spec!r} must look like package.module:name")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {what} {spec!r}: {exc}") from None


OUTSIDE_DATA = (
    "data folder",
    # its parquet files (the reference cache, pairs) were read as more data on the rerun that resumed it
    ": the run's own parquet files would be read as data when it is rerun; put the output elsewhere",
)
# the bundle copied the model folder into itself, level after level (a full copy of the weights each)
OUTSIDE_MODEL = ("model folder", ": put it elsewhere")


def _output_outside(output: Path, kind: tuple[str, str], *folders: tuple[str, Path | None]) -> None:
    """The output folder must not be inside any of `folders` (option, folder): `kind` names them and says why."""
    from rlaifv.trainer.errors import ConfigError

    what, why = kind
    for option, folder in folders:
        if folder is not None and folder.is_dir() and output.resolve().is_relative_to(folder.resolve()):
            where = f"{option} {folder}" if option else str(folder)
            raise ConfigError(f"--output {output} is inside the {what} {where}{why}")


def _load_source(spec: str) -> Any:
    """`package.module:factory` -> factory() (a PromptSource, e.g. the shapes world's generator)."""
    factory: Callable[[], Any] = _import_object(spec, "--source", "prompt source")
    return factory()


@train_app.command("dpo")
def dpo_command(
    data: Annotated[
        Path,
        typer.Argument(
            help="RLAIF-V parquet file/folder, or JSONL (or a JSON array file) of (image, question, chosen, rejected)."
        ),
    ],
    model: Annotated[Path, typer.Option(help="Model folder to train (also the reference unless --reference).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output folder: dpo/ (policy, reference cache, report) and bundle/.")
    ],
    reference: Annotated[Path | None, typer.Option(help="Reference model folder (full fine-tune only).")] = None,
    lora: Annotated[bool, typer.Option(help="Train a LoRA adapter instead of all weights.")] = False,
    beta: Annotated[float, typer.Option(help="DPO beta (also the bundle's reward beta).")] = 0.1,
    nll_weight: Annotated[float, typer.Option(help="Weight of the NLL term on chosen answers.")] = 0.0,
    token_kl: Annotated[
        float, typer.Option(help="Weight of a per-token KL to the reference on both answers (dpo.token_kl).")
    ] = 0.0,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 5e-7 full, 1e-5 LoRA).")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Pairs per step per device.")] = 2,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N rows.")] = None,
    name: Annotated[str, typer.Option(help="Model name in the bundle.")] = "rlaifv",
    cpu: Annotated[bool, typer.Option(help="Train on CPU even with a GPU.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    set_: SetOption = None,
) -> None:
    """DPO on a preference dataset, then export a bundle the service loads."""
    with _clean_errors(progress):
        from rlaifv.trainer.data import data_files, describe_files, read_preferences
        from rlaifv.trainer.dpo import check_models, train_dpo
        from rlaifv.trainer.dpo_config import DPOConfig
        from rlaifv.trainer.errors import ConfigError
        from rlaifv.trainer.export import export_bundle
        from rlaifv.trainer.iterate_config import apply_overrides, build_config

        settings = {
            "beta": beta,
            "nll_weight": nll_weight,
            "token_kl": token_kl,
            "learning_rate": lr,
            "epochs": epochs,
            "batch_size": batch_size,
            "gradient_accumulation_steps": grad_accum,
            "seed": seed,
            "lora": lora,
            "cpu": cpu,
        }
        for item in set_ or []:
            key = item.partition("=")[0].strip()
            section, dot, _ = key.partition(".")
            if dot and section != "dpo":  # it was read as the DPO setting `feedback` ("unknown setting dpo.feedback")
                raise ConfigError(f"--set {key}: train dpo takes dpo.* settings only (see `rlaifv train options`)")
        overrides = [s.removeprefix("dpo.") for s in set_ or []]
        config: DPOConfig = build_config(DPOConfig, apply_overrides(settings, overrides), "dpo")
        _output_outside(output, OUTSIDE_DATA, ("", data))
        check_models(config, model, reference, names=("--model", "--reference"))  # before the data: minutes to read
        _output_outside(output, OUTSIDE_MODEL, ("--model", model), ("--reference", reference))
        rows = read_preferences(data, limit=limit, progress=progress)
        typer.echo(f"{len(rows)} preference rows from {data}")
        result = train_dpo(
            config, rows, model_path=model, output_dir=output / "dpo", reference_path=reference, progress=progress
        )
        if not result.is_main_process:  # under `accelerate launch`/torchrun only rank 0 exports
            return
        provenance = {
            "trainer": "rlaifv train dpo",
            "data": describe_files(data_files(data)),
            "rows_read": len(rows),
            "pairs_trained": result.num_pairs,
            "settings": config.to_dict() | {"effective_learning_rate": config.lr},
            "metrics": result.metrics,
            "initial_model": str(model.resolve()),
        }
        export_bundle(
            output / "bundle",
            policy_dir=result.policy_dir,
            reference_dir=reference if reference is not None and not config.lora else model,
            policy_type=result.policy_type,  # type: ignore[arg-type]
            beta=config.beta,
            name=name,
            end_of_turn=config.end_of_turn,
            provenance=provenance,
        )
        typer.echo(
            json.dumps(
                {"bundle": str(output / "bundle"), "optimizer_steps": result.optimizer_steps, **result.metrics},
                indent=2,
            )
        )


@train_app.command("iterate")
def iterate_command(
    model: Annotated[
        Path, typer.Option(help="Initial (SFT) model folder: round 1's policy and the bundle's reference.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder; rerun the same command to resume.")],
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts: parquet/JSONL/JSON-array file, or folder, with image and question.")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Prompt source factory instead of --prompts: package.module:factory.")
    ] = None,
    eval_hook: Annotated[
        str | None,
        typer.Option(
            "--eval",
            help="Eval hook run after each round: package.module:function(ctx) -> metrics (added on a rerun, it"
            " also measures the rounds finished without it).",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON file with IterateConfig settings (flags and --set override it).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help=f"Rounds (default {_DEFAULTS['rounds']}).")] = None,
    prompts_per_round: Annotated[
        int | None, typer.Option(help=f"Prompts per round (default {_DEFAULTS['prompts_per_round']}).")
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help=f"Candidates per prompt (default {_DEFAULTS['feedback.num_samples']}).")
    ] = None,
    labeler: Annotated[
        str | None, typer.Option(help=f"'self' or a labeler model folder (default {_DEFAULTS['feedback.labeler']}).")
    ] = None,
    lora: Annotated[bool | None, typer.Option(help="Train LoRA adapters (default: full fine-tuning).")] = None,
    seed: Annotated[int | None, typer.Option(help=f"Run seed (default {_DEFAULTS['seed']}).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    set_: SetOption = None,
) -> None:
    """k rounds of sample -> feedback -> pairs -> DPO, resumable, exported as a bundle."""
    with _clean_errors(progress):
        from rlaifv.trainer.data import ListPromptSource
        from rlaifv.trainer.errors import ConfigError
        from rlaifv.trainer.iterate import run_iterate
        from rlaifv.trainer.iterate_config import IterateConfig, apply_overrides, read_settings_file

        if (prompts is None) == (source is None):
            raise ConfigError("give exactly one of --prompts or --source")
        data: dict[str, Any] = read_settings_file(config) if config is not None else {}
        data |= {"model": str(model), "output_dir": str(output), "progress": progress}
        flags = {"rounds": rounds, "prompts_per_round": prompts_per_round, "seed": seed}
        data |= {k: v for k, v in flags.items() if v is not None}
        nested = [("feedback", "num_samples", samples), ("feedback", "labeler", labeler), ("dpo", "lora", lora)]
        for section, key, value in nested:
            if value is not None:
                data.setdefault(section, {})[key] = value
        settings = IterateConfig.from_dict(apply_overrides(data, set_ or []))
        _output_outside(output, OUTSIDE_MODEL, ("--model", model))
        from rlaifv.trainer.dpo import require_model_folder

        # before run.json is written: a typo was tried as a hub id, then fixed only in a new output folder
        require_model_folder(model, "--model")
        if settings.feedback.labeler != "self":
            require_model_folder(Path(settings.feedback.labeler), "feedback.labeler")
        if settings.feedback.llm_model:
            require_model_folder(Path(settings.feedback.llm_model), "feedback.llm_model")
        hook = _import_object(eval_hook, "--eval", "eval hook") if eval_hook is not None else None
        if prompts is not None:
            _output_outside(output, OUTSIDE_DATA, ("--prompts", prompts))
            prompt_source = ListPromptSource.from_path(prompts, progress=progress)
        else:
            prompt_source = _load_source(source)  # type: ignore[arg-type]
        result = run_iterate(settings, prompt_source, eval_hook=hook)
        typer.echo(
            json.dumps(
                {
                    "bundle": str(result.bundle_dir),
                    "exported_round": result.exported_round,
                    "resumed_rounds": result.resumed_rounds,
                },
                indent=2,
            )
        )


@train_app.command("options")
def options_command() -> None:
    """List every setting usable with --set / --config, with defaults and help."""
    from rlaifv.trainer.iterate_config import IterateConfig, describe_settings

    for name, default, help_text in describe_settings(IterateConfig):
        typer.echo(f"{name:34} {default:24} {help_text}")


def feedback(
    prompts: Annotated[
        Path, typer.Argument(help="Prompts: parquet/JSONL/JSON-array file, or folder, with image and question.")
    ],
    model: Annotated[Path, typer.Option(help="Policy model folder that samples the candidates.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output folder: feedback.parquet, pairs.parquet, report.json.")
    ],
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter over --model to sample from.")] = None,
    samples: Annotated[int, typer.Option(help="Candidates per prompt.")] = 10,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (same for all candidates).")] = 0.7,
    max_tokens: Annotated[int, typer.Option(min=1, help="Maximum new tokens per candidate (RLAIF-V: 512).")] = 512,
    labeler: Annotated[str, typer.Option(help="'self' or a labeler model folder.")] = "self",
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a feedback.* or pairs.* setting, e.g. --set pairs.length_balance=false (see `rlaifv "
            "train options`).",
        ),
    ] = None,
) -> None:
    """Sample candidates, score them by divide-and-conquer verification, and build preference pairs.

    A rerun with the same prompts, models and feedback settings goes on from the batches already saved; when
    feedback.parquet is already this run's, only the pairs are built again (pairs.* settings may change)."""
    with _clean_errors(progress):
        from rlaifv.reward.models import load_adapter, load_model, load_processor
        from rlaifv.trainer.data import (
            data_files,
            describe_files,
            prompts_digest,
            read_prompts,
            write_json,
            write_preferences,
        )
        from rlaifv.trainer.dpo import require_model_folder
        from rlaifv.trainer.errors import ConfigError
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
        from rlaifv.trainer.feedback_config import FeedbackConfig
        from rlaifv.trainer.iterate_config import apply_overrides, build_config
        from rlaifv.trainer.preference_pairs import PairConfig, build_pairs, why_no_pairs

        base = {
            "num_samples": samples,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "labeler": labeler,
            "seed": seed,
        }
        data = apply_overrides({"feedback": base, "pairs": {"seed": seed}}, set_ or [])
        for stray in sorted(set(data) - {"feedback", "pairs"}):
            meant = [
                f"{s}.{stray}"
                for s, c in (("feedback", FeedbackConfig), ("pairs", PairConfig))
                if stray in c.__dataclass_fields__
            ]
            raise ConfigError(
                f"--set {stray}...: feedback takes feedback.* and pairs.* settings"
                + (f" (did you mean --set {meant[0]}=...?)" if meant else " only (see `rlaifv train options`)")
            )
        config: FeedbackConfig = build_config(FeedbackConfig, data["feedback"], "feedback")
        pair_config: PairConfig = build_config(PairConfig, data["pairs"], "pairs")
        # local folders, checked before the prompts are read: a typo was tried as a hub id (30 s of retries)
        require_model_folder(model, "--model")
        if adapter is not None:
            require_model_folder(adapter, "--adapter")
        if config.labeler != "self":
            require_model_folder(Path(config.labeler), "--labeler")
        _output_outside(output, OUTSIDE_DATA, ("", prompts))
        items = read_prompts(prompts, limit=limit, progress=progress)
        models = [model] if adapter is None else [model, adapter]
        keys = feedback_keys(config, models)  # the first is saved; the others: an earlier version's (unchanged files)
        made = {"feedback_key": keys[0], "prompts_digest": prompts_digest(items)}
        finished, pairs_file = output / FEEDBACK_FILE, output / "pairs.parquet"
        earlier = _feedback_made(output)
        # Built again below: an earlier run's pairs are never left beside other feedback (`train dpo` took them).
        pairs_file.unlink(missing_ok=True)
        same_run = earlier.get("feedback_key") in keys
        if earlier in [made | {"feedback_key": key} for key in keys]:
            results = read_feedback(finished)
            typer.secho(f"{finished} is this run's feedback: only the pairs are built again", err=True)
        else:
            (output / "report.json").unlink(missing_ok=True)  # it describes the feedback this run replaces
            processor = load_processor(model)
            policy = load_model(model)
            if adapter is not None:
                policy = load_adapter(policy, adapter)
            shards = FeedbackShards(
                output / FEEDBACK_PARTIAL,
                keys,
                config.to_dict(),
                finished=finished if same_run else None,
            )
            results = collect_feedback(policy, processor, items, config, progress=progress, shards=shards)
            write_feedback(finished, results, made=made)
        rows, stats = build_pairs(results, pair_config)
        origin = {"generator": str(model), "labeler": labeler, "type": "rlaifv-feedback"}
        if rows:
            write_preferences(pairs_file, rows, origin=origin)
        else:
            typer.secho(
                f"no pairs selected ({why_no_pairs(stats, pair_config)}): pairs.parquet not written",
                fg=typer.colors.YELLOW,
                err=True,
            )
        report = {
            "kind": "feedback",
            "made": made,
            "prompts": describe_files(data_files(prompts)),
            "settings": {"feedback": config.to_dict(), "pairs": pair_config.to_dict()},
            # prompts read (duplicates kept once) against those scored: the rest were too long for the model
            "feedback": {"prompts_read": len(items), **feedback_summary(results)},
            "pairs": stats.to_dict(),
        }
        write_json(output / "report.json", report)
        # Only now: until the report is written, a stop leaves the batches to go on from.
        FeedbackShards(output / FEEDBACK_PARTIAL, made["feedback_key"]).clear()
        typer.echo(json.dumps({"feedback": report["feedback"], "pairs": report["pairs"]}, indent=2))


if __name__ == "__main__":  # `python -m rlaifv.trainer.cli dpo ...` (e.g. under torchrun) without the service's CLI
    train_app()
