"""`rlaifv demo ...`: build and evaluate the shapes world, one build or a seeds x threads matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

ThreadsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="torch threads (default: torch's choice). Different counts change floating-point reduction order,"
        " a cheap stand-in for another CPU's kernels.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe setting, e.g. --set dpo_lr=4e-5 --set reference.sft_steps=1200."),
]


def _threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _integers(text: str, least: int) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; a word or a value under `least` is a usage error (it was a ValueError traceback)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise typer.BadParameter(f"comma-separated integers of at least {least}, got {text!r}")
    return values


def _seeds(value: str) -> str:
    _integers(value, 0)
    return value


def _thread_counts(value: str) -> str:
    _integers(value, 1)
    return value


def build(
    ctx: typer.Context,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: shapes-<recipe hash> in RLAIFV_CACHE_DIR, else $XDG_CACHE_HOME/rlaifv,"
            " else ~/.cache/rlaifv)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the whole build.")] = 0,
    threads: ThreadsOption = None,
    set_: SetOption = None,
    ship: Annotated[
        bool, typer.Option(help="Evaluate the build and make it the package's default bundle (with its provenance).")
    ] = False,
) -> None:
    """SFT the reference, then run RLAIF-V rounds with self-feedback; prints the bundle path."""
    import torch

    ship_to: Path | None = (ctx.obj or {}).get("shipped_bundle")
    if ship and ship_to is None:
        raise typer.BadParameter("only the `rlaifv` command knows where the default bundle lives", param_hint="--ship")

    from rlaifv.trainer.shapes.pipeline import build_demo, demo_config
    from rlaifv.trainer.user_cache import cache_root

    _threads(threads)
    config = demo_config(seed=seed, overrides=set_ or [])
    folder = cache_dir or cache_root() / f"shapes-{config.fingerprint()}"
    bundle = build_demo(folder, config)
    typer.echo(bundle)
    if ship and ship_to is not None:
        from rlaifv.trainer.shapes.ship import ship as ship_build

        sets = "".join(f" --set {item}" for item in set_ or [])
        command = f"rlaifv demo build --seed {seed} --threads {torch.get_num_threads()}{sets} --ship"
        shipped = ship_build(folder, config, ship_to, threads=torch.get_num_threads(), command=command)
        typer.echo(json.dumps({"shipped": str(ship_to), "targets": shipped["targets"]}, indent=2))


def evaluate(
    bundle: Annotated[Path, typer.Argument(help="A shapes-world bundle (the run's reference is evaluated too).")],
    seeds: Annotated[str, typer.Option(callback=_seeds, help="Comma-separated sampling seeds.")] = "0,1,2",
    images: Annotated[int, typer.Option(min=1, help="Held-out images.")] = 200,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Candidates for best-of-N.")] = 8,
    threads: ThreadsOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSON report here.")] = None,
) -> None:
    """CHAIR / recall / repeats / yes-no F1 for reference vs policy, best-of-N by each reward vs random."""
    from rlaifv.trainer.shapes.report import evaluate_bundle, render_markdown

    _threads(threads)
    report = evaluate_bundle(bundle, seeds=_integers(seeds, 0), images=images, n=n)
    typer.echo(render_markdown(report))
    if output is not None:
        output.write_text(json.dumps(report, indent=2) + "\n")


def matrix(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the builds, reports and matrix.json.")],
    seeds: Annotated[str, typer.Option(callback=_seeds, help="Comma-separated training seeds.")] = "0,1,2",
    threads: Annotated[str, typer.Option(callback=_thread_counts, help="Comma-separated torch thread counts.")] = "1,2",
    eval_seeds: Annotated[
        str, typer.Option(callback=_seeds, help="Comma-separated sampling seeds of each evaluation.")
    ] = "0,1,2",
    eval_images: Annotated[int, typer.Option(min=1, help="Held-out images of each evaluation.")] = 200,
    cores: Annotated[
        int | None, typer.Option(min=1, help="Run cells side by side while their threads fit (default: all cores).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Build and evaluate every seed x threads cell (resumable) and print the targets table."""
    from rlaifv.trainer.shapes.matrix import render_matrix, run_matrix
    from rlaifv.trainer.shapes.pipeline import demo_config

    training_seeds = _integers(seeds, 0)
    for seed in training_seeds:  # an unknown --set is refused as `demo build` refuses it, not by every cell
        demo_config(seed=seed, overrides=set_ or [])
    result = run_matrix(
        output,
        seeds=training_seeds,
        threads=_integers(threads, 1),
        eval_seeds=eval_seeds,
        eval_images=eval_images,
        cores=cores,
        overrides=set_ or [],
    )
    typer.echo(render_matrix(result))


def demo_app(shipped_bundle: Path | None = None) -> typer.Typer:
    """The `demo` command group; with `shipped_bundle`, `build --ship` writes the package's default bundle there.

    The trainer does not know where the service keeps its default bundle: the
    composition root (`rlaifv.cli.main`) passes the folder in.
    """
    app = typer.Typer(
        help="The shapes world: the embedded default model, trained here on a CPU.",
        no_args_is_help=True,
        context_settings={"obj": {"shipped_bundle": shipped_bundle}},
    )
    app.command("build")(build)
    app.command("eval")(evaluate)
    app.command("matrix")(matrix)
    return app


if __name__ == "__main__":  # `python -m rlaifv.trainer.shapes.cli ...`: what `rlaifv demo matrix` runs per cell
    demo_app()()
