"""The RLAIF-V trainer: AI feedback, preference pairs, DPO, the iterative loop, bundle export.

Heavy libraries (torch, transformers, accelerate) load inside the functions
that need them, so importing `trainer` (and building the CLI) stays cheap.

    from rlaifv.trainer import IterateConfig, run_iterate, ListPromptSource
    run_iterate(IterateConfig(model="sft/", output_dir="runs/a"), ListPromptSource.from_path("prompts.parquet"))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rlaifv.trainer.errors import (
    ConfigError,
    DataError,
    EmptyAnswerError,
    ImageDecodeError,
    MissingColumnError,
    RunStateError,
    TrainerError,
)

if TYPE_CHECKING:
    from rlaifv.trainer.data import (
        ListPromptSource,
        PreferenceRow,
        PromptItem,
        PromptSource,
        read_preferences,
        read_prompts,
    )
    from rlaifv.trainer.dpo import DPOResult, train_dpo
    from rlaifv.trainer.dpo_config import DPOConfig
    from rlaifv.trainer.export import export_bundle
    from rlaifv.trainer.feedback import PromptFeedback, ScoredAnswer, collect_feedback
    from rlaifv.trainer.feedback_config import FeedbackConfig
    from rlaifv.trainer.iterate import EvalHook, IterateResult, RoundContext, run_iterate
    from rlaifv.trainer.iterate_config import IterateConfig
    from rlaifv.trainer.preference_pairs import PairConfig, build_pairs

__all__ = [
    "ConfigError",
    "DPOConfig",
    "DPOResult",
    "DataError",
    "EmptyAnswerError",
    "EvalHook",
    "FeedbackConfig",
    "ImageDecodeError",
    "IterateConfig",
    "IterateResult",
    "ListPromptSource",
    "MissingColumnError",
    "PairConfig",
    "PreferenceRow",
    "PromptFeedback",
    "PromptItem",
    "PromptSource",
    "RoundContext",
    "RunStateError",
    "ScoredAnswer",
    "TrainerError",
    "build_pairs",
    "collect_feedback",
    "export_bundle",
    "read_preferences",
    "read_prompts",
    "run_iterate",
    "train_dpo",
]

_LAZY = {
    "ListPromptSource": "rlaifv.trainer.data",
    "PreferenceRow": "rlaifv.trainer.data",
    "PromptItem": "rlaifv.trainer.data",
    "PromptSource": "rlaifv.trainer.data",
    "read_preferences": "rlaifv.trainer.data",
    "read_prompts": "rlaifv.trainer.data",
    "DPOResult": "rlaifv.trainer.dpo",
    "train_dpo": "rlaifv.trainer.dpo",
    "DPOConfig": "rlaifv.trainer.dpo_config",
    "export_bundle": "rlaifv.trainer.export",
    "PromptFeedback": "rlaifv.trainer.feedback",
    "ScoredAnswer": "rlaifv.trainer.feedback",
    "collect_feedback": "rlaifv.trainer.feedback",
    "FeedbackConfig": "rlaifv.trainer.feedback_config",
    "EvalHook": "rlaifv.trainer.iterate",
    "IterateResult": "rlaifv.trainer.iterate",
    "RoundContext": "rlaifv.trainer.iterate",
    "run_iterate": "rlaifv.trainer.iterate",
    "IterateConfig": "rlaifv.trainer.iterate_config",
    "PairConfig": "rlaifv.trainer.preference_pairs",
    "build_pairs": "rlaifv.trainer.preference_pairs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
