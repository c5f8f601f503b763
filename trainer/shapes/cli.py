"""`rlaifv demo ...`: build and evaluate the shapes world."""

from __future__ import annotations

from pathlib import Path

import typer

demo_app = typer.Typer(
    help="The shapes world: the embedded default model, trained here on a CPU.", no_args_is_help=True
)


@demo_app.command("build")
def build(
    cache_dir: Path | None = typer.Option(None, help="Output folder; default: the cache `rlaifv serve` uses."),
    seed: int = typer.Option(0, help="Seed of the whole build."),
) -> None:
    """SFT the reference, then run RLAIF-V rounds with self-feedback; prints the bundle path."""
    from service.default_model import cache_root
    from trainer.shapes.pipeline import DemoConfig, build_demo

    config = DemoConfig(seed=seed)
    folder = cache_dir or cache_root() / f"shapes-{config.fingerprint()}"
    typer.echo(build_demo(folder, config))


@demo_app.command("eval")
def evaluate(
    bundle: Path = typer.Argument(..., help="A shapes-world bundle (the run's reference is evaluated too)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated sampling seeds."),
    images: int = typer.Option(200, help="Held-out images."),
    n: int = typer.Option(8, help="Candidates for best-of-N."),
    output: Path | None = typer.Option(None, help="Write the JSON report here."),
) -> None:
    """CHAIR / recall / repeats / yes-no F1 for reference vs policy, best-of-N by each reward vs random."""
    from trainer.shapes.report import evaluate_bundle, render_markdown

    report = evaluate_bundle(bundle, seeds=[int(s) for s in seeds.split(",")], images=images, n=n)
    text = render_markdown(report)
    typer.echo(text)
    if output is not None:
        import json

        output.write_text(json.dumps(report, indent=2) + "\n")
