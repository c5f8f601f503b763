"""What a shapes-world build must achieve, checked on an evaluation report.

One definition serves the docs' seeds x threads table (`rlaifv demo matrix`)
and the quality tests, so the two cannot drift apart. Each target compares the
served (last) model with the reference, or one selection rule with a random
pick of the *same* candidates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """The thresholds; the quality tests loosen them by a margin for sampling noise."""

    chair_ratio: float = 0.35  # aligned CHAIRi <= this x the reference's (issue 14's raised target; was 0.5)
    recall_drop: float = 0.03  # aligned recall >= reference recall - this
    f1_drop: float = 0.01  # aligned yes/no F1 >= reference F1 - this
    claims_ratio: float = 0.5  # claims best-of-N CHAIRi <= this x random-of-N
    implicit_ratio: float = 0.6  # implicit-reward best-of-N CHAIRi <= this x random-of-N (issue 14; was 1.0)


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(entry: Any) -> float:
    """A metric from a summary ((mean, std)) or a single run (a float)."""
    return float(entry[0]) if isinstance(entry, list | tuple) else float(entry)


def _ratio(value: float, base: float) -> float:
    """value / base, with 0/0 = 0 (nothing to beat, nothing worse) and x/0 = inf."""
    if base:
        return value / base
    return 0.0 if value == 0 else float("inf")


def check_targets(reference: dict[str, Any], aligned: dict[str, Any], limits: Limits | None = None) -> list[Check]:
    """The targets for one build: `reference` and `aligned` are `evaluate_pair` results or their summaries."""
    limits = limits or Limits()
    ref_chair = _mean(reference["model"]["chair_i"])
    ref_recall = _mean(reference["model"]["recall"])
    ref_f1 = _mean(reference["yes_no"]["f1"])
    chair_i = _mean(aligned["model"]["chair_i"])
    recall = _mean(aligned["model"]["recall"])
    f1 = _mean(aligned["yes_no"]["f1"])
    random_pick = _mean(aligned["random"]["chair_i"])
    claims = _mean(aligned["bon_claims"]["chair_i"])
    implicit = _mean(aligned["bon_implicit"]["chair_i"])
    ratio = _ratio(chair_i, ref_chair)
    claims_ratio = _ratio(claims, random_pick)
    implicit_ratio = _ratio(implicit, random_pick)
    return [
        Check("chair_i_vs_reference", ratio, limits.chair_ratio, ratio <= limits.chair_ratio),
        Check("recall_change", recall - ref_recall, -limits.recall_drop, recall - ref_recall >= -limits.recall_drop),
        Check("yes_no_f1_change", f1 - ref_f1, -limits.f1_drop, f1 - ref_f1 >= -limits.f1_drop),
        Check("claims_bon_vs_random", claims_ratio, limits.claims_ratio, claims_ratio <= limits.claims_ratio),
        Check("implicit_bon_vs_random", implicit_ratio, limits.implicit_ratio, implicit_ratio <= limits.implicit_ratio),
    ]


def served_label(models: dict[str, Any]) -> str:
    """The label of the served model in a report: the last one that is not the reference."""
    return [label for label in models if label != "reference"][-1]
