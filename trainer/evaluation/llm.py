"""Chat calls to any OpenAI-compatible endpoint (MMHal judges, object extractors, the feedback's LLM): asyncio + httpx.

Concurrency is bounded by a semaphore; each attempt has a total deadline (a server that accepts the
connection and never answers, or trickles bytes, still times out) and is retried on timeouts, connection
errors, HTTP 408/409/425/429 and 5xx but 501/505 (what the server does not implement stays so), and replies
the caller's `accept` rejects (malformed text). Each retry waits an exponential backoff with jitter (calls that
failed together do not come back together), or the server's Retry-After when longer; one longer than
`max_wait_s` ends the call at once, saying so. A request the client cannot even write (an API key HTTP forbids)
is not retried. A call that still fails returns a `ChatResult` with `ok=False` and every reply and error it saw,
so callers record the item as failed instead of dropping it. Errors show URLs without their credentials and
never the API key.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlaifv.trainer.credentials import authorization_clash, hidden, key_problem, shown_url, url_secrets

RETRIED = frozenset({408, 409, 425, 429})
"""Besides 5xx: timeout, conflict, too early, rate limited."""
NOT_RETRIED_5XX = frozenset({501, 505})
"""Not implemented, HTTP version not supported: the same request gets the same answer."""


def retryable(status: int) -> bool:
    """Whether an HTTP status may pass if the request is sent again."""
    return status in RETRIED or (500 <= status < 600 and status not in NOT_RETRIED_5XX)


def chat_url(base_url: str) -> str:
    """The chat completions route under a base URL, its query kept (Azure's `?api-version=...`)."""
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions", fragment=""))


def retry_after_s(headers: httpx.Headers, now: float) -> float | None:
    """The wait a reply asks for: `retry-after-ms` (OpenAI's), else Retry-After in seconds or as an HTTP date;
    None without one (or one that cannot be read)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if scale != 1.0:
                continue
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - now
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None  # none, or "inf"/"nan": no wait (an unusable retry-after-ms leaves it to Retry-After, as the SDK)


class ChatSettings(BaseModel):
    """Where and how to call the chat model."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)  # no API key in errors

    url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8001/v1.")
    model: str = Field(min_length=1, description="Model name sent in each request.")
    api_key: str | None = Field(None, repr=False, description="Bearer key (none: no Authorization header).")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one attempt, in seconds.")
    retries: int = Field(3, ge=0, description="Attempts after the first.")
    backoff_s: float = Field(
        1.0, ge=0, description="Wait before the first retry; doubles per retry, times a random 0.5-1.5 (jitter)."
    )
    max_wait_s: float = Field(
        120.0,
        ge=0,
        description="Longest wait before a retry; a server's Retry-After beyond it ends the call, named in its error.",
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at most.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (the originals judge at 0).")
    max_tokens: int | None = Field(None, ge=1, description="max_tokens sent (none: the server's default).")
    refuse_cut_off: bool = Field(
        False,
        description="A reply that stopped at max_tokens (finish_reason 'length') fails the call at once: at "
        "temperature 0 a retry stops at the same place, and a list read from it would lose its end.",
    )

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """url as reports show it: settings printed in a log line or a traceback keep its credentials out."""
        for name, value in super().__repr_args__():
            yield name, shown_url(value) if name == "url" else value

    @model_validator(mode="after")
    def _one_authorization(self) -> ChatSettings:
        if clash := authorization_clash(self.url, self.api_key, "the URL", "an API key"):
            raise ValueError(clash)
        return self

    @field_validator("api_key")
    @classmethod
    def _header_safe(cls, key: str | None) -> str | None:
        problem = key_problem(key) if key else None
        if problem:  # httpx failed on it in every request, the whole header (key included) in its error
            raise ValueError(f"the API key {problem}")
        return key


class ChatResult(BaseModel):
    """One call's outcome: the accepted reply, or ok=False with everything that went wrong."""

    ok: bool = False
    content: str | None = None
    attempts: int = 0
    replies: list[str] = Field(default_factory=list, description="Every reply text received, accepted or not.")
    errors: list[str] = Field(default_factory=list, description="One line per failed attempt.")
    status: int | None = Field(None, description="The last attempt's HTTP status (none: no response).")
    exception: str | None = Field(None, description="The last attempt's transport error type, if it had one.")


Sleep = Callable[[float], Awaitable[Any]]


class ChatClient:
    """`async with ChatClient(settings) as chat: await chat.complete(messages, accept=...)`; `sleep`, `jitter` (a
    number in [0, 1)) and `clock` (epoch seconds, for Retry-After dates) are replaced in tests."""

    def __init__(
        self,
        settings: ChatSettings,
        *,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._sleep, self._jitter, self._clock = sleep, jitter, clock
        self._limit = asyncio.Semaphore(settings.concurrency)
        self._endpoint = chat_url(settings.url)
        self._secrets = (settings.api_key, *url_secrets(settings.url))  # never in an error, however it comes back
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = httpx.AsyncClient(headers=headers, timeout=settings.timeout_s)

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        async with self._limit:  # the deadline starts once the request may go out, not while it queues
            async with asyncio.timeout(self.settings.timeout_s):
                return await self._http.post(self._endpoint, json=body)

    def _backoff(self, attempt: int) -> float:
        """The wait before attempt `attempt` (1 = the first retry): doubling, times 0.5-1.5 at random."""
        return float(self.settings.backoff_s * 2.0 ** (attempt - 1) * (0.5 + self._jitter()))

    async def complete(
        self, messages: list[dict[str, Any]], *, accept: Callable[[str], bool] = lambda _: True
    ) -> ChatResult:
        s = self.settings
        body: dict[str, Any] = {"model": s.model, "messages": messages, "temperature": s.temperature}
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        result = ChatResult()
        asked: float | None = None  # the wait the last reply asked for (Retry-After)
        for attempt in range(s.retries + 1):
            if attempt:
                await self._sleep(min(s.max_wait_s, max(self._backoff(attempt), asked or 0.0)))
            result.attempts, result.status, result.exception, asked = attempt + 1, None, None, None
            try:
                response = await self._post(body)
            except (TimeoutError, httpx.TimeoutException):
                result.errors.append(f"timeout after {s.timeout_s:g} s")
                continue
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
                # the request could not be written: the same every time (its message held the whole header)
                result.exception = type(exc).__name__
                result.errors.append(
                    f"{type(exc).__name__}: the request cannot be sent (an API key or URL with a character HTTP"
                    " forbids?)"
                )
                return result
            except httpx.HTTPError as exc:
                result.exception = type(exc).__name__
                result.errors.append(f"{type(exc).__name__}: {_detail(exc, *self._secrets)}")
                continue
            result.status = response.status_code
            if response.status_code != 200:
                result.errors.append(f"HTTP {response.status_code}: {hidden(response.text, *self._secrets)[:300]}")
                if not retryable(response.status_code):
                    return result  # 400/401/404/501...: the same request would fail again
                asked = retry_after_s(response.headers, self._clock())
                if asked is not None and asked > s.max_wait_s and attempt < s.retries:
                    result.errors[-1] += (
                        f" (the server asks to retry after {asked:g} s, longer than the {s.max_wait_s:g} s a"
                        " retry waits at most: try again later)"
                    )
                    return result
                continue
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                result.errors.append(f"not a chat completion: {hidden(response.text, *self._secrets)[:300]}")
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


def _detail(exc: httpx.HTTPError, *secrets: str | None) -> str:
    """An httpx error's message without credentials; a connection the server dropped says so (its message is
    empty: the error read "ReadError: ")."""
    text = hidden(" ".join(str(exc).split()), *secrets)
    if text:
        return text
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError):
        return "connection closed by the server"
    return "no detail given"
