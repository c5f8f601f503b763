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
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from rlaifv.service.shutdown import answer_deadline_s

DEFAULT_HEADER_TIMEOUT_S = 30.0
DEFAULT_WRITE_TIMEOUT_S = 60.0
log = logging.getLogger("rlaifv.http")
_TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)


class HeadDeadlineH11Protocol(H11Protocol):
    """The deadlines are the served app's `state.settings.header_timeout_s` and `stream_write_timeout_s` (the
    defaults for another app)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.counted = _Counted(transport)
        super().connection_made(cast(asyncio.Transport, self.counted))
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

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
