"""`rlaifv bundle create|inspect|check`: bundles from one's own models, what a bundle holds, whether it serves exactly.

The logic lives in `rlaifv.reward.bundle_create`; this module only parses options and prints.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rlaifv.reward.bundle import BundleManifest
from rlaifv.reward.scoring import Normalize

if TYPE_CHECKING:
    from rlaifv.reward.bundle_create import BundleDescription, ModelSummary

bundle_app = typer.Typer(
    help="Make a bundle from a policy and a reference model folder, or inspect one.",
    no_args_is_help=True,
    add_completion=False,
)

_DEFAULTS = BundleManifest.model_fields


def _fail(exc: Exception | str, code: int = 1) -> typer.Exit:
    """One `error:` line; `code` 2 for a usage error (a wrong option), as `rlaifv serve` answers one."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _option_problems(**values: object) -> str | None:
    """The first manifest setting that is invalid, named by its option (`--beta inf` read as a float is valid for
    typer but not for the manifest: it was refused as 'invalid bundle settings')."""
    from pydantic import ValidationError

    try:
        BundleManifest.model_validate({"policy": "policy", "reference": "reference", **values})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        return f"--{field.replace('_', '-')}: {error['msg'].removeprefix('Value error, ')}"
    return None


@bundle_app.command("create")
def create(
    policy: Annotated[
        Path, typer.Option(help="Policy: a full model folder, or a PEFT LoRA adapter folder (adapter_config.json).")
    ],
    reference: Annotated[Path, typer.Option(help="Reference model folder (the LoRA base; holds the processor).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to write.")],
    beta: Annotated[float, typer.Option(help="Reward beta.")] = _DEFAULTS["beta"].default,
    normalize: Annotated[
        Normalize, typer.Option(help="'mean' divides the reward by the answer's token count; 'sum' does not.")
    ] = _DEFAULTS["normalize"].default,
    end_of_turn: Annotated[
        str | None, typer.Option(help="Token closing an assistant turn (default: the tokenizer's EOS).")
    ] = None,
    name: Annotated[str, typer.Option(help="Model name the service advertises.")] = _DEFAULTS["name"].default,
    copy: Annotated[
        bool,
        typer.Option(
            "--copy/--link",
            help="Copy the model folders into the bundle, or record their absolute paths (shared model storage).",
        ),
    ] = True,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace an existing bundle (a folder holding rlaifv.json) or a link; never a folder of other files."
        ),
    ] = False,
) -> None:
    """Check that policy and reference share tokenizer and image preprocessing, then write the bundle."""
    from rlaifv.reward.bundle_create import create_bundle, describe_bundle
    from rlaifv.reward.errors import RewardError

    problem = _option_problems(beta=beta, normalize=normalize, end_of_turn=end_of_turn, name=name)
    if problem:
        raise _fail(problem)
    try:
        create_bundle(
            output,
            policy=policy,
            reference=reference,
            beta=beta,
            normalize=normalize,
            end_of_turn=end_of_turn,
            name=name,
            copy=copy,
            force=force,
        )
        description = describe_bundle(output)
    except RewardError as exc:
        raise _fail(exc) from None
    typer.secho(f"wrote bundle {output}", fg=typer.colors.GREEN)
    typer.echo(render(description))


@bundle_app.command("inspect")
def inspect(
    folder: Annotated[Path, typer.Argument(help="Bundle folder (holds rlaifv.json).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show a bundle's settings, models (read from configs and safetensors headers, no weights loaded), provenance."""
    from rlaifv.reward.bundle_create import describe_bundle
    from rlaifv.reward.errors import RewardError

    try:
        description = describe_bundle(folder)
    except RewardError as exc:
        raise _fail(exc) from None
    typer.echo(description.model_dump_json(indent=2) if as_json else render(description))


@bundle_app.command("check")
def check(
    folder: Annotated[Path, typer.Argument(help="Bundle folder (holds rlaifv.json).")],
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")] = None,
    dtype: Annotated[
        str, typer.Option(help="auto, float32, bfloat16 or float16, as the service would load it.")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Load the bundle as the service would and check the engine against each model's own `generate`.

    Scoring and sampling log-probs on three synthetic prompts (batched, one group left-padded) must match the
    model's own greedy generation: 1e-3 in float32, in half precision 8x the model's own padding noise; exit
    status 1 when they do not. Families without rules in the engine are checked this way at every load; this
    runs the check for any family, on your weights, device, dtype and transformers release."""
    from rlaifv.reward.bundle import load_bundle
    from rlaifv.reward.errors import ModelLoadError, RewardError
    from rlaifv.reward.families import FAMILIES
    from rlaifv.reward.family_check import check_pair
    from rlaifv.reward.models import pick_device, pick_dtype

    for option, check in (("--device", lambda: pick_device(device)), ("--dtype", lambda: pick_dtype("cpu", dtype))):
        try:
            check()
        except ModelLoadError as exc:
            raise _fail(f"{option}: {exc}", code=2) from None
    try:
        results = check_pair(load_bundle(folder, device=device, dtype=dtype))
    except RewardError as exc:
        raise _fail(exc) from None
    if as_json:
        report = {  # null: not finite (sampling: the sampler picked other greedy tokens; scoring: NaN weights)
            role: {
                **asdict(r),
                "scoring": r.scoring if math.isfinite(r.scoring) else None,
                "sampling": r.sampling if math.isfinite(r.sampling) else None,
                "exact": r.exact,
                "family_rules": FAMILIES[r.model_type].name if r.model_type in FAMILIES else None,
            }
            for role, r in results.items()
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        for role, result in results.items():
            rules = f"{FAMILIES[result.model_type].name} rules" if result.model_type in FAMILIES else "no family rules"
            sampling = "other greedy tokens" if result.sampling == float("inf") else f"{result.sampling:.2g}"
            typer.secho(
                f"{role:<10} {result.model_type} ({rules})  scoring {result.scoring:.2g}  sampling {sampling}"
                f"  tolerance {result.tolerance:g}  {'exact' if result.exact else 'NOT EXACT'}",
                fg=typer.colors.GREEN if result.exact else typer.colors.RED,
            )
    if not all(result.exact for result in results.values()):
        raise typer.Exit(1)


def _count(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.1f}{unit})"
    return f"{n:,}"


def _model_lines(role: str, model: ModelSummary) -> list[str]:
    lines = [
        f"{role}:",
        f"  path          {model.path} ({model.stored})",
        f"  model_type    {model.model_type or 'unknown'}",
        f"  architecture  {model.architecture or 'unknown'}",
        f"  parameters    {_count(model.parameters)}" + (f"  [{', '.join(model.dtypes)}]" if model.dtypes else ""),
        f"  vocab size    {model.tokenizer_vocab_size if model.tokenizer_vocab_size is not None else '(no tokenizer)'}",
    ]
    if model.kind == "lora":
        lines.append(f"  LoRA rank     {model.lora_rank}  (base recorded by PEFT: {model.lora_base})")
    return lines


def render(description: BundleDescription) -> str:
    """The text form of `rlaifv bundle inspect`."""
    lines = [
        f"bundle        {description.folder}",
        f"name          {description.name}",
        f"policy type   {description.policy_type}",
        f"beta          {description.beta}",
        f"normalize     {description.normalize}",
        f"end_of_turn   {description.end_of_turn or '(what the chat template ends a turn with, else EOS)'}",
        *_model_lines("policy", description.policy),
        *_model_lines("reference", description.reference),
        "provenance:",
    ]
    provenance = json.dumps(description.provenance, indent=2, sort_keys=True, default=str)
    lines += ["  " + line for line in provenance.splitlines()]
    return "\n".join(lines)
