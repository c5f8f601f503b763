"""Ground-truth COCO objects of images, from COCO 2014 instance and caption annotations (official JSON).

As in CHAIR and RLAIF-V's Object HalBench: an image's objects are the categories of its instance
annotations *plus* the COCO objects its five reference captions mention (read with the same extractor as
the answers), so an object a person saw and named is not a hallucination even without a box.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.coco_objects import CocoObjects


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CocoCategory(_Loose):
    id: int
    name: str


class CocoInstance(_Loose):
    image_id: int
    category_id: int


class CocoCaption(_Loose):
    image_id: int
    caption: str


class CocoInstances(_Loose):
    categories: list[CocoCategory]
    annotations: list[CocoInstance]


class CocoCaptions(_Loose):
    annotations: list[CocoCaption]


def _load(path: str | Path, model: type[_Loose], what: str) -> Any:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"COCO {what} file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"COCO {what} file {path} is not JSON: {exc}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(f"not in the COCO {what} format: {first['msg']} at {where}", source=str(path)) from None


def find_annotation_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """instances_*2014.json and captions_*2014.json in a COCO `annotations/` folder (train and val)."""
    folder = Path(folder)
    instances = sorted(folder.glob("instances_*2014.json"))
    captions = sorted(folder.glob("captions_*2014.json"))
    if not instances or not captions:
        raise DataError(f"{folder} needs instances_*2014.json and captions_*2014.json (COCO 2014 annotations)")
    return instances, captions


def ground_truth(
    image_ids: Iterable[int],
    instances: Sequence[str | Path],
    captions: Sequence[str | Path],
    objects: CocoObjects | None = None,
) -> dict[int, frozenset[str]]:
    """image id -> COCO categories present; every id must occur in the annotation files."""
    objects = objects or CocoObjects()
    truth: dict[int, set[str]] = {int(i): set() for i in image_ids}
    seen: set[int] = set()
    for path in instances:
        data = _load(path, CocoInstances, "instances")
        names = {c.id: c.name for c in data.categories}
        for ann in data.annotations:
            if ann.image_id not in truth:
                continue
            name = names.get(ann.category_id)
            category = objects.category(name) if name is not None else None
            if category is None:
                raise DataError(
                    f"category id {ann.category_id} ({name!r}) is not in the synonym table", source=str(path)
                )
            truth[ann.image_id].add(category)
            seen.add(ann.image_id)
    for path in captions:
        for cap in _load(path, CocoCaptions, "captions").annotations:
            if cap.image_id in truth:
                truth[cap.image_id].update(objects(cap.caption))
                seen.add(cap.image_id)
    missing = sorted(set(truth) - seen)
    if missing:
        raise DataError(
            f"image ids not in the COCO annotation files: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    return {i: frozenset(objs) for i, objs in truth.items()}
