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

An answer with no claims (empty, or punctuation only) scores 0.0, the best
score, in both modes. That is RLAIF-V's formula, kept on purpose: scores stay
comparable with the paper's and with the shipped shapes-world results; a
caller for whom such answers matter filters them before ranking.

Splitting and question writing are protocols, so a fine-tuned LLM (as the
RLAIF-V code uses) can replace the spaCy rules without touching the scoring.
The rules are English rules; for other languages they only cut sentences
(CJK sentence marks included) and each sentence is one claim.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
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
# An ASCII "?" stays on the claim: the shipped shapes-world bundle's recorded evaluation holds sampled captions
# like "a green?", and stripping it changes their questions and so those numbers.
_SENTENCE_END = ".!。．｡！？"
# spaCy's English tokenizer cuts at whitespace first, and CJK text has none, so its sentencizer never sees these.
_CJK_SENTENCE_END = re.compile(r"(?<=[。．｡！？])")
_FULL_STOP_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA")
_BULLET = re.compile(r"^[ \t]*[-*•‣◦][ \t]+", re.M)
_NUMBER = re.compile(r"(?:^|(?<=\s))\(?(?P<n>\d{1,2})[.)](?=\s|$)")
_RELATIVE_PRONOUNS = frozenset({"which", "who", "whom", "whose"})
_CLAUSE_TAGS = frozenset({"VBG", "VBN", "WDT", "WP", "WP$"})
_ATTRIBUTIVE_POS = frozenset({"DET", "ADJ", "NUM"})


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
    """Rule-based English splitter: list items and sentences, then lists of objects into one claim per object.

    "There is a red circle, a blue square and a cat." -> three "There is ..." claims;
    a bare list ("a red circle and a blue square.") is read as existential too;
    a participial or relative clause after a comma stays with its object
    ("a man wearing a hat, holding an umbrella" -> "There is a man wearing a hat.",
    "There is a man holding an umbrella."); any other sentence is one claim.
    Bulleted and numbered items are cut before sentences, and CJK sentence
    marks end sentences; past that the rules are English only: a sentence in
    another language is one claim.
    """

    def __init__(self, nlp: Any | None = None) -> None:
        self.nlp = nlp or english_pipeline()

    def split(self, answer: str) -> list[str]:
        claims: list[str] = []
        for segment in _segments(answer.strip()):
            for sent in self.nlp(segment).sents:
                claims += _sentence_claims(sent)
        return claims


def _segments(answer: str) -> list[str]:
    """The answer cut at list markers and CJK sentence marks (numbers count as markers only in sequence 1, 2, ...)."""
    cuts = [(m.start(), m.end()) for m in _BULLET.finditer(answer)]
    last = 0
    for m in _NUMBER.finditer(answer):
        line_start = answer[: m.start()].rsplit("\n", 1)[-1].strip() == ""
        number = int(m.group("n"))
        if (line_start and (number == 1 or last)) or (last and number == last + 1):
            cuts.append((m.start(), m.end()))
            last = number
    if not cuts and not _CJK_SENTENCE_END.search(answer):
        return [answer] if answer else []
    pieces, position = [], 0
    for start, end in sorted(cuts):
        pieces.append(answer[position:start])
        position = end
    pieces.append(answer[position:])
    return [part.strip() for piece in pieces for part in _CJK_SENTENCE_END.split(piece) if part.strip()]


def _sentence_claims(sent: Any) -> list[str]:
    """One sentence's claims; Chinese and Japanese ones end in their own full stop."""
    lead = len(sent.text) - len(sent.text.lstrip())
    text = sent.text.strip().rstrip(_SENTENCE_END).strip()
    if not text:
        return []
    end = "。" if unicodedata.name(text[-1], "").startswith(_FULL_STOP_SCRIPTS) else "."
    match = _EXISTENTIAL.match(text)
    if match:
        start, verb = match.end(), (match.group("verb") or match.group("verb2") or "is").lower()
        body = text[start:]
    elif _BARE_LIST_START.match(text) and not _VERB.search(text):
        start, verb, body = 0, "is", text
    else:
        return [text + end]
    items = _attach_clauses(_list_items(body), sent, sent.start_char + lead + start)
    return [f"There {_verb_for(item, verb)} {item}{end}" for item in items]


def _list_items(body: str) -> list[tuple[int, str]]:
    """Split a list of objects at commas and "and", keeping "a black and white cat" whole; (offset, item) pairs."""
    parts = _LIST_SEPARATOR.split(body)
    offsets = [0, *accumulate(len(part) for part in parts)]
    items = [(offsets[0] + len(parts[0]) - len(parts[0].lstrip()), parts[0].strip())]
    for k in range(2, len(parts), 2):
        separator, item = parts[k - 1], parts[k].strip()
        offset = offsets[k] + len(parts[k]) - len(parts[k].lstrip())
        last = items[-1][1].split()[-1].lower() if items[-1][1] else ""
        if item and last in _LEADING_ADJECTIVES and not _SINGULAR_START.match(item) and not _PLURAL_START.match(item):
            items[-1] = (items[-1][0], items[-1][1] + separator + item)
        else:
            items.append((offset, item))
    return [(offset, item) for offset, item in items if item]


def _attach_clauses(items: list[tuple[int, str]], sent: Any, base: int) -> list[str]:
    """Give a list item that is a clause ("holding an umbrella", "which is red") the object it describes.

    The clause belongs to the noun phrase before it: it completes a bare noun
    phrase ("a car, parked here" -> "a car parked here") and otherwise makes
    its own claim about that noun phrase, as an LLM splitter would.
    """
    by_start = {token.idx: token for token in sent}
    out: list[str] = []
    head = ""
    for offset, item in items:
        start = base + offset
        first = by_start.get(start)
        if out and first is not None and _opens_clause(first):
            if out[-1] == head:
                out[-1] = f"{head} {item}"
            else:
                out.append(f"{head} {item}")
            continue
        inner = [t for t in sent if start < t.idx < start + len(item) and _opens_clause(t) and not _attributive(t)]
        head = item[: inner[0].idx - start].rstrip(" ,") if inner else item
        out.append(item)
    return out


def _opens_clause(token: Any) -> bool:
    """A participle or relative pronoun: by the tagger where the pipeline has one, else by the lookup lemma."""
    if token.doc.has_annotation("TAG"):
        return token.tag_ in _CLAUSE_TAGS
    word = token.lower_
    if word in _RELATIVE_PRONOUNS:
        return True
    return word.endswith(("ing", "ed")) and bool(token.lemma_) and token.lemma_.lower() != word


def _attributive(token: Any) -> bool:
    """A participle used as an adjective ("a parked car", "a big striped cat")."""
    if token.i == 0:
        return False
    before = token.doc[token.i - 1]
    if token.doc.has_annotation("POS"):
        return before.pos_ in _ATTRIBUTIVE_POS
    return before.lower_ in _DETERMINERS or before.lower_ in _LEADING_ADJECTIVES


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
        text = claim.strip().rstrip(_SENTENCE_END).strip()
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
    """Per answer: (claim, question, repeated) triples; plus the unique questions to ask.

    N samples often repeat an answer or a claim: each distinct answer is split
    once and each distinct claim is normalised and rewritten once.
    """
    nlp = getattr(splitter, "nlp", None)
    splits: dict[str, list[str]] = {}
    rewritten: dict[str, tuple[str, str]] = {}
    plans: list[list[tuple[str, str, bool]]] = []
    unique: dict[str, None] = {}
    for answer in answers:
        if answer not in splits:
            splits[answer] = splitter.split(answer)
        seen: set[str] = set()
        plan = []
        for claim in splits[answer]:
            if claim not in rewritten:
                rewritten[claim] = (normalize_claim(claim, nlp), writer.question(claim))
            key, question = rewritten[claim]
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
