"""Exceptions of the SDK. They mirror the wire: one class per HTTP status family, built in one place.

RLAIFVError
├── InvalidArgumentError        an argument refused before anything is sent (also a ValueError); `param` names it
│   └── ImageInputError         an image argument the SDK cannot read or encode
├── ClientClosedError           a call on a client after its close() / aclose() (also a RuntimeError)
├── JobError                    `Job.raise_for_status()` on a failed or cancelled job
├── WaitTimeoutError            `jobs.wait` / `wait_until_ready` gave up (also a builtin TimeoutError)
└── APIError                    anything the server or the network did
    ├── APIStatusError          non-2xx answer: status_code, request_id, type, code, param, body
    │   ├── InvalidRequestError 400, 413, 422: bad input; `param` and `field_errors` name the field
    │   │   └── ConflictError   409: the Idempotency-Key was used with another body
    │   ├── AuthenticationError 401: API key missing or not valid (`.code` says which)
    │   ├── PermissionDeniedError 403: refused (a proxy in front of the service)
    │   ├── NotFoundError       404: unknown route, model or job
    │   ├── RequestTimeoutError 408: the server did not get the request body in time (also a builtin TimeoutError)
    │   ├── RateLimitError      429: queue full or over quota; `retry_after` in seconds
    │   └── ServerError         5xx
    └── APIConnectionError      no answer: connection refused, reset, DNS...
        └── APITimeoutError     the request timed out (also a builtin TimeoutError; alias `TimeoutError`)
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "ClientClosedError",
    "ConflictError",
    "FieldError",
    "ImageInputError",
    "InvalidArgumentError",
    "InvalidRequestError",
    "JobError",
    "NotFoundError",
    "PermissionDeniedError",
    "RLAIFVError",
    "RateLimitError",
    "RequestTimeoutError",
    "ServerError",
    "TimeoutError",
    "WaitTimeoutError",
]


class RLAIFVError(Exception):
    """Root of every exception the SDK raises.

    Picklable whatever a subclass's constructor takes (keyword-only arguments defeat the default), so errors
    cross process pools and multiprocessing queues."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__.copy()))


def _rebuild(cls: type[RLAIFVError], args: tuple[Any, ...], state: dict[str, Any]) -> RLAIFVError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class InvalidArgumentError(RLAIFVError, ValueError):
    """An argument refused on the client side, before anything was sent (e.g. a NaN that JSON cannot carry).

    `param` is the field's path in the request body, as `InvalidRequestError.param` names it for the server's
    refusals (e.g. ``sampling.temperature``, ``items[0].reward.beta``); None when no single field is to blame."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ImageInputError(InvalidArgumentError):
    """An image argument could not be read or encoded on the client side (nothing was sent)."""


class ClientClosedError(RLAIFVError, RuntimeError):
    """A method was called on a client after its `close()` / `aclose()`, or after its connection pool was closed
    (a `with_options()` copy whose original was closed, or your own `http_client` closed): make a new client."""


class JobError(RLAIFVError):
    """A batch job ended `failed` or `cancelled`."""

    def __init__(self, message: str, *, job: Any) -> None:
        super().__init__(message)
        self.job = job


class WaitTimeoutError(RLAIFVError, builtins.TimeoutError):
    """`jobs.wait(timeout=...)` ran out of time; the job itself goes on (see `.job`). Also `wait_until_ready` at its
    deadline (`.job` None), naming what the server was still waiting for."""

    def __init__(self, message: str, *, job: Any) -> None:
        super().__init__(message)
        self.job = job


class APIError(RLAIFVError):
    """The server answered with an error, or could not be reached.

    `note` says why the SDK stopped retrying where that is not plain (the retries spent, or a wait the server asked
    for that would end past the call's timeout); it ends `str(error)`. None when the call was not retried."""

    def __init__(self, message: str, *, request: httpx.Request | None = None, note: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.note = note

    def __str__(self) -> str:
        return self._noted(super().__str__())

    def _noted(self, text: str) -> str:
        return f"{text}; {self.note}" if self.note else text


@dataclass(frozen=True)
class FieldError:
    """One problem with one request field, as the server reported it."""

    param: str | None
    message: str
    code: str | None = None


class APIStatusError(APIError):
    """A non-2xx response. `body` is the parsed JSON (or text); `type`, `code`, `param` come from its error envelope."""

    status_code: int

    def __init__(self, message: str, *, response: httpx.Response, body: Any) -> None:
        super().__init__(message, request=response.request)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        self.request_id: str | None = response.headers.get("x-request-id")
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        self.type: str | None = error.get("type")
        self.code: str | None = error.get("code")
        self.param: str | None = error.get("param")

    def __str__(self) -> str:
        where = f", request_id={self.request_id}" if self.request_id else ""
        text = f"{self.status_code} {self.message} (type={self.type}, code={self.code}, param={self.param}{where})"
        return self._noted(text)


class InvalidRequestError(APIStatusError):
    """400/409/413/422: the request was refused as invalid. `param` is the dotted path of the offending field."""

    def __init__(self, message: str, *, response: httpx.Response, body: Any) -> None:
        super().__init__(message, response=response, body=body)
        error = body.get("error") if isinstance(body, dict) else None
        details = error.get("errors") if isinstance(error, dict) else None
        if isinstance(details, list) and details:  # a server listing every problem
            self.field_errors = [
                FieldError(d.get("param"), str(d.get("message", "")), d.get("code"))
                for d in details
                if isinstance(d, dict)
            ]
        else:
            self.field_errors = [FieldError(self.param, message, self.code)]


class AuthenticationError(APIStatusError):
    """401: no API key was sent (`code` missing_api_key: give `api_key=` or set RLAIFV_API_KEY), or the key is not
    valid (`code` invalid_api_key)."""


class PermissionDeniedError(APIStatusError):
    """403: the call was refused (the service answers 401 for keys; a proxy or gateway in front may say 403)."""


class NotFoundError(APIStatusError):
    """404: unknown route, model or job."""


class RequestTimeoutError(APIStatusError, builtins.TimeoutError):
    """408: the server gave up waiting for the request's body (`code` body_timeout: a slow or stalled upload).
    Retried like a 429; raised after the retries. A builtin TimeoutError, as every timeout of the SDK."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full or the key is over quota. `retry_after` is the server's hint in seconds."""

    def __init__(self, message: str, *, response: httpx.Response, body: Any) -> None:
        super().__init__(message, response=response, body=body)
        from ._base_client import parse_retry_after

        self.retry_after: float | None = parse_retry_after(response.headers)


class ServerError(APIStatusError):
    """5xx: the server failed (500), is not ready or shutting down (503), or missed the request's deadline (504)."""


class APIConnectionError(APIError):
    """The request got no answer: connection refused or reset, DNS failure, protocol error."""

    def __init__(self, message: str = "connection error", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError, builtins.TimeoutError):
    """The request timed out (connect, read, write or pool), retries included."""

    def __init__(self, message: str = "request timed out", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


TimeoutError = APITimeoutError  # the name the issue uses; `except rlaifv_client.TimeoutError` reads naturally


class ConflictError(InvalidRequestError):
    """409: the Idempotency-Key was used before with a different request body."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    409: ConflictError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    429: RateLimitError,
}


def make_status_error(response: httpx.Response, note: str | None = None) -> APIStatusError:
    """The one mapping from an error response to its exception. Reads the body; call after `read()`."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        message = str(error["message"])
    elif isinstance(body, str) and body.strip():
        message = body.strip()[:500]
    else:
        message = response.reason_phrase or "error"
    cls = _STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else APIStatusError
    raised = cls(message, response=response, body=body)
    raised.note = note
    return raised
