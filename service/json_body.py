"""Request bodies are JSON in UTF-8 (RFC 8259, section 8.1), read the same way on every route.

Python's `json.loads(bytes)`, which FastAPI's body parsing uses, guesses UTF-16 or UTF-32 from the first bytes and
accepts them: a client sending those would work against us and fail against any other OpenAI-compatible server.
Every router's routes are `JsonBodyRoute`s (FastAPI's documented way to give handlers another Request class)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

UTF8 = ("utf-8", "utf-8-sig")  # a byte-order mark is tolerated, as RFC 8259 allows a parser to
MAX_JSON_MARKS = 200_000
"""Most '{', '[' and ',' in one request's body: a bound on its JSON values (marks inside strings count too), each
of which costs microseconds of validation on the event loop, where every other request waits. A 16 MB body of
5.5 million empty objects in a free-form field (a message's `annotations`) held it 35 s. Counted in C before the
body is parsed; a batch job (`BatchBodyRoute`) bounds each item so, in a worker thread."""


class TooManyValues(ValueError):
    """A body over `MAX_JSON_MARKS`; `code` is its error's (`errors._http_exception_handler`)."""

    code = "too_many_values"


def json_marks(text: str | bytes) -> int:
    """The '{', '[' and ',' in JSON text: at least its containers and values less one (marks in strings count)."""
    if isinstance(text, str):
        return text.count("{") + text.count("[") + text.count(",")
    return text.count(b"{") + text.count(b"[") + text.count(b",")


def over_marks(marks: int, item: str | None = None) -> str:
    """Why a body (or a batch job's `item`) over `MAX_JSON_MARKS` is refused, and what to do instead."""
    what, instead = (item, "send less in one item") if item else ("the body", "send many as a batch job (/v1/jobs)")
    return (
        f"{what} holds {marks:,} of '{{', '[' and ',', over the limit of {MAX_JSON_MARKS:,} per request (each a"
        f" JSON value to check): {instead}"
    )


class JsonBodyRequest(Request):
    def __init__(self, scope: Any, receive: Any, max_marks: int | None = MAX_JSON_MARKS) -> None:
        super().__init__(scope, receive)
        self.max_marks = max_marks

    async def json(self) -> Any:
        """The body as JSON; a ValueError that FastAPI turns into our 400 `invalid_json` otherwise (its message is
        what the client reads: see errors._http_exception_handler)."""
        if not hasattr(self, "_json"):
            body = await self.body()
            encoding = json.detect_encoding(body)
            if encoding not in UTF8:
                raise ValueError(f"the body is {encoding.upper()}; JSON must be UTF-8")
            if self.max_marks is not None and (marks := json_marks(body)) > self.max_marks:
                raise TooManyValues(over_marks(marks))
            try:
                self._json = json.loads(body)
            except json.JSONDecodeError:
                raise
            except ValueError as exc:
                if "integer string conversion" not in str(exc):
                    raise
                limit = sys.get_int_max_str_digits()
                raise ValueError(f"a number has more than {limit} digits") from None
        return self._json


class JsonBodyRoute(APIRoute):
    max_marks: int | None = MAX_JSON_MARKS

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        max_marks = self.max_marks

        async def handle(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive, max_marks))

        return handle


class BatchBodyRoute(JsonBodyRoute):
    """A batch job's routes: any number of values the body limit allows, as each item is bounded as a request is
    (`MAX_JSON_MARKS`) and they are checked one by one in a worker thread (`JobStore.validate`)."""

    max_marks = None
