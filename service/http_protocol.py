"""uvicorn's h11 HTTP/1.1 protocol with a deadline on each request head.

uvicorn times a connection only between requests (its keep-alive timer, armed after a response, cancelled by
any byte): a connection that sends nothing, or trickles its headers a byte at a time, stayed open for ever, and
a few hundred of them used up the process's file descriptors (slowloris). Here every request head must be
complete within `RLAIFV_HEADER_TIMEOUT_S` of the connection opening or of the previous response; the body has
its own bound (`RLAIFV_BODY_TIMEOUT_S`, in the middleware).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 30.0


class HeadDeadlineH11Protocol(H11Protocol):
    """The deadline is the served app's `state.settings.header_timeout_s` (the default for another app)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = getattr(getattr(self.config.app, "state", None), "settings", None)
        self.header_timeout_s = float(getattr(settings, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S))
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

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
            self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._owes() and not self.transport.is_closing():
            self.transport.close()
