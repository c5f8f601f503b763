"""Fixtures of the bundle tests: a tiny reference with a perturbed full policy and a LoRA adapter over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than fighting over two cores with the rest of the suite."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders to make bundles from (each module its own): `reference`, a full `policy` perturbed from it, a
    `lora` over it."""
    from rlaifv.trainer.shapes.tiny_vlm import build_tiny_vlm, perturb_copy, random_lora

    root = tmp_path_factory.mktemp("sources")
    reference = build_tiny_vlm(root / "reference")
    return {
        "reference": reference,
        "policy": perturb_copy(reference, root / "policy"),
        "lora": random_lora(reference, root / "lora"),
    }
