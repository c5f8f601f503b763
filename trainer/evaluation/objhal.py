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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from rlaifv.trainer.errors import DataError, ImageDecodeError
from rlaifv.trainer.evaluation.candidates import Prompt
from rlaifv.trainer.evaluation.chair import chair_totals, items_from_mentions
from rlaifv.trainer.evaluation.coco_objects import CocoObjects
from rlaifv.trainer.evaluation.files import read_numbered_models, refuse_repeats
from rlaifv.trainer.evaluation.images import first_problem, image_in_file, problem_detail
from rlaifv.trainer.evaluation.llm_objects import SHORT_ANSWER_WORDS, LLMObjectExtractor
from rlaifv.trainer.evaluation.report import failure_causes
from rlaifv.trainer.evaluation.store import digest


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


def coco_image(folder: Path, image_id: int) -> Path | None:
    for name in (f"COCO_val2014_{image_id:012d}.jpg", f"COCO_train2014_{image_id:012d}.jpg", f"{image_id:012d}.jpg"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_answers(path: str | Path) -> list[Answer]:
    """The answers; one COCO image asked the same question twice is refused, naming both rows, as `eval amber`
    refuses a question answered twice (it was scored twice without a word)."""
    numbered = read_numbered_models(path, Answer)
    refuse_repeats(
        [(number, (a.image_id, a.question)) for number, a in numbered],
        path,
        "image_id {key[0]} is answered twice for the question {key[1]!r}",
    )
    return [a for _, a in numbered]


def prompt_id(image_id: int, question: str) -> str:
    """`<image id>-<digest of the question>`: what the prompt is, not where it is in the file, so a rerun of an
    edited file samples only what changed (ids were `<line>:<image id>`: deleting a line re-sampled every later
    prompt). A `-` where the old ids had `:` keeps old cache entries from ever being read under a new id."""
    return f"{image_id}-{digest('objhal-question', question)[:12]}"


def read_prompts(path: str | Path, images: str | Path | None = None) -> list[tuple[Prompt, int]]:
    """Prompts to generate for, each with its COCO image id (ids: `prompt_id`). Every image is decoded here, so a
    bad one is named by its row before any model loads; the same question about one image twice is refused."""
    path = Path(path)
    roots = [*([Path(images)] if images else []), path.parent]
    numbered = read_numbered_models(path, PromptRow)
    refuse_repeats(
        [(number, (row.image_id, row.question)) for number, row in numbered],
        path,
        "image_id {key[0]} is asked the question {key[1]!r} twice",
    )
    out = []
    for number, row in numbered:
        image: Path | bytes | None
        if row.image is not None:
            image = image_in_file(row.image, roots, source=path, row=number, column="image")
        else:
            image = coco_image(Path(images), row.image_id) if images else None
            if image is None:
                raise DataError(
                    f"no image for COCO id {row.image_id}: give `image` (base64 or a path), or --images DIR"
                    " with COCO_val2014_<id>.jpg files",
                    source=str(path),
                    row=number,
                )
        out.append((Prompt(prompt_id(row.image_id, row.question), image, row.question), row.image_id))
    bad = first_problem([p.image for p, _ in out])
    if bad is not None:
        index, problem = bad
        number, row = numbered[index]
        detail = problem_detail(out[index][0].image, problem)
        raise ImageDecodeError(detail, source=str(path), row=number, column="image" if row.image is not None else None)
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
