"""Object HalBench: CHAIR over COCO images, as RLAIF-V's `eval_gpt_obj_halbench.py` computes it.

Inputs (local files):
- answers JSONL, what RLAIF-V's scripts read: `image_id` (COCO id), `question` or `prompt`, `answer` or
  `text` ("Assistant:" is removed, as the original does);
- or the prompts to generate answers for, e.g. RLAIF-V's `obj_halbench_300_with_image.jsonl`: `image_id`,
  `question` (or `prompt`) and the image as base64 in `image`, or a path in `image`/`image_path` (relative
  to the file or to an images folder), or only the id with COCO files (`COCO_val2014_<id>.jpg`) in a folder;
- COCO 2014 `instances_*.json` and `captions_*.json` for the ground truth (`coco_truth.py`).

Reported: CHAIRi (hallucinated mentions / mentions), CHAIRs over all answers, RLAIF-V's response-level
CHAIRs (`chair_s_object_answers`: over answers that mention a COCO object, its "Response Hall"), object
recall, answers with repeated objects, average words per answer, and per answer what was found.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from rlaifv.trainer.data import names_a_file
from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.candidates import Prompt
from rlaifv.trainer.evaluation.chair import chair_totals, items_from_mentions
from rlaifv.trainer.evaluation.coco_objects import CocoObjects
from rlaifv.trainer.evaluation.files import read_models
from rlaifv.trainer.evaluation.llm_objects import SHORT_ANSWER_WORDS, LLMObjectExtractor
from rlaifv.trainer.evaluation.report import failure_causes


class Answer(BaseModel):
    """One line of an answers file."""

    model_config = ConfigDict(extra="ignore")

    image_id: int
    question: str = Field("", validation_alias=AliasChoices("question", "prompt"))
    answer: str = Field(validation_alias=AliasChoices("answer", "text"))

    @field_validator("answer")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.replace("Assistant:", "").strip()


class PromptRow(BaseModel):
    """One line of a prompts file."""

    model_config = ConfigDict(extra="ignore")

    image_id: int
    question: str = Field(validation_alias=AliasChoices("question", "prompt"))
    image: str | None = Field(None, validation_alias=AliasChoices("image", "image_path"))

    @model_validator(mode="before")
    @classmethod
    def _path_when_no_image(cls, data: Any) -> Any:
        """pandas writes both columns, `"image": null` beside a valid `image_path`: the alias took the null."""
        if isinstance(data, dict) and data.get("image") is None and data.get("image_path") is not None:
            return {**data, "image": data["image_path"]}
        return data


def read_answers(path: str | Path) -> list[Answer]:
    return read_models(path, Answer)


def coco_image(folder: Path, image_id: int) -> Path | None:
    for name in (f"COCO_val2014_{image_id:012d}.jpg", f"COCO_train2014_{image_id:012d}.jpg", f"{image_id:012d}.jpg"):
        if (folder / name).is_file():
            return folder / name
    return None


# A value that names a file: a folder separator or a file extension (base64 has no ".", and an image's base64 that
# holds "/" decodes to an image first).
PATH_LIKE = re.compile(r"[/\\]|\.[A-Za-z][A-Za-z0-9]{1,4}$")


def _image(value: str, roots: Sequence[Path]) -> Path | bytes:
    """A file under one of `roots`, else the bytes of a base64 image (RLAIF-V's file embeds them).

    A ValueError says what the value is instead: a path that is not there ("img/cat1" is valid base64 too, and
    read as such it failed at generation as "data is not a recognised image", naming neither file nor row),
    base64 of something that is no image, or neither."""
    if not value.strip():
        raise ValueError("image is empty")
    short = len(value) < 4096
    if short:
        found = next((root / value for root in roots if names_a_file(root / value)), None)
        if found is not None:
            return found
    encoded = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        data: bytes | None = base64.b64decode(encoded, validate=True)
    except ValueError:
        data = None
    if data is not None and _is_image(data):
        return data
    if short and PATH_LIKE.search(value):
        raise ValueError(f"image file {value!r} not found (looked in {', '.join(str(r) for r in roots)})")
    if data is not None:
        raise ValueError(f"image {value[:60]!r} is base64 of something that is no image")
    raise ValueError(f"image {value[:60]!r} is neither a file nor base64")


def _is_image(data: bytes) -> bool:
    """Whether Pillow recognises `data` as an image (it reads the header only; the generator decodes with it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def read_prompts(path: str | Path, images: str | Path | None = None) -> list[tuple[Prompt, int]]:
    """Prompts to generate for, each with its COCO image id; the prompt id is `<line>:<image id>`."""
    path = Path(path)
    roots = [*([Path(images)] if images else []), path.parent]
    out = []
    for number, row in enumerate(read_models(path, PromptRow), 1):
        image: Any
        if row.image is not None:
            try:
                image = _image(row.image, roots)
            except ValueError as exc:
                raise DataError(str(exc), source=str(path), row=number, column="image") from None
        else:
            image = coco_image(Path(images), row.image_id) if images else None
            if image is None:
                raise DataError(
                    f"no image for COCO id {row.image_id}: give `image` (base64 or a path), or --images DIR"
                    " with COCO_val2014_<id>.jpg files",
                    source=str(path),
                    row=number,
                )
        out.append((Prompt(f"{number}:{row.image_id}", image, row.question), row.image_id))
    return out


def evaluate_objhal(
    answers: Sequence[Answer],
    truth: dict[int, frozenset[str]],
    *,
    objects: CocoObjects | None = None,
    llm: LLMObjectExtractor | None = None,
) -> dict[str, Any]:
    """CHAIR metrics and per-answer details; with `llm`, answers whose extraction failed are left out and counted.

    Answers of three words or fewer ("Yes.", "A red car.") name no objects with either extractor: RLAIF-V's
    LLM path (the one its reported numbers come from) skips them, and the rule path follows it so the two
    extractors count the same answers.
    """
    objects = objects or CocoObjects()
    missing = sorted({a.image_id for a in answers} - set(truth))
    if missing:
        raise DataError(f"no ground truth for image ids {missing[:10]}")
    if llm is not None:
        extractions = llm.extract([a.question for a in answers], [a.answer for a in answers])
        kept = [i for i, e in enumerate(extractions) if e.status != "failed"]
        mentions = [extractions[i].mentions for i in kept]
    else:
        extractions = None
        kept = list(range(len(answers)))
        mentions = [[] if len(a.answer.split()) <= SHORT_ANSWER_WORDS else objects(a.answer) for a in answers]
    used = [answers[i] for i in kept]
    items = items_from_mentions(mentions, [truth[a.image_id] for a in used])
    metrics: dict[str, Any] = dict(chair_totals(items))
    metrics["avg_words"] = sum(len(a.answer.split()) for a in used) / len(used) if used else None
    position = {i: k for k, i in enumerate(kept)}
    details = []
    for i, answer in enumerate(answers):
        row: dict[str, Any] = {"image_id": answer.image_id, "answer": answer.answer}
        if i in position:
            item = items[position[i]]
            row |= {
                "mentions": list(item.mentions),
                "hallucinated": list(item.hallucinated),
                "truth": sorted(item.truth),
            }
        if extractions is not None:
            row["extraction"] = extractions[i].model_dump(exclude={"mentions"})
        details.append(row)
    if extractions is not None:
        metrics["extraction_failed"] = len(answers) - len(kept)
    return {"metrics": metrics, "items": details}


def objhal_metric(
    prompts: Sequence[tuple[Prompt, int]],
    truth: dict[int, frozenset[str]],
    *,
    objects: CocoObjects | None = None,
    llm: LLMObjectExtractor | None = None,
    errors: list[str] | None = None,
) -> Callable[[Sequence[str]], dict[str, Any]]:
    """CHAIR of answers given in prompt order: the metric of the inference-time scaling curve. The last error of
    each failed extraction is appended to `errors`, so a caller can say why a point is incomplete."""

    def metric(texts: Sequence[str]) -> dict[str, Any]:
        answers = [Answer(image_id=i, question=p.question, answer=t) for (p, i), t in zip(prompts, texts, strict=True)]
        result = evaluate_objhal(answers, truth, objects=objects, llm=llm)
        if errors is not None:
            errors.extend(failure_causes(result["items"]))
        metrics: dict[str, Any] = result["metrics"]
        return metrics

    return metric
