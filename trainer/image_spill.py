"""A dataset's distinct images kept on disk and read back through one read-only memory map.

Images are most of a preference dataset's bytes (RLAIF-V: ~134 KB a row, ~11 GiB for its 83k rows) and a
training run reads each one only when its batch comes. Held as `bytes` they stay in every process's anonymous
memory for the whole run, once per rank of a multi-process run. Here each distinct image is written once to an
unlinked temporary file and the rows get `memoryview`s into a map of it: file-backed pages, which the kernel
reads on demand, shares between views, and drops under memory pressure instead of failing the run. The file goes
when the last view does.

The file is made in the temporary folder (`TMPDIR`): point that at a disk, not a memory-backed tmpfs, for the
saving to hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from rlaifv.trainer.errors import DataError

T = TypeVar("T")

WARN_BYTES = 1 << 30
"""Spilled bytes past which a spill on a memory-backed filesystem is worth a warning."""


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem `path` is on (its longest mount point in /proc/mounts); None off Linux."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = os.path.realpath(path), "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


class ImageSpill:
    """Append distinct images while reading (`add`), then map them once (`attach`). A context manager: leaving
    it gives the file up (views already attached stay valid: the map holds the unlinked file)."""

    def __init__(self) -> None:
        # Unbuffered: a full disk fails the `add` of the image it cannot hold, as the DataError that names TMPDIR; a
        # buffer failed later, in attach() or close(), as a bare OSError in place of whatever was going wrong then.
        self._file = tempfile.TemporaryFile(prefix="rlaifv-images-", buffering=0)  # noqa: SIM115 (closed on leaving `with`)
        self._spans: list[tuple[int, int]] = []
        self._index: dict[bytes, int] = {}
        self._size = 0

    def __enter__(self) -> ImageSpill:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self._index.clear()
        try:
            self._file.close()
        except OSError:
            if kind is None:
                raise  # else the error already on its way out is the one to tell

    def add(self, data: bytes) -> tuple[int, bool]:
        """The image's index, and whether it is new (identical bytes get the index of their first copy)."""
        key = hashlib.blake2b(data, digest_size=20).digest()
        known = self._index.get(key)
        if known is not None:
            return known, False
        try:
            view = memoryview(data)
            while view:  # an unbuffered write may take part of it (the last bytes a disk has room for)
                view = view[self._file.write(view) :]
        except OSError as exc:  # a full or read-only temporary folder
            raise DataError(
                f"cannot store the dataset's images in {tempfile.gettempdir()} (TMPDIR): {exc.strerror or exc}"
            ) from None
        before, self._size = self._size, self._size + len(data)
        self._spans.append((before, len(data)))
        self._index[key] = len(self._spans) - 1
        if before <= WARN_BYTES < self._size:
            self._warn_if_in_memory()
        return len(self._spans) - 1, True

    def _warn_if_in_memory(self) -> None:
        folder = tempfile.gettempdir()
        if filesystem_type(folder) in ("tmpfs", "ramfs"):
            warnings.warn(
                f"the dataset's images are stored in {folder}, a memory-backed filesystem: they take memory"
                " there as they would in the process. Set TMPDIR to a folder on a disk.",
                stacklevel=3,
            )

    def attach(self, rows: Sequence[tuple[T, int]]) -> list[T]:
        """Dataclass rows, each given with its image's index, with their `image` field set to a read-only view
        of that image (hashable, and equal to the bytes it holds), all views into one map of the file."""
        self._file.flush()
        if self._size == 0:
            views = [memoryview(b"") for _ in self._spans]
        else:
            whole = memoryview(mmap.mmap(self._file.fileno(), self._size, access=mmap.ACCESS_READ))
            views = [whole[offset : offset + length] for offset, length in self._spans]
        return [dataclasses.replace(cast(Any, row), image=views[index]) for row, index in rows]
