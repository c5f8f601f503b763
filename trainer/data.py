"""Reading preference data and prompts from local files.

Two layouts:

- RLAIF-V-Dataset parquet (`openbmb/RLAIF-V-Dataset`): columns
  image{bytes, path}, question, chosen, rejected, ds_name, origin_dataset,
  origin_split (a JSON string), idx (a string), image_path. Give one file or a
  folder (every `*.parquet` below it, in sorted order).
- JSONL: one object per line with `image` (a path, relative to the JSONL file's
  folder, or base64), `question`, and for preference data `chosen`/`rejected`.

Errors are `DataError`s naming the file, the 0-based data row and the column.
Images are decoded once while reading (with the reward core's safe decoder),
so an undecodable image fails here, not halfway through training.

Prompt sources feed the sampling rounds of `rlaifv train iterate`: any object
with `prompts(round_index, count, seed) -> list[PromptItem]` and
`describe() -> dict` works (the shapes world passes its image generator).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rlaifv.trainer.errors import DataError, EmptyAnswerError, ImageDecodeError, MissingColumnError

RLAIFV_COLUMNS = (
    "ds_name",
    "image",
    "question",
    "chosen",
    "rejected",
    "origin_dataset",
    "origin_split",
    "idx",
    "image_path",
)
REQUIRED_PREFERENCE = ("image", "question", "chosen", "rejected")
REQUIRED_PROMPT = ("image", "question")


@dataclass(frozen=True)
class PromptItem:
    """One image + question to sample answers for. `image` is encoded bytes (PNG/JPEG...) or a PIL image."""

    id: str
    image: Any
    question: str


@dataclass(frozen=True)
class PreferenceRow:
    """One (image, question, chosen, rejected) preference; `meta` keeps the other dataset columns."""

    id: str
    image: bytes
    question: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt(self) -> PromptItem:
        return PromptItem(self.id, self.image, self.question)


@runtime_checkable
class PromptSource(Protocol):
    """Where a sampling round gets its prompts: disjoint ones per round when the source allows it."""

    def prompts(self, round_index: int, count: int, seed: int) -> list[PromptItem]:
        """`count` prompts for round `round_index` (0-based); the same arguments give the same prompts."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for provenance (e.g. file hashes, generator settings)."""
        ...


def image_bytes(image: Any) -> bytes:
    """Encoded bytes of a PromptItem image (PIL images are stored as PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_files(path: str | Path, suffixes: Sequence[str] = (".parquet", ".parq", ".jsonl")) -> list[Path]:
    """The data files at `path`: the file itself, or every matching file below a folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if files:
            return files
        raise DataError(f"no {' or '.join(suffixes)} files in folder", source=str(path))
    raise DataError("no such file or folder", source=str(path))


def is_parquet(file: Path) -> bool:
    """Parquet by its suffix (.parquet, .parq, any case) or, for any other name, by its magic bytes."""
    if file.suffix.lower() in (".parquet", ".parq"):
        return True
    with contextlib.suppress(OSError), open(file, "rb") as handle:
        return handle.read(4) == b"PAR1"
    return False


def describe_files(files: Sequence[Path]) -> list[dict[str, str]]:
    return [{"path": str(p), "sha256": sha256_file(p)} for p in files]


# -- validation helpers ------------------------------------------------------------------------


def _text(value: Any, *, source: str, row: int, column: str) -> str:
    if value is None or not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else ("empty" if isinstance(value, str) else f"a {type(value).__name__}")
        raise EmptyAnswerError(f"must be non-empty text, got {got}", source=source, row=row, column=column)
    return value


def _check_image(data: bytes, *, source: str, row: int, column: str) -> bytes:
    from rlaifv.reward.errors import ImageError
    from rlaifv.reward.images import decode_image

    try:
        decode_image(data, param=column)
    except ImageError as exc:
        raise ImageDecodeError(f"undecodable image: {exc.message}", source=source, row=row, column=column) from None
    return data


_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")


def _read_image_ref(value: Any, base: Path, *, source: str, row: int, column: str) -> bytes:
    """An image given as bytes, a {bytes, path} struct (bytes or base64 text), a path (relative to `base`), a
    data URL or bare base64 text. A path that exists wins; text that is not one but is base64 is decoded, and
    an image that then fails says why (format, size), not "not found"."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") else value.get("path")
    if isinstance(value, bytes | bytearray):
        return _check_image(bytes(value), source=source, row=row, column=column)
    if not isinstance(value, str) or not value.strip():
        raise ImageDecodeError("no image bytes and no image path", source=source, row=row, column=column)
    text = value.strip()
    if text[:5].lower() == "data:":
        return _check_image(_base64(text, source=source, row=row, column=column), source=source, row=row, column=column)
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        is_file = path.is_file()
    except OSError:  # a name too long for the filesystem: not a path
        is_file = False
    if is_file:
        return _check_image(path.read_bytes(), source=source, row=row, column=column)
    if _BASE64.fullmatch(text) and len(text) >= 64 and "." not in text[-6:]:
        return _check_image(_base64(text, source=source, row=row, column=column), source=source, row=row, column=column)
    shown = text if len(text) <= 200 else text[:200] + "..."
    raise ImageDecodeError(f"image file {shown} not found (in {base})", source=source, row=row, column=column)


def _base64(text: str, *, source: str, row: int, column: str) -> bytes:
    """A data URL's or bare base64 text's bytes, decoded as the service decodes them."""
    from rlaifv.reward.errors import ImageError
    from rlaifv.reward.images import decode_base64

    try:
        return decode_base64(text, param=column)
    except ImageError as exc:
        raise ImageDecodeError(exc.message, source=source, row=row, column=column) from None


# -- RLAIF-V parquet --------------------------------------------------------------------------


def _parquet_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DataError(f"not a readable parquet file: {exc}", source=str(path)) from None
    names = parquet.schema_arrow.names
    for column in required:
        if column not in names and not (column == "image" and "image_path" in names):
            raise MissingColumnError(
                f"required column is missing (the file has: {', '.join(names)})", source=str(path), column=column
            )
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield row, record
                row += 1
    except OSError as exc:  # a damaged data page: name the file and where reading stopped
        raise DataError(f"unreadable parquet data after row {row}: {exc}", source=str(path)) from None


def read_preferences(path: str | Path, *, limit: int | None = None) -> list[PreferenceRow]:
    """Preference rows from RLAIF-V parquet file(s) or JSONL file(s) at `path` (file or folder)."""
    rows: list[PreferenceRow] = []
    for file in data_files(path):
        reader = _parquet_preferences if is_parquet(file) else _jsonl_preferences
        for item in reader(file):
            rows.append(item)
            if limit is not None and len(rows) >= limit:
                return rows
    if not rows:
        raise DataError("no preference rows", source=str(path))
    return rows


def _preference(record: dict[str, Any], file: Path, row: int, row_id: str) -> PreferenceRow:
    source = str(file)
    image = _read_image_ref(_image_field(record), file.parent, source=source, row=row, column="image")
    question = _text(record.get("question"), source=source, row=row, column="question")
    chosen = _text(record.get("chosen"), source=source, row=row, column="chosen")
    rejected = _text(record.get("rejected"), source=source, row=row, column="rejected")
    meta = {k: v for k, v in record.items() if k not in REQUIRED_PREFERENCE and _jsonable(v)}
    if isinstance(meta.get("origin_split"), str):
        with contextlib.suppress(json.JSONDecodeError):
            meta["origin_split"] = json.loads(meta["origin_split"])
    return PreferenceRow(row_id, image, question, chosen, rejected, meta)


def _image_field(record: dict[str, Any]) -> Any:
    """The image, or where it is empty (null, a struct with neither bytes nor path) the `image_path` column."""
    image = record.get("image")
    empty = image is None or (isinstance(image, dict) and not image.get("bytes") and not image.get("path"))
    return record.get("image_path") if empty and record.get("image_path") else image


def _record_id(record: dict[str, Any], file: Path, row: int, keys: Sequence[str] = ("id", "idx")) -> str:
    """The first of `keys` the record has, else file:row; a null or empty id counts as none (every row would
    share "None"). RLAIF-V's parquet names rows by `idx` only."""
    for key in keys:
        if record.get(key) not in (None, ""):
            return str(record[key])
    return f"{file.stem}:{row}"


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _parquet_preferences(file: Path) -> Iterator[PreferenceRow]:
    for row, record in _parquet_rows(file, REQUIRED_PREFERENCE):
        yield _preference(record, file, row, _record_id(record, file, row, keys=("idx",)))


# -- JSONL ------------------------------------------------------------------------------------


def _jsonl_records(file: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        yield from _jsonl_lines(file, required)
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start}): JSONL must be UTF-8", source=str(file)) from None


def _jsonl_lines(file: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(file, encoding="utf-8-sig") as handle:  # a byte-order mark is not part of the first line
        row = 0
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"line {lineno} is not valid JSON: {exc.msg}", source=str(file), row=row) from None
            if not isinstance(record, dict):
                raise DataError(f"line {lineno} is not a JSON object", source=str(file), row=row)
            for column in required:
                if column == "image" and "image" not in record and "image_path" in record:
                    continue
                if column not in record:
                    raise MissingColumnError(
                        f"required field is missing (line {lineno})", source=str(file), row=row, column=column
                    )
            yield row, record
            row += 1


def _jsonl_preferences(file: Path) -> Iterator[PreferenceRow]:
    for row, record in _jsonl_records(file, REQUIRED_PREFERENCE):
        yield _preference(record, file, row, _record_id(record, file, row))


# -- prompts ----------------------------------------------------------------------------------


def read_prompts(path: str | Path, *, limit: int | None = None) -> list[PromptItem]:
    """(image, question) prompts from parquet/JSONL; duplicate (image, question) pairs are kept once."""
    items: list[PromptItem] = []
    seen: set[str] = set()
    for file in data_files(path):
        if is_parquet(file):
            records: Iterator[tuple[int, dict[str, Any]]] = _parquet_rows(file, REQUIRED_PROMPT)
        else:
            records = _jsonl_records(file, REQUIRED_PROMPT)
        for row, record in records:
            source = str(file)
            image = _read_image_ref(_image_field(record), file.parent, source=source, row=row, column="image")
            question = _text(record.get("question"), source=source, row=row, column="question")
            key = hashlib.sha256(image + b"\0" + question.encode()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            items.append(PromptItem(_record_id(record, file, row), image, question))
            if limit is not None and len(items) >= limit:
                return items
    if not items:
        raise DataError("no prompts", source=str(path))
    return items


class ListPromptSource:
    """A fixed list of prompts, shuffled once by `seed`, handed out in disjoint slices per round.

    When a round asks for more prompts than remain, it wraps around (prompts repeat
    across rounds only when the list is too short for all rounds).
    """

    def __init__(self, items: Sequence[PromptItem], *, description: dict[str, Any] | None = None) -> None:
        if not items:
            raise DataError("a prompt source needs at least one prompt")
        self.items = list(items)
        self.description = description or {"kind": "list", "count": len(self.items)}

    @classmethod
    def from_path(cls, path: str | Path) -> ListPromptSource:
        files = data_files(path)
        return cls(read_prompts(path), description={"kind": "files", "files": describe_files(files)})

    def prompts(self, round_index: int, count: int, seed: int) -> list[PromptItem]:
        order = list(range(len(self.items)))
        random.Random(seed).shuffle(order)
        start = round_index * count
        return [self.items[order[(start + i) % len(order)]] for i in range(min(count, len(order)) if count > 0 else 0)]

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


def write_preferences(
    path: str | Path, rows: Sequence[PreferenceRow], *, ds_name: str = "rlaifv", origin: dict[str, Any] | None = None
) -> Path:
    """Write rows in the RLAIF-V-Dataset parquet layout (readable by `read_preferences`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "ds_name": pa.array([ds_name] * len(rows), type=pa.string()),
            "image": pa.array([{"bytes": r.image, "path": None} for r in rows], type=image_type),
            "question": pa.array([r.question for r in rows], type=pa.string()),
            "chosen": pa.array([r.chosen for r in rows], type=pa.string()),
            "rejected": pa.array([r.rejected for r in rows], type=pa.string()),
            "origin_dataset": pa.array([str(r.meta.get("origin_dataset", ds_name)) for r in rows], type=pa.string()),
            "origin_split": pa.array(
                [json.dumps(origin or r.meta.get("origin_split") or {}) for r in rows], type=pa.string()
            ),
            "idx": pa.array([r.id for r in rows], type=pa.string()),
            "image_path": pa.array([str(r.meta.get("image_path", "")) for r in rows], type=pa.string()),
        }
    )
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path
