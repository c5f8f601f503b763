"""The RLAIF-V reward core: model pairs, token log-probs, the self-reward, best-of-N, bundles.

Heavy libraries (torch, transformers) load lazily, so importing `reward` for
its types or errors stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from reward.errors import AnswerError, BundleError, ImageError, InvalidInputError, ModelLoadError, RewardError

if TYPE_CHECKING:
    from reward.bundle import BundleManifest, load_bundle
    from reward.pair import ModelPair
    from reward.results import Candidate, Ranking
    from reward.sampling import SamplingParams
    from reward.scoring import RewardConfig, implicit_reward, select_best

__all__ = [
    "AnswerError",
    "BundleError",
    "BundleManifest",
    "Candidate",
    "ImageError",
    "InvalidInputError",
    "ModelLoadError",
    "ModelPair",
    "Ranking",
    "RewardConfig",
    "RewardError",
    "SamplingParams",
    "implicit_reward",
    "load_bundle",
    "select_best",
]

_LAZY = {
    "BundleManifest": "reward.bundle",
    "load_bundle": "reward.bundle",
    "ModelPair": "reward.pair",
    "Candidate": "reward.results",
    "Ranking": "reward.results",
    "SamplingParams": "reward.sampling",
    "RewardConfig": "reward.scoring",
    "implicit_reward": "reward.scoring",
    "select_best": "reward.scoring",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
