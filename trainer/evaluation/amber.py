"""AMBER discriminative evaluation, counted as the official `inference.py` counts it.

Inputs, in AMBER's published layout: `data/annotations.json` ([{id, type, truth, ...}], the entry of
question `id` is the one with that id, else the id-th entry as the official script indexes it), the
queries `data/query/query_discriminative*.json` ([{id, image, query}], for generating answers), and
answers [{id, response}] (a JSON list as the official script reads, or JSONL).

Types: `discriminative-hallucination` (existence), `discriminative-attribute-{state,number,action}`
(attribute), any other discriminative type (relation). "No" is the positive class: precision = correct
"No" answers / "No" answers, recall = correct "No" answers / questions whose truth is "no", F1 = 2PR /
(P + R + eps) with the official eps (1e-4; 1e-3 for existence, as the official script has it). The
official script matches the exact strings "Yes" and "No"; that is the default (`match="exact"`), and any
other response is wrong and counted as unparsed. `match="first-word"` reads "Yes, there is ..." as yes
(what the CLI uses for answers it generates: a model says "Yes." or "No, there is not."). A number with
nothing to divide by (no question, no "No" answer, no question whose truth is no) is None, where the
official script would divide by zero.

The generative task (CHAIR, Cover, Hal, Cog) is not computed: the official one needs NLTK's POS tagger
and spaCy `en_core_web_lg` word vectors (a 0.8-similarity synonym test), neither of which installs from
a package registry; generative items in an answers file are counted as skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rlaifv.trainer.errors import DataError, ImageDecodeError
from rlaifv.trainer.evaluation.candidates import Prompt
from rlaifv.trainer.evaluation.files import read_models, read_numbered_models, refuse_repeats
from rlaifv.trainer.evaluation.images import first_problem, problem_detail

Match = Literal["exact", "first-word"]
DIMENSIONS = ("existence", "attribute", "relation")
ATTRIBUTE_KINDS = ("state", "number", "action")
EPSILON = {"existence": 1e-3}  # the official script's F1 epsilon per dimension; 1e-4 elsewhere


class Annotation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int | None = None
    type: str
    truth: str | list[str]


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    response: str


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    image: str
    query: str


def group_of(kind: str) -> tuple[str, str | None] | None:
    """(dimension, attribute kind) of an annotation type; None for the generative task."""
    if kind == "generative":
        return None
    if kind == "discriminative-hallucination":
        return "existence", None
    if kind.startswith("discriminative-attribute-"):
        return "attribute", kind.removeprefix("discriminative-attribute-")
    return "relation", None


def read_annotations(path: str | Path) -> dict[int, Annotation]:
    """Annotations by question id (the `id` field, else the 1-based position, as the official script indexes)."""
    rows = read_models(path, Annotation)
    return {row.id if row.id is not None else number: row for number, row in enumerate(rows, 1)}


def read_responses(path: str | Path) -> list[Response]:
    numbered = read_numbered_models(path, Response)
    refuse_repeats([(number, r.id) for number, r in numbered], path, "question id {key} is answered twice")
    return [r for _, r in numbered]


def read_queries(path: str | Path, images: str | Path) -> list[Prompt]:
    """Generation prompts; every image is decoded here, so a bad one is named by its row before any model loads (it
    failed at its batch, after the earlier ones were sampled, naming nothing), and a repeated id is refused."""
    numbered = read_numbered_models(path, Query)
    refuse_repeats([(number, q.id) for number, q in numbered], path, "question id {key} is asked twice")
    prompts = []
    for number, q in numbered:
        image = Path(images) / q.image
        if not image.is_file():
            raise DataError(f"image {image} not found", source=str(path), row=number)
        prompts.append(Prompt(str(q.id), image, q.query))
    bad = first_problem([p.image for p in prompts])
    if bad is not None:
        index, problem = bad
        raise ImageDecodeError(problem_detail(prompts[index].image, problem), source=str(path), row=numbered[index][0])
    return prompts


def parse_yes_no(response: str, match: Match = "exact") -> Literal["yes", "no"] | None:
    if match == "exact":
        return {"Yes": "yes", "No": "no"}.get(response)  # type: ignore[return-value]
    words = response.strip().split()
    first = words[0].strip(".,!:;\"'()").lower() if words else ""
    return first if first in ("yes", "no") else None  # type: ignore[return-value]


def scores(rows: Sequence[tuple[str, str | None]], eps: float = 1e-4) -> dict[str, float | None]:
    """(truth, parsed answer) pairs -> accuracy, precision, recall, F1 with "no" as the positive class.

    Precision without a "No" answer, recall without a question whose truth is no, and F1 without both are
    None: 0.0 would be a measured value, and the official script stops there with a division by zero."""
    n = len(rows)
    said_no = sum(a == "no" for _, a in rows)
    truly_no = sum(t == "no" for t, _ in rows)
    hits = sum(t == "no" and a == "no" for t, a in rows)
    precision = hits / said_no if said_no else None
    recall = hits / truly_no if truly_no else None
    f1 = None if precision is None or recall is None else 2 * precision * recall / (precision + recall + eps)
    return {
        "accuracy": sum(t == a for t, a in rows) / n if n else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "questions": n,
        "unparsed": sum(a is None for _, a in rows),
        "yes_rate": sum(a == "yes" for _, a in rows) / n if n else None,
    }


def check_scorable(ids: Sequence[int], annotations: dict[int, Annotation]) -> None:
    """Refuse queries with no discriminative question among them before any is answered (a generative query file
    was sampled whole, then refused: 1,004 queries for nothing on a real model)."""
    unknown = [i for i in ids if i not in annotations]
    if unknown:
        raise DataError(f"question id {unknown[0]} is not in the annotations")
    if ids and not any(group_of(annotations[i].type) is not None for i in ids):
        raise DataError(
            f"no discriminative question among the {len(ids)} queries (AMBER's generative task is not computed):"
            " give query_discriminative.json or query_all.json"
        )


def evaluate_amber(
    responses: Sequence[Response], annotations: dict[int, Annotation], *, match: Match = "exact"
) -> dict[str, Any]:
    groups: dict[str, list[tuple[str, str | None]]] = {}
    items = []
    skipped = 0
    for r in responses:
        ann = annotations.get(r.id)
        if ann is None:
            raise DataError(f"question id {r.id} is not in the annotations")
        group = group_of(ann.type)
        if group is None:
            skipped += 1
            continue
        if not isinstance(ann.truth, str) or ann.truth.lower() not in ("yes", "no"):
            raise DataError(f"question id {r.id}: a discriminative truth must be 'yes' or 'no', got {ann.truth!r}")
        dimension, kind = group
        pair = (ann.truth.lower(), parse_yes_no(r.response, match))
        groups.setdefault(dimension, []).append(pair)
        if kind is not None:
            groups.setdefault(f"attribute_{kind}", []).append(pair)
        items.append({"id": r.id, "type": ann.type, "truth": pair[0], "answer": pair[1], "response": r.response})
    if not items:
        raise DataError(
            f"no discriminative question to score ({skipped} generative answer(s) skipped: AMBER's generative"
            " task is not computed)"
        )
    everything = [p for d in DIMENSIONS for p in groups.get(d, [])]
    metrics: dict[str, Any] = {"overall": scores(everything)}
    for name in (*DIMENSIONS, *(f"attribute_{k}" for k in ATTRIBUTE_KINDS)):
        if groups.get(name):
            metrics[name] = scores(groups[name], EPSILON.get(name, 1e-4))
    metrics["generative_skipped"] = skipped
    return {"metrics": metrics, "items": items}


def amber_metric(prompts: Sequence[Prompt], annotations: dict[int, Annotation], match: Match = "exact") -> Any:
    """AMBER metrics of answers given in prompt order (for the scaling curve)."""

    def metric(texts: Sequence[str]) -> dict[str, Any]:
        responses = [Response(id=int(p.id), response=t) for p, t in zip(prompts, texts, strict=True)]
        metrics: dict[str, Any] = evaluate_amber(responses, annotations, match=match)["metrics"]
        return metrics

    return metric
