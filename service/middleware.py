"""The request-context middleware: request ids (X-Request-ID), the body size limit (413), the access log
line and the HTTP metrics, in one pure-ASGI pass."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlaifv.service.errors import ClientDisconnected, error_body, internal_error_body, log_unhandled
from rlaifv.service.log_format import request_id_var
from rlaifv.service.metrics import Metrics

REQUEST_ID_HEADER = "x-request-id"
CLIENT_CLOSED = 499
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Request id (echoed in X-Request-ID), body size limit (413), access log line, HTTP metrics.

    Pure ASGI, so `receive` reaches handlers unwrapped and disconnects are seen.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
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
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            too_big = self._declared_too_big(scope)
            if too_big:
                await self._reject_413(send_wrapper)
            else:
                await self.app(scope, self._limited(receive), send_wrapper)
        except _BodyTooLarge:
            if not started:
                await self._reject_413(send_wrapper)
        except ClientDisconnected:
            status = CLIENT_CLOSED  # nginx's 499: nobody to answer, and not a server error for the dashboards
        except Exception as exc:
            # Answered here rather than by Starlette's outermost handler, which re-raises after its 500: uvicorn
            # then drops the keep-alive connection and the client's next request on it fails too.
            if started:
                raise
            log_unhandled(exc)
            await _send_json(send_wrapper, 500, internal_error_body())
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            method = scope.get("method", "?")
            if getattr(route, "include_in_schema", True):  # static pages (the playground) are not API traffic
                self.metrics.requests.labels(route=template, method=method, status=str(status)).inc()
                self.metrics.latency.labels(route=template, method=method, status=str(status)).observe(elapsed)
            self.log.info(
                "request",
                extra={
                    "method": method,
                    "path": scope.get("path"),
                    "route": template,
                    "status": status,
                    "duration_s": round(elapsed, 5),
                },
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

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        return wrapped

    async def _reject_413(self, send: Send) -> None:
        message = f"request body is over the limit of {self.max_body_bytes} bytes"
        await _send_json(send, 413, error_body("invalid_request_error", message, None, "body_too_large"))


async def _send_json(send: Send, status: int, payload: dict[str, object]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a streamed body passes the limit; FastAPI re-raises HTTP exceptions as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes")
