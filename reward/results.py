"""Typed results of scoring and best-of-N, shared by the Python API and the service."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rlaifv.reward.scoring import select_best


class ClaimCheck(BaseModel):
    """One claim of an answer as the yes/no labeler judged it ('claims' reward mode); also the wire model."""

    claim: str
    question: str = Field(description="The yes/no question put to the labeler.")
    p_yes: float = Field(description="p(yes) / (p(yes) + p(no)) from the labeler's first answer token.")
    accepted: bool = Field(description="p_yes > 0.5.")
    repeated: bool = Field(description="The claim restates an earlier claim of the same answer (penalised).")


class TopToken(BaseModel):
    """One token of the raw (temperature 1) policy distribution at an answer position."""

    token: str = Field(description="The token's text in context (leading space included).")
    token_id: int
    logprob: float


class TokenLogprob(TopToken):
    """An answer token with its raw policy log-prob (a term of the reward) and the most likely alternatives."""

    top_logprobs: list[TopToken] = Field(default_factory=list)


class Candidate(BaseModel):
    """One answer with its reward and the terms the reward was computed from."""

    text: str
    reward: float = Field(description="The reward this candidate was ranked by (depends on the reward mode).")
    implicit_reward: float = Field(description="The RLAIF-V implicit reward beta/T * (policy - reference log-prob).")
    policy_logprob: float = Field(description="sum_t log pi_theta(y_t | x, y_<t), raw logits (temperature 1).")
    reference_logprob: float = Field(description="sum_t log pi_ref(y_t | x, y_<t), raw logits (temperature 1).")
    num_tokens: int = Field(description="T: answer tokens scored, end-of-turn included.")
    finish_reason: Literal["stop", "length", "given"] = "given"
    token_ids: list[int] = Field(default_factory=list, exclude=True)
    token_logprobs: list[TokenLogprob] | None = Field(
        None, exclude=True, description="Per answer token (end-of-turn excluded), when the task asked for them."
    )
    claims: list[ClaimCheck] | None = Field(None, description="Per-claim verdicts when the 'claims' reward was used.")


class Ranking(BaseModel):
    """Candidates in their original order plus the index of the best one."""

    candidates: list[Candidate]
    best_index: int
    timings: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, candidates: list[Candidate], timings: dict[str, float] | None = None) -> Ranking:
        """The ranking of scored candidates: the highest reward, ties to the lower index.

        An answer sampled or given twice (the same tokens, text and finish) gets its first copy's numbers: the
        same tokens scored in two rows of a batch differ by float noise (~1e-8), which decided between equal
        answers against the lower-index rule, and showed one answer with two rewards."""
        first: dict[tuple[tuple[int, ...], str, str], Candidate] = {}
        same: list[Candidate] = []
        for candidate in candidates:
            key = (tuple(candidate.token_ids), candidate.text, candidate.finish_reason)
            original = first.setdefault(key, candidate)
            same.append(candidate if original is candidate else _scored_as(candidate, original))
        best = select_best([c.reward for c in same])
        return cls(candidates=same, best_index=best, timings=dict(timings or {}))

    @property
    def best(self) -> Candidate:
        return self.candidates[self.best_index]

    @property
    def rewards(self) -> list[float]:
        return [c.reward for c in self.candidates]


def _scored_as(candidate: Candidate, original: Candidate) -> Candidate:
    """`candidate` with `original`'s scores (the same answer)."""
    scores = ("reward", "implicit_reward", "policy_logprob", "reference_logprob", "token_logprobs", "claims")
    return candidate.model_copy(update={name: getattr(original, name) for name in scores})
