"""Benchmark images: read and checked when the benchmark file is read, by the trainer's rules.

A damaged or oversized image was found only when its batch was sampled, after the model had loaded and earlier
batches had run, in an error naming no file, row or prompt. Every image is now decoded here
(`trainer.data`'s check: the sampler's limits and the verdict of a full decode, in the trainer's words), and a
value in a file is told apart as a path or base64 by the trainer's rule, so the two readers cannot disagree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rlaifv.trainer.data import check_row_image, names_a_file, row_image_bytes
from rlaifv.trainer.errors import ImageDecodeError, ImageNotFoundError


def image_in_file(value: str, roots: Sequence[Path], *, source: str | Path, row: int, column: str) -> Path | bytes:
    """A file under the first of `roots` that holds it, else the bytes of base64 (or a data URL), decided as
    `trainer.data` decides (base64 of a damaged JPEG starts with "/9j/" and was called a missing file); not yet
    checked (`first_problem`). The error of a value that is neither names every folder looked in, and calls it a
    missing file only when it reads as a path."""
    if len(value) < 4096:
        found = next((root / value for root in roots if names_a_file(root / value)), None)
        if found is not None:
            return found
    with contextlib.suppress(ImageNotFoundError):  # said below, naming every folder looked in
        return row_image_bytes(value, roots[0], source=str(source), row=row, column=column)
    shown = repr(value if len(value) <= 200 else value[:200] + "...")
    looked = ", ".join(str(r) for r in roots)
    if "/" in value or "\\" in value or Path(value).suffix[1:].isalnum():
        message = f"image file {shown} not found (looked in {looked})"
        raise ImageNotFoundError(message, source=str(source), row=row, column=column) from None
    message = f"image {shown} is neither a file (looked in {looked}) nor base64 of an image"
    raise ImageDecodeError(message, source=str(source), row=row, column=column) from None


def image_problem(image: Path | bytes) -> str | None:
    """Why the sampler would refuse `image` (a file cannot be read, a decode fails, a limit is exceeded), in the
    trainer's words; None when it decodes within the limits."""
    if isinstance(image, Path):
        try:
            data = image.read_bytes()
        except OSError as exc:
            return f"cannot read image file {image}: {exc.strerror or exc}"
    else:
        data = image
    try:
        check_row_image(data, source="", row=0, column="image")
    except ImageDecodeError as exc:
        return exc.detail
    return None


def first_problem(images: Sequence[Path | bytes]) -> tuple[int, str] | None:
    """The first image of `images` (in their order) that the sampler would refuse, with why; each distinct one is
    decoded once (AMBER asks ~14 questions per image), on a few threads (Pillow decodes without the GIL)."""
    distinct = list(dict.fromkeys(images))
    if not distinct:
        return None
    workers = max(1, min(4, os.cpu_count() or 1, len(distinct)))
    with ThreadPoolExecutor(workers, thread_name_prefix="rlaifv-eval-image") as pool:
        verdicts = dict(zip(distinct, pool.map(image_problem, distinct), strict=True))
    for i, image in enumerate(images):
        problem = verdicts[image]
        if problem is not None:
            return i, problem
    return None


def describe_image(image: Any) -> str:
    """An image as an error names it: its path, else how it was given (the prompt id names its row)."""
    if isinstance(image, Path) or (isinstance(image, str) and len(image) < 4096 and names_a_file(Path(image))):
        return str(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return f"inline, {len(image)} bytes"
    return f"inline, a {type(image).__name__}"


def problem_detail(image: Path | bytes, problem: str) -> str:
    """`first_problem`'s verdict as an error says it: the file's path, or that the value was base64 (the row is
    named beside it), so a damaged image given inline is never looked for as a file."""
    if isinstance(image, Path):
        return f"image {image}: {problem}"
    return f"base64 that is no usable image: {problem}"
