from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rlaifv.service.auth import require_metrics_key
from rlaifv.service.errors import error_responses
from rlaifv.service.json_body import JsonBodyRoute
from rlaifv.service.protocol import Health
from rlaifv.service.redis_conn import FULL_HINT, memory_use, over_fraction

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rlaifv.service.metrics import Metrics
    from rlaifv.service.settings import Settings

router = APIRouter(route_class=JsonBodyRoute, tags=["operations"])
log = logging.getLogger("rlaifv.service")
# A readiness check answers within this (kubelet gives up at the probe's timeoutSeconds: 5 in deploy/k8s).
READY_PROBE_S = 3.0


@runtime_checkable
class _Probed(Protocol):
    """An engine that serves from other processes (vLLM): readiness asks them, not only whether it was loaded."""

    async def probe(self) -> str: ...


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
    summary="Readiness: model loaded and warm; Redis state reported (unreachable, full)",
)
async def readyz(request: Request) -> Response:
    """Ready means the model answers. Redis is checked and reported (`checks.redis`) but, unless
    RLAIFV_READY_REQUIRES_REDIS is set, does not make the replica unready: every replica shares the one Redis,
    so failing readiness on it would pull all of them out of the load balancer at once and turn an outage of
    jobs (503 with Retry-After) into an outage of the synchronous endpoints, which work without Redis.
    A generator (RLAIFV_GENERATOR_URL) is reported (`checks.generator`) for the same reason: it was checked at
    start-up, and while it is down best-of-N answers 503 but /v1/rewards still works. A full Redis (`checks.redis`
    "full: ...": new jobs are refused) is reported, never unready: it still serves job status and results, and
    leaving the load balancer frees no memory."""
    state = request.app.state
    checks = {"model": "ok" if getattr(state, "ready", False) else "loading"}
    if getattr(state, "shutting_down", False):
        checks["model"] = "shutting_down"
    settings = state.settings
    required = ["model"]
    probes: dict[str, Awaitable[str]] = {}
    redis = getattr(state, "redis", None)
    if redis is not None:
        if settings.ready_requires_redis:
            required.append("redis")
        probes["redis"] = _probe_redis(redis, settings, state.metrics)
    engine = getattr(state, "engine", None)
    if checks["model"] == "ok" and isinstance(engine, _Probed):  # the vLLM servers of the pair: the model itself
        probes["engine"] = _bounded(engine.probe(), READY_PROBE_S)
        required.append("engine")
    generator = getattr(state, "generator", None)
    if generator is not None:
        probes["generator"] = _bounded(generator.probe(), READY_PROBE_S)
    # Side by side: one slow dependency costs its own bound, not the sum of all (kubelet's timeoutSeconds is 5).
    checks.update(zip(probes, await asyncio.gather(*probes.values()), strict=True))
    ok = all(checks[name] == "ok" or (name == "redis" and checks[name].startswith("full")) for name in required)
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


async def _probe_redis(redis: Redis, settings: Settings, metrics: Metrics) -> str:
    """ "ok", "unreachable: ..." or "full: ..." (past RLAIFV_JOBS_ADMIT_MEMORY_FRACTION of maxmemory): PING and INFO
    memory in one round trip; INFO refused (an ACL user) reads as not full."""
    pipe = redis.pipeline(transaction=False)
    pipe.ping()
    pipe.info("memory")
    try:
        _, memory = await asyncio.wait_for(pipe.execute(raise_on_error=False), timeout=settings.redis_connect_timeout_s)
    except Exception as exc:  # any failure means Redis is not usable now
        metrics.redis_up.set(0)
        return f"unreachable: {type(exc).__name__}"
    metrics.redis_up.set(1)
    return _memory_state(memory, settings, metrics) or "ok"


def _memory_state(memory: object, settings: Settings, metrics: Metrics) -> str | None:
    """The memory gauges from an INFO memory reply; a "full: ..." state past the admission fraction, else None."""
    use = memory_use(memory)
    if use is None:
        return None
    used, maxmemory = use
    metrics.redis_used_memory.set(used)
    metrics.redis_maxmemory.set(maxmemory)
    full = over_fraction(used, maxmemory, settings.jobs_admit_memory_fraction)
    metrics.jobs_store_full.set(int(full))
    if not full:
        return None
    refused = "every write is refused" if used >= maxmemory else "new jobs are refused"
    return (
        f"full: used_memory {used} of maxmemory {maxmemory} bytes, past RLAIFV_JOBS_ADMIT_MEMORY_FRACTION"
        f" ({settings.jobs_admit_memory_fraction:g}): {refused}; {FULL_HINT}"
    )


async def _bounded(probe: Awaitable[str], timeout_s: float) -> str:
    """A probe's answer within `timeout_s` as a whole (an HTTP client's timeout bounds each phase, not the sum)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await probe
    except TimeoutError:
        return f"unavailable: no answer within {timeout_s:g} s"


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
        await _read_redis(state.redis, state.settings, state.metrics)
    body = await asyncio.to_thread(generate_latest, state.metrics.registry)  # off the loop: probes share it
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def _read_redis(redis: Redis, settings: Settings, metrics: Metrics) -> None:
    """The job stream's length and Redis's memory now, in one round trip: a scrape is the only reader, so no loop
    polls Redis between scrapes. Redis away (or INFO refused to an ACL user): the last values stand
    (`rlaifv_redis_up` 0 tells them apart) and the scrape still answers."""
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(settings.jobs_stream)
    pipe.info("memory")
    try:
        backlog, memory = await asyncio.wait_for(
            pipe.execute(raise_on_error=False), timeout=settings.redis_connect_timeout_s
        )
    except Exception as exc:
        log.debug("Redis not read for the metrics: %s", type(exc).__name__)
        metrics.redis_up.set(0)
        return
    metrics.redis_up.set(1)
    if not isinstance(backlog, Exception):
        metrics.jobs_backlog.set(backlog)
    _memory_state(memory, settings, metrics)
