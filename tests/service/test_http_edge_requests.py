"""Requests at the edges of HTTP/1.1 framing, sent over raw sockets to uvicorn with the HTTP stack `rlaifv serve`
runs (`serve_cli.HTTP_OPTIONS`): Content-Length beside Transfer-Encoding (the request-smuggling shape), differing
Content-Lengths, and request heads around the 64 KiB bound. Every refusal is the service's JSON error shape, and
the connection is closed after it (its end read by the client, not a reset). The jobs upload's repeated query
parameters are refused too."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from rlaifv.service.errors import install_error_handlers
from rlaifv.service.http_protocol import UNPARSED_ROUTE
from rlaifv.service.metrics import Metrics
from rlaifv.service.serve_cli import MAX_HEADER_BYTES
from rlaifv.testing.server import uvicorn_thread


class Echo:
    """An app whose POST /echo answers the body it read, counting the requests it served."""

    def __init__(self) -> None:
        self.served: list[bytes] = []
        self.app = FastAPI()
        self.app.state.metrics = Metrics()
        install_error_handlers(self.app)

        @self.app.post("/echo")
        async def echo(request: Request) -> dict[str, str]:
            body = await request.body()
            self.served.append(body)
            return {"body": body.decode("latin-1")}

        @self.app.get("/ok")
        async def ok() -> dict[str, bool]:
            return {"ok": True}


@pytest.fixture
def echo() -> Iterator[tuple[Echo, int]]:
    """`Echo` under uvicorn with `rlaifv serve`'s HTTP options, on a free port; yields it and its port."""
    app = Echo()
    with uvicorn_thread(app.app) as (port, _):
        yield app, port


def exchange(port: int, request: bytes, piece: int | None = None) -> bytes:
    """Sends `request` (in pieces of `piece` bytes, a pause between them, or at once), then reads until the server
    closes. A reset or a broken pipe fails the test: the answer must reach the client."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for start in range(0, len(request), piece or len(request)):
            sock.sendall(request[start : start + (piece or len(request))])
            if piece:
                time.sleep(0.0005)
        received = b""
        while chunk := sock.recv(65536):  # the 30 s timeout fails the test where nothing closes the connection
            received += chunk
    return received


def responses(received: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in `received`, each (status, headers, body), read by their Content-Length."""
    found = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        found.append((int(status_line.split()[1]), headers, rest[:length]))
        received = rest[length:]
    return found


def refused(received: bytes, status: int) -> dict[str, Any]:
    """The one response in `received`: `status`, the JSON error shape, `Connection: close`; its `error`."""
    (answer,) = responses(received)  # one answer, then the connection's end
    assert answer[0] == status, received[:300]
    assert answer[1]["content-type"] == "application/json" and answer[1]["connection"] == "close"
    error: dict[str, Any] = json.loads(answer[2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


SMUGGLED = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"  # what a proxy framing by Content-Length sees as the next request


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"content-length: 0\r\ntransfer-encoding: Chunked\r\n",
    ],
)
def test_a_request_framed_by_both_content_length_and_transfer_encoding_is_refused_and_closed(
    echo: tuple[Echo, int], framing: bytes
) -> None:
    """h11 read it as chunked and served it: behind a proxy that frames by Content-Length, the two disagree on where
    the request ends (the request-smuggling shape). RFC 9112 section 6.3 lets a server refuse it, and then it must
    close the connection: nothing after it on the connection is read as a request."""
    app, port = echo
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n" + b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED
    error = refused(exchange(port, request), 400)
    assert error["code"] == "invalid_http" and "Content-Length and Transfer-Encoding" in error["message"]
    assert app.served == []
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    assert responses(exchange(port, chunked + b"3\r\nabc\r\n0\r\n\r\n"))[0][2] == b'{"body":"abc"}'  # alone: read


@pytest.mark.parametrize(
    "lengths", [b"Content-Length: 3\r\nContent-Length: 4\r\n", b"Content-Length: 3, 4\r\n"], ids=["headers", "list"]
)
def test_differing_content_lengths_are_refused_in_the_error_shape_and_closed(
    echo: tuple[Echo, int], lengths: bytes
) -> None:
    """h11 refused them with uvicorn's text/plain 400; identical ones are one length (RFC 9112 section 6.3)."""
    app, port = echo
    error = refused(exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\nabcd" + SMUGGLED), 400)
    assert error["code"] == "invalid_http" and "Content-Length" in error["message"]
    same = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    assert responses(exchange(port, same))[0][:1] == (200,) and app.served == [b"abc"]


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /ok HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", 400, "invalid_http"),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", 501, "unsupported_transfer_encoding"),
    ],
)
def test_every_request_h11_refuses_is_answered_in_the_error_shape(
    echo: tuple[Echo, int], request_bytes: bytes, status: int, code: str
) -> None:
    """With a request id to quote (X-Request-ID, as every other answer has) and counted in the HTTP requests
    metric (route `unparsed`): a client's broken requests showed in neither."""
    app, port = echo
    received = exchange(port, request_bytes)
    assert refused(received, status)["code"] == code
    request_id = responses(received)[0][1]["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    labels = {"route": UNPARSED_ROUTE, "method": "other", "status": str(status)}
    assert app.app.state.metrics.registry.get_sample_value("rlaifv_http_requests_total", labels) == 1


def head_of(size: int) -> bytes:
    """A GET whose request line and headers, the blank line included, are `size` bytes."""
    bare = b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: \r\n\r\n"
    return bare[:-4] + b"a" * (size - len(bare)) + b"\r\n\r\n"


@pytest.mark.parametrize("piece", [None, 4096], ids=["at-once", "in-pieces"])
def test_a_request_head_over_64_kib_is_431_and_closed_whichever_way_it_comes(
    echo: tuple[Echo, int], piece: int | None
) -> None:
    """h11 checked its bound only on a head still incomplete after a read: one of 70 KB (or 250 KB) read at once
    was served. Larger ones were refused with the rest unread, and the client got a reset or a broken pipe instead
    of the answer. The bound is now exact, the answer a 431 that the client reads, whatever the head's size."""
    assert len(head_of(MAX_HEADER_BYTES)) == MAX_HEADER_BYTES
    assert responses(exchange(echo[1], head_of(MAX_HEADER_BYTES), piece))[0][0] == 200
    # In pieces, what follows the refusal must be sent within the linger (REFUSAL_LINGER_S): 186 KB is, on any load.
    for size in (MAX_HEADER_BYTES + 1, 70 * 1024, 250 * 1024, *([1024 * 1024] if piece is None else [])):
        error = refused(exchange(echo[1], head_of(size), piece), 431)
        assert error["code"] == "headers_too_large" and str(MAX_HEADER_BYTES) in error["message"], size


def test_a_client_that_keeps_sending_after_a_refusal_is_closed(echo: tuple[Echo, int]) -> None:
    """After the answer the server reads on (dropping what comes) for a while so that the client gets it, but a
    client sending without end is cut off."""
    with socket.create_connection(("127.0.0.1", echo[1]), timeout=30) as sock:
        sent, started = 0, time.monotonic()
        with pytest.raises(OSError):  # a broken pipe or a reset
            while time.monotonic() - started < 20:
                sock.sendall(b"a" * 65536 if sent else head_of(MAX_HEADER_BYTES + 1))
                sent += 65536
        assert sent < 64 * 1024 * 1024


class UploadStore:
    """Enough of a job store for an upload: records what it is given."""

    max_items = 100

    def __init__(self) -> None:
        self.created: list[Any] = []

    async def create(self, request: Any, **kwargs: Any) -> Any:
        from rlaifv.service.protocol import Job

        self.created.append(request)
        now = int(time.time())
        return Job(id="job-" + "0" * 32, kind=request.kind, status="queued", created=now, updated=now,
                   total=len(request.items), completed=0, failed=0)  # fmt: skip


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("kind=rewards&kind=best_of_n", "kind"),
        ("kind=rewards&metadata=%7B%7D&metadata=%7B%22run%22%3A%227%22%7D", "metadata"),
    ],
)
async def test_a_query_parameter_given_twice_to_the_upload_is_refused(query: str, name: str) -> None:
    """FastAPI takes the last of a repeated query parameter: `?kind=rewards&kind=best_of_n` ran every line as a
    best-of-n request."""
    from rlaifv.service.routes import jobs as job_routes

    app, store = FastAPI(), UploadStore()
    install_error_handlers(app)
    app.include_router(job_routes.router)
    app.state.job_store = store
    body = b'{"question": "q", "answers": ["a"]}\n'
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/v1/jobs/upload?" + query, content=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == name and "given 2 times" in error["message"] and store.created == []
        once = await client.post("/v1/jobs/upload?kind=rewards&metadata=%7B%7D", content=body)
    assert once.status_code == 202, once.text
    assert [job.kind for job in store.created] == ["rewards"]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v1/jobs?limit=1&limit=100", "limit"),
        ("/v1/jobs?after=job-a&after=job-b", "after"),
        ("/v1/jobs/job-1/results?format=json&format=jsonl", "format"),
        ("/v1/jobs/job-1/results?after=3&after=0", "after"),
    ],
)
async def test_a_query_parameter_given_twice_to_a_job_read_is_refused(path: str, name: str) -> None:
    """The last of each was taken: `?after=3&after=0` read the results after item 0, not 3."""
    from rlaifv.service.routes import jobs as job_routes

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(job_routes.router)
    app.state.job_store = UploadStore()  # never reached: the repeat is refused first
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get(path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and "given 2 times" in error["message"]


def test_a_refused_body_keeps_its_request_id_and_is_counted_once() -> None:
    """h11 refuses a bad chunk after the app began the request: the answer is that request's (its id, as in its
    access line), counted by the middleware under its route, not again as route `unparsed` with a new id."""
    import threading
    import types

    from rlaifv.service.middleware import RequestContextMiddleware

    app, metrics, began = FastAPI(), Metrics(), threading.Event()
    app.state.metrics = metrics
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        began.set()
        return {"n": len(await request.body())}

    settings = types.SimpleNamespace(max_body_bytes=10**6, body_timeout_s=30.0)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, settings=settings)
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Request-ID: client-id-123\r\nTransfer-Encoding: chunked\r\n\r\n"
    with uvicorn_thread(app) as (port, _), socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + b"3\r\nabc\r\n")
        assert began.wait(30)
        sock.sendall(b"ZZ\r\nabc\r\n0\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    (answer,) = responses(received)
    assert answer[0] == 400 and answer[1]["x-request-id"] == "client-id-123", received[:300]
    unparsed = {"route": UNPARSED_ROUTE, "method": "other", "status": "400"}
    assert metrics.registry.get_sample_value("rlaifv_http_requests_total", unparsed) is None
    counted = {"route": "/echo", "method": "POST", "status": "400"}  # (was 499, a client gone, in the access line too)
    deadline = time.monotonic() + 30
    while metrics.registry.get_sample_value("rlaifv_http_requests_total", counted) is None:  # the app ends after
        assert time.monotonic() < deadline, metrics.registry.get_sample_value(
            "rlaifv_http_requests_total", {**counted, "status": "499"}
        )
        time.sleep(0.01)
    assert metrics.registry.get_sample_value("rlaifv_http_requests_total", counted) == 1
