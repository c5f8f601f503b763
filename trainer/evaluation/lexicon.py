"""Which words are nouns, their singulars, and which read as verbs: what the rule extractor needs of a tagger.

RLAIF-V tags answers with spaCy's `en_core_web_trf`; no trained spaCy pipeline installs from a package registry
here (reward/claims.py falls back to a blank one too). So the facts come from spacy-lookups-data's English
tables, already a dependency: WordNet 3.0's noun and verb index and irregular forms, and the lemmatizer's
suffix rules ("ies" -> "y"). WordNet gives parts of speech per word, not per use: "sleeps" and "lies" are
plural nouns and verbs. Which reading a description usually means is in `data/verb_forms.txt`, made by
`python -m rlaifv.trainer.evaluation.lexicon` from the same package's Brown clusters (words used alike in
running text share a cluster): such an -s form reads as a verb when most -s words of its cluster that are
only verbs or only plural nouns are verbs.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rlaifv.trainer.errors import DataError

VERB_FORMS = Path(__file__).parent / "data" / "verb_forms.txt"
THIRD_PERSON = ("s", "es", "ies")  # the verb suffix rules of a present-tense -s form


def _tables(*names: str) -> list[Any]:
    try:
        import spacy_lookups_data  # type: ignore[import-untyped]
        from spacy.util import load_language_data
    except ImportError:
        raise DataError("the rule extractor needs spacy-lookups-data: pip install spacy-lookups-data") from None
    return [load_language_data(spacy_lookups_data.en[name]) for name in names]


@dataclass(frozen=True)
class Lexicon:
    """WordNet's nouns and verbs with their inflection rules, plus the -s forms that read as verbs."""

    nouns: frozenset[str]
    verbs: frozenset[str]
    plurals: Mapping[str, str]  # irregular plural -> singular, the first WordNet lists ("taxes" -> "tax")
    verb_inflections: frozenset[str]  # irregular verb forms: "sat", "slept", "born", "sank"
    noun_rules: tuple[tuple[str, str], ...]
    verb_rules: tuple[tuple[str, str], ...]
    verb_forms: frozenset[str] = frozenset()

    @classmethod
    def load(cls, verb_forms: Path | None = VERB_FORMS) -> Lexicon:
        index, exceptions, rules = _tables("lemma_index", "lemma_exc", "lemma_rules")
        forms: frozenset[str] = frozenset()
        if verb_forms is not None:
            lines = (line.split("#", 1)[0].strip() for line in verb_forms.read_text().splitlines())
            forms = frozenset(line for line in lines if line)
        return cls(
            nouns=frozenset(index["noun"]),
            verbs=frozenset(index["verb"]),
            plurals={word: lemmas[0] for word, lemmas in exceptions["noun"].items() if lemmas},
            verb_inflections=frozenset(exceptions["verb"]),
            noun_rules=tuple((a, b) for a, b in rules["noun"] if a),
            verb_rules=tuple((a, b) for a, b in rules["verb"] if a),
            verb_forms=forms,
        )

    def singular(self, word: str, known: Collection[str] = ()) -> str | None:
        """The singular of a plural noun ("knives" -> "knife"; "suvs" -> "suv" when `known` has it), else None.

        Only plural -> singular: a lemma of any other kind turns verbs and unrelated words into objects
        ("crew" -> crow, "born" -> bear, "sank" -> sink)."""
        if word in self.plurals:
            return self.plurals[word]
        if word.endswith("ss"):
            return None
        stems = [word[: -len(a)] + b for a, b in self.noun_rules if word.endswith(a) and len(word) > len(a) + 1]
        return next((s for s in stems if s in known), None) or next((s for s in stems if s in self.nouns), None)

    def is_noun(self, word: str) -> bool:
        return word in self.nouns or self.singular(word) is not None

    def third_person(self, word: str) -> bool:
        """Whether `word` is a verb's present-tense -s form ("sleeps", "carries")."""
        return not word.endswith("ss") and any(
            word.endswith(a) and word[: -len(a)] + b in self.verbs for a, b in self.verb_rules if a in THIRD_PERSON
        )

    def reads_as_verb(self, word: str) -> bool:
        """Whether `word`, right after a noun, is more likely a verb than a noun that the first one modifies."""
        if word in self.verb_forms or word in self.verb_inflections or word.endswith("ing"):
            return True
        return word.endswith("ed") and any(
            word.endswith(a) and word[: -len(a)] + b in self.verbs for a, b in self.verb_rules if a == "ed"
        )


@cache
def lexicon() -> Lexicon:
    return Lexicon.load()


def derive_verb_forms(lex: Lexicon, clusters: Mapping[str, int]) -> list[str]:
    """The -s forms that are both plural nouns and verbs and that read as verbs by their Brown cluster."""
    votes: dict[int, list[int]] = {}
    ambiguous: list[tuple[str, int]] = []
    for word, cluster in clusters.items():
        if not cluster or not word.endswith("s") or not word.isalpha() or not word.islower():
            continue
        noun, verb = lex.singular(word) is not None, lex.third_person(word)
        if noun and verb:
            ambiguous.append((word, cluster))
        elif noun or verb:
            votes.setdefault(cluster, [0, 0])[verb] += 1
    return sorted(word for word, cluster in ambiguous if (v := votes.get(cluster, [0, 0]))[1] > v[0])


def main(path: Path = VERB_FORMS) -> None:
    """Rewrite `data/verb_forms.txt` from the installed spacy-lookups-data."""
    import spacy_lookups_data

    (clusters,) = _tables("lexeme_cluster")
    words = derive_verb_forms(Lexicon.load(verb_forms=None), clusters)
    header = (
        "# -s forms that are both a plural noun and a verb in WordNet 3.0 and read as verbs in running text\n"
        "# (most -s words of their Brown cluster are verbs). Made by `python -m rlaifv.trainer.evaluation.lexicon`\n"
        f"# from spacy-lookups-data {spacy_lookups_data.__version__}: WordNet 3.0 Copyright 2006 by Princeton\n"
        "# University, all rights reserved (its license: spacy_lookups_data/data/en_license.txt).\n"
    )
    path.write_text(header + "".join(f"{w}\n" for w in words))
    print(f"wrote {len(words)} words to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
