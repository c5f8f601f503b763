"""`create_app(settings)`: wires settings, lifespan, middleware, error handlers and routers. No logic here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from rlaifv.service.auth import KeyRing
from rlaifv.service.daemon_threads import in_daemon_thread
from rlaifv.service.deps import enforce_limits
from rlaifv.service.errors import install_error_handlers
from rlaifv.service.metrics import Metrics
from rlaifv.service.middleware import RequestContextMiddleware
from rlaifv.service.redis_conn import Breaker
from rlaifv.service.settings import Settings

log = logging.getLogger("rlaifv.service")

DESCRIPTION = """Best-of-N selection and reranking for multimodal LLMs by the RLAIF-V self-reward
r(x, y) = beta/T * sum_t [log pi_theta(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t)].

Log-probs are raw model log-probs (softmax of the logits at temperature 1, no top-p/top-k), whatever
the sampling settings. Every error has the body `{"error": {"message", "type", "param", "code"}}`;
a request with several problems also gets `error.errors`, every one as `{"message", "param", "code"}`.
When API keys are configured, /v1 routes need `Authorization: Bearer <key>` (401 when missing or not valid)."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Loads the model before serving, or with `load_in_background` (`rlaifv serve`) while already answering:
    /readyz says "loading" (503) and /v1 503 `not_ready` until it is ready, instead of a socket that accepts and
    never answers for the minutes a 7B pair or a vLLM server takes (probes timed out, curl hung)."""
    loading = None
    if app.state.load_in_background:
        loading = asyncio.create_task(_load(app), name="rlaifv-load")
    else:
        await _load(app)
    try:
        yield
    finally:
        if loading is not None and not loading.done():  # stopped while loading: the load thread is abandoned
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
        if app.state.drain is not None:
            await app.state.drain.finish()
        if app.state.redis is not None:
            await app.state.redis.aclose()
        log.info("stopped")


async def _load(app: FastAPI) -> None:
    try:
        await _start(app)
    except Exception as exc:
        # uvicorn logs the start-up traceback as one message: the reason, first and alone, is what an operator
        # reads in the pod's log (a vLLM server not usable, a generator unreachable...).
        log.error("start-up failed: %s", exc, extra={"error_type": type(exc).__name__})
        if app.state.redis is not None:
            await app.state.redis.aclose()
            app.state.redis = None
        if not app.state.load_in_background:
            raise
        app.state.load_error = exc
        app.state.on_load_failure()


async def _start(app: FastAPI) -> None:
    """Everything the app holds, made and loaded in the order failures are cheapest to find."""
    from rlaifv.service.engines import load_engine
    from rlaifv.service.generator import open_generator
    from rlaifv.service.rate_limit import RateLimiter
    from rlaifv.service.serving import Serving
    from rlaifv.service.shutdown import Drain

    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    if settings.bundle is None:
        raise RuntimeError("no bundle configured (RLAIFV_BUNDLE or --bundle)")
    redis = None
    if settings.redis_url:
        from rlaifv.service.redis_conn import connect

        redis = connect(settings)
        app.state.redis = redis
    generator = await open_generator(settings, metrics)  # before the model: a wrong URL fails start-up at once
    app.state.generator = generator
    engine, load_s = await in_daemon_thread(load_engine, settings, metrics, name="rlaifv-model-load")
    app.state.engine = engine
    metrics.model_load.set(load_s)
    if settings.warmup:
        metrics.warmup.set(await engine.warmup())
    breaker = Breaker(settings.redis_retry_after_s, settings.redis_optional_timeout_s)  # the cache's and limits'
    if settings.rate_limit_per_minute > 0:
        app.state.limiter = RateLimiter(per_minute=settings.rate_limit_per_minute, redis=redis, breaker=breaker)
    app.state.serving = Serving.open(settings, engine, metrics, redis=redis, generator=generator, breaker=breaker)
    jobs = None
    stopping = app.state.shutting_down  # a stop came while loading, and the load ended within the HTTP drain
    if redis is not None:
        from rlaifv.service.jobs import JobStore, JobWorkers

        app.state.job_store = JobStore(redis, settings)
        if settings.jobs_workers > 0 and not stopping:
            jobs = JobWorkers(app.state.job_store, app.state.serving, settings, metrics)
            jobs.start()
            app.state.job_workers = jobs
    app.state.drain = Drain(app.state, jobs)  # `rlaifv serve` begins it when the stop signal comes
    if stopping:  # never ready: the lifespan's end releases what was loaded
        log.info("loaded after the stop signal: not serving")
        return
    app.state.ready = True
    metrics.ready.set(1)
    log.info(
        "ready",
        extra={
            "model": app.state.serving.model_name,
            "load_s": round(load_s, 3),
            "bundle": str(settings.bundle),
            "engine": settings.engine,
            "device": settings.device or "auto",
            "dtype": settings.dtype,
            "api_keys": app.state.keys.count,  # 0: /v1 is open to anyone who reaches the port
            "redis": redis is not None,
            "job_workers": settings.jobs_workers if redis is not None else 0,
        },
    )


def init_state(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """What the routes read from `app.state`, before the lifespan (or `rlaifv worker`) fills it in."""
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keys = KeyRing(settings.api_key_hashes())
    app.state.ready = False
    app.state.shutting_down = False
    app.state.redis = None
    app.state.limiter = None
    app.state.job_store = None
    app.state.generator = None
    app.state.engine = None
    app.state.serving = None
    app.state.job_workers = None
    app.state.drain = None
    app.state.load_in_background = False
    app.state.load_error = None
    app.state.on_load_failure = lambda: None


def create_worker_app(settings: Settings, metrics: Metrics) -> FastAPI:
    """`rlaifv worker`'s HTTP face: the operations routes only (/healthz, /readyz, /metrics), so Kubernetes can
    restart a stuck worker and Prometheus can scrape its job metrics; it takes no requests."""
    from rlaifv.service.routes import health

    app = FastAPI(title="rlaifv worker", version="0.1.0", openapi_url=None, docs_url=None, redoc_url=None)
    init_state(app, settings, metrics)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, settings=settings)
    app.include_router(health.router)
    return app


def create_app(settings: Settings | None = None, *, load_in_background: bool = False) -> FastAPI:
    """The service. `load_in_background`: answer (503 while loading) from the start, the model loading beside;
    a failed load then sets `app.state.load_error` and calls `app.state.on_load_failure()` (the server stops)."""
    from rlaifv.service.routes import best_of_n, chat, health, jobs, models, playground, rewards

    settings = settings or Settings()
    app = FastAPI(
        title="RLAIF-V reward service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={},
    )
    init_state(app, settings, Metrics())
    app.state.load_in_background = load_in_background
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics, settings=settings)
    v1 = [Depends(enforce_limits)]
    for module in (best_of_n, rewards, chat, models, jobs):
        app.include_router(module.router, dependencies=v1)
    app.include_router(health.router)
    app.include_router(playground.router)
    jobs.install_cut_filter()
    _tidy_openapi(app)
    return app


def _tidy_openapi(app: FastAPI) -> None:
    """Validation errors answer 400 with the error envelope, so drop FastAPI's default 422 from the schema."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
