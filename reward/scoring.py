"""The RLAIF-V self-reward and best-of-N selection.

    r(x, y) = beta / T * sum_t [ log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]

`normalize="mean"` (default) is the length-normalised form the paper states;
`normalize="sum"` drops 1/T and gives the plain DPO implicit reward, which
favours short answers. T counts the answer's tokens, end-of-turn included when
it was generated (or appended to a given answer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Normalize = Literal["mean", "sum"]
RewardMode = Literal["dpo", "claims"]
ClaimScore = Literal["count", "expected"]


class RewardConfig(BaseModel):
    """How log-prob ratios become a reward; stored in the bundle, overridable per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: RewardMode = Field(
        "dpo",
        description="'dpo': the RLAIF-V implicit reward (policy vs reference log-ratio). 'claims': divide-and-conquer"
        " claim verification by the yes/no labeler (see claim_score).",
    )
    beta: float = Field(0.1, gt=0.0, description="DPO temperature; RLAIF-V trains with 0.1.")
    normalize: Normalize = Field("mean", description="'mean' divides by the answer's token count T; 'sum' does not.")
    repeat_penalty: float = Field(1.0, ge=0.0, description="'claims' mode: penalty per repeated claim.")
    claim_threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="'claims' mode: a claim is accepted when the labeler's p(yes) exceeds this."
    )
    claim_score: ClaimScore = Field(
        "count",
        description="'claims' mode: 'count' = -(claims with p(yes) <= claim_threshold), RLAIF-V's feedback score;"
        " 'expected' = -(sum over claims of the labeler's p(no)), the expected number of hallucinated claims, which"
        " also ranks the candidates a count ties, but favours answers with fewer claims. Both subtract repeat_penalty *"
        " (repeated claims). Shapes-world measurements of both: docs/shapes-world.md.",
    )


def implicit_reward(policy_logprob: float, reference_logprob: float, num_tokens: int, config: RewardConfig) -> float:
    """beta * (log pi_theta(y|x) - log pi_ref(y|x)), divided by T when normalising by mean."""
    if num_tokens < 1:
        raise ValueError("an answer has at least one token")
    ratio = policy_logprob - reference_logprob
    if config.normalize == "mean":
        ratio /= num_tokens
    return config.beta * ratio


def select_best(rewards: Sequence[float]) -> int:
    """Index of the highest reward; ties go to the lower index, NaN never wins."""
    if not rewards:
        raise ValueError("no rewards to select from")
    best = 0
    best_value = -math.inf
    for index, value in enumerate(rewards):
        if not math.isnan(value) and value > best_value:
            best, best_value = index, value
    return best


def top_k(rewards: Sequence[float], k: int) -> list[int]:
    """Indices of the k highest rewards, best first; ties keep the lower index first."""
    order = sorted(range(len(rewards)), key=lambda i: (-(rewards[i] if not math.isnan(rewards[i]) else -math.inf), i))
    return order[:k]
