"""What `Client` and `AsyncClient` share, without I/O: configuration, request bodies, the retry
schedule, response parsing and the error mapping. The two clients only send and sleep.
"""

from __future__ import annotations

import datetime
import email.utils
import inspect
import logging
import math
import os
import platform
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, NoReturn, SupportsIndex, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from . import _constants as C
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    ClientClosedError,
    InvalidArgumentError,
    WaitTimeoutError,
    make_status_error,
)
from ._files import read_regular_file
from ._images import ImageInput, MessageInput, encode_images, encode_message_images
from ._version import __version__
from .types import BaseType, Health, Job, JobList, JobResult

log = logging.getLogger("rlaifv_client")

T = TypeVar("T", bound=BaseType)
JobKind = Literal["best_of_n", "rewards"]
JSONL = "application/x-ndjson"


class NotGiven:
    """Sentinel for "argument not given" where `None` means something (e.g. `timeout=None`: no timeout)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()
TimeoutTypes = float | httpx.Timeout | None


@dataclass(frozen=True)
class Backoff:
    """The retry schedule. Attempt k (0-based) waits `min(initial * 2**k, max)` times a random factor in
    `[1 - jitter, 1]`. A `Retry-After` from the server is used instead, capped at `max_retry_after` and
    lengthened by up to `jitter` of itself so a burst of rejected clients does not come back at once."""

    initial: float = C.INITIAL_RETRY_DELAY
    max: float = C.MAX_RETRY_DELAY
    max_retry_after: float = C.MAX_RETRY_AFTER
    jitter: float = C.RETRY_JITTER

    def __post_init__(self) -> None:
        """Refuse at once what would give a negative, infinite or NaN wait at the first retry (where `time.sleep`
        raises and `asyncio.sleep` does not wait at all)."""
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Backoff jitter must be in [0, 1], got {self.jitter!r}")
        if not 0.0 <= self.initial < math.inf:
            raise ValueError(f"Backoff initial must be a finite number of seconds >= 0, got {self.initial!r}")
        for name in ("max", "max_retry_after"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"Backoff {name} must be >= 0 seconds, got {getattr(self, name)!r}")

    def delay(self, attempt: int, retry_after: float | None = None, *, rand: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1`. `rand` in [0, 1) replaces the random draw (tests)."""
        r = random.random() if rand is None else rand
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after) * (1 + self.jitter * r)
        return min(self.initial * 2.0**attempt, self.max) * (1 - self.jitter * r)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date; None when absent or invalid
    (non-finite numbers included: "inf" is no wait a client can keep)."""
    try:
        ms = float(headers.get("retry-after-ms", "nan"))
    except ValueError:
        ms = math.nan
    if math.isfinite(ms):
        return max(0.0, ms / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return _seconds_until(value, time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _seconds_until(http_date: str, now: float) -> float | None:
    """An HTTP date in `-0000` (RFC 5322's "zone unknown") is read as UTC: the standard library returns it without a
    zone, which `timestamp()` would take as this machine's local time."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)


class LineSplitter:
    """JSONL lines out of text chunks: split at "\\n" only (httpx's line reader also splits at U+2028 and U+0085,
    which JSON text may hold unescaped), a final "\\r" dropped; a line spanning chunks is joined once."""

    def __init__(self) -> None:
        self._pending: list[str] = []

    def feed(self, chunk: str) -> list[str]:
        *ended, rest = chunk.split("\n")
        lines = []
        for piece in ended:
            lines.append(("".join(self._pending) + piece).removesuffix("\r"))
            self._pending = []
        self._pending.append(rest)
        return lines

    def end(self) -> list[str]:
        last = "".join(self._pending).removesuffix("\r")
        return [last] if last else []


def split_lines(chunks: Iterable[str]) -> Generator[str, None, None]:
    splitter = LineSplitter()
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.end()


async def asplit_lines(chunks: AsyncIterable[str]) -> AsyncGenerator[str, None]:
    splitter = LineSplitter()
    async for chunk in chunks:
        for line in splitter.feed(chunk):
            yield line
    for line in splitter.end():
        yield line


def should_retry(response: httpx.Response | None, *, error: Exception | None = None, idempotent: bool = True) -> bool:
    """Whether an attempt that got `response` (None: it raised `error`) may be repeated.

    Connection errors, 408, 429, 502, 503 and 504 are retried; other 4xx and 500 never. A call that must not run
    twice (`idempotent=False`, e.g. submitting a job) is repeated only when the server surely did not act on it:
    the connection was never made, or the answer was 429 or 503."""
    if response is None:
        if isinstance(error, (httpx.LocalProtocolError, httpx.UnsupportedProtocol)):
            return False  # our own request is malformed: every attempt would fail alike
        return idempotent or isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    return response.status_code in (C.RETRY_STATUSES if idempotent else C.NOT_PROCESSED_STATUSES)


@dataclass
class APICall(Generic[T]):
    """One logical API call; its request id stays the same across retries."""

    method: str
    path: str
    cast_to: type[T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    content: bytes | None = None
    timeout: TimeoutTypes | NotGiven = NOT_GIVEN
    headers: Mapping[str, str] | None = None
    max_retries: int | None = None
    ok_statuses: frozenset[int] = frozenset()
    # What an accepted non-2xx answer means when its body is not the API's (a proxy's HTML 503 page).
    unparsed: Callable[[], T] | None = None
    idempotent: bool = True
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        """Every call's JSON body and query parameters are checked here, before anything is sent (`check_json`)."""
        if self.json is not None:
            check_json(self.json)
        if self.params:
            check_json(dict(self.params))


def is_not_ready(response: httpx.Response) -> bool:
    """A 503 `not_ready`: the server answers while its model loads (`rlaifv serve`), and will serve once loaded."""
    if response.status_code != 503:
        return False
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("code") == "not_ready"


class Retrying:
    """The retries of one call (shared by `_request` and `_stream_lines` of both clients): each attempt's timeout,
    and whether and when to try again.

    The call's timeout (`call_budget`) bounds the call as a whole, retries and their waits included: each retry's
    timeout is cut to what is left, and a retry whose wait would end past the deadline is not made, the error
    raised at once saying so (a 429 asking for 30 s with 10 s left used to sleep through the caller's deadline).
    A 503 `not_ready` is waited out up to the deadline without counting against `max_retries`: `rlaifv serve`
    answers it for as long as its model loads (minutes), where it used to hold the connection until loaded, so a
    call made during the load succeeded then within its timeout, and must still. `max_retries=0`, or no timeout,
    keeps the count."""

    def __init__(self, call: APICall[Any], timeout: TimeoutTypes, max_retries: int, backoff: Backoff) -> None:
        self.call, self.timeout, self.backoff = call, timeout, backoff
        self.max_retries = max_retries if call.max_retries is None else call.max_retries
        self.budget = call_budget(timeout)
        self.start = time.monotonic()
        self.attempt = 0  # the number of the attempt being made (0: the first)
        self.counted = 0  # the retries counted against max_retries
        self.note: str | None = None  # why the last `delay` gave up, where that is not plain

    def attempt_timeout(self) -> TimeoutTypes:
        """The first attempt's timeout is the call's; a retry's is cut to what is left of it."""
        if self.attempt == 0 or self.budget is None:
            return self.timeout
        return cut_timeout(self.timeout, max(self.budget - (time.monotonic() - self.start), 0.0))

    def delay(self, response: httpx.Response | None, error: Exception | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up (`note` then says why, where not plain)."""
        self.note = None
        call = self.call
        if not should_retry(response, error=error, idempotent=call.idempotent):
            return None
        elapsed = time.monotonic() - self.start
        loading = response is not None and self.budget is not None and self.max_retries > 0 and is_not_ready(response)
        if not loading and self.counted >= self.max_retries:
            if self.attempt > 0:
                self.note = f"gave up after {self.attempt + 1} attempts in {elapsed:.1f} s"
            return None
        retry_after = parse_retry_after(response.headers) if response is not None else None
        delay = self.backoff.delay(self.counted, retry_after)
        if self.budget is not None:
            left = self.budget - elapsed
            due = delay if retry_after is None else retry_after  # the server's own wait, not the capped one
            room = min(C.MIN_RETRY_ATTEMPT_S, self.budget / 4)  # what the retry itself needs
            if due + room > left:
                wait = "the next retry was due in" if retry_after is None else "the server asked to retry after"
                header = "" if retry_after is None else " (Retry-After)"
                self.note = (
                    f"not retried: {wait} {due:.3g} s{header}, past this call's timeout of {self.budget:g} s "
                    f"({max(left, 0.0):.1f} s left after {self.attempt + 1} attempt{'s' if self.attempt else ''},"
                    f" and a retry needs {room:.2g} s after its wait)"
                )
                return None
            if delay >= left:  # the jitter added to a Retry-After that fits: not past the deadline
                delay = due
        reason = f"HTTP {response.status_code}" if response is not None else "connection error"
        if loading:
            reason += " (the server's model is loading)"
        self.attempt += 1
        self.counted += 0 if loading else 1
        log.info("retrying %s %s in %.2fs after %s (retry %d)", call.method, call.path, delay, reason, self.attempt)
        return delay


def _drop_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


def check_json(value: Any, path: str = "") -> None:
    """Refuse what JSON cannot carry anywhere in a request body, by its path (`sampling.temperature`, `answers[1]`):
    a NaN or infinity (JSON has no such numbers), and text holding a lone surrogate (`"\\ud800"`, as text decoded
    with `errors="surrogateescape"` holds: not Unicode, so not UTF-8). httpx's encoder would otherwise fail at send
    time, with a `ValueError` or `UnicodeEncodeError` naming no argument. Every call's body passes here (`APICall`)."""
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgumentError(f"{path} must be a finite number, got {value!r}", param=path)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                _check_text(key, path, key=True)
            check_json(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json(item, f"{path}[{i}]")


def _check_text(text: str, path: str, *, key: bool = False) -> None:
    """Refuse `text` holding a lone surrogate (cheap for ASCII text, as a base64 image is: `isascii` reads a flag)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = (f"a key of {path}" if path else "a key") if key else path
        raise InvalidArgumentError(
            f"{where} is not valid Unicode: it holds a lone surrogate {text[exc.start]!r} at index {exc.start}, which"
            " UTF-8 cannot encode (text decoded with errors='surrogateescape', or half of a JSON \\u escape pair?)",
            param=path or None,
        ) from None


def prompt_body(
    *,
    model: str | None = None,
    image: ImageInput | None = None,
    images: Iterable[ImageInput] | None = None,
    question: str | None = None,
    messages: Sequence[MessageInput] | None = None,
    continue_final_message: bool | None = None,
    beta: float | None = None,
    normalize: str | None = None,
    mode: str | None = None,
    claim_score: str | None = None,
    repeat_penalty: float | None = None,
) -> dict[str, Any]:
    """The fields /v1/best-of-n and /v1/rewards share. Only given fields are sent (the server has the defaults)."""
    if messages is not None and (image is not None or images not in (None, [], ())):
        raise InvalidArgumentError(
            "with messages=, give images as image_url parts of a user message, not as image= or images=",
            param="images",
        )
    body: dict[str, Any] = {"model": model, "question": question}
    body["messages"] = None if messages is None else encode_message_images(messages)
    body["continue_final_message"] = continue_final_message
    encoded = encode_images(image, images)
    if encoded:
        body["images"] = encoded
    reward = _drop_none(
        {
            "mode": mode,
            "beta": beta,
            "normalize": normalize,
            "claim_score": claim_score,
            "repeat_penalty": repeat_penalty,
        }
    )
    if reward:
        body["reward"] = reward
    return _drop_none(body)


def best_of_n_body(
    *,
    n: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    **prompt: Any,
) -> dict[str, Any]:
    """The JSON body of POST /v1/best-of-n; `prompt` holds `prompt_body`'s arguments."""
    body = prompt_body(**prompt)
    if n is not None:
        body["n"] = n
    sampling = _drop_none(
        {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "max_tokens": max_tokens,
            "seed": seed,
        }
    )
    if sampling:
        body["sampling"] = sampling
    check_json(body)
    return body


def score_body(*, answers: Iterable[str], **prompt: Any) -> dict[str, Any]:
    """The JSON body of POST /v1/rewards; `prompt` holds `prompt_body`'s arguments."""
    if isinstance(answers, str):
        raise TypeError("answers= takes a list of strings, not one string")
    body = prompt_body(**prompt)
    body["answers"] = list(answers)
    check_json(body)
    return body


def submission_headers(
    idempotency_key: str | None = None, extra_headers: Mapping[str, str] | None = None
) -> dict[str, str]:
    """One Idempotency-Key per job submission, the same on every retry: the server then creates the job once,
    so submitting is safe to retry after a timeout (where the first attempt may have gone through). Your own key
    (`idempotency_key=`, or an Idempotency-Key in `extra_headers`; e.g. derived from the batch's name) also makes
    a re-run of your program get the job it submitted before instead of a second one."""
    headers = {k: v for k, v in (extra_headers or {}).items() if k.lower() != "idempotency-key"}
    given = [v for k, v in (extra_headers or {}).items() if k.lower() == "idempotency-key"]
    key = idempotency_key if idempotency_key is not None else (given[0] if given else uuid.uuid4().hex)
    if not key.strip():
        raise ValueError("idempotency_key must not be empty")
    if not all(" " <= c <= "~" for c in key):  # httpx would raise UnicodeEncodeError at send time
        raise ValueError(f"idempotency_key must be printable ASCII (an HTTP header carries it), got {key!r}")
    return headers | {"Idempotency-Key": key}


def _keywords(*builders: Callable[..., Any], required: bool = False) -> frozenset[str]:
    """The keyword-only arguments of `builders` (those without a default when `required`)."""
    return frozenset(
        p.name
        for builder in builders
        for p in inspect.signature(builder).parameters.values()
        if p.kind is p.KEYWORD_ONLY and not (required and p.default is not p.empty)
    )


# kind -> (the body's builder, the keys an item may hold, the keys it must hold). Checked up front: a mistyped key
# would otherwise be reported as a keyword argument of an internal builder (`prompt_body() got an unexpected...`).
_JOB_ITEMS: dict[str, tuple[Callable[..., dict[str, Any]], frozenset[str], frozenset[str]]] = {
    "best_of_n": (
        best_of_n_body,
        _keywords(prompt_body, best_of_n_body) | {"custom_id"},
        _keywords(best_of_n_body, required=True),
    ),
    "rewards": (score_body, _keywords(prompt_body, score_body) | {"custom_id"}, _keywords(score_body, required=True)),
}


def job_body(kind: JobKind, items: Iterable[Mapping[str, Any]], metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """The JSON body of POST /v1/jobs: each item holds the keyword arguments of `best_of_n` (kind 'best_of_n')
    or of `score` (kind 'rewards'), and becomes that endpoint's request body; an item's `custom_id` (the
    caller's id of it) comes back in its result. An item's problem is named by its index, as the server does."""
    if kind not in _JOB_ITEMS:
        raise ValueError(f"kind must be 'best_of_n' or 'rewards', got {kind!r}")
    builder, known, required = _JOB_ITEMS[kind]
    bodies: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"items[{i}] of a {kind!r} job"
        kwargs = dict(item)
        unknown = [str(key) for key in kwargs if key not in known]
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise TypeError(
                f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {names} (known: {', '.join(sorted(known))})"
            )
        missing = sorted(required - kwargs.keys())
        if missing:
            raise TypeError(f"{where}: missing key {', '.join(map(repr, missing))}")
        custom_id = kwargs.pop("custom_id", None)
        try:
            built = builder(**kwargs)
        except InvalidArgumentError as exc:  # e.g. a NaN, or an image that cannot be read: named within the job
            param = f"items[{i}]" + (f".{exc.param}" if exc.param else "")
            raise type(exc)(f"{where}: {exc}", param=param) from None
        except TypeError as exc:
            raise TypeError(f"{where}: {exc}") from None
        bodies.append(built if custom_id is None else {"custom_id": str(custom_id), "body": built})
    body: dict[str, Any] = {"kind": kind, "items": bodies}
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return body


_UPLOAD_TOO_BIG = (
    ": a server at its defaults takes no upload over 16 MiB (RLAIFV_MAX_BODY_BYTES); split it into several jobs,"
    " or read it yourself and pass its bytes to a server whose operator raised that limit"
)


def upload_call(
    path: str | os.PathLike[str] | bytes,
    kind: JobKind,
    metadata: Mapping[str, str] | None,
    timeout: Any,
    given_headers: Mapping[str, str],
) -> APICall[Job]:
    """POST /v1/jobs/upload of a JSONL file (a path, or its bytes): one request body or `{"custom_id", "body"}`
    per line, sent as is (images already encoded in the lines). A Content-Type in `given_headers` wins. A path must
    name a regular file of at most `MAX_UPLOAD_FILE_BYTES` (`InvalidArgumentError` otherwise, before it is read
    whole; an `OSError` such as `FileNotFoundError` when it cannot be opened)."""
    import json

    if kind not in ("best_of_n", "rewards"):
        raise ValueError(f"kind must be 'best_of_n' or 'rewards', got {kind!r}")
    if isinstance(path, bytes):
        data = path
    else:
        data = read_regular_file(path, C.MAX_UPLOAD_FILE_BYTES, "job file", InvalidArgumentError, _UPLOAD_TOO_BIG)
    params: dict[str, str] = {"kind": kind}
    if metadata is not None:
        check_json(dict(metadata), "metadata")  # json.dumps would escape a lone surrogate, for the server to refuse
        params["metadata"] = json.dumps(dict(metadata))
    headers = httpx.Headers({"Content-Type": JSONL})
    headers.update(given_headers)
    return APICall("POST", "/v1/jobs/upload", Job, params=params, content=data, timeout=timeout, headers=headers)


def list_call(limit: int | None, after: str | Job | None, timeout: Any) -> APICall[JobList]:
    """GET /v1/jobs: one page of the caller's jobs, newest first. Unset arguments take the server's defaults (20 jobs,
    from the newest); `after` is a job (or its id) of the previous page, usually its `last_id`."""
    params = {"limit": limit, "after": after.id if isinstance(after, Job) else after}
    return APICall("GET", "/v1/jobs", JobList, params=_drop_none(params), timeout=timeout)


def results_call(path: str, timeout: Any) -> APICall[JobResult]:
    """GET /v1/jobs/{id}/results as JSONL: read line by line, so no client holds a whole big job in memory."""
    return APICall("GET", path, JobResult, params={"format": "jsonl"}, timeout=timeout, headers={"Accept": JSONL})


class BodyCut(Exception):
    """A streamed response body that broke off after it began (the connection closed or stalled before its end):
    raised by the clients' `_stream_lines`, for `jobs.results` to read on (`ResultsReading`)."""

    def __init__(self, error: httpx.TransportError, request: httpx.Request) -> None:
        super().__init__(str(error))
        self.error, self.request = error, request


def readiness_call(timeout: Any) -> APICall[Health]:
    """GET /readyz once (no retries): 503 means "not ready" (also when an ingress answers it with its own page)."""
    return APICall(
        "GET",
        "/readyz",
        Health,
        timeout=timeout,
        max_retries=0,
        ok_statuses=frozenset({503}),
        unparsed=lambda: Health(status="unavailable"),
    )


def liveness_call(timeout: Any) -> APICall[Health]:
    """GET /healthz, retried on connection errors; its 503 (a stuck worker, with the failed checks) is the answer,
    not an error: a health probe reports the state it finds."""
    return APICall(
        "GET",
        "/healthz",
        Health,
        timeout=timeout,
        ok_statuses=frozenset({503}),
        unparsed=lambda: Health(status="unavailable"),
    )


def call_budget(timeout: TimeoutTypes) -> float | None:
    """Seconds one call may take in all, its retries and their waits included: a number's, or an `httpx.Timeout`'s
    `read` (the wait for the answer; its `connect` bounds each attempt's connecting too); None: no bound."""
    if isinstance(timeout, httpx.Timeout):
        return timeout.read
    return None if timeout is None else float(timeout)


def cut_timeout(timeout: TimeoutTypes, left: float) -> TimeoutTypes:
    """`timeout` with no phase longer than `left` seconds (a phase without a bound gets `left`)."""
    if isinstance(timeout, httpx.Timeout):
        phases = {"connect": timeout.connect, "read": timeout.read, "write": timeout.write, "pool": timeout.pool}
        return httpx.Timeout(**{name: left if value is None else min(value, left) for name, value in phases.items()})
    return left if timeout is None else min(float(timeout), left)


def poll_call(path: str, client_timeout: TimeoutTypes, left: float | None) -> APICall[Job]:
    """One status poll of `jobs.wait`. Without a deadline it is `jobs.get` (retried as any call); with `left`
    seconds to the deadline, one attempt whose timeout is cut to them (at least `MIN_POLL_TIMEOUT`, so the poll at
    the deadline can still see a job that just finished), so the wait ends on time; the wait itself polls again
    after a failure worth it (`worth_polling_again`)."""
    if left is None:
        return APICall("GET", path, Job)
    return APICall("GET", path, Job, timeout=poll_timeout(client_timeout, left), max_retries=0)


def poll_timeout(client_timeout: TimeoutTypes, left: float) -> TimeoutTypes:
    """A poll's timeout `left` seconds before its loop's deadline: cut to them, but at least `MIN_POLL_TIMEOUT`, so
    the poll at the deadline can still see the state it waits for."""
    return cut_timeout(client_timeout, max(left, C.MIN_POLL_TIMEOUT))


class Polling:
    """The deadline of a poll loop (`jobs.wait`, `wait_until_ready`): `timeout` seconds from its start, or none."""

    def __init__(self, poll_interval: float, timeout: float | None) -> None:
        check_polling(poll_interval, timeout)
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def cut_to_deadline(self, pause: float) -> float | None:
        """`pause`, no longer than what is left; None once the deadline has passed."""
        left = self.left()
        if left is None:
            return pause
        return None if left <= 0 else min(pause, left)


def _job_id(job: str | Job) -> str:
    """The id of `job`; an id that would name another path ("", ".", "..", one with "/") is refused."""
    job_id = job.id if isinstance(job, Job) else job
    if job_id in ("", ".", "..") or "/" in job_id:
        raise ValueError(f"invalid job id {job_id!r}")
    if not job_id.isascii():
        _check_text(job_id, "job_id")  # a lone surrogate: no URL can carry it
    return job_id


def _job_path(job: str | Job, suffix: str = "") -> str:
    """The job's URL path, its id percent-encoded: "a?b" is the job "a?b", not the job "a" with a query."""
    return f"/v1/jobs/{quote(_job_id(job), safe='')}{suffix}"


def check_polling(poll_interval: float, timeout: float | None) -> None:
    """The arguments of a polling wait (`jobs.wait`, `wait_until_ready`), refused before the first poll."""
    if not (isinstance(poll_interval, (int, float)) and math.isfinite(poll_interval) and poll_interval > 0):
        raise ValueError(f"poll_interval must be a number of seconds > 0, got {poll_interval!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")


class Waiting(Polling):
    """The loop of `jobs.wait`, shared by the sync and the async client (they differ only in how they request and
    sleep): the next poll's call, what a failed poll means, and how long to pause before the next.

    A pause is the poll interval, or the server's `Retry-After` when a failed poll carried a longer one (polling
    sooner would only be refused again, and each poll counts against the key's rate limit)."""

    def __init__(self, job_id: str | Job, poll_interval: float, timeout: float | None, client_timeout: Any) -> None:
        super().__init__(poll_interval, timeout)
        self.interval = min(float(poll_interval), C.MAX_POLL_INTERVAL)
        self.client_timeout = client_timeout
        self.name = _job_id(job_id)
        self.path = _job_path(self.name)
        self.job: Job | None = job_id if isinstance(job_id, Job) else None
        self.error: APIError | None = None

    def call(self) -> APICall[Job]:
        self.error = None
        return poll_call(self.path, self.client_timeout, self.left())

    def answered(self, job: Job) -> bool:
        """True when the job is done."""
        self.job = job
        return job.done

    def failed(self, exc: APIError) -> None:
        """Raises `exc` unless polling again may get another answer before the deadline (without one, a poll has
        had the retries of any call, 429s apart: a rate limit always lifts)."""
        rate_limited = isinstance(exc, APIStatusError) and exc.status_code == 429
        if not worth_polling_again(exc) or (self.deadline is None and not rate_limited):
            raise exc
        self.error = exc

    def pause(self) -> float:
        """Seconds to sleep before the next poll; `WaitTimeoutError` once the deadline has passed."""
        pause = self.interval
        if isinstance(self.error, APIStatusError):
            retry_after = parse_retry_after(self.error.response.headers)
            if retry_after is not None:
                pause = max(pause, min(retry_after, C.MAX_RETRY_AFTER))
        cut = self.cut_to_deadline(pause)
        if cut is None:
            assert self.timeout is not None
            raise wait_timed_out(self.name, self.timeout, self.job, self.error) from self.error
        return cut


class ResultsReading:
    """The reading of one job's results (`jobs.results`), shared by both clients (they only send and sleep).

    A stream cut part-way (the server leaves it unfinished when Redis fails mid-way; the network breaks) is read on
    with `after=` the index of the last result yielded, so no result comes twice (one at or before it is dropped,
    should a server ignore `after`) and none is skipped. Reading on is a retry of the call: counted against
    `max_retries` and made only within its timeout (`Retrying`, one per call: the X-Request-ID stays). A stream that
    brought new results since it started begins the count and the timeout afresh, from its cut: the time the caller
    spends on results is not the server's, and a big job read through several cuts, each after progress, is read to
    its end. Giving up raises an `APIConnectionError` (`APITimeoutError` for a stalled stream) saying how many
    results were read and the `after` to read on with."""

    def __init__(self, client: BaseClient, job_id: str | Job, after: int | None, timeout: Any) -> None:
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise InvalidArgumentError(f"after must be an item index (an int >= 0), got {after!r}", param="after")
        self.client, self.job = client, _job_id(job_id)
        self.first = results_call(_job_path(job_id, "/results"), timeout)
        self.retrying = client._retrying(self.first)
        self.last = after  # the index of the last result yielded (or the caller's `after`)
        self.read = 0
        self.progressed = False  # new results since the stream (re)started

    def call(self) -> APICall[JobResult]:
        """The next stream's call: the first one's (its request id kept), after the last result yielded."""
        params = dict(self.first.params or {})
        if self.last is not None:
            params["after"] = self.last
        return replace(self.first, params=params)

    def take(self, call: APICall[JobResult], line: str) -> JobResult | None:
        """The result of a line, or None for a blank line or a result already yielded."""
        if not line:
            return None
        result = self.client._parse_line(call, line)
        if self.last is not None and result.index <= self.last:
            return None
        self.last, self.read, self.progressed = result.index, self.read + 1, True
        return result

    def cut(self, cut: BodyCut) -> float | None:
        """Seconds to wait before reading on, or None to give up (then raise `gave_up(cut)`)."""
        if self.progressed:
            self.retrying, self.progressed = self.client._retrying(self.first), False
        return self.retrying.delay(None, cut.error)

    def gave_up(self, cut: BodyCut) -> APIConnectionError:
        plural = "" if self.read == 1 else "s"
        resume = "" if self.last is None else f"; jobs.results(job, after={self.last}) reads on from there"
        message = f"the results stream of job {self.job} was cut after {self.read} result{plural}{resume}: {cut}"
        cls = APITimeoutError if isinstance(cut.error, httpx.TimeoutException) else APIConnectionError
        error = cls(message, request=cut.request)
        error.note = self.retrying.note
        return error


class Readiness(Polling):
    """The loop of `wait_until_ready`, shared by both clients: GET /readyz until it answers 200. A poll that finds
    the server not ready (503: loading, shutting down), gets no answer (not started yet, restarting) or a 502/504
    (an ingress without a ready pod) is polled again; another answer (a 404: no such route there) is raised."""

    def __init__(self, base_url: httpx.URL, poll_interval: float, timeout: float | None, client_timeout: Any) -> None:
        super().__init__(poll_interval, timeout)
        self.interval, self.client_timeout = float(poll_interval), client_timeout
        self.url = base_url
        self.state = "no poll answered"

    def call(self) -> APICall[Health]:
        """One poll, its timeout cut to what is left (`poll_timeout`)."""
        left = self.left()
        return readiness_call(self.client_timeout if left is None else poll_timeout(self.client_timeout, left))

    def answered(self, health: Health) -> bool:
        """True when the server is ready; else remembers what it is waiting for (`model: loading`)."""
        if health.ok:
            return True
        waiting = [f"{name}: {value}" for name, value in health.checks.items() if value != "ok"]
        self.state = ", ".join(waiting) or f"status {health.status}"
        return False

    def failed(self, exc: APIError) -> None:
        if not worth_polling_again(exc):
            raise exc
        self.state = f"last poll failed: {exc}"

    def pause(self) -> float:
        """Seconds to sleep before the next poll; `WaitTimeoutError` once the deadline has passed."""
        cut = self.cut_to_deadline(self.interval)
        if cut is None:
            assert self.timeout is not None
            raise WaitTimeoutError(f"server {self.url} not ready within {self.timeout:g} s ({self.state})", job=None)
        return cut


def worth_polling_again(exc: APIError) -> bool:
    """A poll that got no answer, or an answer a retry may change (429, 502, 503, 504, a timeout)."""
    return isinstance(exc, APIConnectionError) or (
        isinstance(exc, APIStatusError) and exc.status_code in C.RETRY_STATUSES
    )


def wait_timed_out(job_id: str, timeout: float, job: Job | None, error: APIError | None) -> WaitTimeoutError:
    """The error `jobs.wait` raises at its deadline: the job's last status, or why the last poll failed."""
    if job is not None and error is None:
        state = job.status
    else:
        state = f"last poll failed: {error}" if error is not None else "no poll answered"
    return WaitTimeoutError(f"job {job_id} not finished within {timeout:g} s ({state})", job=job)


def progress_line(job: Job, width: int = 30) -> str:
    """A one-line text progress bar for a job, e.g. `job-1 [#######.......] 10/40 running`."""
    filled = round(job.progress * width)
    done = job.completed + job.failed
    failed = f" ({job.failed} failed)" if job.failed else ""
    return f"{job.id} [{'#' * filled}{'.' * (width - filled)}] {done}/{job.total} {job.status}{failed}"


class BaseClient:
    """Configuration and the no-I/O half of every call."""

    def __init__(
        self,
        *,
        base_url: str | httpx.URL | None,
        api_key: str | None,
        timeout: TimeoutTypes,
        max_retries: int,
        backoff: Backoff | None,
        default_headers: Mapping[str, str] | None,
    ) -> None:
        base_url = base_url or os.environ.get(C.BASE_URL_ENV) or C.DEFAULT_BASE_URL
        url = httpx.URL(str(base_url))
        # The OpenAI habit, ".../v1", names the server root here: every API path of the SDK carries its own /v1.
        self.base_url = url.copy_with(path=url.path.rstrip("/").removesuffix("/v1") + "/")
        if self.base_url.scheme not in ("http", "https"):
            raise ValueError(f"base_url must be an http(s) URL, got {str(base_url)!r}")
        key = api_key if api_key is not None else os.environ.get(C.API_KEY_ENV)
        self.api_key = key.strip() or None if key is not None else None  # a key read from a file ends in "\\n"
        if self.api_key is not None and not all(" " <= c <= "~" for c in self.api_key):
            raise ValueError("api_key holds characters an HTTP header cannot carry (only printable ASCII)")
        if self.api_key and (url.username or url.password):  # httpx sends the URL's as Basic, replacing the key's
            raise ValueError(
                f"base_url holds a user and password and an API key is set (api_key or {C.API_KEY_ENV}): both go in"
                " the Authorization header and the URL's would replace the key; give one of them"
            )
        self.timeout = timeout
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.max_retries = max_retries
        self.backoff = backoff or Backoff()
        self._default_headers = dict(default_headers or {})
        self._closed = False

    # -- configuration --------------------------------------------------------------

    @property
    def user_agent(self) -> str:
        """`rlaifv-client/<version> python/<version> httpx/<version>`, sent with every request."""
        return f"{C.USER_AGENT_NAME}/{__version__} python/{platform.python_version()} httpx/{httpx.__version__}"

    def _headers(self, call: APICall[Any], attempt: int) -> httpx.Headers:
        """The SDK's headers, then `default_headers`, then the call's: a later one replaces an earlier one of the
        same name in any case (`authorization` replaces the SDK's Authorization; one X-Request-ID per call)."""
        headers = httpx.Headers(
            {
                "Accept": "application/json",
                "User-Agent": self.user_agent,
                C.REQUEST_ID_HEADER: call.request_id,
                C.RETRY_COUNT_HEADER: str(attempt),
            }
        )
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for given in (self._default_headers, call.headers or {}):
            for name, value in given.items():
                headers[name] = value
        return headers

    def _options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "api_key": self.api_key,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "backoff": self.backoff,
            "default_headers": self._default_headers,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={str(self.base_url)!r}, max_retries={self.max_retries})"

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        """Refuse pickling and `copy.deepcopy` (which falls back to this) by name, not with "cannot pickle
        '_thread.RLock'": a client holds a connection pool, which another process cannot use and a deep copy could
        only share (closing the original would then break the "independent" copy). `copy.copy` is `with_options()`."""
        name = type(self).__name__
        raise TypeError(
            f"a {name} cannot be pickled or deep-copied (it holds a connection pool): use client.with_options() "
            f"or copy.copy(client) for a client sharing the pool, or make a new {name} in the other process"
        )

    # -- one call -------------------------------------------------------------------

    def _retrying(self, call: APICall[Any]) -> Retrying:
        timeout = self.timeout if isinstance(call.timeout, NotGiven) else call.timeout
        return Retrying(call, timeout, self.max_retries, self.backoff)

    def _build_request(
        self, http: httpx.Client | httpx.AsyncClient, call: APICall[Any], retrying: Retrying
    ) -> httpx.Request:
        """The request of the call's current attempt; every attempt carries the call's request id."""
        if self._closed or http.is_closed:
            why = "close() was called" if self._closed else "its connection pool (http_client) was closed"
            raise ClientClosedError(f"the client is closed ({why}): make a new {type(self).__name__}")
        url = self.base_url.join(call.path.lstrip("/"))
        return http.build_request(
            call.method,
            url,
            json=call.json,
            content=call.content,
            params=call.params,
            headers=self._headers(call, retrying.attempt),
            timeout=retrying.attempt_timeout(),
        )

    @staticmethod
    def _connection_error(
        exc: httpx.TransportError, request: httpx.Request, note: str | None = None
    ) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            error: APIConnectionError = APITimeoutError(f"request timed out: {exc}", request=request)
        else:
            error = APIConnectionError(f"connection error: {exc}", request=request)
        error.note = note
        return error

    @staticmethod
    def _status_error(response: httpx.Response, note: str | None = None) -> APIStatusError:
        return make_status_error(response, note)

    @staticmethod
    def _parse(call: APICall[T], response: httpx.Response) -> T:
        try:
            result = call.cast_to.model_validate(response.json())
        except (ValueError, pydantic.ValidationError) as exc:
            if call.unparsed is not None and not response.is_success:
                return call.unparsed()
            raise APIError(
                f"unexpected response from {call.method} {call.path} (HTTP {response.status_code}): {exc}",
                request=response.request,
            ) from None
        result._request_id = response.headers.get("x-request-id")
        return result

    @staticmethod
    def _parse_line(call: APICall[T], line: str) -> T:
        """One line of a JSONL response as `call.cast_to`."""
        try:
            return call.cast_to.model_validate_json(line)
        except pydantic.ValidationError as exc:
            raise APIError(f"unexpected line in the response of {call.method} {call.path}: {exc}") from None

    def _is_final(self, call: APICall[Any], response: httpx.Response) -> bool:
        return response.is_success or response.status_code in call.ok_statuses
