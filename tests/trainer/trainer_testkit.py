"""Helpers of the trainer tests (imported by name: tests/trainer is on sys.path)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def rlaifv_table(rows: Sequence[dict[str, Any]]):
    """A pyarrow table in the exact openbmb/RLAIF-V-Dataset schema (built here, independently of trainer/)."""
    import pyarrow as pa

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "ds_name": pa.array([r.get("ds_name", "RLAIF-V") for r in rows], type=pa.string()),
            "image": pa.array([r["image"] for r in rows], type=image_type),
            "question": pa.array([r["question"] for r in rows], type=pa.string()),
            "chosen": pa.array([r["chosen"] for r in rows], type=pa.string()),
            "rejected": pa.array([r["rejected"] for r in rows], type=pa.string()),
            "origin_dataset": pa.array([r.get("origin_dataset", "COCO") for r in rows], type=pa.string()),
            "origin_split": pa.array(
                [json.dumps({"generator": "tiny", "labeler": "tiny", "type": "detailed_description"})] * len(rows),
                type=pa.string(),
            ),
            "idx": pa.array([str(r.get("idx", i)) for i, r in enumerate(rows)], type=pa.string()),
            "image_path": pa.array([f"images/{i}.png" for i in range(len(rows))], type=pa.string()),
        }
    )


def write_rlaifv_parquet(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rlaifv_table(rows), path)
    return path


COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (20, 20, 20), (240, 240, 240)]


def preference_rows(pairs: Sequence[tuple[str, str]], question: str = "describe the image") -> list[dict[str, Any]]:
    rows = []
    for i, (chosen, rejected) in enumerate(pairs):
        image = {"bytes": png(COLOURS[i % len(COLOURS)]), "path": f"{i}.png"}
        rows.append({"image": image, "question": question, "chosen": chosen, "rejected": rejected})
    return rows


class ControlledLabeler:
    """A labeler whose answers are fixed by the test: p(yes) = accept(question); records every question asked."""

    def __init__(self, accept) -> None:
        self.accept = accept
        self.asked: list[str] = []

    def p_yes(self, image: Any, questions: Sequence[str]) -> list[float]:
        self.asked.extend(questions)
        return [0.9 if self.accept(q) else 0.1 for q in questions]
