"""`rlaifv demo matrix`: the recipe built and evaluated for every training seed x torch thread count.

A recipe that meets its targets for one seed on one CPU proves little: the
outcome of a 1M-parameter model trained for minutes swings with the seed and
with the floating-point reduction order of the CPU's kernels. Thread counts
change that order, so seeds x threads is a cheap stand-in for "any CPU".
Each cell is its own process (its thread count set before any work), cells run
side by side while their threads fit in `cores`, and a finished cell
(`report.json`) is never redone, so an interrupted matrix resumes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaifv.trainer.errors import TrainerError
from rlaifv.trainer.shapes.targets import check_targets, served_label


class CellsFailed(TrainerError, RuntimeError):
    """Cells whose build or evaluation exited with an error; each is named with its log (one `error:` line from
    the CLI, not a traceback)."""


@dataclass(frozen=True)
class Cell:
    seed: int
    threads: int

    @property
    def name(self) -> str:
        return f"seed{self.seed}-threads{self.threads}"


def _commands(folder: Path, cell: Cell, eval_seeds: str, eval_images: int, overrides: list[str]) -> list[list[str]]:
    base = [sys.executable, "-m", "rlaifv.trainer.shapes.cli"]
    sets = [arg for item in overrides for arg in ("--set", item)]
    build = [
        *base,
        "build",
        "--seed",
        str(cell.seed),
        "--threads",
        str(cell.threads),
        "--cache-dir",
        str(folder),
        *sets,
    ]
    bundle = folder / "run" / "bundle"
    report = folder / "report.json"
    evaluate = [*base, "eval", str(bundle), "--seeds", eval_seeds, "--images", str(eval_images)]
    evaluate += ["--threads", str(cell.threads)]
    return [build, [*evaluate, "--output", str(report)]]


def _run_cell(
    folder: Path, cell: Cell, eval_seeds: str, eval_images: int, overrides: list[str]
) -> subprocess.Popen[bytes]:
    """Start the cell's build-then-eval as one shell-free process chain (logs in the cell folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": str(cell.threads), "MKL_NUM_THREADS": str(cell.threads)}
    script = (
        "import subprocess, sys, time, json\n"
        f"cmds = {_commands(folder, cell, eval_seeds, eval_images, overrides)!r}\n"
        "times = []\n"
        "for cmd in cmds:\n"
        "    start = time.perf_counter()\n"
        "    subprocess.run(cmd, check=True)\n"
        "    times.append(time.perf_counter() - start)\n"
        f"open({str(folder / 'times.json')!r}, 'w').write(json.dumps({{'build_s': times[0], 'eval_s': times[1]}}))\n"
    )
    log = open(folder / "log.txt", "ab")  # noqa: SIM115 - the child owns it until it exits
    return subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env)


def run_matrix(
    output: Path,
    *,
    seeds: list[int],
    threads: list[int],
    eval_seeds: str = "0,1,2",
    eval_images: int = 200,
    cores: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Build + evaluate each cell not done yet; returns {cell name: {report, targets, times}}."""
    cores = cores or os.cpu_count() or 1
    overrides = overrides or []
    cells = [Cell(s, t) for t in threads for s in seeds]
    todo = [c for c in cells if not (output / c.name / "report.json").is_file()]
    running: dict[Cell, subprocess.Popen[bytes]] = {}
    failed: list[str] = []
    while todo or running:
        for cell in list(todo):
            busy = sum(c.threads for c in running)
            if not running or busy + cell.threads <= cores:
                running[cell] = _run_cell(output / cell.name, cell, eval_seeds, eval_images, overrides)
                todo.remove(cell)
        for cell, process in list(running.items()):
            if process.poll() is not None:
                if process.returncode != 0:
                    failed.append(f"{cell.name} (exit {process.returncode}, see {output / cell.name / 'log.txt'})")
                del running[cell]
        if running:
            time.sleep(1.0)  # polling child processes, not waiting for a timing
    if failed:
        raise CellsFailed("cells failed: " + ", ".join(failed))
    result = collect_matrix(output, cells)
    (output / "matrix.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def collect_matrix(output: Path, cells: list[Cell]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for cell in cells:
        report = json.loads((output / cell.name / "report.json").read_text())
        models = report["models"]
        times_path = output / cell.name / "times.json"
        done = output / cell.name / "reference" / "DONE"
        result[cell.name] = {
            "seed": cell.seed,
            "threads": cell.threads,
            "times": json.loads(times_path.read_text()) if times_path.is_file() else {},
            "judge": json.loads(done.read_text()).get("judge_accuracy", {}) if done.is_file() else {},
            "served": served_label(models),
            "summary": {label: _headline(summary) for label, summary in models.items()},
            "targets": [c.as_dict() for c in check_targets(models["reference"], models[served_label(models)])],
        }
    return result


def _headline(summary: dict[str, Any]) -> dict[str, float]:
    return {
        "chair_i": summary["model"]["chair_i"][0],
        "recall": summary["model"]["recall"][0],
        "repeats": summary["model"]["repeats"][0],
        "f1": summary["yes_no"]["f1"][0],
        "random_chair_i": summary["random"]["chair_i"][0],
        "claims_chair_i": summary["bon_claims"]["chair_i"][0],
        "implicit_chair_i": summary["bon_implicit"]["chair_i"][0],
        "implicit_malformed": summary["bon_implicit"].get("malformed", [float("nan")])[0],
    }


def _verdict(checks: dict[str, dict[str, Any]]) -> str:
    missed = [name for name, check in checks.items() if not check["ok"]]
    return "yes" if not missed else "NO: " + ", ".join(missed)


def render_matrix(result: dict[str, Any]) -> str:
    """One row per cell, the served model against the reference, then the spread of each target."""
    lines = [
        "| seed | threads | ref CHAIRi % | served CHAIRi % (ratio) | recall ref -> served | yes/no F1 ref -> served |"
        " random-of-8 % | claims BoN-8 % (ratio) | implicit BoN-8 % (ratio) | implicit picks malformed % |"
        " judge on same-colour misses | build s | all met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in result.values():
        ref, served = cell["summary"]["reference"], cell["summary"][cell["served"]]
        checks = {c["name"]: c for c in cell["targets"]}
        lines.append(
            f"| {cell['seed']} | {cell['threads']} | {100 * ref['chair_i']:.1f} | "
            f"{100 * served['chair_i']:.1f} ({checks['chair_i_vs_reference']['value']:.2f}) | "
            f"{ref['recall']:.3f} -> {served['recall']:.3f} | {ref['f1']:.3f} -> {served['f1']:.3f} | "
            f"{100 * served['random_chair_i']:.1f} | "
            f"{100 * served['claims_chair_i']:.1f} ({checks['claims_bon_vs_random']['value']:.2f}) | "
            f"{100 * served['implicit_chair_i']:.1f} ({checks['implicit_bon_vs_random']['value']:.2f}) | "
            f"{100 * served.get('implicit_malformed', float('nan')):.1f} | "
            f"{cell.get('judge', {}).get('colour_miss', float('nan')):.2f} | "
            f"{cell['times'].get('build_s', float('nan')):.0f} | "
            f"{_verdict(checks)} |"
        )
    lines += ["", "| target | limit | worst | mean | std | cells met |", "|---|---|---|---|---|---|"]
    names = [c["name"] for c in next(iter(result.values()))["targets"]]
    for name in names:
        per_cell = [next(c for c in cell["targets"] if c["name"] == name) for cell in result.values()]
        values = [c["value"] for c in per_cell]
        lower_is_better = per_cell[0]["limit"] >= 0
        worst = max(values) if lower_is_better else min(values)
        lines.append(
            f"| {name} | {per_cell[0]['limit']:+.2f} | {worst:+.3f} | {statistics.fmean(values):+.3f} | "
            f"{statistics.pstdev(values):.3f} | {sum(c['ok'] for c in per_cell)}/{len(per_cell)} |"
        )
    return "\n".join(lines)
