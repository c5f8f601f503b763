"""Preference pairs from scored candidates, as RLAIF-V builds them.

- Any two answers to the same prompt whose scores differ by >= `min_score_gap`
  form a candidate pair (higher score = chosen).
- Exact and near duplicates are skipped (word n-gram Jaccard >= threshold).
- At most `max_pairs_per_prompt` pairs per prompt: largest score gap first,
  seeded random order among equal gaps, answers not reused while others remain.
- Length balancing: if chosen answers are on average shorter than rejected ones
  (fewer words, beyond `length_tolerance`), the pairs where the chosen answer is
  shortest relative to the rejected one are removed until the means balance —
  so DPO does not learn "shorter is better" instead of "fewer false claims".
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rlaifv.trainer.data import PreferenceRow
from rlaifv.trainer.errors import ConfigError
from rlaifv.trainer.feedback import PromptFeedback, ScoredAnswer


@dataclass
class PairConfig:
    min_score_gap: float = field(
        default=1.0, metadata={"help": "Minimum score difference between chosen and rejected."}
    )
    max_pairs_per_prompt: int = field(default=2, metadata={"help": "Pairs kept per prompt (RLAIF-V: about 2)."})
    length_balance: bool = field(
        default=True, metadata={"help": "Remove pairs until chosen answers are not shorter on average."}
    )
    length_tolerance: float = field(
        default=0.05, metadata={"help": "Allowed relative shortfall of mean chosen length."}
    )
    length_drop: Literal["ratio", "random"] = field(
        default="ratio",
        metadata={
            "help": "Which pairs the length filter drops: 'ratio' (RLAIF-V: the shortest chosen relative to its"
            " rejected first, a threshold) or 'random' (any pair whose chosen is shorter, seeded). Where a"
            " hallucination adds an object, 'ratio' drops every such pair and keeps those whose chosen names an"
            " extra true object, so DPO may learn 'more objects is better'; 'random' keeps both kinds."
        },
    )
    dedup_ngram: int = field(default=10, metadata={"help": "Word n-gram size of the near-duplicate test."})
    dedup_threshold: float = field(
        default=0.9, metadata={"help": "Jaccard similarity at or above which a pair is a near duplicate."}
    )
    keep_verified: bool = field(
        default=False,
        metadata={
            "help": "Only pairs whose chosen answer keeps at least as many verified (accepted, non-repeated) claims"
            " as the rejected one: the pair then teaches dropping false claims, not true ones. An alternative to"
            " the length filter where hallucinations make answers longer."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for tie-breaking among equal score gaps."})

    def __post_init__(self) -> None:
        if self.min_score_gap <= 0:
            raise ConfigError("min_score_gap must be > 0")
        if self.max_pairs_per_prompt < 1:
            raise ConfigError("max_pairs_per_prompt must be >= 1")
        if not 0 <= self.length_tolerance < 1:
            raise ConfigError("length_tolerance must be in [0, 1)")
        if self.length_drop not in ("ratio", "random"):
            raise ConfigError("length_drop must be 'ratio' or 'random'")
        if self.dedup_ngram < 1:
            raise ConfigError("dedup_ngram must be >= 1")
        if not 0 < self.dedup_threshold <= 1:
            raise ConfigError("dedup_threshold must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairStats:
    prompts: int = 0
    answers: int = 0
    answers_without_claims: int = 0  # scored 0 with nothing verified: a claim splitter that found none
    prompts_with_pairs: int = 0
    candidate_pairs: int = 0
    near_duplicates: int = 0
    verified_removed: int = 0
    capped: int = 0  # left out by pairs.max_pairs_per_prompt
    selected: int = 0
    length_removed: int = 0
    length_threshold: float | None = None
    mean_chosen_words: float = 0.0
    mean_rejected_words: float = 0.0
    mean_score_gap: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def why_no_pairs(stats: PairStats, config: PairConfig) -> str:
    """What removed every pair, and which setting would keep some (it said "raise the temperature" when the
    length filter had removed them)."""
    if not stats.candidate_pairs and stats.answers and stats.answers_without_claims * 2 > stats.answers:
        return (
            f"{stats.answers_without_claims} of the {stats.answers} answers have no claims, so they all score 0:"
            " the claim splitter found none in them (with feedback.splitter=llm, check what feedback.llm_name"
            " replies: [] for every answer? A rerun reads the saved feedback.parquet again, as the server's address"
            " decides no score: delete it to ask the mended server again)"
        )
    if not stats.candidate_pairs:
        return (
            f"no two answers to one of the {stats.prompts} prompts differ in score by pairs.min_score_gap="
            f"{config.min_score_gap:g}: sample more candidates or prompts, or raise the temperature"
        )
    removed = [
        (stats.verified_removed, "dropped by pairs.keep_verified"),
        (stats.near_duplicates, "near duplicates (pairs.dedup_threshold)"),
        (stats.capped, f"over pairs.max_pairs_per_prompt={config.max_pairs_per_prompt}"),
        (
            stats.length_removed,
            "removed by length balancing, their chosen answers being shorter (pairs.length_balance=false keeps them)",
        ),
    ]
    return f"{stats.candidate_pairs} candidate pairs: " + "; ".join(f"{n} {why}" for n, why in removed if n)


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_CJK_PUNCTUATION = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20"
_WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}{_CJK_PUNCTUATION}]+")


def _words(text: str) -> list[str]:
    """Whitespace-separated words; in Chinese and Japanese, which leave no spaces, each character counts as one
    (the whole answer was one word: length balancing and the near-duplicate test saw nothing)."""
    return _WORD.findall(text.lower())


def ngram_jaccard(a: str, b: str, n: int = 10) -> float:
    """Jaccard similarity of word n-grams (n shrinks to the shorter answer's length)."""
    wa, wb = _words(a), _words(b)
    if not wa or not wb:
        return 1.0 if wa == wb else 0.0
    n = max(1, min(n, len(wa), len(wb)))
    ga = {tuple(wa[i : i + n]) for i in range(len(wa) - n + 1)}
    gb = {tuple(wb[i : i + n]) for i in range(len(wb) - n + 1)}
    return len(ga & gb) / len(ga | gb)


def verified_claims(answer: ScoredAnswer) -> int:
    """Claims of an answer the labeler accepted, each counted once."""
    return sum(bool(c.get("accepted")) and not c.get("repeated") for c in answer.claims)


def build_pairs(
    feedback: Sequence[PromptFeedback], config: PairConfig | None = None
) -> tuple[list[PreferenceRow], PairStats]:
    """Pairs (as `PreferenceRow`s ready for DPO) from scored candidates, and what was kept or removed."""
    config = config or PairConfig()
    rng = random.Random(config.seed)
    stats = PairStats(prompts=len(feedback))
    selected: list[tuple[PromptFeedback, int, int]] = []
    for item in feedback:
        answers = item.answers
        stats.answers += len(answers)
        stats.answers_without_claims += sum(a.num_claims == 0 for a in answers if a.text.strip())
        candidates = []
        for i, a in enumerate(answers):
            for j, b in enumerate(answers):
                if a.score - b.score < config.min_score_gap:
                    continue
                stats.candidate_pairs += 1
                if config.keep_verified and verified_claims(a) < verified_claims(b):
                    stats.verified_removed += 1
                    continue
                if (
                    a.text.strip() == b.text.strip()
                    or ngram_jaccard(a.text, b.text, config.dedup_ngram) >= config.dedup_threshold
                ):
                    stats.near_duplicates += 1
                    continue
                candidates.append((-(a.score - b.score), rng.random(), i, j))
        candidates.sort()
        chosen_pairs: list[tuple[int, int]] = []
        used: set[int] = set()
        for fresh_only in (True, False):
            for _, _, i, j in candidates:
                if len(chosen_pairs) >= config.max_pairs_per_prompt:
                    break
                if (i, j) in chosen_pairs or (fresh_only and (i in used or j in used)):
                    continue
                chosen_pairs.append((i, j))
                used.update((i, j))
        stats.capped += len(candidates) - len(chosen_pairs)
        if chosen_pairs:
            stats.prompts_with_pairs += 1
        selected.extend((item, i, j) for i, j in chosen_pairs)

    if config.length_balance and selected:
        selected, stats.length_removed, stats.length_threshold = _balance_lengths(
            selected, config.length_tolerance, rng if config.length_drop == "random" else None
        )

    rows = []
    for item, i, j in selected:
        chosen, rejected = item.answers[i], item.answers[j]
        meta = {"chosen_score": chosen.score, "rejected_score": rejected.score, "prompt_id": item.id}
        rows.append(PreferenceRow(f"{item.id}:{i}>{j}", item.image, item.question, chosen.text, rejected.text, meta))
    stats.selected = len(rows)
    if rows:
        stats.mean_chosen_words = sum(len(_words(r.chosen)) for r in rows) / len(rows)
        stats.mean_rejected_words = sum(len(_words(r.rejected)) for r in rows) / len(rows)
        stats.mean_score_gap = sum(r.meta["chosen_score"] - r.meta["rejected_score"] for r in rows) / len(rows)
    return rows, stats


def _balance_lengths(
    selected: list[tuple[PromptFeedback, int, int]], tolerance: float, rng: random.Random | None = None
) -> tuple[list[tuple[PromptFeedback, int, int]], int, float | None]:
    """Drop pairs whose chosen answer is shorter until mean chosen >= (1 - tol) * mean rejected: the smallest
    chosen/rejected length ratio first (the threshold is reported), or in `rng`'s order (no threshold)."""

    def lengths(entry: tuple[PromptFeedback, int, int]) -> tuple[int, int]:
        item, i, j = entry
        return len(_words(item.answers[i].text)), len(_words(item.answers[j].text))

    if rng is None:
        ordered = sorted(selected, key=lambda e: lengths(e)[0] / max(1, lengths(e)[1]))
    else:
        ordered = [e for e in selected if lengths(e)[0] < lengths(e)[1]]
        rng.shuffle(ordered)
    total_c = sum(lengths(e)[0] for e in selected)
    total_r = sum(lengths(e)[1] for e in selected)
    removed: set[int] = set()
    threshold = None
    for entry in ordered:
        if total_c >= (1 - tolerance) * total_r:
            break
        c, r = lengths(entry)
        if c >= r:
            break
        total_c, total_r = total_c - c, total_r - r
        removed.add(id(entry))
        threshold = c / max(1, r)
    kept = [e for e in selected if id(e) not in removed]
    return kept, len(removed), threshold if rng is None else None
