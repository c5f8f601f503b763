from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from rlaifv.service.errors import BadRequest, NotEnabled, NotFound, StoreUnavailable, Unavailable, error_responses
from rlaifv.service.jobs import JobStore, parse_jsonl
from rlaifv.service.json_body import BatchBodyRoute
from rlaifv.service.protocol import Job, JobList, JobRequest, JobResults

router = APIRouter(route_class=BatchBodyRoute, tags=["jobs"])
log = logging.getLogger("rlaifv.jobs")
JobId = Annotated[str, Path(description="Job id returned by POST /v1/jobs.", max_length=64)]
JSONL = "application/x-ndjson"
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Makes the submission safe to retry: a repeat with the same key and body returns the "
        "job the first one created (same body required, else 409). The SDK sends one per submit.",
    ),
]


class StreamCut(Exception):
    """Raised by the body iterator of a `CuttableStreamingResponse` to leave the response incomplete."""


# Set in the task that serves a response cut on purpose: uvicorn's "returned without completing" error line is
# then dropped (`_CutOnPurpose`); the cut was logged already, as a warning naming its job.
_cut_on_purpose: ContextVar[bool] = ContextVar("rlaifv_response_cut", default=False)
_UVICORN_INCOMPLETE = "ASGI callable returned without completing response"


class _CutOnPurpose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_cut_on_purpose.get() and record.getMessage().startswith(_UVICORN_INCOMPLETE))


_CUT_FILTER = _CutOnPurpose()


def install_cut_filter() -> None:
    """Drops uvicorn's error line for responses this module cut on purpose (called by `create_app`; adding the same
    filter again does nothing)."""
    logging.getLogger("uvicorn.error").addFilter(_CUT_FILTER)


class CuttableStreamingResponse(StreamingResponse):
    """A stream that its iterator can end *incomplete* by raising `StreamCut`: the final body message is never sent,
    so the server closes the connection without the terminating chunk and every HTTP client sees an error (httpx:
    RemoteProtocolError, incomplete chunked read). A body that merely ended early was taken for a whole one (by our
    SDK too: results were lost unnoticed); raising another error from the iterator did the same as this, but uvicorn
    logged it as an unhandled exception with its traceback."""

    cut = False

    async def stream_response(self, send: Send) -> None:
        try:  # Starlette sends the final message after its loop over the body: a cut raised in the loop skips it
            await super().stream_response(send)
        except StreamCut:
            self.cut = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)
        if self.cut:  # here, not in `stream_response`: Starlette may run that in a task of its own
            _cut_on_purpose.set(True)


def _prefers_jsonl(accept: str) -> bool:
    """Whether an Accept header ranks JSONL at least as high as JSON (`application/x-ndjson;q=0` refuses it)."""
    weights: dict[str, float] = {}
    for entry in accept.split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights[media.lower()] = max(weight, weights.get(media.lower(), 0.0))
    return weights.get(JSONL, 0.0) > 0 and weights[JSONL] >= weights.get("application/json", 0.0)


def get_store(request: Request) -> JobStore:
    state = request.app.state
    store: JobStore | None = state.job_store
    if store is None:
        if state.settings.redis_url and not state.ready:  # set up with the model (`rlaifv serve` answers meanwhile)
            raise Unavailable("the model is not loaded yet", code="not_ready", headers={"Retry-After": "5"})
        raise NotEnabled("batch jobs need Redis: the operator sets RLAIFV_REDIS_URL", code="jobs_not_enabled")
    return store


StoreDep = Annotated[JobStore, Depends(get_store)]


def _given_once(request: Request, *names: str) -> None:
    """A 400 naming a query parameter given more than once: FastAPI takes the last value of a repeated one, so
    `?kind=rewards&kind=best_of_n` ran every line as a best-of-n request."""
    for name in names:
        given = len(request.query_params.getlist(name))
        if given > 1:
            raise BadRequest(f"query parameter '{name}' is given {given} times: give it once", param=name)


def _owner(request: Request) -> str | None:
    """The API key (its id) that owns what this request creates or reads; None without keys configured."""
    return getattr(request.state, "key_id", None)


def _found(job: Job | None, job_id: str) -> Job:
    if job is None:
        raise NotFound(f"job '{job_id}' does not exist (or has expired)", param="job_id", code="job_not_found")
    return job


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=Job,
    responses=error_responses(400, 401, 409, 413, 429, 501, 503),
    summary="Submit a durable batch job (Redis Streams)",
)
async def create_job(
    body: JobRequest, store: StoreDep, request: Request, idempotency_key: IdempotencyKey = None
) -> Job:
    """Queues every item (a /v1/best-of-n or /v1/rewards request body, optionally wrapped as
    `{"custom_id", "body"}`) on the job stream. Items are checked against the request schema now; limits
    (n, max_tokens, images) are applied when an item runs, and an item that breaks them gets an error
    result. Poll GET /v1/jobs/{id}; read GET /v1/jobs/{id}/results."""
    return await store.create(body, idempotency_key=idempotency_key, owner=_owner(request))


@router.post(
    "/v1/jobs/upload",
    status_code=202,
    response_model=Job,
    responses=error_responses(400, 401, 409, 413, 429, 501, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSONL: {"schema": {"type": "string", "description": "One item per line."}}},
        }
    },
    summary="Submit a batch job as a JSONL file",
)
async def upload_job(
    request: Request,
    store: StoreDep,
    kind: Annotated[Literal["best_of_n", "rewards"], Query(description="Which endpoint each line is a request for.")],
    metadata: Annotated[
        str | None, Query(max_length=4096, description='Labels stored with the job, as a JSON object: {"run": "7"}.')
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    """The body is a JSONL file: one item per line, as in the `items` of POST /v1/jobs (a request body, or
    `{"custom_id": "...", "body": {...}}`). A line that is not a JSON object is a 400 naming `items[i]`."""
    _given_once(request, "kind", "metadata")
    body = await request.body()  # parsed off the loop: a large upload held /healthz for seconds
    items = await asyncio.to_thread(parse_jsonl, body.splitlines(), store.max_items)
    try:
        job = JobRequest(kind=kind, items=items, metadata=json.loads(metadata) if metadata else {})
    except ValidationError as exc:  # only the metadata is checked here: each item is checked as its own request
        bound = [e["ctx"]["error"] for e in exc.errors() if e["type"] == "value_error"]
        raise BadRequest(
            f"metadata: {bound[0]}" if bound else "metadata must be a JSON object of strings", param="metadata"
        ) from None
    except (ValueError, RecursionError):
        raise BadRequest("metadata must be a JSON object of strings", param="metadata") from None
    return await store.create(job, idempotency_key=idempotency_key, owner=_owner(request))


@router.get(
    "/v1/jobs",
    response_model=JobList,
    responses=error_responses(400, 401, 429, 501, 503),
    summary="List your jobs, newest first",
)
async def list_jobs(
    store: StoreDep,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page, 1 to 100.")] = 20,
    after: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            description="A job id (the previous page's `last_id`): the page starts with the job after it.",
        ),
    ] = None,
) -> JobList:
    """The jobs of the calling API key (all jobs without keys configured) that have not expired, newest first,
    paginated as OpenAI's `GET /v1/batches`: follow `last_id` as `after` while `has_more`. An `after` that is not
    one of the caller's jobs (unknown, expired, another key's) is a 400 naming `after`."""
    _given_once(request, "limit", "after")
    jobs, has_more = await store.list_jobs(_owner(request), limit=limit, after=after)
    return JobList(
        data=jobs,
        first_id=jobs[0].id if jobs else None,
        last_id=jobs[-1].id if jobs else None,
        has_more=has_more,
    )


@router.get(
    "/v1/jobs/{job_id}",
    response_model=Job,
    responses=error_responses(400, 401, 404, 429, 501, 503),
    summary="Job status",
)
async def get_job(job_id: JobId, store: StoreDep, request: Request) -> Job:
    """A job is seen only with the API key that submitted it (404 for any other)."""
    return _found(await store.get(job_id, _owner(request)), job_id)


@router.get(
    "/v1/jobs/{job_id}/results",
    response_model=JobResults,
    responses={
        200: {
            "description": "JSON (`JobResults`), or with `format=jsonl` / `Accept: application/x-ndjson` one "
            "`JobItemResult` per line.",
            "content": {JSONL: {"schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 404, 429, 501, 503),
    },
    summary="Results of a job so far, in item order (JSON or streamed JSONL)",
)
async def get_job_results(
    job_id: JobId,
    store: StoreDep,
    request: Request,
    format: Annotated[
        Literal["json", "jsonl"] | None,
        Query(description="jsonl: one result per line (also chosen by `Accept: application/x-ndjson`)."),
    ] = None,
    after: Annotated[
        int | None,
        Query(
            ge=0,
            description="An item index: only the results of the items after it, still in item order. Resumes a "
            "stream that was cut: pass the `index` of the last result read.",
        ),
    ] = None,
) -> StreamingResponse:
    """Both forms are streamed from Redis a page at a time, so a 10,000-item job costs the server one page of
    memory. Items without a result yet are left out. Should Redis fail mid-stream the response is left
    incomplete (the connection closes without the body's end: every HTTP client sees an error, never a body that
    looks whole): read on with `after` set to the index of the last result read."""
    _given_once(request, "format", "after")
    job = _found(await store.get(job_id, _owner(request)), job_id)
    jsonl = format == "jsonl" or (format is None and _prefers_jsonl(request.headers.get("accept", "")))
    lines = store.result_lines(job, after)
    first = await anext(lines, None)  # Redis failing here is still a 503, not a cut-off 200

    async def body() -> AsyncIterator[str]:
        if not jsonl:
            yield json.dumps({"id": job.id, "object": "list", "status": job.status})[:-1] + ', "data": ['
        if first is not None:
            yield first + ("\n" if jsonl else "")
            try:
                async for line in lines:
                    yield (line + "\n") if jsonl else ("," + line)
            except StoreUnavailable as exc:  # the status line is sent: only an incomplete body can say it failed
                log.warning("job results cut short: %s", exc.message, extra={"job": job.id})
                raise StreamCut from None
        if not jsonl:
            yield "]}"

    return CuttableStreamingResponse(body(), media_type=JSONL if jsonl else "application/json")


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=Job,
    responses=error_responses(400, 401, 404, 429, 501, 503),
    summary="Cancel a job",
)
async def cancel_job(job_id: JobId, store: StoreDep, request: Request) -> Job:
    """Items not yet started are skipped and those running are not stored: results already stored are kept,
    and the job's counts stay as this answer gives them."""
    return _found(await store.cancel(job_id, _owner(request)), job_id)
