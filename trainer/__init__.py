"""The RLAIF-V trainer: AI feedback, preference pairs, DPO, the iterative loop, bundle export.

Heavy libraries (torch, transformers, accelerate) load inside the functions
that need them, so importing `trainer` (and building the CLI) stays cheap.

    from trainer import IterateConfig, run_iterate, ListPromptSource
    run_iterate(IterateConfig(model="sft/", output_dir="runs/a"), ListPromptSource.from_path("prompts.parquet"))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from trainer.errors import (
    ConfigError,
    DataError,
    EmptyAnswerError,
    ImageDecodeError,
    MissingColumnError,
    RunStateError,
    TrainerError,
)

if TYPE_CHECKING:
    from trainer.data import ListPromptSource, PreferenceRow, PromptItem, PromptSource, read_preferences, read_prompts
    from trainer.dpo import DPOResult, train_dpo
    from trainer.dpo_config import DPOConfig
    from trainer.export import export_bundle
    from trainer.feedback import PromptFeedback, ScoredAnswer, collect_feedback
    from trainer.feedback_config import FeedbackConfig
    from trainer.iterate import EvalHook, IterateResult, RoundContext, run_iterate
    from trainer.iterate_config import IterateConfig
    from trainer.pairs import PairConfig, build_pairs

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
    "ListPromptSource": "trainer.data",
    "PreferenceRow": "trainer.data",
    "PromptItem": "trainer.data",
    "PromptSource": "trainer.data",
    "read_preferences": "trainer.data",
    "read_prompts": "trainer.data",
    "DPOResult": "trainer.dpo",
    "train_dpo": "trainer.dpo",
    "DPOConfig": "trainer.dpo_config",
    "export_bundle": "trainer.export",
    "PromptFeedback": "trainer.feedback",
    "ScoredAnswer": "trainer.feedback",
    "collect_feedback": "trainer.feedback",
    "FeedbackConfig": "trainer.feedback_config",
    "EvalHook": "trainer.iterate",
    "IterateResult": "trainer.iterate",
    "RoundContext": "trainer.iterate",
    "run_iterate": "trainer.iterate",
    "IterateConfig": "trainer.iterate_config",
    "PairConfig": "trainer.pairs",
    "build_pairs": "trainer.pairs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
