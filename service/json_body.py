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


class JsonBodyRequest(Request):
    async def json(self) -> Any:
        """The body as JSON; a ValueError that FastAPI turns into our 400 `invalid_json` otherwise (its message is
        what the client reads: see errors._http_exception_handler)."""
        if not hasattr(self, "_json"):
            body = await self.body()
            encoding = json.detect_encoding(body)
            if encoding not in UTF8:
                raise ValueError(f"the body is {encoding.upper()}; JSON must be UTF-8")
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
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return handle
