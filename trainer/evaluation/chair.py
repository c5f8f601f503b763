"""CHAIR as Object HalBench defines it, over any object extractor.

- CHAIRi = hallucinated object mentions / all object mentions
- CHAIRs = answers with at least one hallucinated mention / answers
- recall = true objects mentioned / true objects (so saying nothing cannot win)
- repeats = answers mentioning some object more than once / answers (so
  repeating true objects to please a judge cannot win)

The extractor maps an answer to canonical object mentions in order: the
shapes world parses "colour shape" pairs; for the real Object HalBench it is
spaCy lemmas + a synonym table onto the 80 COCO classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

ObjectExtractor = Callable[[str], list[str]]


@dataclass(frozen=True)
class ChairReport:
    chair_i: float
    chair_s: float
    recall: float
    repeats: float
    answers: int
    mentions: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def chair(answers: Sequence[str], truths: Sequence[set[str] | Sequence[str]], extract: ObjectExtractor) -> ChairReport:
    if len(answers) != len(truths):
        raise ValueError("one ground-truth object set per answer")
    mentions = hallucinated = answers_with_hallucination = repeated = 0
    found = total_true = 0
    for answer, truth in zip(answers, truths, strict=True):
        truth = set(truth)
        objects = extract(answer)
        bad = [o for o in objects if o not in truth]
        mentions += len(objects)
        hallucinated += len(bad)
        answers_with_hallucination += bool(bad)
        repeated += len(objects) != len(set(objects))
        found += len(truth & set(objects))
        total_true += len(truth)
    n = max(len(answers), 1)
    return ChairReport(
        chair_i=hallucinated / mentions if mentions else 0.0,
        chair_s=answers_with_hallucination / n,
        recall=found / total_true if total_true else 0.0,
        repeats=repeated / n,
        answers=len(answers),
        mentions=mentions,
    )


@dataclass(frozen=True)
class YesNoReport:
    """F1 takes 'yes' (the object exists) as the positive class."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_rate: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def yes_no(predicted_yes: Sequence[bool], truly_yes: Sequence[bool]) -> YesNoReport:
    pairs = list(zip(predicted_yes, truly_yes, strict=True))
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(t and not p for p, t in pairs)
    correct = sum(p == t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(pairs), 1)
    return YesNoReport(correct / n, precision, recall, f1, sum(p for p, _ in pairs) / n)
