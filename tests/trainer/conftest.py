"""Fixtures of the trainer tests: a tiny LLaVA built through the real save/load path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests import their helpers from trainer_testkit.py beside this file (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LLaVA (word tokenizer over reward.tiny.DEFAULT_WORDS) saved with save_pretrained."""
    from rlaifv.trainer.shapes.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The models' kept hashes (`dpo._file_digest`) go to a folder of this session, not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLAIFV_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))
        yield
