"""Divide-and-conquer claim verification: split an answer into claims, ask yes/no, count rejections.

Used twice with the same code: by the trainer to score sampled answers (AI
feedback for preference pairs), and by the service as the `claims` reward
mode (best-of-N by verification). An answer's score is

    count:    score = -(rejected claims)               - repeat_penalty * (repeated claims)
    expected: score = -(sum over claims of p(no))      - repeat_penalty * (repeated claims)

`count` is RLAIF-V's feedback score and the default. `expected` (the
expected number of hallucinated claims under the labeler's probabilities)
also ranks the candidates a count ties, by how sure the labeler is, but every
true claim costs a little, so it favours answers with fewer claims; in the
shapes world it picked fewer hallucinations than `count` on 5 of 6 models, at
0-6 points of recall (docs/shapes-world.md).

The repeat term matters: without it a policy learns to please the judge by
restating true claims.

Splitting and question writing are protocols, so a fine-tuned LLM (as the
RLAIF-V code uses) can replace the spaCy rules without touching the scoring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from rlaifv.reward.scoring import ClaimScore
from rlaifv.reward.yes_no import Labeler

YES_NO_SUFFIX = "Please answer yes or no."
_EXISTENTIAL = re.compile(
    r"^(?:there (?P<verb>is|are)|(?:the|this) (?:image|picture|photo) (?:shows|contains|depicts|has)|"
    r"i (?:can )?see|it shows|(?:in the (?:image|picture),? )?there (?P<verb2>is|are))\s+",
    re.I,
)
_LIST_SEPARATOR = re.compile(r"(\s*,\s*(?:and\s+)?|\s+and\s+|\s*;\s*)", re.I)
_BARE_LIST_START = re.compile(r"^(?:a|an|one|two|three|four|five|some|several)\s", re.I)
_SINGULAR_START = re.compile(r"^(?:a|an|one|the|this|that|another|each|every)\b", re.I)
_PLURAL_START = re.compile(
    r"^(?:two|three|four|five|six|seven|eight|nine|ten|[2-9]|\d\d+|several|many|multiple|both|few|a few|"
    r"a couple|a group|these|those|numerous)\b",
    re.I,
)
# "a black and white cat" is one object: a list item ending in one of these before an item without its own
# determiner is an adjective of the next (a trained spaCy pipeline's parser would say so; the blank one cannot).
_COLOURS = "black white red green blue yellow orange purple pink brown grey gray silver gold golden beige"
_LOOKS = "dark light bright pale striped spotted big small large little tall short long old young new"
_LEADING_ADJECTIVES = frozenset(f"{_COLOURS} {_LOOKS}".split())
_IMAGE_PLACE = re.compile(r"\b(?:in|on|within) (?:the|this) (?:image|picture|photo|photograph|scene)\b", re.I)
_VERB = re.compile(
    r"\b(?:is|are|was|were|has|have|had|does|do|did|shows?|contains?|sits?|stands?|holds?|looks?)\b", re.I
)
_DETERMINERS = {"a", "an", "the", "one", "some", "this", "that", "these", "those"}


class ClaimSplitter(Protocol):
    def split(self, answer: str) -> list[str]: ...


class QuestionWriter(Protocol):
    def question(self, claim: str) -> str: ...


@lru_cache(maxsize=1)
def english_pipeline() -> Any:
    """A trained spaCy English pipeline when one is installed, else blank + sentencizer + lookup lemmatizer."""
    import spacy

    for name in ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm"):
        try:
            return spacy.load(name)
        except OSError:
            continue
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    try:
        nlp.add_pipe("lemmatizer", config={"mode": "lookup"}).initialize()
    except Exception:  # spacy-lookups-data missing: claims still split, repeats match on lowercase words
        if "lemmatizer" in nlp.pipe_names:
            nlp.remove_pipe("lemmatizer")
    return nlp


class SpacyClaimSplitter:
    """Rule-based splitter: sentences, then lists of objects into one claim per object.

    "There is a red circle, a blue square and a cat." -> three "There is ..." claims;
    a bare list ("a red circle and a blue square.") is read as existential too;
    any other sentence is one claim.
    """

    def __init__(self, nlp: Any | None = None) -> None:
        self.nlp = nlp or english_pipeline()

    def split(self, answer: str) -> list[str]:
        claims: list[str] = []
        for sent in self.nlp(answer.strip()).sents:
            text = sent.text.strip().rstrip(".!").strip()
            if not text:
                continue
            match = _EXISTENTIAL.match(text)
            if match:
                body, verb = text[match.end() :], (match.group("verb") or match.group("verb2") or "is").lower()
            elif _BARE_LIST_START.match(text) and not _VERB.search(text):
                body, verb = text, "is"
            else:
                claims.append(text + ".")
                continue
            claims += [f"There {_verb_for(item, verb)} {item}." for item in _list_items(body)]
        return claims


def _list_items(body: str) -> list[str]:
    """Split a list of objects at commas and "and", keeping "a black and white cat" whole."""
    parts = _LIST_SEPARATOR.split(body)
    items = [parts[0].strip()]
    for separator, item in zip(parts[1::2], parts[2::2], strict=True):
        item = item.strip()
        last = items[-1].split()[-1].lower() if items[-1] else ""
        if item and last in _LEADING_ADJECTIVES and not _SINGULAR_START.match(item) and not _PLURAL_START.match(item):
            items[-1] += separator + item
        else:
            items.append(item)
    return [item for item in items if item]


def _verb_for(item: str, verb: str) -> str:
    """The item's number where its first word says it ("two cats", "a cat"), else the sentence's verb."""
    if _SINGULAR_START.match(item):
        return "is"
    if _PLURAL_START.match(item):
        return "are"
    return verb


class RuleQuestionWriter:
    """Claim -> general yes/no question, negations kept, suffixed as in RLAIF-V."""

    def __init__(self, suffix: str = YES_NO_SUFFIX) -> None:
        self.suffix = suffix

    def question(self, claim: str) -> str:
        text = claim.strip().rstrip(".!").strip()
        lowered = text[:1].lower() + text[1:]
        match = re.match(r"^there (is|are)\s+(.*)$", lowered, re.I)
        if match:
            place = "" if _IMAGE_PLACE.search(match.group(2)) else " in the image"
            core = f"{match.group(1).capitalize()} there {match.group(2)}{place}?"
        else:
            match = re.match(r"^(.+?)\s+(is|are|was|were)\s+(.*)$", lowered)
            if match:
                core = f"{match.group(2).capitalize()} {match.group(1)} {match.group(3)}?"
            else:
                core = f"Is it true that {lowered}?"
        return f"{core} {self.suffix}".strip()


def normalize_claim(claim: str, nlp: Any | None = None) -> str:
    """Key for repeat detection: lowercase lemmas without determiners or punctuation."""
    doc = (nlp or english_pipeline())(claim.lower())
    words = [(tok.lemma_ or tok.text) for tok in doc if not tok.is_punct and tok.text not in _DETERMINERS]
    return " ".join(words)


@dataclass
class ClaimVerdict:
    claim: str
    question: str
    p_yes: float
    accepted: bool
    repeated: bool


@dataclass
class AnswerVerdict:
    score: float
    claims: list[ClaimVerdict] = field(default_factory=list)
    rejected: int = 0
    repeated: int = 0


def plan_claims(
    answers: Sequence[str], splitter: ClaimSplitter, writer: QuestionWriter
) -> tuple[list[list[tuple[str, str, bool]]], list[str]]:
    """Per answer: (claim, question, repeated) triples; plus the unique questions to ask."""
    nlp = getattr(splitter, "nlp", None)
    plans: list[list[tuple[str, str, bool]]] = []
    unique: dict[str, None] = {}
    for answer in answers:
        seen: set[str] = set()
        plan = []
        for claim in splitter.split(answer):
            key = normalize_claim(claim, nlp)
            question = writer.question(claim)
            plan.append((claim, question, key in seen))
            seen.add(key)
            unique.setdefault(question, None)
        plans.append(plan)
    return plans, list(unique)


class JudgedClaim(Protocol):
    p_yes: float
    accepted: bool
    repeated: bool


def answer_score(claims: Sequence[JudgedClaim], *, scoring: ClaimScore = "count", repeat_penalty: float = 1.0) -> float:
    """An answer's score from its judged claims (the formula in the module docstring)."""
    wrong = sum(not c.accepted for c in claims) if scoring == "count" else sum(1.0 - c.p_yes for c in claims)
    return 0.0 - wrong - repeat_penalty * sum(c.repeated for c in claims)  # 0.0 - ... never yields -0.0


def score_plans(
    plans: Sequence[Sequence[tuple[str, str, bool]]],
    p_yes: dict[str, float],
    *,
    repeat_penalty: float = 1.0,
    threshold: float = 0.5,
    scoring: ClaimScore = "count",
) -> list[AnswerVerdict]:
    """Turn judged questions into answer scores (every mention judged; repeats also penalised)."""
    verdicts = []
    for plan in plans:
        claims = [
            ClaimVerdict(claim, question, p_yes[question], p_yes[question] > threshold, repeated)
            for claim, question, repeated in plan
        ]
        score = answer_score(claims, scoring=scoring, repeat_penalty=repeat_penalty)
        rejected = sum(not c.accepted for c in claims)
        verdicts.append(AnswerVerdict(score, claims, rejected, sum(c.repeated for c in claims)))
    return verdicts


def verify_answers(
    image: Any,
    answers: Sequence[str],
    labeler: Labeler,
    splitter: ClaimSplitter | None = None,
    writer: QuestionWriter | None = None,
    *,
    repeat_penalty: float = 1.0,
    threshold: float = 0.5,
    scoring: ClaimScore = "count",
) -> list[AnswerVerdict]:
    """Score answers to one image by divide-and-conquer verification (each distinct question asked once)."""
    splitter = splitter or SpacyClaimSplitter()
    writer = writer or RuleQuestionWriter()
    plans, questions = plan_claims(answers, splitter, writer)
    p_yes = dict(zip(questions, labeler.p_yes(image, questions), strict=True)) if questions else {}
    return score_plans(plans, p_yes, repeat_penalty=repeat_penalty, threshold=threshold, scoring=scoring)
