"""Typed views of the Redis replies the job store reads.

The client is made with `decode_responses` off (`redis_conn.connect`), so every string in a reply is `bytes`, but
redis-py types its replies for either mode (`bytes | str`) and a script's or a pipeline's reply as `Any`. Each reply is
checked here once, where it comes in, so the code after it works on precise types; a reply of another shape (a client
made to decode, a script changed without its reader) raises `UnexpectedReply` naming what it got, instead of an
`AttributeError` further on, or an id passed on as `str` that then matches no `bytes` one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class UnexpectedReply(TypeError):
    """A Redis reply is not of the shape its command gives a client that does not decode responses."""


class Pending(NamedTuple):
    """One entry of XPENDING's extended form."""

    entry_id: bytes
    consumer: bytes
    idle_ms: int
    deliveries: int


StreamEntry = tuple[bytes, dict[bytes, bytes]]  # an entry's id and fields


def _shape(value: object) -> str:
    return type(value).__name__


def as_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise UnexpectedReply(f"expected bytes in a Redis reply, got {_shape(value)}")
    return value


def as_optional_bytes(value: object) -> bytes | None:
    return None if value is None else as_bytes(value)


def as_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnexpectedReply(f"expected an integer in a Redis reply, got {_shape(value)}")
    return value


def as_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise UnexpectedReply(f"expected a boolean in a Redis reply, got {_shape(value)}")
    return value


def as_list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise UnexpectedReply(f"expected an array in a Redis reply, got {_shape(value)}")
    return value


def as_sized_list(value: object, size: int) -> list[object]:
    items = as_list(value)
    if len(items) != size:
        raise UnexpectedReply(f"expected {size} items in a Redis reply, got {len(items)}")
    return items


def as_bytes_list(value: object) -> list[bytes]:
    return [as_bytes(item) for item in as_list(value)]


def as_pairs(value: object) -> dict[bytes, bytes]:
    """A flat array of field, value, field, value... (a stream entry's fields as a script gets them)."""
    flat = as_bytes_list(value)
    if len(flat) % 2:
        raise UnexpectedReply(f"expected field-value pairs in a Redis reply, got {len(flat)} items")
    return dict(zip(flat[::2], flat[1::2], strict=True))


def as_hash(value: object) -> dict[bytes, bytes]:
    """A hash as HGETALL returns it (an empty dict for a key that does not exist)."""
    if not isinstance(value, Mapping):
        raise UnexpectedReply(f"expected a map in a Redis reply, got {_shape(value)}")
    return {as_bytes(k): as_bytes(v) for k, v in value.items()}


def pending(reply: object) -> list[Pending]:
    """XPENDING's extended form, as redis-py's `xpending_range` parses it."""
    out = []
    for entry in as_list(reply):
        if not isinstance(entry, Mapping):
            raise UnexpectedReply(f"expected a map per XPENDING entry, got {_shape(entry)}")
        out.append(
            Pending(
                as_bytes(entry["message_id"]),
                as_bytes(entry["consumer"]),
                as_int(entry["time_since_delivered"]),
                as_int(entry["times_delivered"]),
            )
        )
    return out


def stream_entries(reply: object) -> list[StreamEntry]:
    """Entries as redis-py parses XRANGE, XCLAIM and each stream of XREADGROUP: (id, fields), where an entry deleted
    while pending comes as (None, None) (left out here: there is nothing to run)."""
    out = []
    for entry in as_list(reply):
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise UnexpectedReply(f"expected (id, fields) per stream entry, got {_shape(entry)}")
        entry_id, fields = entry
        if entry_id is not None and fields is not None:
            out.append((as_bytes(entry_id), as_hash(fields)))
    return out


def read_group_entries(reply: object, stream: str) -> list[StreamEntry]:
    """XREADGROUP's entries of one stream: redis-py's RESP2 shape, [[stream, entries]], empty when none came."""
    for item in as_list(reply):
        name, entries = as_sized_list(item, 2)
        if as_bytes(name) == stream.encode():
            return stream_entries(entries)
    return []
