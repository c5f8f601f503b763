"""What the SDK reads and sends from the caller's inputs, bounded and checked before anything is sent: image and
job files (only regular files, at most the server's default body limit; file objects read in bounded pieces), and
text JSON cannot carry as UTF-8 (a lone surrogate), named by its field in the sync and the async client alike."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlaifv_client import AsyncClient, Client, ImageInputError, InvalidArgumentError, _files
from rlaifv_client import _constants as C
from rlaifv_client._images import encode_image

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
JOB = {"id": "j1", "kind": "rewards", "status": "queued", "created": 1, "updated": 1, "total": 1, "completed": 0,
       "failed": 0}  # fmt: skip
posix = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/null are POSIX")
# Devices are tested with /dev/null: refused by its kind as /dev/zero is, which a regression would read until the
# memory ran out (the test's own machine included); the bounded read is tested with /proc and `Endless`.


def finishes(fn: Callable[[], Any], fifo: Path | None = None, seconds: float = 10.0) -> BaseException | None:
    """What `fn()` raised (None if nothing), failing the test if it blocks (on a FIFO without a writer: the bug); the
    FIFO is then opened for writing, so the blocked thread ends."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader's open returns; it reads EOF
            thread.join(seconds)
        pytest.fail(f"blocked for over {seconds} s")
    return outcome[0]


def recording() -> tuple[list[httpx.Request], httpx.Client, httpx.AsyncClient]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=JOB)

    transport = httpx.MockTransport(handler)
    return seen, httpx.Client(transport=transport), httpx.AsyncClient(transport=transport)


# -- image and job files ----------------------------------------------------------------------


def test_the_sdks_file_bounds_are_the_servers_default_body_limit() -> None:
    """A file over the server's default body limit can never be sent to it (an image goes base64, 4/3 of its size):
    the SDK reads no more. A drift check: the SDK cannot import the server's settings."""
    from rlaifv.service.settings import Settings

    body = Settings.model_fields["max_body_bytes"].default
    assert C.MAX_IMAGE_FILE_BYTES == body == C.MAX_UPLOAD_FILE_BYTES
    assert Settings.model_fields["max_image_bytes"].default <= C.MAX_IMAGE_FILE_BYTES


@posix
def test_an_image_path_that_is_no_regular_file_is_refused_by_name(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    cases = [
        ("/dev/null", "'/dev/null' is a character device, not a regular file", None),
        (str(fifo), "pipe.png' is a FIFO (named pipe), not a regular file", fifo),
        (fifo, "pipe.png' is a FIFO", fifo),  # a Path
        (f"file://{fifo}", "pipe.png' is a FIFO", fifo),
        (str(tmp_path), "is a directory, not a regular file", None),
    ]
    for image, message, blocking in cases:
        error = finishes(lambda image=image: encode_image(image), blocking)  # type: ignore[misc]
        assert isinstance(error, ImageInputError) and message in str(error), (image, error)
        assert str(error).startswith("image file '")


@posix
def test_a_fifo_image_does_not_block_the_clients_and_nothing_is_sent(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    seen, http, ahttp = recording()

    def sync_call() -> None:
        with Client(base_url="http://svc", http_client=http) as client:
            client.score(image=fifo, question="q", answers=["a"])

    def async_call() -> None:  # its own event loop, in the thread: a blocked loop would block the thread too
        async def call() -> None:
            async with AsyncClient(base_url="http://svc", http_client=ahttp) as client:
                await client.score(image=str(fifo), question="q", answers=["a"])

        asyncio.run(call())

    for call in (sync_call, async_call):
        error = finishes(call, fifo)
        assert isinstance(error, ImageInputError) and "FIFO" in str(error), error
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/dev/null"}}]}]
    more, http, _ = recording()
    with Client(base_url="http://svc", http_client=http) as client:
        with pytest.raises(ImageInputError, match=r"^messages\[0\]\.content\[0\]\.image_url\.url: .*character device"):
            client.best_of_n(messages=messages)
        with pytest.raises(ImageInputError, match=r"^items\[0\] of a 'rewards' job: .*character device") as caught:
            client.jobs.submit([{"image": "/dev/null", "answers": ["a"]}], kind="rewards")
        assert caught.value.param == "items[0]"
    assert seen == more == []


def test_an_image_file_is_read_up_to_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as file:  # sparse: no 16 MiB written
        file.truncate(C.MAX_IMAGE_FILE_BYTES + 1)
    with pytest.raises(ImageInputError) as caught:
        encode_image(big)
    message = str(caught.value)
    assert f"is {C.MAX_IMAGE_FILE_BYTES + 1} bytes, over the SDK's limit of 16777216 bytes (16 MiB)" in message
    assert "RLAIFV_MAX_BODY_BYTES" in message and "pass its bytes" in message

    monkeypatch.setattr(C, "MAX_IMAGE_FILE_BYTES", len(PNG))
    exact = tmp_path / "exact.png"
    exact.write_bytes(PNG)
    assert encode_image(exact) == "data:image/png;base64," + base64.b64encode(PNG).decode()
    exact.write_bytes(PNG + b"\0")
    with pytest.raises(ImageInputError, match=f"over the SDK's limit of {len(PNG)} bytes"):
        encode_image(exact)


def test_a_file_longer_than_its_size_says_is_read_no_further_than_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The read is bounded, not only the size `stat` gives: a /proc file says 0 bytes; a file may grow."""
    maps = Path("/proc/self/maps")
    if not maps.exists() or maps.stat().st_size != 0:
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(C, "MAX_IMAGE_FILE_BYTES", 16)
    with pytest.raises(ImageInputError, match=r"image file '/proc/self/maps' is over the SDK's limit of 16 bytes"):
        encode_image(maps)


@posix
def test_a_path_swapped_for_a_fifo_after_its_check_neither_blocks_nor_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opened file is checked again (and opened non-blocking): the path may change between `stat` and `open`."""
    regular = tmp_path / "cat.png"
    regular.write_bytes(PNG)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(_files.os, "stat", lambda path, *a, **k: real_stat(regular if path == str(fifo) else path))
    error = finishes(lambda: encode_image(fifo), fifo)
    assert isinstance(error, ImageInputError) and "is a FIFO (named pipe), not a regular file" in str(error), error


class Endless:
    """A binary stream without end (a socket, /dev/zero opened by the caller) that must be read in pieces."""

    def __init__(self, piece: int | None = None) -> None:
        self.asked: list[int] = []
        self.piece = piece

    def read(self, size: int = -1) -> bytes:
        assert size >= 0, "read whole"
        self.asked.append(size)
        return PNG[:1] * (size if self.piece is None else min(size, self.piece))


def test_an_image_file_object_is_read_in_bounded_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = Endless()
    with pytest.raises(ImageInputError, match=r"the image file object holds over 16777216 bytes \(16 MiB\)"):
        encode_image(stream)
    assert stream.asked == [C.MAX_IMAGE_FILE_BYTES + 1]
    monkeypatch.setattr(C, "MAX_IMAGE_FILE_BYTES", 100)
    trickle = Endless(piece=30)  # short reads are read on, up to the limit and one byte
    with pytest.raises(ImageInputError, match="over 100 bytes"):
        encode_image(trickle)
    assert trickle.asked == [101, 71, 41, 11]


def test_image_file_objects_still_read_as_before() -> None:
    class Short(io.RawIOBase):  # unbuffered: each read gives at most 7 bytes
        def __init__(self) -> None:
            self.data = io.BytesIO(PNG)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            chunk = self.data.read(min(len(buffer), 7))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    class NoSize:  # httpx.Response.read() takes no size (its body is in memory)
        def read(self) -> bytes:
            return PNG

    expected = "data:image/png;base64," + base64.b64encode(PNG).decode()
    for reader in (io.BytesIO(PNG), Short(), NoSize()):
        assert encode_image(reader) == expected, reader  # type: ignore[arg-type]
    with pytest.raises(ImageInputError, match="binary mode"):
        encode_image(io.StringIO("text"))  # type: ignore[arg-type]
    with pytest.raises(ImageInputError, match="empty"):
        encode_image(io.BytesIO(b""))


@posix
def test_submit_file_takes_only_a_regular_file_within_the_upload_limit(tmp_path: Path) -> None:
    fifo = tmp_path / "batch.jsonl"
    os.mkfifo(fifo)
    big = tmp_path / "big.jsonl"
    with big.open("wb") as file:
        file.truncate(C.MAX_UPLOAD_FILE_BYTES + 1)
    good = tmp_path / "good.jsonl"
    good.write_bytes(b'{"question": "q", "answers": ["a"]}\n')
    seen, http, ahttp = recording()
    with Client(base_url="http://svc", http_client=http) as client:
        for path, message, blocking in [
            ("/dev/null", "job file '/dev/null' is a character device, not a regular file", None),
            (fifo, "batch.jsonl' is a FIFO (named pipe), not a regular file", fifo),
            (tmp_path, "is a directory, not a regular file", None),
            (big, f"is {C.MAX_UPLOAD_FILE_BYTES + 1} bytes, over the SDK's limit of 16777216 bytes (16 MiB)", None),
        ]:
            error = finishes(lambda path=path: client.jobs.submit_file(path, kind="rewards"), blocking)  # type: ignore[misc]
            assert isinstance(error, InvalidArgumentError) and message in str(error), (path, error)
        with pytest.raises(FileNotFoundError):  # as before
            client.jobs.submit_file(tmp_path / "gone.jsonl", kind="rewards")
        assert seen == []
        client.jobs.submit_file(good, kind="rewards")
        assert seen[-1].content == good.read_bytes()

    async def async_call() -> None:
        async with AsyncClient(base_url="http://svc", http_client=ahttp) as aclient:
            with pytest.raises(InvalidArgumentError, match="character device"):
                await aclient.jobs.submit_file("/dev/null", kind="rewards")

    asyncio.run(async_call())
    assert len(seen) == 1


# -- text JSON cannot carry -------------------------------------------------------------------

LONE = "\ud800"
# (what the call gets, the param named)
SURROGATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("score", {"question": "q", "answers": ["A", LONE]}, "answers[1]"),
    ("score", {"question": f"q{LONE}", "answers": ["A"]}, "question"),
    ("score", {"question": "q", "answers": ["A"], "model": f"m{LONE}"}, "model"),
    ("best_of_n", {"question": "\udcff"}, "question"),
    ("best_of_n", {"messages": [{"role": "user", "content": f"x{LONE}"}]}, "messages[0].content"),
    (
        "best_of_n",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
        "messages[0].content[0].text",
    ),
    ("best_of_n", {"messages": [{"role": "user", "content": "x", f"k{LONE}": 1}]}, "messages[0]"),
    ("jobs.submit", {"items": [{"question": "q", "answers": ["a", LONE]}], "kind": "rewards"}, "items[0].answers[1]"),
    ("jobs.submit", {"items": [{"question": "q", "answers": ["a"], "custom_id": LONE}], "kind": "rewards"},
     "items[0].custom_id"),
    ("jobs.submit", {"items": [{"question": "q", "answers": ["a"]}], "kind": "rewards", "metadata": {"run": LONE}},
     "metadata.run"),
    ("jobs.submit_file", {"path": b"{}\n", "kind": "rewards", "metadata": {"run": LONE}}, "metadata.run"),
    ("jobs.list", {"after": f"job-{LONE}"}, "after"),
    ("jobs.get", {"job_id": f"job-{LONE}"}, "job_id"),
]  # fmt: skip


def _method(client: Any, name: str) -> Any:
    for part in name.split("."):
        client = getattr(client, part)
    return client


@pytest.mark.parametrize(("method", "kwargs", "param"), SURROGATE_CASES)
def test_a_lone_surrogate_is_refused_by_its_field_before_anything_is_sent(
    method: str, kwargs: dict[str, Any], param: str
) -> None:
    seen, http, ahttp = recording()
    refused = pytest.raises(InvalidArgumentError, match="is not valid Unicode: it holds a lone surrogate")
    with Client(base_url="http://svc", http_client=http) as client, refused as caught:
        _method(client, method)(**kwargs)
    assert caught.value.param == param, caught.value
    assert "'\\ud800'" in str(caught.value) or "'\\udcff'" in str(caught.value)

    async def async_call() -> InvalidArgumentError:
        async with AsyncClient(base_url="http://svc", http_client=ahttp) as aclient:
            with pytest.raises(InvalidArgumentError) as caught:
                await _method(aclient, method)(**kwargs)
            return caught.value

    assert asyncio.run(async_call()).param == param
    assert seen == []


def test_valid_non_ascii_text_is_sent_as_utf8() -> None:
    seen, http, _ = recording()
    text = "café 😀 \U0001f600 中文"
    with Client(base_url="http://svc", http_client=http, max_retries=0) as client:
        with pytest.raises(Exception) as answered:
            client.score(question=text, answers=[text])
        assert not isinstance(answered.value, InvalidArgumentError), answered.value  # sent, not refused
        client.jobs.submit([{"question": text, "answers": [text], "custom_id": text}], kind="rewards",
                           metadata={text: text})  # fmt: skip
    assert text.encode() in seen[0].content and seen[1].content.count(text.encode()) == 5


def test_an_idempotency_key_an_http_header_cannot_carry_is_refused() -> None:
    seen, http, _ = recording()
    with Client(base_url="http://svc", http_client=http) as client:
        for key in (LONE, "clé"):
            with pytest.raises(ValueError, match="idempotency_key must be printable ASCII"):
                client.jobs.submit([{"question": "q", "answers": ["a"]}], kind="rewards", idempotency_key=key)
    assert seen == []
