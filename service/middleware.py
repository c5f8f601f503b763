"""The request-context middleware: request ids (X-Request-ID), the body's size limit (413) and deadline (408),
the access log line and the HTTP metrics, in one pure-ASGI pass."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

import anyio
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlaifv.service.errors import ClientDisconnected, error_body, internal_error_body, log_unhandled
from rlaifv.service.http_protocol import PARSER_STATUS
from rlaifv.service.log_format import request_id_var
from rlaifv.service.metrics import Metrics
from rlaifv.service.settings import Settings

REQUEST_ID_HEADER = "x-request-id"
CLOSE = {"Connection": "close"}  # a refused body's connection: the rest of the upload is never read
CLIENT_CLOSED = 499
YIELD_BYTES = 64 * 1024  # of a streamed body, after which its task lets the others run (a departure is seen)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def metric_method(method: str) -> str:
    """The method as a metric label: any token is a valid HTTP method, and each new one was a new time series
    (30k invented methods, sent before auth, grew /metrics from 42 to 112 MB and each scrape to 9 s)."""
    return method if method in HTTP_METHODS else "other"


class RequestContextMiddleware:
    """Request id (echoed in X-Request-ID), body size limit (413) and deadline (408), access log line, HTTP metrics.

    Pure ASGI, so `receive` reaches handlers unwrapped and disconnects are seen. A refused body's connection is
    closed (`Connection: close`): kept open, the server read and threw away the rest of the upload.

    A response started and never completed (its body cut short on purpose, as a job results stream is when Redis
    fails mid-way, or by an error) is the server's failure, not the clean 200 its status line said: counted as 500,
    its access line marked `cut` (499 when the client went away first).

    A client gone before the end of its response is looked for when the response's last message goes out: uvicorn
    drops what is sent to a closed connection without a word, so a stream abandoned part-way (or cut for not being
    read, `service.http_protocol`) ran to its end and was counted 200. A streamed body also lets the other tasks
    run every `YIELD_BYTES`: Starlette's disconnect listener then stops the stream (the rest is not serialised for
    nobody), and a stream does not hold the event loop for the whole of a big answer.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, settings: Settings) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout_s = settings.body_timeout_s
        self.log = logging.getLogger("rlaifv.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = completed = False
        abandoned, gone = asyncio.Event(), asyncio.Event()
        unyielded = 0  # body bytes sent since the task last let others run

        send_failed = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started, completed, unyielded, send_failed
            last = message["type"] == "http.response.body" and not message.get("more_body", False)
            if last and started:
                await asyncio.sleep(0)  # a connection lost meanwhile is told to the server first
                if await _client_left(receive):
                    gone.set()
                    return  # nobody reads the end: the response stays incomplete (499)
            elif message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                if not any(name.lower() == b"x-content-type-options" for name, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))  # JSON holding model text is no page
                message = {**message, "headers": headers}
            try:
                await send(message)
            except OSError:  # ASGI 2.4: a server may raise it for a closed connection instead of dropping the message
                gone.set()
                send_failed = True
                raise
            if last:
                if _server_saw_disconnect(receive):  # the end waited on a client cut meanwhile (not read): dropped
                    gone.set()
                    return
                completed = True
            elif message["type"] == "http.response.body":
                unyielded += len(message.get("body", b""))
                if unyielded >= YIELD_BYTES:
                    unyielded = 0
                    await asyncio.sleep(0)

        try:
            too_big = self._declared_too_big(scope)
            if too_big:
                await self._reject_413(send_wrapper)
            else:
                await self.app(scope, self._limited(receive, start, abandoned, gone), send_wrapper)
        except _BodyTooLarge:
            if not started:
                await self._reject_413(send_wrapper)
        except _BodyTooSlow as exc:
            if not started:
                body = error_body("invalid_request_error", str(exc.detail), None, "body_timeout")
                await _send_json(send_wrapper, 408, body, close=True)
        except (ClientDisconnected, ClientDisconnect):  # ours, or Starlette's (a stream's send raised OSError)
            status = CLIENT_CLOSED  # nginx's 499: nobody to answer, and not a server error for the dashboards
        except Exception as exc:
            if isinstance(exc, OSError) and send_failed:
                status = CLIENT_CLOSED  # raised by a send to the closed connection (ASGI 2.4)
                return
            # Answered here rather than by Starlette's outermost handler, which re-raises after its 500: uvicorn
            # then drops the keep-alive connection and the client's next request on it fails too.
            if started:
                raise
            log_unhandled(exc)
            await _send_json(send_wrapper, 500, internal_error_body())
        finally:
            if (abandoned.is_set() and status == 400) or (not started and gone.is_set()):
                status = CLIENT_CLOSED  # (not started: Starlette's disconnect listener stopped a stream before it)
            cut = False
            if started and not completed and status != CLIENT_CLOSED:
                cut = not gone.is_set()
                status = 500 if cut else CLIENT_CLOSED
            if not started and (answered := scope.get("state", {}).get(PARSER_STATUS)):
                status = answered  # the parser refused the body and answered (`service.http_protocol`): not a 499
            route = scope.get("route") or _matched_route(scope)
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            method = scope.get("method", "?")
            if getattr(route, "include_in_schema", True):  # static pages (the playground) are not API traffic
                labels = {"route": template, "method": metric_method(method), "status": str(status)}
                self.metrics.requests.labels(**labels).inc()
                self.metrics.latency.labels(**labels).observe(elapsed)
            self.log.info(
                "request",
                extra={
                    "method": method,
                    "path": scope.get("path"),
                    "route": template,
                    "status": status,
                    "duration_s": round(elapsed, 5),
                }
                | ({"cut": True} if cut else {}),
            )
            request_id_var.reset(token)

    def _declared_too_big(self, scope: Scope) -> bool:
        for key, value in scope.get("headers") or []:
            if key == b"content-length":
                try:
                    return int(value) > self.max_body_bytes
                except ValueError:
                    return False
        return False

    def _limited(self, receive: Receive, start: float, abandoned: asyncio.Event, gone: asyncio.Event) -> Receive:
        """`receive` with the body's limits: its size, and its deadline while it is incomplete (after it, a
        handler waits on `receive` for the client's disconnect as long as the request runs). `abandoned` is set
        when the client goes away with its body part-sent: the failed parse of half a body then counts as nginx's
        499, not a 400 on the client-error dashboards. `gone` is set at any disconnect seen."""
        seen = 0
        complete = False
        limit = self.max_body_bytes
        deadline = start + self.body_timeout_s

        async def wrapped() -> Message:
            nonlocal seen, complete
            if complete:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.perf_counter()))
                except TimeoutError:
                    raise _BodyTooSlow(self.body_timeout_s) from None
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge(limit)
                    complete = not message.get("more_body", False)
                elif message["type"] == "http.disconnect" and seen:  # gone with part of its body sent
                    abandoned.set()
            if message["type"] == "http.disconnect":
                gone.set()
            return message

        return wrapped

    async def _reject_413(self, send: Send) -> None:
        message = f"request body is over the limit of {self.max_body_bytes} bytes"
        body = error_body("invalid_request_error", message, None, "body_too_large")
        await _send_json(send, 413, body, close=True)


def _server_saw_disconnect(receive: Receive) -> bool | None:
    """uvicorn's own record that the connection was lost before the response completed (its request cycle's
    `disconnected`, which `receive` is a method of); None under a server that keeps none."""
    flag = getattr(getattr(receive, "__self__", None), "disconnected", None)
    return flag if isinstance(flag, bool) else None


async def _client_left(receive: Receive) -> bool:
    """Whether the client has gone, without waiting: the server's record where it keeps one (an attribute read),
    else `receive` asked under a cancelled scope, so that it answers only what it has at once (as Starlette's
    `Request.is_disconnected`; 30 us a response). Asked as the last message of a response goes out, when no handler
    reads the request body any more."""
    seen = _server_saw_disconnect(receive)
    if seen is not None:
        return seen
    with anyio.CancelScope() as scope:
        scope.cancel()
        message = await receive()
        return bool(message["type"] == "http.disconnect")
    return False


def _matched_route(scope: Scope) -> BaseRoute | None:
    """The route a request refused before routing (a 413 for its declared size) would have reached, so that its
    metrics keep the route."""
    routes: list[BaseRoute] = list(getattr(getattr(scope.get("app"), "router", None), "routes", []))
    while routes:
        route = routes.pop(0)
        included = getattr(getattr(route, "original_router", None), "routes", None)
        if included is not None:  # FastAPI keeps an included router's own routes behind a wrapper
            routes[:0] = included
        elif route.matches(scope)[0] == Match.FULL:
            return route
    return None


async def _send_json(send: Send, status: int, payload: dict[str, object], *, close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a streamed body passes the limit; FastAPI re-raises HTTP exceptions as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes", headers=CLOSE)


class _BodyTooSlow(StarletteHTTPException):
    """Raised from `receive` when the body is still incomplete at its deadline (RLAIFV_BODY_TIMEOUT_S)."""

    def __init__(self, timeout_s: float) -> None:
        message = f"request body not received within {timeout_s:g} s (RLAIFV_BODY_TIMEOUT_S)"
        super().__init__(408, message, headers=CLOSE)
