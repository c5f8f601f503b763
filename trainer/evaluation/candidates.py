"""Candidate answers for evaluation prompts: sampled once, cached, then picked by a selection rule.

A `Generator` samples n candidates per prompt and reports each one's RLAIF-V implicit reward (`dpo`) and,
when asked, its claim-verification reward (`claims`). Candidates are cached in a JSONL store keyed by the
generator's fingerprint (bundle files or served model), the prompt (id, image bytes, question) and the
sampling settings; an entry of n candidates also serves any smaller n (its first candidates), so a
best-of-32 run makes every best-of-N below it free and a rerun samples only what changed.

Selection rules over the first n candidates (so best-of-4 sees the first 4 of the 32 sampled for
best-of-32): `first` (plain decoding of one sample), `random` (a seeded random pick), `dpo` (argmax of the
implicit reward), `claims` (argmax of the claims reward); ties go to the lower index, as the service's.
"""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from rlaifv.reward.scoring import select_best
from rlaifv.trainer.data import names_a_file
from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.store import JsonlStore, digest

Rule = Literal["first", "random", "dpo", "claims"]
RULES: tuple[Rule, ...] = ("first", "random", "dpo", "claims")


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt; `id` is stable across runs (it seeds the sampling and keys the cache)."""

    id: str
    image: Any  # a path, raw bytes, a base64/data-URL string or a PIL image
    question: str


class Sampling(BaseModel):
    """Decoding settings of every candidate (the same for all N: RLAIF-V's "deconfounded" sampling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0, le=5, description="0 is greedy (every candidate the same).")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(
        64,
        ge=1,
        description="Most new tokens per answer; None: the generator's own default (a service's"
        " RLAIFV_DEFAULT_MAX_TOKENS, or what the prompt leaves of the model's positions in process), fitted to the"
        " context.",
    )
    seed: int = Field(0, ge=0, description="Base seed; each prompt samples with a seed made of it and its id.")


class Sampled(BaseModel):
    """n candidates of one prompt with their rewards (index-aligned)."""

    texts: list[str]
    dpo: list[float]
    claims: list[float] | None = None

    @model_validator(mode="after")
    def _aligned(self) -> Sampled:
        if len(self.dpo) != len(self.texts) or (self.claims is not None and len(self.claims) != len(self.texts)):
            raise ValueError("one reward per candidate")
        return self

    def head(self, n: int) -> Sampled:
        return Sampled(texts=self.texts[:n], dpo=self.dpo[:n], claims=None if self.claims is None else self.claims[:n])


class Generator(Protocol):
    """Samples candidates; `fingerprint` names the model(s) so cached samples of another model never match."""

    fingerprint: str

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]: ...


def image_bytes(image: Any) -> bytes:
    """The image's bytes: read a path, decode base64 / a data URL, or save a PIL image as PNG."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, Path) or (isinstance(image, str) and len(image) < 4096 and names_a_file(Path(image))):
        return Path(image).read_bytes()
    if isinstance(image, str):
        data = image.split(",", 1)[1] if image.startswith("data:") else image
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise DataError(f"image {image[:60]!r} is neither a file nor base64") from None
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()
    raise DataError(f"cannot read an image from {type(image).__name__}")


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed that does not move when prompts are added, removed or reordered (48 bits)."""
    return int(digest("seed", seed, prompt_id)[:12], 16)


class CandidateCache:
    """Sampled candidates in a JSONL store; a stored entry serves any n up to its own."""

    def __init__(self, path: str | Path | None) -> None:
        self.store = JsonlStore(path)

    @staticmethod
    def key(fingerprint: str, prompt: Prompt, sampling: Sampling) -> str:
        return digest(
            "candidates", fingerprint, prompt.id, image_bytes(prompt.image), prompt.question, sampling.model_dump()
        )

    def get(self, key: str, n: int, claims: bool) -> Sampled | None:
        row = self.store.get(key)
        if row is None:
            return None
        sampled = Sampled.model_validate(row["sampled"])
        if len(sampled.texts) < n or (claims and sampled.claims is None):
            return None
        return sampled.head(n)

    def put(self, key: str, sampled: Sampled) -> None:
        self.store.put(key, {"sampled": sampled.model_dump()})


def sample_all(
    generator: Generator,
    prompts: Sequence[Prompt],
    n: int,
    sampling: Sampling,
    *,
    claims: bool = False,
    cache: CandidateCache | None = None,
    batch: int = 8,
    progress: bool = True,
) -> tuple[list[Sampled], int]:
    """n candidates per prompt (from the cache where it has them); also returns how many prompts were sampled now."""
    cache = cache or CandidateCache(None)
    keys = [cache.key(generator.fingerprint, p, sampling) for p in prompts]
    out: list[Sampled | None] = [cache.get(k, n, claims) for k in keys]
    todo = [i for i, s in enumerate(out) if s is None]
    with tqdm(total=len(todo), desc=f"sampling {n} per prompt", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            fresh = generator.sample([prompts[i] for i in chunk], n, sampling, claims)
            if len(fresh) != len(chunk):
                raise DataError(f"the generator answered {len(fresh)} of {len(chunk)} prompts")
            for i, sampled in zip(chunk, fresh, strict=True):
                if len(sampled.texts) != n:
                    raise DataError(f"prompt {prompts[i].id}: the generator returned {len(sampled.texts)} of {n}")
                cache.put(keys[i], sampled)
                out[i] = sampled
            bar.update(len(chunk))
    return [s for s in out if s is not None], len(todo)


def pick(sampled: Sampled, rule: Rule, n: int, *, seed: int = 0, prompt_id: str = "") -> int:
    """Index of the candidate `rule` picks among the first n."""
    if not 1 <= n <= len(sampled.texts):
        raise ValueError(f"n={n} but {len(sampled.texts)} candidates were sampled")
    if rule == "first":
        return 0
    if rule == "random":
        return random.Random(digest("pick", seed, prompt_id, n)).randrange(n)
    if rule == "dpo":
        return select_best(sampled.dpo[:n])
    if rule == "claims":
        if sampled.claims is None:
            raise ValueError("claims rewards were not computed (sample with claims=True)")
        return select_best(sampled.claims[:n])
    raise ValueError(f"unknown selection rule {rule!r}")


def picked_texts(
    prompts: Sequence[Prompt], sampled: Sequence[Sampled], rule: Rule, n: int, *, seed: int = 0
) -> list[str]:
    return [s.texts[pick(s, rule, n, seed=seed, prompt_id=p.id)] for p, s in zip(prompts, sampled, strict=True)]
