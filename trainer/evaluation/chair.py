"""CHAIR as Object HalBench defines it, over any object extractor.

- CHAIRi = hallucinated object mentions / all object mentions
- CHAIRs = answers with at least one hallucinated mention / answers
- recall = true objects mentioned / true objects (so saying nothing cannot win)
- repeats = answers mentioning some object more than once / answers (so
  repeating true objects to please a judge cannot win)

The extractor maps an answer to canonical object mentions in order: the
shapes world parses "colour shape" pairs; for the real Object HalBench it is
spaCy lemmas + a synonym table onto the 80 COCO classes (`coco_objects.py`), or
objects an LLM listed (`llm_objects.py`).
`chair_items` gives the per-answer counts, `chair_totals` every number made of
them (also RLAIF-V's response-level CHAIRs); `chair` is the shapes world's view.
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


@dataclass(frozen=True)
class ChairItem:
    """One answer's objects: every mention in order, the hallucinated ones, and the true objects it found."""

    mentions: tuple[str, ...]
    hallucinated: tuple[str, ...]
    found: frozenset[str]
    truth: frozenset[str]

    @property
    def repeated(self) -> bool:
        return len(self.mentions) != len(set(self.mentions))


def chair_items(
    answers: Sequence[str], truths: Sequence[set[str] | frozenset[str] | Sequence[str]], extract: ObjectExtractor
) -> list[ChairItem]:
    """The per-answer counts every CHAIR number is made of (one extractor call per answer)."""
    if len(answers) != len(truths):
        raise ValueError("one ground-truth object set per answer")
    return items_from_mentions([extract(answer) for answer in answers], truths)


def items_from_mentions(
    mentions: Sequence[Sequence[str]], truths: Sequence[set[str] | frozenset[str] | Sequence[str]]
) -> list[ChairItem]:
    """Per-answer counts from mentions already extracted (e.g. listed by an LLM)."""
    if len(mentions) != len(truths):
        raise ValueError("one ground-truth object set per answer")
    items = []
    for objects, truth in zip(mentions, truths, strict=True):
        truth = frozenset(truth)
        objects = tuple(objects)
        items.append(ChairItem(objects, tuple(o for o in objects if o not in truth), truth & frozenset(objects), truth))
    return items


def chair_totals(items: Sequence[ChairItem]) -> dict[str, float | None]:
    """CHAIRi, CHAIRs, RLAIF-V's response-level CHAIRs, recall and repeats over per-answer counts.

    `chair_s_object_answers` is what RLAIF-V reports as "Response Hall": answers with a hallucination over
    answers that mention at least one object (`CHAIRs_refine` in its evaluation script); `chair_s`
    divides by all answers. A number with nothing to measure on is None, not 0.0 (which reads as perfect):
    no mention (CHAIRi, both CHAIRs: with no object named, nothing was checked), no true object (recall),
    no answer (repeats).
    """
    mentions = sum(len(i.mentions) for i in items)
    hallucinated = sum(len(i.hallucinated) for i in items)
    bad_answers = sum(bool(i.hallucinated) for i in items)
    with_objects = sum(bool(i.mentions) for i in items)
    total_true = sum(len(i.truth) for i in items)
    n = len(items)
    return {
        "chair_i": hallucinated / mentions if mentions else None,
        "chair_s": bad_answers / n if with_objects else None,
        "chair_s_object_answers": bad_answers / with_objects if with_objects else None,
        "recall": sum(len(i.found) for i in items) / total_true if total_true else None,
        "repeats": sum(i.repeated for i in items) / n if n else None,
        "answers": n,
        "answers_with_objects": with_objects,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
    }


def chair(answers: Sequence[str], truths: Sequence[set[str] | Sequence[str]], extract: ObjectExtractor) -> ChairReport:
    """The shapes world's summary (CHAIRi, CHAIRs over all answers, recall, repeats); its reports want numbers,
    so a number with nothing to measure on is 0.0 there."""
    totals = chair_totals(chair_items(answers, truths, extract))
    return ChairReport(
        chair_i=totals["chair_i"] or 0.0,
        chair_s=totals["chair_s"] or 0.0,
        recall=totals["recall"] or 0.0,
        repeats=totals["repeats"] or 0.0,
        answers=len(answers),
        mentions=int(totals["mentions"] or 0),
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
