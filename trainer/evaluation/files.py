"""Reading the benchmarks' files: JSON lists or JSONL, each row validated by a pydantic model.

Errors are `DataError`s naming the file, the row (1-based: a JSONL file's line, a JSON list's item) and the
field, so a malformed line in a 300-line answers file is found without a debugger. Files may be gzip-compressed.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from rlaifv.trainer.data import damaged_gzip_named, open_text
from rlaifv.trainer.errors import DataError

Row = TypeVar("Row", bound=BaseModel)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSONL (one object per line; blank lines skipped); never empty."""
    return [row for _, row in numbered_rows(path)]


def numbered_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """`read_rows` with each row's number as errors give it: its JSONL line, or its 1-based item in a list.

    A file holding one JSON object is refused unless it is named .jsonl (then it is a one-row JSONL): no
    benchmark file this reads is an object, so it is a wrapper (`{"records": [...]}`) or a mistake, and read
    as a row it would fail on a missing field or, worse, be scored as one answer."""
    path = Path(path)
    try:
        with damaged_gzip_named(path), open_text(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a text file: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"not JSON: {exc}", source=str(path)) from None
        rows = list(enumerate(data, 1)) if isinstance(data, list) else []
    else:
        _refuse_object(text, path)
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may stand in a string
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"not JSON: {exc}", source=str(path), row=number) from None
    if not rows:
        raise DataError("no rows: the file is empty or an empty list", source=str(path))
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError("expected a JSON object", source=str(path), row=number)
    return rows


def _refuse_object(text: str, path: Path) -> None:
    """A whole file that is one JSON object with a list of objects inside, or one object not named .jsonl."""
    if not text.lstrip().startswith("{"):
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return  # several lines: JSONL
    if not isinstance(data, dict):
        return
    inner = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if inner:
        raise DataError(
            f"expected a JSON list or JSONL, got one JSON object with a list under {inner[0]!r}: give that list",
            source=str(path),
        )
    if path.suffix.lower() != ".jsonl" and not path.name.lower().endswith(".jsonl.gz"):
        raise DataError(
            "expected a JSON list or JSONL, got one JSON object (name a one-row JSONL file .jsonl)", source=str(path)
        )


def validate_rows(
    rows: Sequence[dict[str, Any]], model: type[Row], source: str | Path, numbers: Sequence[int] | None = None
) -> list[Row]:
    """Each row as `model`; an error names the row by `numbers` (its line), else by its 1-based place."""
    out = []
    for i, row in enumerate(rows):
        number = numbers[i] if numbers is not None else i + 1
        try:
            out.append(model.model_validate(row))
        except ValidationError as exc:
            first = exc.errors()[0]
            column = ".".join(str(p) for p in first["loc"]) or None
            raise DataError(first["msg"], source=str(source), row=number, column=column) from None
    return out


def read_models(path: str | Path, model: type[Row]) -> list[Row]:
    return [row for _, row in read_numbered_models(path, model)]


def read_numbered_models(path: str | Path, model: type[Row]) -> list[tuple[int, Row]]:
    """`read_models` with each row's number (its JSONL line, or its place in a JSON list), for errors about it."""
    numbered = numbered_rows(path)
    numbers = [number for number, _ in numbered]
    return list(zip(numbers, validate_rows([row for _, row in numbered], model, path, numbers), strict=True))


def refuse_repeats(keys: Sequence[tuple[int, Hashable]], source: str | Path, what: str) -> None:
    """Refuse a key given in two rows, naming both: scored twice, a repeated answer weighs double; sampled twice, a
    repeated prompt costs twice and counts double. `what` says what repeats, with `{key}` for the key."""
    first: dict[Hashable, int] = {}
    for number, key in keys:
        if key in first:
            raise DataError(
                f"{what.format(key=key)} in rows {first[key]} and {number}: remove one", source=str(source), row=number
            )
        first[key] = number
