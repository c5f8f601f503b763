"""Reports: one JSON file per evaluation, a Markdown table beside it, and side-by-side comparisons.

A report names the benchmark, what was evaluated, when, on which machine and by which command (secret
options' values and URLs' credentials shown as `***`: reports are shared), its settings, its metrics (nested
dicts of numbers) and the per-item details. The Markdown table flattens the metrics to dotted rows
(`attribute.f1`); `compare` puts several reports in one table (reference vs aligned vs best-of-N), one column
each.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from rlaifv.reward.cpu_info import cpu_name
from rlaifv.trainer.credentials import shown_url
from rlaifv.trainer.errors import DataError


def machine() -> str:
    """The CPU and core count, e.g. "x86_64, AMD EPYC 7B13, 2 cores" (what the numbers were measured on)."""
    return f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} cores"


# --judge-key, --api-key, --llm-key and any later --*-key/-token/-secret/-password (not --max-tokens).
SECRET_OPTION = re.compile(r"--(?:[a-z0-9]+-)*(?:key|token|secret|password)", re.IGNORECASE)


def shown_command(argv: Sequence[str]) -> str:
    """`rlaifv <argv>` as reports and their console header show it: the values of secret options (`--judge-key K`,
    `--api-key=K`) and the credentials in URLs are `***`, since reports are shared (they held keys in plain text)."""
    shown: list[str] = []
    secret_next = False
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if secret_next:
            shown.append("***")
            secret_next = False
        elif SECRET_OPTION.fullmatch(flag):
            shown.append(f"{flag}=***" if equals else flag)
            secret_next = not equals
        elif equals and flag.startswith("--"):
            shown.append(f"{flag}={shown_url(value)}")
        else:
            shown.append(shown_url(arg))
    return shlex.join(["rlaifv", *shown])


class Report(BaseModel):
    benchmark: str
    name: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    machine: str = Field(default_factory=machine)
    command: str = Field(default_factory=lambda: shown_command(sys.argv[1:]))
    settings: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any]
    items: list[dict[str, Any]] = Field(default_factory=list)


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested numbers -> {"a.b": value}; lists and other values are left out of tables."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is None or isinstance(value, int | float | str | bool):  # None: n/a (nothing to measure on)
            out[name] = value
    return out


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report_markdown(report: Report) -> str:
    head = f"## {report.benchmark}: {report.name}\n\n{report.created_at}, {report.machine}\n\n`{report.command}`\n\n"
    return head + markdown_table(["metric", "value"], list(flatten(report.metrics).items()))


def failure_causes(items: Sequence[dict[str, Any]]) -> list[str]:
    """The last error of each item whose extraction (objhal) or judgement (MMHal) failed, in item order."""
    causes = []
    for item in items:
        record = item.get("extraction", item)
        if record.get("status") == "failed":
            errors = record.get("errors") or ["no error recorded"]
            causes.append(str(errors[-1]))
    return causes


def report_stem(output: str | Path) -> Path:
    """The report's path without its .json (or .md, the Markdown's name given for the report's); any other name is
    kept whole: in `llava-v1.5` the ".5" is part of the name, and cutting it made two runs share one .md, one
    cache and one report name."""
    path = Path(output)
    for ending in (".json", ".md"):
        if path.name.lower().endswith(ending) and len(path.name) > len(ending):
            return path.with_name(path.name[: -len(ending)])
    return path


def sibling(output: str | Path, ending: str) -> Path:
    """A file beside the report, named after it: `run.json` -> `run<ending>`, `llava-v1.5` -> `llava-v1.5<ending>`."""
    stem = report_stem(output)
    return stem.with_name(stem.name + ending)


def report_name(output: str | Path) -> str:
    """The default name of a report (its column in `compare`): `run.json` -> "run", `llava-v1.5` -> "llava-v1.5"."""
    return report_stem(output).name


def write_report(report: Report, path: str | Path, *, markdown: str | None = None) -> tuple[Path, Path]:
    """`path` (JSON) and `sibling(path, ".md")` (the given Markdown, else the metrics table). A `path` ending in
    .md is the Markdown's: the JSON goes beside it as .json (it was overwritten by the Markdown)."""
    path = Path(path)
    if path.name.lower().endswith(".md"):
        path = sibling(path, ".json")
    if path.is_dir():
        raise DataError(f"--output {path} is a folder: give the report's file name (e.g. {path / 'report.json'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    md = sibling(path, ".md")
    md.write_text(markdown or report_markdown(report), encoding="utf-8")
    return path, md


def read_report(path: str | Path) -> Report:
    """A report `write_report` wrote; anything else (a PNG, a folder's name typed by mistake, another JSON) is a
    `DataError` naming the file."""
    try:
        return Report.model_validate_json(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"report {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"report {path} is a folder: give the report's JSON file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not an evaluation report: not UTF-8 text (a JSON report is)") from None
    except ValidationError as exc:
        raise DataError(f"{path} is not an evaluation report: {exc.errors()[0]['msg']}") from None


def compare(paths: Sequence[str | Path]) -> str:
    """Reports side by side: one column per report, one row per metric any of them has."""
    reports = [read_report(p) for p in paths]
    flats = [flatten(r.metrics) for r in reports]
    keys: list[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    header = ["metric", *(f"{r.name or report_name(p)} ({r.benchmark})" for r, p in zip(reports, paths, strict=True))]
    return markdown_table(header, [[k, *(f.get(k) for f in flats)] for k in keys])
