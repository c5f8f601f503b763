from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rlaifv.service.auth import require_metrics_key
from rlaifv.service.errors import error_responses
from rlaifv.service.protocol import Health

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rlaifv.service.metrics import Metrics
    from rlaifv.service.settings import Settings

router = APIRouter(tags=["operations"])
log = logging.getLogger("rlaifv.service")


@router.head("/healthz", include_in_schema=False)  # load balancers and uptime checkers probe with HEAD
@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "Stuck: restart me (checks say what stopped)."}},
    summary="Liveness: the process answers and its work moves",
)
async def healthz(request: Request) -> Response:
    """Fails only for what a restart mends: the scheduler's loop ended, a job consumer ended, or one engine batch
    has run past RLAIFV_ENGINE_STALL_S (a model call hung in a driver never returns). Loading, draining, Redis or
    a vLLM server being away are readiness matters, never liveness ones: restarting would not help."""
    state = request.app.state
    checks = {}
    for name, part in (("engine", state.serving), ("jobs", state.job_workers)):
        problem = part.liveness() if part is not None else None
        if problem is not None:
            checks[name] = problem
    if checks:
        return JSONResponse(Health(status="unavailable", checks=checks).model_dump(), status_code=503)
    return JSONResponse(Health(status="ok").model_dump())


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=Health,
    responses={
        503: {
            "model": Health,
            "description": "Not ready: loading or shutting down (or, with "
            "RLAIFV_READY_REQUIRES_REDIS, Redis unreachable; with RLAIFV_ENGINE=vllm, a vLLM server of the pair "
            "unhealthy: checks.engine). A generator's state is reported in checks.generator.",
        }
    },
    summary="Readiness: model loaded and warm; Redis state reported",
)
async def readyz(request: Request) -> Response:
    """Ready means the model answers. Redis is checked and reported (`checks.redis`) but, unless
    RLAIFV_READY_REQUIRES_REDIS is set, does not make the replica unready: every replica shares the one Redis,
    so failing readiness on it would pull all of them out of the load balancer at once and turn an outage of
    jobs (503 with Retry-After) into an outage of the synchronous endpoints, which work without Redis.
    A generator (RLAIFV_GENERATOR_URL) is reported (`checks.generator`) for the same reason: it was checked at
    start-up, and while it is down best-of-N answers 503 but /v1/rewards still works."""
    state = request.app.state
    checks = {"model": "ok" if getattr(state, "ready", False) else "loading"}
    if getattr(state, "shutting_down", False):
        checks["model"] = "shutting_down"
    redis = getattr(state, "redis", None)
    required = ["model"]
    if redis is not None:
        settings = state.settings
        if settings.ready_requires_redis:
            required.append("redis")
        try:
            await asyncio.wait_for(redis.ping(), timeout=settings.redis_connect_timeout_s)
            checks["redis"] = "ok"
        except Exception as exc:  # any failure means Redis is not usable now
            checks["redis"] = f"unreachable: {type(exc).__name__}"
    engine = getattr(state, "engine", None)
    if checks["model"] == "ok" and hasattr(engine, "probe"):  # the vLLM servers of the pair: the model itself
        checks["engine"] = await engine.probe()
        required.append("engine")
    generator = getattr(state, "generator", None)
    if generator is not None:
        checks["generator"] = await generator.probe()
    ok = all(checks[name] == "ok" for name in required)
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_key)],
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
        **error_responses(401),
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    state = request.app.state
    if state.redis is not None:
        await _read_backlog(state.redis, state.settings, state.metrics)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _read_backlog(redis: Redis, settings: Settings, metrics: Metrics) -> None:
    """The job stream's length now: a scrape is the only reader, so no loop polls Redis between scrapes. Redis
    away: the last value stands (the items wait for it too) and the scrape still answers."""
    try:
        backlog = await asyncio.wait_for(redis.xlen(settings.jobs_stream), timeout=settings.redis_connect_timeout_s)
    except Exception as exc:
        log.debug("job backlog not read: %s", type(exc).__name__)
        return
    metrics.jobs_backlog.set(backlog)
