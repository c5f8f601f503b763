"""Shared fixtures: tiny random-weight bundles built offline through the real save/load path."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-model tiny bundle: random reference, perturbed policy."""
    from rlaifv.trainer.shapes.tiny_vlm import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_lora_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle whose policy is a random LoRA adapter over the reference."""
    from rlaifv.trainer.shapes.tiny_vlm import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-lora", lora=True)


@pytest.fixture(scope="session")
def tiny_pair(tiny_bundle: Path):
    from rlaifv.reward import load_bundle

    return load_bundle(tiny_bundle)


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 32)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def red_png() -> bytes:
    return png_bytes()
