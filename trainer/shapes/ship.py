"""Shipping a shapes-world build as the package's embedded default bundle.

The shipped folder is the exported bundle (policy + reference, loadable by
`reward.bundle.load_bundle`) plus two files that say where it came from:
`shipped.json` (recipe version and fingerprint, seed, threads, the command,
build time, the targets met) and `report.json` (`rlaifv demo eval` on it).
A test compares the fingerprint with the current recipe, so a recipe change
without a rebuild fails CI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlaifv.reward.cpu_info import cpu_name
from rlaifv.trainer.shapes.pipeline import RECIPE_VERSION, DemoConfig
from rlaifv.trainer.shapes.targets import check_targets, served_label

SHIPPED_FILE = "shipped.json"
REPORT_FILE = "report.json"


def ship(
    build_folder: Path,
    config: DemoConfig,
    target: Path,
    *,
    threads: int,
    command: str,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5),
    images: int = 200,
) -> dict[str, Any]:
    """Evaluate the build's bundle (`seeds` sampling seeds), then copy it to `target` with its provenance."""
    from rlaifv.trainer.shapes.report import evaluate_bundle

    bundle = build_folder / "run" / "bundle"
    report = evaluate_bundle(bundle, seeds=list(seeds), images=images)
    models = report["models"]
    checks = check_targets(models["reference"], models[served_label(models)])
    build = json.loads((build_folder / "build.json").read_text()) if (build_folder / "build.json").is_file() else {}
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("DONE"))
    shipped = {
        "recipe_version": RECIPE_VERSION,
        "fingerprint": config.fingerprint(),
        "seed": config.seed,
        "threads": threads,
        "command": command,
        "built_on": {"cpu": cpu_name(), "cores": os.cpu_count() or 1, "date": time.strftime("%Y-%m-%d")},
        "timings": build.get("timings", {}),
        "targets": [c.as_dict() for c in checks],
        "config": asdict(config),
    }
    (target / SHIPPED_FILE).write_text(json.dumps(shipped, indent=2) + "\n")
    (target / REPORT_FILE).write_text(json.dumps(report | {"bundle": "(shipped)"}, indent=2) + "\n")
    return shipped
