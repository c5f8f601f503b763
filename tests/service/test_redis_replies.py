"""The typed views of Redis replies (`service/redis_replies.py`) against what redis-py returns from a real server to
the service's own client: a redis-py upgrade that reshapes a reply fails here, not inside a worker's retry loop."""

from __future__ import annotations

import uuid

import pytest

from rlaifv.service.redis_replies import (
    Pending,
    UnexpectedReply,
    as_bytes,
    as_hash,
    as_int,
    as_pairs,
    pending,
    read_group_entries,
    stream_entries,
)
from rlaifv.service.settings import Settings

pytestmark = pytest.mark.integration


async def test_stream_replies_come_typed(redis_url: str) -> None:
    from rlaifv.service.redis_conn import connect

    client = connect(Settings(bundle="unused", redis_url=redis_url))
    stream = f"rlaifv:replies-test-{uuid.uuid4().hex}"
    try:
        await client.xgroup_create(stream, "g", id="0", mkstream=True)
        first = await client.xadd(stream, {"job": "job-1", "index": "0"})
        await client.xadd(stream, {"job": "job-1", "index": "1"})

        read = read_group_entries(await client.xreadgroup("g", "c", {stream: ">"}, count=2), stream)
        assert read == [(first, {b"job": b"job-1", b"index": b"0"}), (read[1][0], {b"job": b"job-1", b"index": b"1"})]
        assert read_group_entries(await client.xreadgroup("g", "c", {stream: ">"}, count=2, block=1), stream) == []

        held = pending(await client.xpending_range(stream, "g", "-", "+", 10, "c"))
        assert [(p.entry_id, p.consumer, p.deliveries) for p in held] == [(e, b"c", 1) for e, _ in read]
        assert all(isinstance(p, Pending) and p.idle_ms >= 0 for p in held)

        await client.xdel(stream, first)  # deleted while pending: nothing to run, so not an entry
        claimed = stream_entries(await client.xclaim(stream, "g", "d", 0, [e for e, _ in read]))
        assert claimed == [read[1]]

        assert as_hash(await client.hgetall(f"{stream}:absent")) == {}
        assert as_int(await client.eval("return 7", 0)) == 7
        assert as_pairs(await client.eval("return {'a', '1', 'b', '2'}", 0)) == {b"a": b"1", b"b": b"2"}
    finally:
        await client.delete(stream)
        await client.aclose()


def test_a_reply_of_another_shape_is_named() -> None:
    """A client made to decode responses gives `str`: refused where the reply comes in, not an AttributeError (or a
    `str` id that matches no `bytes` one) further on."""
    with pytest.raises(UnexpectedReply, match="expected bytes in a Redis reply, got str"):
        as_bytes("1-0")
    with pytest.raises(UnexpectedReply, match="got bool"):
        as_int(True)
    with pytest.raises(UnexpectedReply, match="field-value pairs"):
        as_pairs([b"a", b"1", b"b"])
    with pytest.raises(UnexpectedReply, match="expected an array"):
        stream_entries(None)
