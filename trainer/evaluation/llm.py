"""Chat calls to any OpenAI-compatible endpoint (MMHal judges, object extractors): asyncio + httpx.

Concurrency is bounded by a semaphore; each attempt has a total deadline (a server that accepts the
connection and never answers, or trickles bytes, still times out) and is retried with exponential
backoff on timeouts, connection errors, 408/409/429/5xx and replies the caller's `accept` rejects
(malformed text). A call that still fails returns a `ChatResult` with `ok=False` and every reply and
error it saw, so callers record the item as failed instead of dropping it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504})


class ChatSettings(BaseModel):
    """Where and how to call the chat model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8001/v1.")
    model: str = Field(min_length=1, description="Model name sent in each request.")
    api_key: str | None = Field(None, repr=False, description="Bearer key (none: no Authorization header).")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one attempt, in seconds.")
    retries: int = Field(3, ge=0, description="Attempts after the first.")
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubles per retry.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at most.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (the originals judge at 0).")
    max_tokens: int | None = Field(None, ge=1, description="max_tokens sent (none: the server's default).")
    refuse_cut_off: bool = Field(
        False,
        description="A reply that stopped at max_tokens (finish_reason 'length') fails the call at once: at "
        "temperature 0 a retry stops at the same place, and a list read from it would lose its end.",
    )


class ChatResult(BaseModel):
    """One call's outcome: the accepted reply, or ok=False with everything that went wrong."""

    ok: bool = False
    content: str | None = None
    attempts: int = 0
    replies: list[str] = Field(default_factory=list, description="Every reply text received, accepted or not.")
    errors: list[str] = Field(default_factory=list, description="One line per failed attempt.")


Sleep = Callable[[float], Awaitable[Any]]


class ChatClient:
    """`async with ChatClient(settings) as chat: await chat.complete(messages, accept=...)`."""

    def __init__(self, settings: ChatSettings, *, sleep: Sleep = asyncio.sleep) -> None:
        self.settings = settings
        self._sleep = sleep
        self._limit = asyncio.Semaphore(settings.concurrency)
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = httpx.AsyncClient(
            base_url=settings.url.rstrip("/") + "/", headers=headers, timeout=settings.timeout_s
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        async with self._limit:  # the deadline starts once the request may go out, not while it queues
            async with asyncio.timeout(self.settings.timeout_s):
                return await self._http.post("chat/completions", json=body)

    async def complete(
        self, messages: list[dict[str, Any]], *, accept: Callable[[str], bool] = lambda _: True
    ) -> ChatResult:
        s = self.settings
        body: dict[str, Any] = {"model": s.model, "messages": messages, "temperature": s.temperature}
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        result = ChatResult()
        for attempt in range(s.retries + 1):
            if attempt:
                await self._sleep(s.backoff_s * 2 ** (attempt - 1))
            result.attempts = attempt + 1
            try:
                response = await self._post(body)
            except (TimeoutError, httpx.TimeoutException):
                result.errors.append(f"timeout after {s.timeout_s:g} s")
                continue
            except httpx.HTTPError as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 200:
                result.errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
                if response.status_code in RETRYABLE:
                    continue
                return result  # 400/401/404...: the same request would fail again
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                result.errors.append(f"not a chat completion: {response.text[:300]}")
                continue
            if not isinstance(content, str):
                result.errors.append(f"message content is not text: {content!r:.300}")
                continue
            result.replies.append(content)
            if s.refuse_cut_off and response.json()["choices"][0].get("finish_reason") == "length":
                result.errors.append(f"reply cut off at max_tokens={s.max_tokens} (finish_reason 'length')")
                return result
            if accept(content):
                result.ok, result.content = True, content
                return result
            result.errors.append("reply rejected as malformed")
        return result
