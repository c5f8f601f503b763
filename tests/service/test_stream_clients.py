"""Clients that leave a response part-way or stop reading it, under real uvicorn with the HTTP stack `rlaifv serve`
runs: the status counted (499, not the 200 that uvicorn's silent drop of the rest made it), the stream stopped
early, a reader that takes nothing cut after RLAIFV_STREAM_WRITE_TIMEOUT_S, and at shutdown before uvicorn's own
cancel (which logged an error and a traceback). The protocol's timers are also driven by hand on a fake loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from starlette.types import Message

from rlaifv.service.errors import install_error_handlers
from rlaifv.service.http_protocol import HeadDeadlineH11Protocol
from rlaifv.service.metrics import Metrics
from rlaifv.service.middleware import RequestContextMiddleware
from rlaifv.service.serve_cli import HTTP_OPTIONS
from rlaifv.service.settings import Settings
from rlaifv.testing.server import uvicorn_thread
from tests.service.conftest import logs_to

pytestmark = pytest.mark.integration

CHUNK = b"x" * 65536
CHUNKS = 400  # 26 MB: far more than the socket buffers of both sides hold, so the server's writes pause
DEADLINE_S = 15.0


class Records(logging.Handler):
    """Every record of our loggers and uvicorn's, with a wait for one that matches."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[logging.LogRecord] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.seen.append(record)
            self.changed.notify_all()

    def wait_for(
        self, match: Callable[[logging.LogRecord], bool], what: str, timeout_s: float = DEADLINE_S
    ) -> logging.LogRecord:
        with self.changed:
            found = self.changed.wait_for(lambda: next((r for r in self.seen if match(r)), None), timeout_s)
        assert found is not None, f"no {what} within {timeout_s} s: {[r.getMessage() for r in self.seen]}"
        return found

    def access(self) -> logging.LogRecord:
        return self.wait_for(lambda r: r.name == "rlaifv.access" and r.path != "/metrics", "access line")

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.seen if r.levelno >= logging.ERROR or r.exc_info]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    with logs_to(handler):
        yield handler


class StreamApp:
    """The service's middleware before `/big` (a 26 MB stream whose generator awaits nothing, as the chat stream's)
    and `/after-lost` (a JSON answer given once the server has seen its connection lost)."""

    def __init__(self, send_buffer: int = 65536, **settings: Any) -> None:
        self.send_buffer = send_buffer
        self.settings = Settings(**settings)
        self.metrics = Metrics()
        self.produced = 0
        self.paused = threading.Event()  # the server's writes paused: the client's buffers are full
        self.lost = threading.Event()  # the server saw a connection close
        self.app = FastAPI()
        self.app.state.settings = self.settings  # read by the protocol (its timeouts)
        self.app.state.metrics = self.metrics  # and its cuts counted there
        install_error_handlers(self.app)
        self.app.add_middleware(RequestContextMiddleware, metrics=self.metrics, settings=self.settings)
        self.app.get("/big")(self.big)
        self.app.get("/after-lost")(self.after_lost)
        self.app.get("/one-chunk")(self.one_chunk)
        self.app.get("/whole")(self.whole)

    async def one_chunk(self) -> StreamingResponse:
        """One 5 MB chunk: the body's (empty) end then waits on the paused transport."""

        async def body() -> AsyncIterator[bytes]:
            yield CHUNK * (5 * 2**20 // len(CHUNK))

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def whole(self) -> Response:
        """A 5 MB answer in one message (a chat completion of many choices with logprobs, not streamed)."""
        return Response(CHUNK * (5 * 2**20 // len(CHUNK)), media_type="application/json")

    async def big(self) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(CHUNKS):
                self.produced += 1
                yield CHUNK

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def after_lost(self) -> dict[str, bool]:
        assert await asyncio.to_thread(self.lost.wait, DEADLINE_S)
        return {"ok": True}

    def protocol(self) -> type[HeadDeadlineH11Protocol]:
        app = self

        class Watched(HeadDeadlineH11Protocol):
            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                # A fixed send buffer: the kernel does not grow it later (autotuning), which would resume writes
                # paused for a client that reads nothing.
                transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, app.send_buffer)
                super().connection_made(transport)

            def pause_writing(self) -> None:
                super().pause_writing()
                app.paused.set()

            def connection_lost(self, exc: Exception | None) -> None:
                super().connection_lost(exc)
                app.lost.set()

        return Watched

    def counted(self, status: int) -> float:
        for route in ("/big", "/after-lost", "/one-chunk", "/whole"):
            labels = {"route": route, "method": "GET", "status": str(status)}
            value = self.metrics.registry.get_sample_value("rlaifv_http_requests_total", labels)
            if value:
                return value
        return 0.0

    @contextlib.contextmanager
    def served(self, grace_s: int | None = None) -> Iterator[tuple[int, uvicorn.Server]]:
        """Under uvicorn on a free port, in a thread; yields the port and the server. Joined at the end."""
        options = {"http": self.protocol(), "timeout_graceful_shutdown": grace_s}
        with uvicorn_thread(self.app, deadline_s=DEADLINE_S, must_stop=True, **options) as (port, server):
            yield port, server


def request(port: int, path: str, request_id: str) -> socket.socket:
    """A raw client with a tiny receive buffer that has sent `GET path` and read nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(DEADLINE_S)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nX-Request-ID: {request_id}\r\n\r\n".encode())
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Reads what is left until the server's end: True once the connection is closed or reset."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_stream_left_part_way_is_counted_499_and_stops_early(records: Records) -> None:
    """The finding: uvicorn drops what is sent to a closed connection without a word, and a generator that awaits
    nothing ran to its end (serialising all of it for nobody) and sent the body's end: counted 200."""
    app = StreamApp()
    with app.served() as (port, _), request(port, "/big", "left-part-way") as sock:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert app.paused.wait(DEADLINE_S), "the server's writes never paused"
        sock.close()  # unread data: the server sees a reset
        access = records.access()
    assert (access.status, access.path) == (499, "/big") and not hasattr(access, "cut")
    assert (app.counted(499), app.counted(200)) == (1.0, 0.0)
    assert app.produced < CHUNKS, "the stream ran to its end for nobody"
    assert not records.errors()


def test_a_json_answer_whose_client_left_is_counted_499(records: Records) -> None:
    """A one-message answer given after its client left (a handler that does not watch the client) was 200."""
    app = StreamApp()
    with app.served() as (port, _):
        with request(port, "/after-lost", "left-before-answer"):
            pass
        access = records.access()
    assert (access.status, access.path) == (499, "/after-lost")
    assert not records.errors()


def test_a_client_that_reads_nothing_is_cut_after_the_write_timeout(records: Records) -> None:
    """It held the handler, the whole answer and the connection for ever (seen 159 s and counting)."""
    app = StreamApp(stream_write_timeout_s=0.3)
    with app.served() as (port, _), request(port, "/big", "stalled-reader") as sock:
        cut = records.wait_for(lambda r: r.getMessage().startswith("response cut"), "cut warning")
        access = records.access()
        assert closed_by_server(sock), "the connection was left open"
    assert cut.levelno == logging.WARNING and "RLAIFV_STREAM_WRITE_TIMEOUT_S" in cut.getMessage()
    assert (cut.request_id, cut.path) == ("stalled-reader", "/big") and cut.unsent_bytes > 0
    assert access.status == 499 and (app.counted(499), app.counted(200)) == (1.0, 0.0)
    assert app.produced < CHUNKS
    assert not records.errors()


def test_a_response_whose_end_waited_on_a_cut_client_is_499_and_every_cut_is_counted(records: Records) -> None:
    """The end of a stream waiting on the paused transport returned silently once the client was cut, and the
    response was counted 200; a one-message answer the server had taken whole keeps its status (it was logged
    before the cut), and the cut shows in `rlaifv_http_responses_cut_total`."""
    app = StreamApp(stream_write_timeout_s=0.3)
    with app.served() as (port, _):
        for path in ("/one-chunk", "/whole"):
            with request(port, path, f"unread{path}") as sock:
                records.wait_for(lambda r, p=path: r.getMessage().startswith("response cut") and r.path == p, "cut")
                assert closed_by_server(sock)
        accesses = {r.path: r.status for r in records.seen if r.name == "rlaifv.access"}
    assert accesses == {"/one-chunk": 499, "/whole": 200}
    cut = app.metrics.registry.get_sample_value("rlaifv_http_responses_cut_total", {"reason": "unread"})
    assert cut == 2
    assert not records.errors()


def test_a_cut_resets_the_connection_and_drops_what_the_kernel_still_held(records: Records) -> None:
    """An abort without SO_LINGER left the socket in FIN-WAIT-1 with its send queue (MBs) for minutes, and the
    client read on through it long after the cut."""
    app = StreamApp(send_buffer=4 * 2**20, stream_write_timeout_s=0.3)
    with app.served() as (port, _), request(port, "/big", "reset") as sock:
        records.wait_for(lambda r: r.getMessage().startswith("response cut"), "cut warning")
        taken = 0
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                taken += len(chunk)
    assert taken < 2**20, f"{taken} bytes read after the cut"


@pytest.mark.slow
def test_a_client_reading_slowly_is_not_cut(records: Records) -> None:
    """Progress was read from the transport's buffer alone, which shrinks only once the kernel's send queue (MBs,
    autotuned) has drained a third: a client reading 100 KB/s was cut as one reading nothing."""
    app = StreamApp(send_buffer=4 * 2**20, stream_write_timeout_s=1.5)
    with app.served() as (port, _), request(port, "/big", "slow-reader") as sock:
        assert app.paused.wait(DEADLINE_S), "the server's writes never paused"
        until = time.monotonic() + 5
        while time.monotonic() < until:  # about 80 KB/s
            assert sock.recv(4096), "the server closed the connection"
            time.sleep(0.05)
        assert not any(r.getMessage().startswith("response cut") for r in records.seen)
    assert not records.errors()


def test_a_stalled_reader_is_cut_at_the_drains_deadline_not_cancelled_by_uvicorn(records: Records) -> None:
    """With no write timeout (0) the stop alone cuts it: uvicorn cancelled the handler at the grace's end, logging
    "Cancel 1 running task(s)" and an "Exception in ASGI application" traceback, both errors."""
    app = StreamApp(stream_write_timeout_s=0)
    with app.served(grace_s=2) as (port, server), request(port, "/big", "stalled-at-stop"):
        assert app.paused.wait(DEADLINE_S), "the server's writes never paused"
        server.should_exit = True
        cut = records.wait_for(lambda r: r.getMessage().startswith("response cut"), "cut warning")
        access = records.access()
    assert "the server is stopping" in cut.getMessage() and cut.request_id == "stalled-at-stop"
    assert access.status == 499
    assert not records.errors()


async def test_a_send_raising_oserror_under_asgi_2_4_is_counted_499() -> None:
    """ASGI 2.4 lets a server raise OSError from `send` on a closed connection (Starlette turns it into
    ClientDisconnect for streams): it went up as an unhandled error after the response had started."""
    app = StreamApp()
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if len(sent) == 3:
            raise OSError("the connection is closed")
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/big",
        "raw_path": b"/big",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    await app.app(scope, receive, send)
    assert (app.counted(499), app.counted(200), app.counted(500)) == (1.0, 0.0, 0.0)
    assert app.produced < CHUNKS


def chat_request(eos: int) -> bytes:
    """A chat stream of some 6 MB from the tiny bundle (16 choices of 256 tokens, each with 20 top logprobs): more
    than the sockets' buffers hold."""
    import json

    body = json.dumps(
        {
            "model": "tiny-llava",
            "messages": [{"role": "user", "content": "hi"}],
            "n": 16,
            "max_tokens": 256,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,
            "logit_bias": {str(eos): -100},  # every answer its full length
        }
    ).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.slow
def test_chat_streams_left_or_not_read_are_counted_499(make_server: Any, service_bundle: Any, records: Records) -> None:
    """The finding on the real route: both were counted 200 (the one not read once its client finally left)."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(service_bundle / "policy").eos_token_id
    server = make_server(max_n=16, max_tokens=256, stream_write_timeout_s=0.5)

    def chat_access(n: int) -> list[logging.LogRecord]:
        lines = [r for r in records.seen if r.name == "rlaifv.access" and r.path == "/v1/chat/completions"]
        return lines if len(lines) >= n else []

    for n, reads in enumerate((True, False), start=1):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(DEADLINE_S * 4)  # the model's time
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(chat_request(eos))
            received = b""
            while reads and b"data: " not in received:  # the first chunk, then gone with the rest unread
                received += sock.recv(4096)
            if not reads:
                records.wait_for(lambda r: r.getMessage().startswith("response cut"), "cut warning", DEADLINE_S * 4)
        with records.changed:
            assert records.changed.wait_for(lambda n=n: chat_access(n), DEADLINE_S), "no access line"
    assert [r.status for r in chat_access(2)] == [499, 499]
    assert not records.errors()


# -- the protocol's timers, by hand ----------------------------------------------------------------------------


class FakeTimer:
    def __init__(self, loop: FakeLoop, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.loop, self.when, self.callback, self.args = loop, when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """call_later and time, run by hand: `advance` fires what falls due."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> FakeTimer:
        timer = FakeTimer(self, self.now + delay, callback, args)
        self.timers.append(timer)
        return timer

    def call_soon(self, callback: Callable[..., None], *args: Any) -> FakeTimer:
        return self.call_later(0, callback, *args)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := [t for t in self.timers if not t.cancelled and t.when <= self.now]:
            for timer in due:
                self.timers.remove(timer)
                timer.callback(*timer.args)


class FakeTransport:
    def __init__(self) -> None:
        self.unsent = 0
        self.aborted = self.closing = False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = True

    def write(self, data: bytes) -> None:
        self.unsent += len(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def connection(**settings: Any) -> tuple[HeadDeadlineH11Protocol, FakeLoop, FakeTransport]:
    from uvicorn.server import ServerState

    app = FastAPI()
    app.state.settings = Settings(**settings)
    config = uvicorn.Config(app, timeout_graceful_shutdown=10, **HTTP_OPTIONS)
    loop, transport = FakeLoop(), FakeTransport()
    protocol = HeadDeadlineH11Protocol(config, ServerState(), {}, _loop=loop)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, loop, transport


def test_a_paused_write_is_cut_only_when_the_client_took_nothing_for_the_whole_timeout() -> None:
    protocol, loop, transport = connection(stream_write_timeout_s=60, header_timeout_s=10_000)
    transport.unsent = 500_000
    protocol.pause_writing()
    loop.advance(59)
    transport.unsent = 499_000  # a slow link reading one big message
    loop.advance(1)
    assert not transport.aborted
    loop.advance(59.9)
    assert not transport.aborted
    loop.advance(0.1)  # nothing taken for a whole period
    assert transport.aborted


def test_a_write_that_resumes_is_not_cut_and_zero_means_no_limit() -> None:
    protocol, loop, transport = connection(stream_write_timeout_s=60, header_timeout_s=10_000)
    transport.unsent = 100_000
    protocol.pause_writing()
    loop.advance(30)
    transport.unsent = 10_000
    protocol.resume_writing()
    loop.advance(1000)
    assert not transport.aborted
    protocol, loop, transport = connection(stream_write_timeout_s=0)
    transport.unsent = 100_000
    protocol.pause_writing()
    loop.advance(10_000)
    assert not transport.aborted


@pytest.mark.parametrize("closed_by", ["keep-alive timeout", "request head timeout", "connection: close"])
def test_the_unread_rest_of_a_closed_connections_response_is_cut_after_the_timeout(closed_by: str) -> None:
    """Under the high-water mark writes never pause; a close waits for the rest to be read: for ever, unread."""
    protocol, loop, transport = connection(stream_write_timeout_s=60, header_timeout_s=30)
    transport.unsent = 30_000
    if closed_by == "keep-alive timeout":
        protocol.timeout_keep_alive_handler()
    elif closed_by == "request head timeout":
        loop.advance(30)
    else:
        transport.close()
        protocol.on_response_complete()
    assert transport.closing
    loop.advance(59)
    transport.unsent = 29_000  # read on, slowly
    loop.advance(60)
    assert not transport.aborted
    loop.advance(60)
    assert transport.aborted


@pytest.mark.parametrize(
    ("before", "during", "cut"),
    [
        ("paused", "nothing", True),
        ("paused", "some read", False),
        ("paused", "resumed", False),
        ("idle", "paused after", True),
        ("finished with an unread rest", "nothing", True),
        ("idle", "nothing", False),
        ("idle", "answered after the stop, partly read", False),
    ],
)
def test_at_the_drains_deadline_what_the_client_took_nothing_of_since_the_stop_is_cut(
    before: str, during: str, cut: bool
) -> None:
    """Grace 10 s: the drain answers what is left at 9 s (`answer_deadline_s`), uvicorn cancels at 10 s."""
    protocol, loop, transport = connection(stream_write_timeout_s=0)
    protocol.cycle = type("Cycle", (), {"response_complete": before != "paused", "scope": {"path": "/x"}})()
    if before == "paused":
        transport.unsent = 200_000
        protocol.pause_writing()
    elif before.startswith("finished"):
        transport.unsent = 30_000
    protocol.shutdown()
    loop.advance(5)
    if during == "some read":
        transport.unsent -= 1000
    elif during == "resumed":
        protocol.resume_writing()
        transport.unsent = 70_000
        protocol.pause_writing()
    elif during == "paused after":
        transport.unsent = 80_000
        protocol.pause_writing()
    elif during.startswith("answered after"):  # under the pause mark: written whole, the response complete
        protocol.transport.write(b"\0" * 1_000_000)
        transport.unsent -= 800_000
    loop.advance(3.9)
    assert not transport.aborted
    loop.advance(0.1)
    assert transport.aborted is cut
