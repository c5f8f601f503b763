"""The `rlaifv` command: serve, worker, bench, bundle, convert, train, feedback, demo, eval.

Subcommands import their heavy dependencies inside their bodies, so
`rlaifv --help` answers instantly.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, TextIO

import typer

from rlaifv.cli.bundle import bundle_app
from rlaifv.convert.cli import convert_app


class Command(typer.Typer):
    """The console script. The project's own errors, and a path the OS refuses, end as one `error:` line and exit
    status 1 whatever subcommand raised them (several printed a traceback: an output under a file, a missing
    template, a bad bundle for `demo eval`); `RLAIFV_TRACEBACK=1` shows the traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from rlaifv.reward.errors import RewardError
        from rlaifv.trainer.errors import ConfigError, TrainerError

        refused = (RewardError, TrainerError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().__call__(*args, **kwargs)
        except (*refused, PermissionError) as exc:
            if os.environ.get("RLAIFV_TRACEBACK"):
                raise
            message = str(exc) if not isinstance(exc, OSError) else f"{exc.strerror}: {exc.filename}"
            typer.secho(f"error: {message}", fg="red", err=True)
            sys.exit(2 if isinstance(exc, ConfigError) else 1)  # a wrong setting is a usage error, as typer's


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A warning as one line for the people running the command, not Python's file:line and source line."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    print(f"warning{kind}: {message}", file=file or sys.stderr, flush=True)


app = Command(name="rlaifv", help="RLAIF-V best-of-N reward service and trainer.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print side-by-side ratios measured in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(bundle_app, name="bundle")
app.add_typer(convert_app, name="convert")


@bench_app.command("reward")
def bench_reward(
    n: int = typer.Option(8, "--n", "-n", min=1, help="Candidates per prompt."),
    answer_tokens: int = typer.Option(64, min=1, help="Tokens per candidate."),
    repeats: int = typer.Option(3, min=1, help="Timed repetitions (median reported)."),
    hidden: int = typer.Option(
        384, min=12, help="Decoder hidden size of the benchmark model: a multiple of 12 (6 heads of an even size)."
    ),
    layers: int = typer.Option(4, min=1, help="Decoder layers of the benchmark model."),
) -> None:
    """Naive scoring (2N full forwards) vs shared-prefix scoring with generation log-probs reused."""
    if hidden % 12:
        raise typer.BadParameter(f"{hidden} is not a multiple of 12 (6 heads of an even size)", param_hint="--hidden")
    from rich.console import Console
    from rich.table import Table

    from rlaifv.bench.reward import run_reward_benchmark

    console = Console()
    with console.status("building the benchmark model and timing both paths..."):
        result = run_reward_benchmark(n=n, answer_tokens=answer_tokens, repeats=repeats, hidden=hidden, layers=layers)
    table = Table(
        title=f"Scoring best-of-{result['n']}: {result['prefix_tokens']} prefix tokens, "
        f"{result['answer_tokens']}-token answers, {result['params_m']:.1f}M params, {result['threads']} threads"
    )
    table.add_column("path")
    table.add_column("seconds", justify="right")
    table.add_column("answer tokens/s", justify="right")
    for key in ("naive", "shared"):
        row = result[key]
        table.add_row(row.name, f"{row.seconds:.3f}", f"{row.tokens_per_s:.0f}")
    console.print(table)
    reward = result["reward"]
    console.print(
        f"scoring speed-up: [bold]{result['speedup']:.2f}x[/bold]  (the paths differ by at most "
        f"{result['max_abs_sum_diff']:.2e} in log-prob sums, policy minus reference, and "
        f"{result['max_abs_reward_diff']:.2e} in reward at beta {reward.beta:g}, normalize {reward.normalize})"
    )
    console.print(
        f"with generation ({result['generation_s']:.2f}s) included, "
        f"end-to-end speed-up: {result['end_to_end_speedup']:.2f}x"
    )


def _register_optional() -> None:
    """Mount the subcommands of the other parts (each module is import-light)."""
    try:
        from rlaifv.service.serve_cli import serve
    except ImportError:
        pass
    else:
        app.command("serve")(serve)
    try:
        from rlaifv.service.worker_cli import worker
    except ImportError:
        pass
    else:
        app.command("worker")(worker)
    try:
        from rlaifv.bench.service import bench_service
    except ImportError:
        pass
    else:
        bench_app.command("service")(bench_service)
    try:
        from rlaifv.bench.soak import bench_soak
    except ImportError:
        pass
    else:
        bench_app.command("soak")(bench_soak)
    from rlaifv.bench.engine import bench_engine

    bench_app.command("engine")(bench_engine)
    try:
        from rlaifv.trainer.cli import feedback, train_app
    except ImportError:
        pass
    else:
        app.add_typer(train_app, name="train")
        app.command("feedback")(feedback)
    from rlaifv.service.default_model import SHIPPED_BUNDLE
    from rlaifv.trainer.shapes.cli import demo_app

    app.add_typer(demo_app(SHIPPED_BUNDLE), name="demo")
    from rlaifv.cli.eval import eval_app

    app.add_typer(eval_app, name="eval")


_register_optional()

if __name__ == "__main__":
    app()
