"""Handing a trained policy to the service: a bundle folder (see `reward.bundle`) with provenance."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Literal

from rlaifv.trainer.errors import RunStateError


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("rlaifv", "torch", "transformers", "peft", "accelerate", "spacy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def export_bundle(
    folder: str | Path,
    *,
    policy_dir: str | Path,
    reference_dir: str | Path,
    policy_type: Literal["full", "lora"],
    beta: float,
    name: str = "rlaifv",
    normalize: Literal["mean", "sum"] = "mean",
    end_of_turn: str | None = None,
    provenance: dict[str, Any] | None = None,
    copy: bool = True,
) -> Path:
    """Write a bundle the service loads unchanged, then re-read its manifest to check it.

    The reference is the model the trained policy is compared against when
    serving: for the iterative loop, the initial (SFT) model.
    """
    from rlaifv.reward.bundle import read_manifest, write_bundle
    from rlaifv.reward.scoring import RewardConfig

    policy_dir, reference_dir = Path(policy_dir), Path(reference_dir)
    for what, path in (("policy", policy_dir), ("reference", reference_dir)):
        if not path.is_dir():
            raise RunStateError(f"cannot export: {what} folder {path} does not exist")
    provenance = {
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": software_versions(),
    } | (provenance or {})
    write_bundle(
        folder,
        policy=policy_dir,
        reference=reference_dir,
        policy_type=policy_type,
        reward=RewardConfig(beta=beta, normalize=normalize),
        name=name,
        end_of_turn=end_of_turn,
        provenance=provenance,
        copy=copy,
    )
    read_manifest(folder)
    return Path(folder)
