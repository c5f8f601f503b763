"""The package's public surface, and imports kept light for the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_exports() -> None:
    from rlaifv import service

    assert service.__all__ == ["Settings", "create_app"]
    assert callable(service.create_app) and service.Settings().max_n >= 1


def test_cli_modules_do_not_import_torch_or_the_app() -> None:
    code = (
        "import sys, rlaifv.cli.main, rlaifv.service.serve_cli, rlaifv.bench.service\n"
        "heavy = ('torch', 'transformers', 'rlaifv.reward.model_pair', 'rlaifv.service.app', 'fastapi')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "assert callable(rlaifv.service.serve_cli.serve) and callable(rlaifv.bench.service.bench_service)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
