"""Reading preference data and prompts from local files.

Two layouts:

- RLAIF-V-Dataset parquet (`openbmb/RLAIF-V-Dataset`): columns
  image{bytes, path}, question, chosen, rejected, ds_name, origin_dataset,
  origin_split (a JSON string), idx (a string), image_path. Give one file or a
  folder (every `*.parquet` below it, in sorted order).
- JSONL: one object per line with `image` (a path, relative to the JSONL file's
  folder, or base64), `question`, and for preference data `chosen`/`rejected`;
  or a JSON file holding one array of such objects (as LLaVA-style datasets
  ship: as prompts, a record's question may be the first human turn of its
  LLaVA-format `conversations`), given as the file itself (a folder is searched for parquet and JSONL
  only: its other JSON files are metadata). Either may be gzip-compressed
  (`train.jsonl.gz`).

Errors are `DataError`s naming the file, the 0-based data row (and a JSONL
row's line) and the column.
Every image is checked while reading (`reward.images.check_image`: the service's
limits, and the verdict of a full decode), so an undecodable image fails here, not
halfway through training. Checks run on a few threads while later rows are read;
rows keep file order and the first bad row in that order is the error raised.
Identical image bytes are stored once and checked once (a dataset with several
pairs per prompt repeats the prompt's image in every row). Rows hold their
images as read-only `memoryview`s into a memory-mapped temporary file
(`trainer.image_spill`), not in the process's memory: a dataset's images are
read from disk when a batch needs them.

Prompt sources feed the sampling rounds of `rlaifv train iterate`: any object
with `prompts(round_index, count, seed) -> list[PromptItem]` and
`describe() -> dict` works (the shapes world passes its image generator).
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import re
import warnings
import zlib
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from rlaifv.reward.prompt import blank
from rlaifv.trainer.errors import (
    ConfigError,
    DataError,
    EmptyAnswerError,
    ImageDecodeError,
    ImageNotFoundError,
    MissingColumnError,
)
from rlaifv.trainer.image_spill import ImageSpill

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
    """One image + question to sample answers for. `image` is encoded bytes (PNG/JPEG...; a read-only memoryview
    when read from files) or a PIL image."""

    id: str
    image: Any
    question: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.id, _portable(self.image), self.question))


@dataclass(frozen=True)
class PreferenceRow:
    """One (image, question, chosen, rejected) preference; `meta` keeps the other dataset columns."""

    id: str
    image: bytes | memoryview
    question: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt(self) -> PromptItem:
        return PromptItem(self.id, self.image, self.question)

    def __reduce__(self) -> tuple[Any, ...]:
        fields = (self.question, self.chosen, self.rejected, self.meta)
        return (type(self), (self.id, _portable(self.image), *fields))


def names_a_file(path: Path) -> bool:
    """Whether `path` is a file; False for a name no filesystem holds (a short base64 image, tried as a file name
    first, raised "File name too long" from `Path.is_file` on Python 3.11)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _portable(image: Any) -> Any:
    """What pickling (multiprocessing, deepcopy) sends of a row's image: a view into the spill cannot travel, so
    its bytes do."""
    return bytes(image) if isinstance(image, memoryview) else image


@runtime_checkable
class PromptSource(Protocol):
    """Where a sampling round gets its prompts: disjoint ones per round when the source allows it."""

    def prompts(self, round_index: int, count: int, seed: int) -> list[PromptItem]:
        """`count` prompts for round `round_index` (0-based); the same arguments give the same prompts."""
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for provenance (e.g. file hashes, generator settings)."""
        ...


def prompt_text(question: str) -> dict[str, Any]:
    """`encode_prompt`'s question/messages for one row's image and question: the image alone when the question is
    empty (a LLaVA-format question that was only its `<image>` placeholder)."""
    from rlaifv.reward.prompt import user_message

    return {"question": question} if question.strip() else {"question": None, "messages": user_message("", 1)}


def image_bytes(image: Any) -> bytes:
    """Encoded bytes of a PromptItem image (PIL images are stored as PNG)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prompts_digest(prompts: Sequence[PromptItem]) -> str:
    """The prompts' ids, questions and images, hashed: a prompt file names its images by path, so the file's own
    hash does not say whether they changed."""
    digest = hashlib.sha256()
    for item in prompts:
        digest.update(json.dumps([item.id, item.question]).encode())
        digest.update(hashlib.sha256(image_bytes(item.image)).digest())
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """A state file written whole or not at all (a temporary file renamed over it): one cut short by a kill or a full
    disk was unreadable, and every rerun stopped on it."""
    from rlaifv.reward.models import write_text_atomically

    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def data_files(path: str | Path, suffixes: Sequence[str] = (".parquet", ".parq", ".jsonl")) -> list[Path]:
    """The data files at `path`: the file itself, or every matching file below a folder, sorted."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in (".csv", ".tsv", ".arrow"):
            raise DataError(UNREAD_FORMATS[path.suffix.lower()], source=str(path))
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _data_suffix(p) in suffixes)
        listed = set(files)
        for file in files:  # its rows were read twice: a folder's file beside its own gzip
            if file.suffix.lower() == ".gz" and file.with_suffix("") in listed:
                plain, packed = (str(f.relative_to(path)) for f in (file.with_suffix(""), file))
                raise DataError(f"{plain} and {packed}: the same data twice? keep one", source=str(path))
        if files:
            return files
        hint = next(
            (UNREAD_FORMATS[p.suffix.lower()] for p in path.rglob("*") if p.suffix.lower() in UNREAD_FORMATS), ""
        )
        raise DataError(
            f"no {' or '.join(suffixes)} files in folder" + (f" ({hint})" if hint else ""), source=str(path)
        )
    raise DataError("no such file or folder", source=str(path))


def _data_suffix(path: Path) -> str:
    """The suffix that says the format, under a `.gz` (`train.jsonl.gz` is JSONL)."""
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix == ".gz" else suffix


GZIP_MAGIC = b"\x1f\x8b"


def open_text(file: Path) -> IO[str]:
    """A UTF-8 text file, gzip-compressed or not (told by its first bytes, whatever its name); a byte-order mark
    (Notepad, PowerShell) is not part of the text."""
    if _gzipped(file):
        return gzip.open(file, "rt", encoding="utf-8-sig")
    return open(file, encoding="utf-8-sig")


def _gzipped(file: Path) -> bool:
    with open(file, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


@contextlib.contextmanager
def damaged_gzip_named(file: Path) -> Iterator[None]:
    """A gzip file that breaks off or is not gzip inside, read in the block, is a `DataError` naming it."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"a damaged gzip file: {exc or 'it ends early'}", source=str(file)) from None


UNREAD_FORMATS = {  # what a data file of another format needs, said instead of failing to parse it as JSON lines
    ".csv": "CSV is not read (it cannot hold the images): write parquet or JSONL, e.g. pandas' to_parquet",
    ".tsv": "TSV is not read (it cannot hold the images): write parquet or JSONL, e.g. pandas' to_parquet",
    ".arrow": "a `datasets` save_to_disk folder is not read directly: export it with"
    " `datasets.load_from_disk(folder).to_parquet('data.parquet')`",
}


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
    if value is None or not isinstance(value, str) or blank(value):
        got = "missing" if value is None else ("empty" if isinstance(value, str) else f"a {type(value).__name__}")
        raise EmptyAnswerError(f"must be non-empty text, got {got}", source=source, row=row, column=column)
    return value


def check_row_image(data: bytes, *, source: str, row: int, column: str, line: int | None = None) -> None:
    from rlaifv.reward.errors import ImageError
    from rlaifv.reward.images import check_image

    try:
        check_image(data, param=column)
    except ImageError as exc:
        if "over the limit" in exc.message or "pixel limit" in exc.message:
            message = f"image too large: {exc.message}; downscale it first"
        elif "aspect ratio" in exc.message or "no pixels" in exc.message:
            message = f"image of an unusable shape: {exc.message}; crop or pad it first"
        else:
            message = f"undecodable image: {exc.message}"
        raise ImageDecodeError(message, source=source, row=row, column=column, line=line) from None


_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")
_URLSAFE_BASE64 = re.compile(r"[A-Za-z0-9\-_\s]+={0,2}\s*")


def row_image_bytes(value: Any, base: Path, *, source: str, row: int, column: str) -> bytes:
    """An image given as bytes, a {bytes, path} struct (bytes or base64 text), a path (relative to `base`), a
    data URL or bare base64 text; not yet checked. A path that exists wins; text that is not one but is base64
    is decoded, so that an image that then fails says why (format, size), not "not found"."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") else value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, list | tuple) and value:
        raise ImageDecodeError(
            f"a list of {len(value)} images: a prompt here has one image", source=source, row=row, column=column
        )
    if not isinstance(value, str) or not value.strip():
        raise ImageDecodeError("no image bytes and no image path", source=source, row=row, column=column)
    text = value.strip()
    if text[:5].lower() == "data:":
        return _base64(text, source=source, row=row, column=column)
    if text.split("://")[0].lower() in ("http", "https", "s3", "gs"):
        raise ImageDecodeError(
            f"image URL {text[:200]}: images are not downloaded here; download them and give their paths",
            source=source,
            row=row,
            column=column,
        )
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base / path
    if names_a_file(path):
        return path.read_bytes()
    # A hashed file name (`images/<64 hex>`) is base64 too: a "/" and no image format in its bytes make it a path.
    path_like = "/" in text and len(text) < 4096
    data = None
    try:
        if _BASE64.fullmatch(text) and len(text) >= 64 and "." not in text[-6:]:
            data = _base64(text, source=source, row=row, column=column)
        elif _URLSAFE_BASE64.fullmatch(text) and len(text) >= 64 and "." not in text[-6:]:
            data = _base64(text.translate(str.maketrans("-_", "+/")), source=source, row=row, column=column)
    except ImageDecodeError:
        if not path_like:
            raise
    if data is not None and (not path_like or data.startswith(IMAGE_MAGIC)):
        return data
    shown = text if len(text) <= 200 else text[:200] + "..."
    raise ImageNotFoundError(f"image file {shown} not found (in {base})", source=source, row=row, column=column)


# The first bytes of the formats images come in (PNG, JPEG, GIF, WebP/RIFF, BMP, TIFF both byte orders).
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def _base64(text: str, *, source: str, row: int, column: str) -> bytes:
    """A data URL's or bare base64 text's bytes, decoded as the service decodes them."""
    from rlaifv.reward.errors import ImageError
    from rlaifv.reward.images import decode_base64

    try:
        return decode_base64(text, param=column)
    except ImageError as exc:
        raise ImageDecodeError(exc.message, source=source, row=row, column=column) from None


# -- RLAIF-V parquet --------------------------------------------------------------------------


def _parquet_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:  # 1 MiB reads: pre-buffered, pyarrow holds a whole column chunk (a row group's images) on top of the rows
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DataError(f"not a readable parquet file: {exc}", source=str(path)) from None
    with parquet:
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
                    yield row, None, record
                    row += 1
        except OSError as exc:  # a damaged data page: name the file and where reading stopped
            raise DataError(f"unreadable parquet data after row {row}: {exc}", source=str(path)) from None


def _row_count(files: Sequence[Path]) -> int | None:
    """Rows in `files` from parquet metadata; None when a file is JSONL or unreadable (reading says why)."""
    import pyarrow.parquet as pq

    total = 0
    for file in files:
        if not is_parquet(file):
            return None
        try:
            with pq.ParquetFile(file) as parquet:
                total += parquet.metadata.num_rows
        except Exception:  # pyarrow raises several types for damaged files
            return None
    return total


def _preference(record: dict[str, Any], file: Path, name: str, row: int, image: bytes, parquet: bool) -> PreferenceRow:
    source = str(file)
    question = _text(record.get("question"), source=source, row=row, column="question")
    chosen = _text(record.get("chosen"), source=source, row=row, column="chosen")
    rejected = _text(record.get("rejected"), source=source, row=row, column="rejected")
    meta = {k: v for k, v in record.items() if k not in REQUIRED_PREFERENCE and _jsonable(v)}
    if isinstance(meta.get("origin_split"), str):
        with contextlib.suppress(json.JSONDecodeError):
            meta["origin_split"] = json.loads(meta["origin_split"])
    row_id = _record_id(record, name, row, keys=("idx",) if parquet else ("id", "idx"))
    return PreferenceRow(row_id, image, question, chosen, rejected, meta)


def _prompt(record: dict[str, Any], file: Path, name: str, row: int, image: bytes, parquet: bool) -> PromptItem:
    if "question" not in record and "conversations" in record:
        question = _first_human_turn(record["conversations"], source=str(file), row=row)
    else:
        question = _text(record.get("question"), source=str(file), row=row, column="question")
    return PromptItem(_record_id(record, name, row), image, question)


def _first_human_turn(conversations: Any, *, source: str, row: int) -> str:
    """A LLaVA-format record's question: its first human turn (later turns follow answers the policy did not
    write, so they are no prompts of its own)."""
    turns = conversations if isinstance(conversations, list) else []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and str(turn.get("from", turn.get("role", ""))).lower() in ("human", "user"):
            return _text(turn.get("value", turn.get("content")), source=source, row=row, column=f"conversations[{i}]")
    raise DataError(
        'no human turn: LLaVA-format conversations are [{"from": "human", "value": ...}, {"from": "gpt", ...}]',
        source=source,
        row=row,
        column="conversations",
    )


def _image_field(record: dict[str, Any]) -> Any:
    """The image, or where it is empty (null, a struct with neither bytes nor path) the `image_path` column."""
    image = record.get("image")
    empty = image is None or (isinstance(image, dict) and not image.get("bytes") and not image.get("path"))
    return record.get("image_path") if empty and record.get("image_path") else image


def _record_id(record: dict[str, Any], name: str, row: int, keys: Sequence[str] = ("id", "idx")) -> str:
    """The first of `keys` the record has, else name:row (`_file_names`); a null or empty id counts as none (every
    row would share "None"). RLAIF-V's parquet names rows by `idx` only."""
    for key in keys:
        if record.get(key) not in (None, ""):
            return str(record[key])
    return f"{name}:{row}"


def _file_names(files: Sequence[Path]) -> dict[Path, str]:
    """Each file's name in row ids: its stem, or where files share a stem (a/train and b/train both named their
    rows train:0, one id for two prompts, hence one seed) its path below the files' common folder, with its
    suffix when that is what tells them apart (train.jsonl beside train.parquet). Stems that are unique keep the
    ids they always had (a dataset without ids keeps its seeds and its resumable runs)."""
    stems = Counter(f.stem for f in files)
    if len(files) == 1 or max(stems.values()) == 1:
        return {f: f.stem for f in files}
    common = Path(os.path.commonpath([f.parent for f in files]))
    names = {f: f.relative_to(common).with_suffix("").as_posix() if stems[f.stem] > 1 else f.stem for f in files}
    twins = Counter(names.values())
    return {f: f.relative_to(common).as_posix() if twins[name] > 1 else name for f, name in names.items()}


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


# -- JSONL ------------------------------------------------------------------------------------


def _jsonl_records(file: Path, required: Sequence[str]) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    """JSONL, or a JSON file holding one array of records (LLaVA-style datasets), told apart by the first
    character that is not white space; either may be gzip-compressed. Each record comes with its row and its
    JSONL line."""
    array = False
    try:
        with damaged_gzip_named(file):
            array = _first_char(file) == "["
            if array:
                yield from _json_array(file, required)
            else:
                yield from _jsonl_lines(file, required)
    except UnicodeDecodeError:
        offset, line, row = _first_bad_utf8(file)
        raise DataError(
            f"not UTF-8 text (byte {offset}, line {line}): JSON and JSONL must be UTF-8",
            source=str(file),
            row=None if array else row,  # (an array's items are not its lines)
        ) from None


def _first_bad_utf8(file: Path) -> tuple[int, int, int]:
    """Where the file stops being UTF-8: the byte's offset (of the uncompressed text), its line and the record
    row that line is in (JSONL's count of non-blank lines before it). The decoder's own position is within one of
    its chunks (byte 6992 was said of a byte at 326480). Read in pieces: a line may be a gigabyte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = rows = 0  # bytes decoded; lines and non-blank lines ended before the current line
    shown = False  # whether the current line has shown anything yet

    def count(text: str) -> None:
        nonlocal newlines, rows, shown
        *ended, last = text.split("\n")
        for piece in ended:
            rows += shown or bool(piece.strip())
            shown = False
        newlines += len(ended)
        shown = shown or bool(last.strip())

    with damaged_gzip_named(file), gzip.open(file) if _gzipped(file) else open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                count(decoder.decode(chunk))
            except UnicodeDecodeError as exc:
                count(exc.object[: exc.start].decode("utf-8", errors="replace"))
                return offset - pending + exc.start, newlines + 1, rows
            offset += len(chunk)
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:  # a character cut off by the end of the file
            return offset - pending + exc.start, newlines + 1, rows
    return offset, newlines + 1, rows  # (not reached: the text decoder found one)


def _first_char(file: Path) -> str:
    with open_text(file) as handle:
        while chunk := handle.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _checked(record: Any, required: Sequence[str], *, source: str, row: int, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object", source=source, row=row)
    for column in required:
        if column == "image" and "image" not in record and "image_path" in record:
            continue
        if column == "question" and "question" not in record and "conversations" in record:
            continue
        if column == "image" and "image" not in record and "conversations" in record:
            raise MissingColumnError(
                f"a text-only conversation ({where}): a prompt here needs an image; leave such rows out, e.g."
                " jq 'map(select(.image))' for a LLaVA-format JSON list",
                source=source,
                row=row,
                column=column,
            )
        if column not in record:
            raise MissingColumnError(f"required field is missing ({where})", source=source, row=row, column=column)
    return record


def _json_array(file: Path, required: Sequence[str]) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    with open_text(file) as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON (line {exc.lineno}): {exc.msg}", source=str(file)) from None
    if not isinstance(records, list):
        raise DataError("a JSON data file must hold one array of records", source=str(file))
    for row, record in enumerate(records):
        yield row, None, _checked(record, required, source=str(file), row=row, where=f"item {row} of the array")


def _jsonl_lines(file: Path, required: Sequence[str]) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    with open_text(file) as handle:
        row = 0
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = _whole_file_hint(file, required) if row == 0 else None
                if hint:
                    raise DataError(hint, source=str(file)) from None
                raise DataError(f"line {lineno} is not valid JSON: {exc.msg}", source=str(file), row=row) from None
            if row == 0 and (hint := _table_hint(record, required)):
                raise DataError(hint, source=str(file))
            yield row, lineno, _checked(record, required, source=str(file), row=row, where=f"line {lineno}")
            row += 1


_HINT_MAX_CHARS = 64 * 1024 * 1024
"""A file whose first line is not JSON is read whole, for a better error, only up to this many characters."""


def _whole_file_hint(file: Path, required: Sequence[str]) -> str | None:
    """Why a file whose first line is not JSON is no JSONL, where the whole file says it: one JSON object written
    over several lines (a wrapper of the records, or pandas' table by columns), or records each written over
    several lines (pretty-printed). Else None: the line's own error stands."""
    with contextlib.suppress(OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error), open_text(file) as f:
        text = f.read(_HINT_MAX_CHARS + 1).lstrip()  # (a bound on what is read: a gzip's size on disk is no bound)
        if len(text) > _HINT_MAX_CHARS:
            return None
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            try:
                first, end = json.JSONDecoder().raw_decode(text)
            except json.JSONDecodeError:
                return None
            if isinstance(first, dict) and "\n" in text[:end]:
                return "records written over several lines (pretty-printed JSON): JSONL holds one record per line"
            return None
        return _table_hint(whole, required)
    return None


def _table_hint(value: Any, required: Sequence[str]) -> str | None:
    """Why a file's first JSON object is a whole table rather than one record, or None: its records under one key
    (`{"data": [...]}`), or pandas' default `to_json()` (columns of {row index: value})."""
    if not isinstance(value, dict) or not value:
        return None
    lists = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    columns = {*required, "image_path", "conversations"}  # (a LLaVA record's names for the image and question)
    if lists and not columns & set(value):
        return (
            f"the file is one JSON object holding its records under {lists[0]!r}: give that list (a JSON array of"
            " records, or JSONL with one record per line)"
        )
    if all(isinstance(v, dict) and v and all(str(k).isdigit() for k in v) for v in value.values()):
        return (
            "the file is a table by columns ({column: {row: value}}, pandas' default to_json()): write it with"
            " orient='records' (and lines=True for JSONL)"
        )
    return None


# -- reading in file order, images checked on threads -----------------------------------------

T = TypeVar("T")
_Seen = dict[int, Future[None] | None]
"""Each distinct image's check, by its index in the spill (None once passed)."""

_LATER = b""
"""A row's image while reading: the view into the spill replaces it once every image is written (`_mapped`)."""

_READ_AHEAD = 8
"""Rows read ahead of the oldest unchecked one, per checking thread: enough to keep the threads busy while
the calling thread parses, few enough that the bytes in flight stay a few MB."""


@dataclass
class _Pending(Generic[T]):
    """A row read in file order whose image may still be under check. Its own error (a text column) waits for
    that check: within a row the image is checked first, as it always was. A file that breaks off is an error
    in this order too, after the rows read before it."""

    value: T | None
    error: Exception | None = None
    image: int | None = None
    check: Future[None] | None = None


def _read_rows(
    files: Sequence[Path],
    required: Sequence[str],
    build: Callable[[dict[str, Any], Path, str, int, bytes, bool], T],
    workers: int,
    spill: ImageSpill,
) -> Generator[tuple[T, int], None, None]:
    """Rows of `files` in order, built by `build` from each record (image `_LATER`), with their image's index in
    `spill`. Images are checked by `workers` threads (1: on this one) while later rows are read; the first bad
    row in file order raises, whatever finished first. Identical images are stored and checked once."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="rlaifv-image-check") if workers > 1 else None
    seen: _Seen = {}
    pending: deque[_Pending[T]] = deque()
    try:
        for item in _pending_rows(files, required, build, seen, pool, spill):
            pending.append(item)
            if len(pending) >= _READ_AHEAD * workers:
                yield _settle(pending.popleft(), seen)
        while pending:
            yield _settle(pending.popleft(), seen)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _pending_rows(
    files: Sequence[Path],
    required: Sequence[str],
    build: Callable[[dict[str, Any], Path, str, int, bytes, bool], T],
    seen: _Seen,
    pool: ThreadPoolExecutor | None,
    spill: ImageSpill,
) -> Iterator[_Pending[T]]:
    names = _file_names(files)
    try:
        for file in files:
            parquet = is_parquet(file)
            records = _parquet_rows(file, required) if parquet else _jsonl_records(file, required)
            for row, line, record in records:
                yield _pend(record, file, names[file], row, line, parquet, build, seen, pool, spill)
    except Exception as exc:  # a damaged file or line, a file that cannot be opened
        yield _Pending(None, exc)


def _pend(
    record: dict[str, Any],
    file: Path,
    name: str,
    row: int,
    line: int | None,
    parquet: bool,
    build: Callable[[dict[str, Any], Path, str, int, bytes, bool], T],
    seen: _Seen,
    pool: ThreadPoolExecutor | None,
    spill: ImageSpill,
) -> _Pending[T]:
    source = str(file)
    try:
        image = row_image_bytes(_image_field(record), file.parent, source=source, row=row, column="image")
    except DataError as exc:
        return _Pending(None, exc.at_line(line))
    index, new = spill.add(image)
    if new:
        seen[index] = _submit(pool, image, source=source, row=row, line=line)
    check = seen[index]
    try:
        return _Pending(build(record, file, name, row, _LATER, parquet), None, index, check)
    except DataError as exc:
        return _Pending(None, exc.at_line(line), index, check)


def _submit(pool: ThreadPoolExecutor | None, image: bytes, *, source: str, row: int, line: int | None) -> Future[None]:
    if pool is not None:
        return pool.submit(check_row_image, image, source=source, row=row, column="image", line=line)
    done: Future[None] = Future()
    try:
        check_row_image(image, source=source, row=row, column="image", line=line)
    except DataError as exc:
        done.set_exception(exc)
    else:
        done.set_result(None)
    return done


def _settle(item: _Pending[T], seen: _Seen) -> tuple[T, int]:
    """The row and its image's index once the image passed, or its first error."""
    if item.check is not None and item.image is not None:
        item.check.result()
        seen[item.image] = None  # checked: the future can go
    if item.error is not None:
        raise item.error
    return cast(T, item.value), cast(int, item.image)


def _mapped(rows: Sequence[tuple[T, int]], spill: ImageSpill, empty: str, path: str | Path) -> list[T]:
    """The rows with their images (views into the spill, mapped now that every image is written); `empty` is the
    error when there are none.

    Arrow's allocator keeps what reading parquet used (~330 MB after a 48 MB file), glibc's what parsing JSON
    used, for reuse that a training run never makes: both go back to the system here."""
    import pyarrow as pa

    if not rows:
        raise DataError(empty, source=str(path))
    pa.default_memory_pool().release_unused()
    _release_freed_heap()
    return spill.attach(rows)


def _release_freed_heap() -> None:
    """Hand glibc's freed heap back to the system. A JSON-array file is parsed whole: its strings, freed once
    the rows are built, left about the file's size in the heap for the rest of a training run (285 MB after a
    195 MB file). Elsewhere (musl, macOS) nothing to do."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _workers(workers: int | None) -> int:
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(4, cpus)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    return workers


def _progress_bar(total: int | None, desc: str, progress: bool) -> Any:
    """Rows read, with rows/s; off when asked or when stderr is not a terminal (logs, CI)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=None if progress else True)


def read_preferences(
    path: str | Path, *, limit: int | None = None, progress: bool = True, workers: int | None = None
) -> list[PreferenceRow]:
    """Preference rows from RLAIF-V parquet file(s) or JSONL file(s) at `path` (file or folder).

    `workers` threads check images (default: up to 4, one per CPU); `progress` shows a bar on a terminal.
    """
    files = data_files(_feedback_pairs(Path(path)))
    total = _rows_to_read(_row_count(files), limit)
    rows: list[tuple[PreferenceRow, int]] = []
    threads = _workers(workers)
    with ImageSpill() as spill:
        read = _read_rows(files, REQUIRED_PREFERENCE, _preference, threads, spill)
        with _progress_bar(total, "reading preferences", progress) as bar, contextlib.closing(read):
            for item in read:
                rows.append(item)
                bar.update()
                if limit is not None and len(rows) >= limit:
                    break
        repeated = len(rows) - len({(image, r.question, r.chosen, r.rejected) for r, image in rows})
        if repeated:  # kept: a pair given twice counts twice in DPO's loss, as a user who repeats it may want
            warnings.warn(
                f"{repeated} rows of {path} repeat an (image, question, chosen, rejected) row: each copy trains,"
                " as one more pair",
                stacklevel=2,
            )
        return _mapped(rows, spill, "no preference rows", path)


def _feedback_pairs(path: Path) -> Path:
    """An `rlaifv feedback` output folder stands for its pairs.parquet: read whole, its feedback.parquet (scored
    candidates, no pairs) failed as "column 'chosen': required column is missing"."""
    if not (path.is_dir() and (path / "feedback.parquet").is_file()):
        return path
    if (path / "pairs.parquet").is_file():
        return path / "pairs.parquet"
    raise DataError(
        "an `rlaifv feedback` output folder without pairs.parquet: that run selected no pairs (its report.json"
        " says why)",
        source=str(path),
    )


def read_prompts(
    path: str | Path, *, limit: int | None = None, progress: bool = True, workers: int | None = None
) -> list[PromptItem]:
    """(image, question) prompts from parquet/JSONL; duplicate (image, question) pairs are kept once. An id that
    names another prompt already read gets a `#k` suffix, with a warning: the id seeds the prompt's samples and
    names its pairs, so two prompts must not share one.

    `workers` and `progress` as in `read_preferences`; the bar counts rows read, duplicates included.
    """
    files = data_files(path)
    known = _row_count(files)
    items: list[tuple[PromptItem, int]] = []
    seen: set[tuple[int, str]] = set()
    ids: set[str] = set()
    renamed: list[str] = []
    duplicates = 0
    threads = _workers(workers)
    with ImageSpill() as spill:
        read = _read_rows(files, REQUIRED_PROMPT, _prompt, threads, spill)
        bar = _progress_bar(_rows_to_read(known, limit), "reading prompts", progress)
        with bar, contextlib.closing(read):
            for item, image in read:
                bar.update()
                key = (image, item.question)  # identical images have one index
                if key in seen:
                    duplicates += 1
                    bar.total = _rows_to_read(known, limit, skipped=duplicates)
                    continue
                seen.add(key)
                if item.id in ids:
                    renamed.append(item.id)
                    k = 2
                    while f"{item.id}#{k}" in ids:
                        k += 1
                    item = replace(item, id=f"{item.id}#{k}")
                ids.add(item.id)
                items.append((item, image))
                if limit is not None and len(items) >= limit:
                    break
        if duplicates:
            warnings.warn(f"{duplicates} rows of {path} repeat an (image, question) pair: kept once", stacklevel=2)
        if renamed:
            more = f" and {len(renamed) - 5} more" if len(renamed) > 5 else ""
            shown = ", ".join(repr(i) for i in renamed[:5]) + more
            warnings.warn(
                f"{len(renamed)} prompts of {path} reuse the id of another prompt ({shown}): renamed id#2, id#3...",
                stacklevel=2,
            )
        return _mapped(items, spill, "no prompts", path)


def _rows_to_read(known: int | None, limit: int | None, skipped: int = 0) -> int | None:
    """The bar's total: every row, or up to `limit` kept rows plus the duplicates skipped on the way."""
    if limit is None:
        return known
    return limit + skipped if known is None else min(known, limit + skipped)


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
    def from_path(cls, path: str | Path, *, progress: bool = True) -> ListPromptSource:
        files = data_files(path)
        items = read_prompts(path, progress=progress)
        description = {"kind": "files", "files": describe_files(files), "prompts": prompts_digest(items)}
        return cls(items, description=description)

    def prompts(self, round_index: int, count: int, seed: int) -> list[PromptItem]:
        order = list(range(len(self.items)))
        random.Random(seed).shuffle(order)
        start = round_index * count
        return [self.items[order[(start + i) % len(order)]] for i in range(min(count, len(order)) if count > 0 else 0)]

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


WRITE_ROWS = 512
"""Rows per row group of a written preference file."""


def write_preferences(
    path: str | Path, rows: Sequence[PreferenceRow], *, ds_name: str = "rlaifv", origin: dict[str, Any] | None = None
) -> Path:
    """Write rows in the RLAIF-V-Dataset parquet layout (readable by `read_preferences`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("ds_name", pa.string()),
            ("image", image_type),
            ("question", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("origin_dataset", pa.string()),
            ("origin_split", pa.string()),
            ("idx", pa.string()),
            ("image_path", pa.string()),
        ]
    )
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:  # a row group at a time: the images are never copied all at once
        for start in range(0, len(rows), WRITE_ROWS):
            group = rows[start : start + WRITE_ROWS]
            columns = {
                "ds_name": [ds_name] * len(group),
                "image": [{"bytes": r.image, "path": None} for r in group],
                "question": [r.question for r in group],
                "chosen": [r.chosen for r in group],
                "rejected": [r.rejected for r in group],
                "origin_dataset": [str(r.meta.get("origin_dataset", ds_name)) for r in group],
                "origin_split": [json.dumps(origin or r.meta.get("origin_split") or {}) for r in group],
                "idx": [r.id for r in group],
                "image_path": [str(r.meta.get("image_path", "")) for r in group],
            }
            writer.write_table(pa.table(columns, schema=schema))
    tmp.replace(path)
    return path
