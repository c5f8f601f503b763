"""COCO object mentions in text, by spaCy rules and our synonym table (`data/coco_synonyms.txt`).

RLAIF-V reads answers with spaCy's `en_core_web_trf` (lemmas, noun tags) and a synonym table onto the 80
COCO classes. No trained spaCy pipeline can be downloaded here, so this uses what installs from PyPI:
`spacy.blank("en")` (the rule tokenizer) and the tables of `spacy-lookups-data` (`lexicon.py`). A word's
lemma is used only when it is a noun's singular ("knives" -> "knife", "geese" -> "goose"): the lookup
lemmatizer has no part of speech and turns verbs and other words into objects ("crew" -> crow, "born" ->
bear, "taxes" -> taxis, "cooked" -> cook). A table `!modifier` word ("orange", "baby", "ski") names no object
when it modifies the noun after it ("orange cat", "baby elephant", "ski slope"): the next word is a COCO
name, or a WordNet noun that does not read as a verb ("An orange sits", "The baby sleeps" keep theirs).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.lexicon import lexicon

TABLE = Path(__file__).parent / "data" / "coco_synonyms.txt"

# Words after which a modifier word is the head of its phrase ("an orange on the table", "the baby is ..."); many
# are WordNet nouns too ("in", "he": indium, helium).
FUNCTION_WORDS = frozenset(
    str.split(
        """a an the and or but nor of in on at with by for from to into onto upon near next beside besides behind
        under over above below between among around across along through during before after against beneath
        underneath inside outside is are was were be been being am has have had do does did can could will would
        shall should may might must that which who whom whose while as than then so too very also not no its it
        this these those there here he she they we you i me him her them us his their our your my some any all
        both each either neither every few many much more most several such one two three four five six"""
    )
)
COLOURS = frozenset(
    str.split("red orange yellow green blue purple pink brown black white gray grey golden silver tan beige")
)


@dataclass(frozen=True)
class SynonymTable:
    """word or two-word phrase -> COCO category, plus the table's `!no-object` and `!modifier` lines."""

    names: dict[str, str]
    no_object: frozenset[str]
    modifiers: frozenset[str]

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.names.values()))


def read_table(path: str | Path = TABLE) -> SynonymTable:
    """Parse a synonym table; a word listed under two categories is an error (the match would be arbitrary)."""
    names: dict[str, str] = {}
    specials: dict[str, set[str]] = {"!no-object": set(), "!modifier": set()}
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"synonym table {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"synonym table {path} is not UTF-8 text: {exc}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        head, _, rest = line.partition(":")
        head = head.strip().lower()
        words = [w.strip().lower() for w in rest.split(",") if w.strip()]
        if head.startswith("!"):
            if head not in specials:
                raise DataError(f"unknown special line {head!r}", source=str(path), row=number)
            specials[head].update(words)
            continue
        for word in [head, *words]:
            if len(word.split()) > 2:
                raise DataError(f"{word!r}: at most two words per name", source=str(path), row=number)
            if names.get(word, head) != head:
                raise DataError(f"{word!r} names both {names[word]!r} and {head!r}", source=str(path), row=number)
            names[word] = head
    return SynonymTable(names, frozenset(specials["!no-object"]), frozenset(specials["!modifier"]))


@cache
def _nlp() -> Any:
    import spacy

    return spacy.blank("en")


@dataclass(frozen=True)
class Word:
    text: str
    forms: tuple[str, ...]  # the word, then its singular when it is a plural noun

    @property
    def is_word(self) -> bool:
        return self.text[:1].isalpha()


def words(text: str, known: Collection[str] = ()) -> list[Word]:
    """Lowercased tokens with their usable forms; hyphens inside compounds are dropped ("hot-dog" = "hot dog").

    The text is tokenized as written, and each token again lowercased: the tokenizer splits "dog.There" (a
    missing space after a full stop) at the capital letter, which lowercasing the text first would hide, and
    only lowercased does it split a period off a word of mixed case ("BuS." -> "bus", "."), as it did before.
    `known` words count as nouns when a plural's singular is looked up ("suvs" -> "suv")."""
    out = []
    lex = lexicon()
    for token in _nlp()(text):
        if token.is_space:
            continue
        for word in _lower_tokens(token.text):
            if word == "-":
                continue
            singular = lex.singular(word, known) if word[:1].isalpha() else None
            out.append(Word(word, (word, singular) if singular else (word,)))
    return out


@lru_cache(maxsize=65536)
def _lower_tokens(token: str) -> tuple[str, ...]:
    return tuple(t.text for t in _nlp().tokenizer(token.lower()) if not t.is_space)


class CocoObjects:
    """Maps text to COCO category mentions in order, repeats kept: the rule `ObjectExtractor` of `chair`."""

    def __init__(self, table: SynonymTable | str | Path | None = None) -> None:
        self.table = table if isinstance(table, SynonymTable) else read_table(table or TABLE)

    def category(self, name: str) -> str | None:
        """The category a COCO category name or synonym stands for (instance annotations use the names)."""
        return self.table.names.get(name.lower())

    def _single(self, word: Word) -> str | None:
        return next((self.table.names[f] for f in word.forms if f in self.table.names), None)

    def _pairs(self, a: Word, b: Word) -> list[str]:
        return [f"{x} {y}" for x, y in itertools.product(a.forms, b.forms)]

    def _words(self, text: str) -> list[Word]:
        return words(text, self.table.names)

    def _before_noun(self, ws: Sequence[Word], i: int) -> bool:
        """Whether ws[i] directly modifies a following noun: a COCO name, or a noun that does not read as a verb."""
        if i + 1 >= len(ws):
            return False
        nxt = ws[i + 1]
        if ws[i].text in COLOURS and nxt.text in ("and", "or", ",") and i + 2 < len(ws):
            return ws[i + 2].text in COLOURS  # "orange and white cat"
        if not nxt.is_word or nxt.text in FUNCTION_WORDS:
            return False
        if self._single(nxt) is not None:
            return True
        lex = lexicon()
        return lex.is_noun(nxt.text) and not lex.reads_as_verb(nxt.text)

    def mentions(self, text: str) -> list[str]:
        """Every COCO mention of `text`: `!no-object` phrases skipped, two-word names first, then single words."""
        ws = self._words(text)
        out: list[str] = []
        i = 0
        while i < len(ws):
            if i + 1 < len(ws):
                pairs = self._pairs(ws[i], ws[i + 1])
                if any(p in self.table.no_object for p in pairs):
                    i += 2
                    continue
                found = next((self.table.names[p] for p in pairs if p in self.table.names), None)
                if found is not None:
                    out.append(found)
                    i += 2
                    continue
            modifier = ws[i].text in self.table.modifiers
            if not (modifier and self._before_noun(ws, i)):
                single = self._single(ws[i])
                if single is not None:
                    out.append(single)
            i += 1
        return out

    __call__ = mentions

    def _head(self, chunk: Sequence[Word]) -> tuple[str, str] | None:
        """(category, the head's lemma) of a noun-phrase chunk, or None."""
        if len(chunk) >= 2:
            pairs = self._pairs(chunk[-2], chunk[-1])
            if any(p in self.table.no_object for p in pairs):
                return None
            found = next((self.table.names[p] for p in pairs if p in self.table.names), None)
            if found is not None:
                return found, f"{chunk[-2].forms[-1]} {chunk[-1].forms[-1]}"
        single = self._single(chunk[-1]) if chunk else None
        return (single, chunk[-1].forms[-1]) if single is not None else None

    def listed(self, phrases: Iterable[str]) -> list[str]:
        """Objects an LLM listed ("red car", "cup of coffee") -> COCO mentions, as RLAIF-V counts them.

        Each phrase is cut into noun-phrase chunks at function words and punctuation (a stand-in for the
        original's noun-tag runs); a chunk names a category by its head: its last two words when they are a
        two-word name, else its last word ("red car" -> car, "dog leash" -> nothing). A listed name counts
        once per answer (repeats of the same name dropped, as the original does); two different names of
        one category ("man", "woman") count twice, as they do in the original.
        """
        seen: set[str] = set()
        out: list[str] = []
        for phrase in phrases:
            chunk: list[Word] = []
            for word in [*self._words(str(phrase)), Word(",", (",",))]:
                if word.is_word and word.text not in FUNCTION_WORDS:
                    chunk.append(word)
                    continue
                head = self._head(chunk)
                if head is not None and head[1] not in seen:
                    seen.add(head[1])
                    out.append(head[0])
                chunk = []
        return out
