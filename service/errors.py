"""Errors of the HTTP layer and the one place every exception becomes an HTTP response.

    ServiceError                (status, type, code, param)
    ├── BadRequest              400 invalid_request_error
    ├── Unauthorized            401 authentication_error: key missing or not valid (RFC 7235; what OpenAI answers)
    ├── NotFound                404 not_found_error
    ├── PayloadTooLarge         413 invalid_request_error
    ├── Overloaded              429 rate_limit_error (Retry-After)
    ├── BadGateway              502 upstream_error: the generator (RLAIFV_GENERATOR_URL) or a vLLM server (engine_error)
    │                               answered badly
    ├── Unavailable             503 service_unavailable (Retry-After)
    │   ├── StoreUnavailable    503 redis_unavailable: Redis down while a job endpoint needs it
    │   ├── GeneratorUnavailable 503 generator_unavailable: the generator unreachable, timed out or overloaded
    │   └── EngineUnavailable   503 engine_unavailable: a vLLM server of the pair (RLAIFV_ENGINE=vllm) is down
    └── DeadlineExceeded        504 timeout_error
        └── QueuedTooLong       504: the deadline passed while it was still queued (nothing ran)

`reward.InvalidInputError` (and its ImageError/AnswerError/ContextLengthError) map to 400 with
their `param`; pydantic validation errors map to 400 naming the field, and when a
request has several problems `error.errors` lists every one (so a client fixes
them in one round trip, not one per retry); any other exception is a bug and
becomes a sanitised 500 (logged with its traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlaifv.reward.errors import InvalidInputError, RewardError
from rlaifv.service.validation_errors import MAX_LISTED_PROBLEMS, FieldProblem, Problems, field_problems

log = logging.getLogger("rlaifv.service")


class ErrorDetail(BaseModel):
    message: str = Field(description="Human-readable explanation.")
    type: str = Field(description="Error class, e.g. invalid_request_error, authentication_error, rate_limit_error.")
    param: str | None = Field(None, description="Dotted path of the offending request field, when one is to blame.")
    code: str | None = Field(
        None, description="Machine-readable code, e.g. invalid_image, queue_full, invalid_api_key."
    )
    errors: list[FieldProblem] | None = Field(
        None,
        description="Present when the request had two problems or more: every one (the first is the envelope's own "
        f"message, param and code), at most {MAX_LISTED_PROBLEMS}.",
    )


class ErrorResponse(BaseModel):
    """The error envelope of every non-2xx response (the OpenAI API's shape)."""

    error: ErrorDetail

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "error": {
                        "message": "n must be <= 16",
                        "type": "invalid_request_error",
                        "param": "n",
                        "code": "invalid_value",
                    }
                }
            ]
        }
    }


class ServiceError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[FieldProblem] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}
        self.errors = errors

    def problems(self) -> Problems:
        """What this error says, as the list a bigger 400 gathers (its own `errors`, or itself as one problem)."""
        return Problems(self.errors or [FieldProblem(message=self.message, param=self.param, code=self.code)])


class BadRequest(ServiceError):
    status, type, code = 400, "invalid_request_error", "invalid_value"

    @classmethod
    def listing(cls, problems: Problems) -> BadRequest:
        """One 400 for several problems: the first's param and code, a message counting the rest, all listed."""
        first = problems.listed[0] if problems.listed else FieldProblem(message=problems.message)
        return cls(problems.message, param=first.param, code=first.code, errors=problems.listed)


class Checks:
    """The independent checks of one request, each run whatever the others found, so one 400 lists them all.

    Each `with checks.one():` block is one check (it stops at its own first problem); a `BadRequest` inside is
    kept and the next check runs; `add` keeps a problem found without a block. `done()` raises what was kept as
    one `BadRequest`: the first problem's message, param and code, and `errors` listing every one. Anything but
    a 400 propagates at once.
    """

    def __init__(self) -> None:
        self.failed: list[BadRequest] = []

    def add(self, problem: BadRequest) -> None:
        self.failed.append(problem)

    @contextmanager
    def one(self) -> Iterator[None]:
        try:
            yield
        except BadRequest as exc:
            self.failed.append(exc)

    def done(self) -> None:
        if len(self.failed) == 1:
            raise self.failed[0]
        if self.failed:
            problems = Problems([])
            for exc in self.failed:
                problems += exc.problems()
            raise BadRequest.listing(problems)


class Unauthorized(ServiceError):
    status, type, code = 401, "authentication_error", "missing_api_key"


class NotFound(ServiceError):
    status, type, code = 404, "not_found_error", "not_found"


class Conflict(ServiceError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(ServiceError):
    status, type, code = 413, "invalid_request_error", "body_too_large"


class Overloaded(ServiceError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(ServiceError):
    status, type, code = 503, "service_unavailable", "not_ready"


class SubmissionPending(Unavailable):
    """A job submission with this Idempotency-Key is still being written, or died before creating its job (its
    claim then expires soon): retry after Retry-After, with the same key."""

    code = "idempotency_pending"


class StoreUnavailable(Unavailable):
    """Redis (which holds jobs) is unreachable or still loading; the request may be retried after Retry-After."""

    code = "redis_unavailable"


class GeneratorUnavailable(Unavailable):
    """The generator is unreachable, timed out or overloaded: retrying later may help."""

    code = "generator_unavailable"


class EngineUnavailable(Unavailable):
    """A vLLM server of the pair (RLAIFV_ENGINE=vllm) is unreachable, timed out or overloaded: retry later."""

    code = "engine_unavailable"


class BadGateway(ServiceError):
    """The generator or a vLLM server (`engine_error`) answered, but not usefully (a 5xx, our key refused, a
    malformed body): an operator's problem."""

    status, type, code = 502, "upstream_error", "generator_error"


class NotEnabled(ServiceError):
    """A feature this deployment was not configured for: retrying cannot help, unlike 503."""

    status, type, code = 501, "not_implemented_error", "not_enabled"


class DeadlineExceeded(ServiceError):
    status, type, code = 504, "timeout_error", "deadline_exceeded"


class QueuedTooLong(DeadlineExceeded):
    """The deadline passed before the request was taken for a batch: nothing of it ran, so sending it again is
    safe (a batch job's item waits and goes again, as after a full queue)."""


class ClientDisconnected(Exception):
    """The client went away while its request waited; nobody reads the answer."""


def error_body(
    type_: str,
    message: str,
    param: str | None = None,
    code: str | None = None,
    errors: list[FieldProblem] | None = None,
) -> dict[str, Any]:
    """The envelope; `errors` only when there are two problems or more (one problem: OpenAI's four keys).

    Texts that echo the request (a model name, a field path) are made encodable: a lone surrogate in them would
    otherwise fail the JSON response itself."""
    error: dict[str, Any] = {"message": _utf8(message), "type": type_, "param": _utf8(param), "code": code}
    if errors and len(errors) > 1:
        error["errors"] = [
            {"message": _utf8(_sanitise(e.message)), "param": _utf8(e.param), "code": e.code}
            for e in errors[:MAX_LISTED_PROBLEMS]
        ]
    return {"error": error}


def _utf8(text: str | None) -> str | None:
    """Lone surrogates written as their escape (`\\ud800`), everything else unchanged."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    status: int,
    type_: str,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[FieldProblem] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(type_, message, param, code, errors), status_code=status, headers=headers)


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    refused = _auth_refusal(request)  # a body that is not JSON fails before the route's auth dependency runs
    if refused is not None:
        return await _service_error_handler(request, refused)
    return await _service_error_handler(request, BadRequest.listing(field_problems(exc.errors(), exc.body, http=True)))


def _auth_refusal(request: Request) -> ServiceError | None:
    from rlaifv.service.auth import auth_refusal  # auth raises this module's errors

    return auth_refusal(request)


def _sanitise(message: str, limit: int = 500) -> str:
    text = message if len(message) <= limit else message[: limit - 3] + "..."
    return text


async def _service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    message = _sanitise(exc.message)
    return error_response(exc.status, exc.type, message, exc.param, exc.code, exc.headers or None, exc.errors)


def invalid_input_code(exc: InvalidInputError) -> str:
    """The `code` of a reward-core input error, the same over HTTP and in a job item's result."""
    from rlaifv.reward.errors import AnswerError, ContextLengthError, ImageError

    if isinstance(exc, ImageError):
        return "invalid_image"
    if isinstance(exc, ContextLengthError):
        return "context_length_exceeded"  # OpenAI's code: clients (LangChain's ContextOverflowError) act on it
    return "invalid_answer" if isinstance(exc, AnswerError) else "invalid_value"


async def _invalid_input_handler(request: Request, exc: InvalidInputError) -> JSONResponse:
    return error_response(400, "invalid_request_error", _sanitise(exc.message), exc.param, invalid_input_code(exc))


FASTAPI_BODY_ERROR = "There was an error parsing the body"


async def _http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kinds = {
        404: ("not_found_error", "not_found"),
        405: ("invalid_request_error", "method_not_allowed"),
        408: ("invalid_request_error", "body_timeout"),
        413: ("invalid_request_error", "body_too_large"),
    }
    type_, code = kinds.get(
        exc.status_code, ("invalid_request_error" if exc.status_code < 500 else "internal_error", None)
    )
    message = str(exc.detail)
    if exc.status_code == 400 and message == FASTAPI_BODY_ERROR and (refused := _auth_refusal(request)) is not None:
        return await _service_error_handler(request, refused)
    if exc.status_code == 400 and message == FASTAPI_BODY_ERROR and exc.__cause__ is not None:
        # JSON that is not UTF-8, a compressed body, an integer past Python's digit limit: FastAPI's parse
        # failures other than a JSONDecodeError, raised from the cause
        code = getattr(exc.__cause__, "code", None)  # a refusal of valid JSON names itself (`TooManyValues`)
        if code is None:
            code, message = "invalid_json", f"request body is not valid JSON (UTF-8 text): {exc.__cause__}"[:300]
        else:
            message = str(exc.__cause__)
    return error_response(exc.status_code, type_, _sanitise(message), None, code, headers=getattr(exc, "headers", None))


def log_unhandled(exc: BaseException) -> None:
    if isinstance(exc, RewardError):
        log.error("reward core error", exc_info=exc)
    else:
        log.exception("unhandled error", exc_info=exc)


def internal_error_body() -> dict[str, Any]:
    return error_body("internal_error", "internal server error", None, "internal_error")


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    """The last resort behind the request middleware (which answers most 500s itself, keeping the connection)."""
    log_unhandled(exc)
    return JSONResponse(internal_error_body(), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, _service_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidInputError, _invalid_input_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled_handler)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error envelope for these statuses."""
    text = {
        400: "Invalid request: malformed JSON, unknown field, value out of bounds, bad image (field in `param`).",
        401: "API key missing (`missing_api_key`) or not valid (`invalid_api_key`).",
        404: "Not found.",
        409: "Idempotency-Key already used with a different request body.",
        413: "Request body over the size limit.",
        429: "Queue full or over quota; retry after `Retry-After` seconds.",
        501: "Not enabled on this deployment (e.g. jobs without RLAIFV_REDIS_URL); retrying will not help.",
        502: "The generator (RLAIFV_GENERATOR_URL) or a vLLM server (`engine_error`) failed or answered something"
        " unusable.",
        503: "Model not loaded yet, shutting down, the generator unreachable, or (job endpoints) Redis unreachable; "
        "retry after `Retry-After`.",
        504: "The request's deadline passed before it was served.",
    }
    return {s: {"model": ErrorResponse, "description": text.get(s, "Error.")} for s in statuses}
