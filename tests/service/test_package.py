"""The package's public surface, and imports kept light for the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_exports() -> None:
    import service

    assert service.__all__ == ["Settings", "create_app"]
    assert callable(service.create_app) and service.Settings().max_n >= 1


def test_cli_modules_do_not_import_torch_or_the_app() -> None:
    code = (
        "import sys, service, service.serve_cli, service.bench_service\n"
        "heavy = [m for m in ('torch', 'transformers', 'reward.pair', 'service.app', 'fastapi') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(service.serve_cli.serve) and callable(service.bench_service.bench_service)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
