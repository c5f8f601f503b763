from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request

from rlaifv.service.errors import NotEnabled, NotFound, error_responses
from rlaifv.service.jobs import JobStore
from rlaifv.service.protocol import Job, JobRequest, JobResults

router = APIRouter(tags=["jobs"])
JobId = Annotated[str, Path(description="Job id returned by POST /v1/jobs.", max_length=64)]


def get_store(request: Request) -> JobStore:
    store = request.app.state.job_store
    if store is None:
        raise NotEnabled("batch jobs need Redis: the operator sets RLAIFV_REDIS_URL", code="jobs_not_enabled")
    return store


StoreDep = Annotated[JobStore, Depends(get_store)]


async def _found(job: Job | JobResults | None, job_id: str):
    if job is None:
        raise NotFound(f"job '{job_id}' does not exist (or has expired)", param="job_id", code="job_not_found")
    return job


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=Job,
    responses=error_responses(400, 401, 403, 409, 413, 429, 501, 503),
    summary="Submit a durable batch job (Redis Streams)",
)
async def create_job(
    body: JobRequest,
    store: StoreDep,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=128,
            pattern=r"^[A-Za-z0-9._:-]+$",
            description="Makes the submission safe to retry: a repeat with the same key and body returns the "
            "job the first one created (same body required, else 409). The SDK sends one per submit.",
        ),
    ] = None,
) -> Job:
    """Queues every item (a /v1/best-of-n or /v1/rewards request body) on the job stream. Items are
    checked against the request schema now; limits (n, max_tokens, images) are applied when an item
    runs, and an item that breaks them gets an error result. Poll GET /v1/jobs/{id}."""
    owner = getattr(request.state, "key_id", None)
    return await store.create(body, idempotency_key=idempotency_key, owner=owner)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=Job,
    responses=error_responses(400, 401, 403, 404, 429, 501, 503),
    summary="Job status",
)
async def get_job(job_id: JobId, store: StoreDep) -> Job:
    return await _found(await store.get(job_id), job_id)


@router.get(
    "/v1/jobs/{job_id}/results",
    response_model=JobResults,
    responses=error_responses(400, 401, 403, 404, 429, 501, 503),
    summary="Results of a job so far, by item index",
)
async def get_job_results(job_id: JobId, store: StoreDep) -> JobResults:
    return await _found(await store.results(job_id), job_id)


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=Job,
    responses=error_responses(400, 401, 403, 404, 429, 501, 503),
    summary="Cancel a job",
)
async def cancel_job(job_id: JobId, store: StoreDep) -> Job:
    """Items not yet started are skipped; results already stored are kept."""
    return await _found(await store.cancel(job_id), job_id)
