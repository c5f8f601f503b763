"""What every `rlaifv eval` command shares: where answers come from, the scaling mode, writing results.

The composition root's side of the evaluation harness (`rlaifv.trainer.evaluation`): it alone knows the
service's default bundle and the shapes world, so the harness itself imports neither.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from rlaifv.reward.errors import RewardError
from rlaifv.service.default_model import MissingDefaultBundle
from rlaifv.trainer.errors import TrainerError
from rlaifv.trainer.evaluation.candidates import CandidateCache, Generator, Prompt, Rule, Sampling, picked_texts
from rlaifv.trainer.evaluation.report import Report, write_report
from rlaifv.trainer.evaluation.scaling import Metric, curve_table, parse_ns, plot_curve, run_scaling

# Mistakes in files, options or models: reported as one line, not a traceback.
USER_ERRORS = (TrainerError, RewardError, MissingDefaultBundle, ValidationError)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def bad_option(flag: str, message: str) -> typer.BadParameter:
    """A mistake in the command line found in a command's body (options that do not go together, one that needs
    another): a usage error as typer's own checks give, exit 2 before anything is read, loaded or sampled."""
    return typer.BadParameter(message, param_hint=[flag])


def one_authorization(url: str | None, key: str | None, url_flag: str, key_flag: str, variable: str) -> None:
    """A key beside a user and password in the URL (`authorization_clash`), refused as a usage error naming both."""
    from rlaifv.trainer.credentials import authorization_clash

    if clash := authorization_clash(url, key, url_flag, f"a key ({key_flag} or {variable})"):
        raise bad_option(key_flag, clash)


def user_error(exc: Exception) -> typer.Exit:
    """One `error:` line for a user mistake; a pydantic error names its first field instead of a listing."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        return fail(f"{exc.title}: {field + ': ' if field else ''}{first['msg']}")
    return fail(str(exc))


def best_of_list(value: str | None) -> str | None:
    """--best-of checked before anything runs (typer shows a bad value as one usage error)."""
    if value is not None:
        try:
            parse_ns(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def parse_modes(value: str) -> list[str]:
    """`dpo,claims` -> ["dpo", "claims"]; a mode that is neither is a `ValueError`."""
    modes = [m.strip() for m in value.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"dpo", "claims"})
    if unknown:
        raise ValueError(f"takes dpo and/or claims, got {', '.join(map(repr, unknown))}")
    return modes


def reward_modes(value: str) -> str:
    """--modes checked before anything runs (an unknown mode was found after both models had loaded)."""
    try:
        parse_modes(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def above_zero(value: float) -> float:
    if value <= 0:
        raise typer.BadParameter(f"must be above 0, got {value:g}")
    return value


def http_url(value: str | None) -> str | None:
    """A URL httpx can call: anything else would fail item by item (every request) instead of once. Refusals show
    it without its credentials (`shown_url`): a password with an unencoded '#', '/' or '?' came back whole."""
    if value is None:
        return value
    from rlaifv.trainer.credentials import shown_url, url_problem

    if problem := url_problem(value):
        raise typer.BadParameter(f"{shown_url(value.strip())!r} {problem}")
    return value


def set_threads(threads: int | None) -> None:
    """torch threads: the option, else RLAIFV_TORCH_THREADS (1 is often fastest on shared CPUs)."""
    value = threads if threads is not None else os.environ.get("RLAIFV_TORCH_THREADS")
    if value is not None:
        import torch

        torch.set_num_threads(int(value))


def resolve_bundle(bundle: str) -> Path:
    """'default' is the shipped shapes-world bundle."""
    if bundle == "default":
        from rlaifv.service.default_model import default_bundle

        return default_bundle()
    return Path(bundle)


@dataclass
class Source:
    """Where candidate answers come from and how they are picked (the options of every eval command)."""

    bundle: str | None
    service: str | None
    api_key: str | None
    service_max_n: int
    n: int
    select: Rule
    best_of: str | None
    modes: str
    sampling: Sampling
    cache: Path | None
    batch: int
    random_draws: int = 1

    @property
    def generates(self) -> bool:
        return self.bundle is not None or self.service is not None

    def check(self, *, answers: bool) -> None:
        """Options that do not go together (`answers`: an answers file was given), refused as usage errors before
        anything is read or loaded: they were found after the benchmark's files were read, some after a model
        loaded."""
        if self.bundle is not None and self.service is not None:
            raise bad_option("--service", "give --bundle or --service, not both")
        if answers and (self.generates or self.best_of):
            raise bad_option("--answers", "scores given answers: leave out --bundle, --service and --best-of")
        if self.best_of and not self.generates:
            raise bad_option("--best-of", "generates answers: give --bundle or --service")
        if self.n > 1 and self.select == "first" and not self.best_of:
            raise bad_option("--select", "-n > 1 needs dpo, claims or random (first would ignore the other candidates)")

    def generator(self) -> Generator:
        from rlaifv.trainer.evaluation.generators import BundleGenerator, ServiceGenerator

        if self.bundle is not None:
            return BundleGenerator.load(resolve_bundle(self.bundle))
        if self.service is not None:
            return ServiceGenerator(self.service, api_key=self.api_key, max_n=self.service_max_n)
        raise fail("no answers: give an answers file, or --bundle / --service to generate them")

    def settings(self) -> dict[str, Any]:
        """What the report records; `sampling.max_tokens` null: the service's default."""
        from rlaifv.service.urls import without_credentials

        out: dict[str, Any] = {"sampling": self.sampling.model_dump()}
        if self.bundle is not None:
            out["bundle"] = str(resolve_bundle(self.bundle))
        if self.service is not None:
            out["service"] = without_credentials(self.service)[1]  # reports are shared
        if self.best_of:
            out |= {"best_of": parse_ns(self.best_of), "modes": self.mode_list()}
        else:
            out |= {"n": self.n, "select": self.select}
        return out

    def mode_list(self) -> list[str]:
        return parse_modes(self.modes)  # checked by the option's callback

    def answers(self, prompts: Sequence[Prompt]) -> list[str]:
        """One answer per prompt: n candidates sampled (or cached), the one --select picks."""
        from rlaifv.trainer.evaluation.candidates import sample_all

        cache = CandidateCache(self.cache)
        claims = self.select == "claims"
        with _closing(self.generator()) as generator:
            sampled, _ = sample_all(
                generator, prompts, self.n, self.sampling, claims=claims, cache=cache, batch=self.batch
            )
        return picked_texts(prompts, sampled, self.select, self.n, seed=self.sampling.seed)

    def scaling(self, prompts: Sequence[Prompt], metric: Metric) -> dict[str, Any]:
        assert self.best_of is not None
        ns = parse_ns(self.best_of)  # checked by the option's callback
        with _closing(self.generator()) as generator:
            return run_scaling(
                generator,
                prompts,
                ns,
                metric,
                self.sampling,
                modes=self.mode_list(),
                cache=CandidateCache(self.cache),
                batch=self.batch,
                random_draws=self.random_draws,
            )


@contextmanager
def _closing(generator: Generator) -> Iterator[Generator]:
    """Close a service generator's HTTP client when done (a bundle generator has nothing to close)."""
    try:
        yield generator
    finally:
        close = getattr(generator, "close", None)
        if close is not None:
            close()


def default_cache(output: Path) -> Path:
    from rlaifv.trainer.evaluation.report import sibling

    return sibling(output, ".candidates.jsonl")


def _block(doc: Path, name: str) -> tuple[str, re.Pattern[str]]:
    """The Markdown file's text and the pattern of its `<!-- begin: name -->` ... `<!-- end: name -->` block; a
    ValueError saying which is missing."""
    try:
        source = doc.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{doc} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    pattern = re.compile(rf"(<!-- begin: {re.escape(name)} -->\n).*?(<!-- end: {re.escape(name)} -->)", re.DOTALL)
    if not pattern.search(source):
        raise ValueError(f"{doc} has no '<!-- begin: {name} -->' ... '<!-- end: {name} -->' block to fill")
    return source, pattern


def check_block(doc: Path, name: str) -> None:
    """`replace_block`'s checks as a usage error before any work: a missing file or block was found after the
    sampling."""
    try:
        _block(doc, name)
    except ValueError as exc:
        raise bad_option("--doc", str(exc)) from None


def replace_block(doc: Path, name: str, text: str) -> None:
    """Replace what lies between `<!-- begin: name -->` and `<!-- end: name -->` in a Markdown file."""
    try:
        source, pattern = _block(doc, name)
    except ValueError as exc:
        raise fail(str(exc)) from None
    doc.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), source, count=1))


def write_scaling(
    report: Report,
    output: Path,
    *,
    metrics: Sequence[str],
    percent: Sequence[str],
    plot: Path | None,
    doc: Path | None,
    title: str,
) -> str:
    """The scaling report (JSON + Markdown table), the PNG, and the table (+ figure link) in a doc's block."""
    result = report.metrics
    table = curve_table(result, metrics, percent=percent)
    if plot is not None:
        plot_curve(result, metrics, plot, title=title, percent=percent)
    text = f"{report.created_at}, {report.machine}:\n\n```bash\n{report.command}\n```\n\n{table}"
    write_report(report, output, markdown=f"## {title}\n\n{text}")
    if doc is not None:
        figure = f"\n![{title}]({os.path.relpath(plot, doc.parent)})\n" if plot is not None else ""
        replace_block(doc, report.name, text + figure)
    return table
