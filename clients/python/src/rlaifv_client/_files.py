"""Reading the files the SDK is given by path or as file objects, with a bound: only regular files (a FIFO would
block for ever, "/dev/zero" would fill the memory), and at most `limit` bytes of them."""

from __future__ import annotations

import inspect
import os
import stat
from typing import Any

from ._exceptions import InvalidArgumentError


def short(value: str, limit: int = 60) -> str:
    """`value` quoted and cut to `limit` characters: an error must not repeat a megabyte of base64."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, by its `st_mode`."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def size_text(limit: int) -> str:
    """`16777216 bytes (16 MiB)`."""
    mib = limit / (1024 * 1024)
    return f"{limit} bytes ({mib:g} MiB)" if mib >= 1 else f"{limit} bytes"


def read_regular_file(
    path: str | os.PathLike[str], limit: int, what: str, error: type[InvalidArgumentError], hint: str
) -> bytes:
    """The bytes of the regular file at `path` (`~` expanded), refused with `error` (its message naming the file as
    `what` and ending in `hint` when it is too big) when it is not a regular file or is over `limit` bytes. An
    `OSError` (not found, no permission) is the caller's to name.

    The path is checked before it is opened (opening a device can have effects; a FIFO would block), and the opened
    file again, in case the path was replaced in between: it is opened non-blocking, so a FIFO swapped in cannot hold
    the open, and it is read up to `limit` + 1 bytes, so a file that grew past its size cannot fill the memory."""
    name = os.path.expanduser(os.fspath(path))
    shown = repr(name)  # in full: it names a file that exists, so it is no megabyte of base64 taken for a path

    def check(info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {shown} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise error(f"{what} {shown} is {info.st_size} bytes, over the SDK's limit of {size_text(limit)}{hint}")

    check(os.stat(name))
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as file:
        check(os.fstat(fd))
        data = file.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {shown} is over the SDK's limit of {size_text(limit)}{hint}")
    return data


def _takes_a_size(read: Any) -> bool:
    """Whether `read(n)` may be called: a file object's does; `httpx.Response.read()` takes no size (its body is
    in memory already, read whole then)."""
    try:
        inspect.signature(read).bind(1)
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (a builtin's): a file object's read takes a size
        pass
    return True


def read_object(obj: Any, limit: int, what: str, error: type[InvalidArgumentError], hint: str) -> bytes | str:
    """What the binary file object `obj` holds, read up to `limit` + 1 bytes (a short read is read on until then
    or the end), refused with `error` past `limit`. A `str` read (a file opened in text mode) is returned as it is,
    for the caller to refuse."""
    read = obj.read
    if not _takes_a_size(read):
        whole = read()
        if isinstance(whole, (bytes, bytearray)) and len(whole) > limit:
            raise error(f"{what} holds {len(whole)} bytes, over the SDK's limit of {size_text(limit)}{hint}")
        if isinstance(whole, (bytes, bytearray, str)):
            return whole if isinstance(whole, str) else bytes(whole)
        raise error(f"{what}'s read() returned {type(whole).__name__}, not bytes")
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = read(limit + 1 - size)
        if isinstance(chunk, str) and not chunks:
            return chunk
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise error(f"{what}'s read() returned {type(chunk).__name__}, not bytes")
        if not chunk:
            break
        chunks.append(bytes(chunk))
        size += len(chunk)
    if size > limit:
        raise error(f"{what} holds over {size_text(limit)}, the SDK's limit{hint}")
    return b"".join(chunks)
