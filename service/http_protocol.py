"""uvicorn's h11 HTTP/1.1 protocol with a deadline on each request head and on a response its client stops reading.

uvicorn times a connection only between requests (its keep-alive timer, armed after a response, cancelled by
any byte): a connection that sends nothing, or trickles its headers a byte at a time, stayed open for ever, and
a few hundred of them used up the process's file descriptors (slowloris). Here every request head must be
complete within `RLAIFV_HEADER_TIMEOUT_S` of the connection opening or of the previous response; the body has
its own bound (`RLAIFV_BODY_TIMEOUT_S`, in the middleware).

Nor does uvicorn time a response: a client that stopped reading a big stream held its handler (and the whole
answer in memory: a chat completion of 16 choices with logprobs, 5 MB) and its connection for ever, and past the
shutdown grace uvicorn cancelled the handler with an error and a traceback. Here a connection whose writes are
paused (its socket's buffers full), or that is closing with bytes still unsent, and whose client takes nothing
for `RLAIFV_STREAM_WRITE_TIMEOUT_S` is aborted (a close waits for the unsent rest to be read): the handler's
pending `send` returns as for a client gone, the response is left incomplete and counted 499 by the middleware.
Once the server stops, a response its client took nothing of since the stop is aborted the same way when the
drain answers what is left (`service.shutdown.answer_deadline_s`), before uvicorn's own cancel.

h11 refuses less than it should (`_StrictConnection`): its bound on a request head (`h11_max_incomplete_event_size`)
is checked only while the head is incomplete, so a 200 KB head that came in one read (asyncio reads 256 KiB at a
time) was served; and a request with both Content-Length and Transfer-Encoding was read as chunked, the
request-smuggling shape behind a proxy that frames by Content-Length (RFC 9112 section 6.3). Both are refused
here, and every request h11 refuses is answered in the service's JSON error shape (uvicorn's was a text/plain
400) with its own status (431 for a head over the bound), then the connection is closed once the client has had
the answer: closed at once, with the rest of the request unread, the kernel reset the connection and the client
saw a reset, not the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import socket
import struct
import termios
import uuid
from typing import Any, cast

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http import h11_impl
from uvicorn.protocols.http.h11_impl import H11Protocol

from rlaifv.service.log_format import request_id_var
from rlaifv.service.shutdown import answer_deadline_s

DEFAULT_HEADER_TIMEOUT_S = 30.0
DEFAULT_WRITE_TIMEOUT_S = 60.0
log = logging.getLogger("rlaifv.http")
_TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
# After a refusal the connection is closed once the client has closed its side, or has sent this many more bytes
# (read and dropped), or at this deadline: closed with the rest of a request unread, the kernel sends a reset, which
# can destroy the answer before the client reads it (RFC 9112 section 9.6).
REFUSAL_LINGER_S = 2.0
REFUSAL_LINGER_BYTES = 4 * 1024 * 1024
PARSER_STATUS = "parser_status"  # the request state's key for the status the parser answered a request's body with
UNPARSED_ROUTE = "unparsed"  # the route label of a request the parser refused (no route was matched)


class _StrictConnection(h11.Connection):
    """h11's server side, refusing two requests more, as h11 refuses its own (the peer's state ERROR, the
    `RemoteProtocolError` raised from `next_event`):

    - a request head over the bound that came complete in one read: h11 compares the bound with its buffer only
      while an event is incomplete (`next_event` returning NEED_DATA), so a head of 70 KB, or 250 KB, read at once
      was served;
    - a request with both Content-Length and Transfer-Encoding (h11 reads it as chunked; RFC 9112 section 6.3 lets a
      server refuse it, and it must close the connection). Differing Content-Lengths h11 refuses itself.

    `refusal` is the answer to the last refused request: status, error type, code and message."""

    def __init__(self, max_head_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes
        self.refusal: tuple[int, str, str, str] | None = None
        self.refused_head = True  # whether the last refusal came before a request head was read (else: its body)
        self._ours: tuple[int, str, str, str] | None = None  # the refusal `_extract_next_receive_event` raised

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        reading_head = self.their_state is h11.IDLE
        self._ours = None
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = self._ours or self._answer(exc, reading_head)
            self.refused_head = reading_head
            raise

    def _extract_next_receive_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """h11's (private, called before the event changes any state: what it raises is handled as h11's own
        refusals are), and the two checks on a request head read complete."""
        buffered = len(self._receive_buffer)
        event = super()._extract_next_receive_event()
        if isinstance(event, h11.Request):
            head_bytes = buffered - len(self._receive_buffer)  # what the head took of the buffer: its raw size
            if head_bytes > self.max_head_bytes:
                self._ours = self._head_too_large()
                raise h11.LocalProtocolError(self._ours[3], error_status_hint=431)
            names = {name for name, _ in event.headers}  # (lower-cased by h11)
            if b"content-length" in names and b"transfer-encoding" in names:
                message = (
                    "a request may not have both Content-Length and Transfer-Encoding (RFC 9112 section 6.3): "
                    "send one of them"
                )
                self._ours = (400, "invalid_request_error", "invalid_http", message)
                raise h11.LocalProtocolError(message)
        return event

    def _head_too_large(self) -> tuple[int, str, str, str]:
        message = f"the request line and headers are over the limit of {self.max_head_bytes} bytes"
        return 431, "invalid_request_error", "headers_too_large", message

    def _answer(self, exc: h11.RemoteProtocolError, reading_head: bool) -> tuple[int, str, str, str]:
        """The answer to a refusal of h11's own, by its status hint (431: the buffer over the bound, 501: a
        transfer coding other than chunked; 400 otherwise)."""
        status = exc.error_status_hint
        if status == 431 and reading_head:
            return self._head_too_large()
        reason = str(exc)
        reason = reason if len(reason) <= 200 else reason[:197] + "..."  # (h11's can quote a whole header line)
        if status == 501:
            return 501, "not_implemented_error", "unsupported_transfer_encoding", reason
        return 400 if status == 431 else status, "invalid_request_error", "invalid_http", f"invalid HTTP: {reason}"


class HeadDeadlineH11Protocol(H11Protocol):
    """The deadlines are the served app's `state.settings.header_timeout_s` and `stream_write_timeout_s` (the
    defaults for another app)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _StrictConnection(self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
        settings = getattr(getattr(self.config.app, "state", None), "settings", None)
        self.header_timeout_s = float(getattr(settings, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S))
        self.write_timeout_s = float(getattr(settings, "stream_write_timeout_s", DEFAULT_WRITE_TIMEOUT_S))
        # The drain's own grace: uvicorn's is it rounded up to whole seconds (`serve`), or none at all.
        graces = (getattr(settings, "shutdown_grace_s", None), self.config.timeout_graceful_shutdown)
        self.grace_s: float | None = None if graces[1] is None else min(float(g) for g in graces if g is not None)
        self.metrics = getattr(getattr(self.config.app, "state", None), "metrics", None)
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._taken_at_pause = 0  # `_taken()` when the write timer was armed
        self._stop_timer: asyncio.TimerHandle | None = None
        self._taken_at_stop = 0  # `_taken()` when the server began stopping
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lingering = False  # a refusal was answered: what comes now is dropped until the close
        self._dropped = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.counted = _Counted(transport)
        super().connection_made(cast(asyncio.Transport, self.counted))
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # the rest of a refused request (not given to h11, whose buffer would keep it)
            self._dropped += len(data)
            if self._dropped > REFUSAL_LINGER_BYTES:
                self._end_linger()
            return
        super().data_received(data)
        self._watch_head()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 refused (a text/plain 400 whatever the reason, then a close that
        could reset the connection before the client read it): the refusal's status in the service's JSON error
        shape, then the close once the client has had it (`_linger`)."""
        from rlaifv.service.errors import error_body  # (FastAPI's: `rlaifv serve --help` imports this module)
        from rlaifv.service.middleware import REQUEST_ID_HEADER

        refusal = getattr(self.conn, "refusal", None) or (400, "invalid_request_error", "invalid_http", msg)
        status, type_, code, message = refusal
        # A refused head has no request (nor a trusted id: a new one); a refused body's request is the app's,
        # counted by its middleware under its route, with the id its access line has.
        head = getattr(self.conn, "refused_head", True) or self.cycle is None
        request_id = uuid.uuid4().hex if head else str(self.cycle.scope.get("state", {}).get("request_id", ""))
        request_id = request_id or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        try:
            log.info(
                "request refused by the HTTP parser: %s",
                message,
                extra={"status": status, "code": code, "client": _shown_client(self.client)},
            )
        finally:
            request_id_var.reset(token)
        if self.metrics is not None and head:  # beside the app's requests: a dashboard's error rate sees it
            self.metrics.requests.labels(route=UNPARSED_ROUTE, method="other", status=str(status)).inc()
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # a response begun: nothing more can be said
            self.transport.close()
            return
        if not head and self.cycle is not None:  # the app's request: its access line and metric say this status
            self.cycle.scope.setdefault("state", {})[PARSER_STATUS] = status
        body = json.dumps(error_body(type_, message, None, code), separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (REQUEST_ID_HEADER.encode(), request_id.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"connection", b"close"),
        ]
        reason = h11_impl.STATUS_PHRASES.get(status, b"")
        answer = (
            h11.Response(status_code=status, headers=headers, reason=reason),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )
        for event in answer:
            self.transport.write(self.conn.send(event))
        self._linger()

    def _linger(self) -> None:
        """Close after the answer to a refusal: at once where a handler runs (an error in its body: the close tells
        it the client went, as uvicorn did), else once the client closes its side or has had its time
        (`REFUSAL_LINGER_S`, `REFUSAL_LINGER_BYTES`), our side half-closed meanwhile (the client reads the answer
        and its end). Closed with the rest of the request unread, the kernel sent a reset, and a client still
        sending (a head over the bound: 200 KB) got a broken pipe or a reset instead of the answer."""
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or not self.transport.can_write_eof():
            self.transport.close()
            return
        self._lingering = True
        self.transport.write_eof()
        self._linger_timer = self.loop.call_later(REFUSAL_LINGER_S, self._end_linger)

    def _end_linger(self) -> None:
        self._linger_timer = _cancelled(self._linger_timer)
        if not self.transport.is_closing():
            self.transport.close()
            self._watch_closing()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()
        self._watch_closing()  # a `Connection: close` response: closed as soon as complete

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._watch_closing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer = _cancelled(self._head_timer)
        self._write_timer = _cancelled(self._write_timer)
        self._stop_timer = _cancelled(self._stop_timer)
        self._linger_timer = _cancelled(self._linger_timer)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_timer = _cancelled(self._write_timer)
        self._watch_closing()

    def shutdown(self) -> None:
        """uvicorn's (close an idle connection, end a busy one after its response), and at the drain's deadline a
        cut of what the client took nothing of since the server began stopping: uvicorn cancelled such a handler
        at the end of the grace, logging an error and a traceback, or waited the grace out on a finished
        response's unread rest."""
        super().shutdown()
        grace = self.grace_s
        if grace is not None and self._stop_timer is None:
            self._taken_at_stop = self._taken()
            self._stop_timer = self.loop.call_later(answer_deadline_s(grace), self._stop_deadline)

    def _stop_deadline(self) -> None:
        self._stop_timer = None
        finished = self.cycle is None or self.cycle.response_complete
        if not (self.flow.write_paused or (finished and self._queued())) or self._taken() > self._taken_at_stop:
            return  # nothing waits on the client, or it took some during the drain: uvicorn's grace decides
        self._cut("the server is stopping and the client took nothing of the response meanwhile", "shutdown")

    def _watch_writes(self) -> None:
        """Armed when the transport pauses writing (over its high-water mark: the socket's buffers are full)."""
        if self.write_timeout_s > 0 and self._write_timer is None:
            self._taken_at_pause = self._taken()
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_expired)

    def _watch_closing(self) -> None:
        """Armed too while a closing connection still holds unsent bytes: a close waits for them to be read, and
        the rest of a response (under the high-water mark: writes never paused) held the connection for ever."""
        if self.transport.is_closing() and self.transport.get_write_buffer_size():
            self._watch_writes()

    def _write_expired(self) -> None:
        """Writes still paused: a client that took some of what waits reads on for another period (a slow link
        reading one big message is not cut); one that took nothing is cut."""
        self._write_timer = None
        if not (self.flow.write_paused or self.transport.is_closing()):  # (closing: nothing more is written)
            return
        if self._taken() > self._taken_at_pause:
            self._watch_writes()
            return
        self._cut(f"the client read nothing for {self.write_timeout_s:g} s (RLAIFV_STREAM_WRITE_TIMEOUT_S)", "unread")

    def _taken(self) -> int:
        """Bytes of this connection's responses the client has taken: written, less what is still queued."""
        return self.counted.written - self._queued()

    def _queued(self) -> int:
        """Bytes not yet taken by the client: the transport's buffer and the socket's send queue (unsent and
        unacknowledged, Linux's TIOCOUTQ). The buffer alone shrinks only when the kernel's queue, autotuned to MBs,
        has drained a third: a client reading 100 KB/s was cut as one reading nothing."""
        queued = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and _TIOCOUTQ is not None:
            with contextlib.suppress(OSError, ValueError):  # not a TCP socket here (or closed): the buffer alone
                queued += struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
        return queued

    def _cut(self, why: str, reason: str) -> None:
        """Reset the connection (a close waits for the unsent rest to be read, and an abort left it queued in the
        kernel, the socket in FIN-WAIT-1 for minutes): the handler's pending send returns as for a client gone,
        and the middleware counts the response 499. A response whose end the server had already taken was logged
        with its status: `rlaifv_http_responses_cut_total` counts every cut."""
        if self.metrics is not None:
            self.metrics.responses_cut.labels(reason=reason).inc()
        scope = self.cycle.scope if self.cycle is not None else {}
        state = scope.get("state") or {}
        log.warning(
            "response cut: %s; connection reset",
            why,
            extra={"request_id": state.get("request_id"), "path": scope.get("path"), "unsent_bytes": self._queued()},
        )
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset, not a close: the kernel kept the unsent queue (MBs) for minutes
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _owes(self) -> bool:
        """The peer owes a request head (h11's IDLE), or a body that its answer no longer waits for (a 404 or 405
        sent before the body was read: uvicorn's keep-alive timer, cancelled by each byte, let it trickle)."""
        their = self.conn.their_state
        return their is h11.IDLE or (self.conn.our_state is h11.DONE and their is h11.SEND_BODY)

    def _watch_head(self) -> None:
        """Armed while the peer owes what `_owes` says, stopped once it is in."""
        if self._owes() and not self.transport.is_closing():
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_expired)
        else:
            self._head_timer = _cancelled(self._head_timer)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._owes() and not self.transport.is_closing():
            self.transport.close()
            self._watch_closing()


def _shown_client(client: tuple[str, int] | None) -> str | None:
    return None if client is None else f"{client[0]}:{client[1]}"


def _cancelled(timer: asyncio.TimerHandle | None) -> asyncio.TimerHandle | None:
    """Cancels `timer` if armed; None, for the field that held it."""
    if timer is not None:
        timer.cancel()
    return None


class _Counted:
    """A transport that counts the bytes written to it: what a client took since a point is the growth of the
    bytes written less those still queued, whatever the handler wrote meanwhile (a response written after the
    server's stop and partly read was cut as one the client took nothing of)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
