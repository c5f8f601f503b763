"""The RLAIF-V reward core: model pairs, token log-probs, the self-reward, best-of-N, bundles.

Heavy libraries (torch, transformers) load lazily, so importing `reward` for
its types or errors stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rlaifv.reward.errors import (
    AnswerError,
    BundleError,
    ContextLengthError,
    ImageError,
    InvalidInputError,
    ModelLoadError,
    RewardError,
)

if TYPE_CHECKING:
    from rlaifv.reward.bundle import BundleManifest, load_bundle
    from rlaifv.reward.model_pair import ModelPair
    from rlaifv.reward.results import Candidate, Ranking
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.reward.scoring import RewardConfig, implicit_reward, select_best

__all__ = [
    "AnswerError",
    "BundleError",
    "BundleManifest",
    "Candidate",
    "ContextLengthError",
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
    "BundleManifest": "rlaifv.reward.bundle",
    "load_bundle": "rlaifv.reward.bundle",
    "ModelPair": "rlaifv.reward.model_pair",
    "Candidate": "rlaifv.reward.results",
    "Ranking": "rlaifv.reward.results",
    "SamplingParams": "rlaifv.reward.sampling",
    "RewardConfig": "rlaifv.reward.scoring",
    "implicit_reward": "rlaifv.reward.scoring",
    "select_best": "rlaifv.reward.scoring",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
