"""`rlaifv worker`: a job worker without the API, so batch capacity scales apart from the replicas.

It loads the same bundle with the same settings as `rlaifv serve` (RLAIFV_* variables, same-named flags) and
consumes the job stream with RLAIFV_JOBS_WORKERS consumers in the group every replica uses. SIGTERM/SIGINT stop
it: items in flight get RLAIFV_SHUTDOWN_GRACE_S to finish, and the rest are handed back (another worker takes them
at once, no delivery counted); a SIGKILL leaves them pending, reclaimed after RLAIFV_JOBS_CLAIM_IDLE_MS with a
delivery counted (RLAIFV_JOBS_MAX_DELIVERIES). While Redis is away the consumers back off and resume by
themselves, first taking up the items they held, with no delivery counted. Its only HTTP is /healthz, /readyz
and /metrics on RLAIFV_WORKER_PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import typer
import uvicorn

from rlaifv.service.serve_cli import (
    HTTP_OPTIONS,
    build_settings,
    checked_bundle_settings,
    with_settings_flags,
)

if TYPE_CHECKING:
    from rlaifv.service.settings import Settings

log = logging.getLogger("rlaifv.worker")
T = TypeVar("T")


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Consume jobs until `stop` is set (or SIGTERM/SIGINT when no event is given).

    /healthz, /readyz and /metrics answer on RLAIFV_WORKER_PORT from before the model loads (alive while
    loading, ready once consuming) until the items in hand have drained."""
    from rlaifv.service.app import create_worker_app
    from rlaifv.service.daemon_threads import in_daemon_thread
    from rlaifv.service.engines import load_engine
    from rlaifv.service.generator import open_generator
    from rlaifv.service.jobs import JobStore, JobWorkers
    from rlaifv.service.metrics import Metrics
    from rlaifv.service.redis_conn import connect
    from rlaifv.service.serving import Serving

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    metrics = Metrics()
    app = create_worker_app(settings, metrics)
    http = await OperationsServer.open(app, settings) if settings.worker_port else None
    try:
        app.state.redis = redis = connect(settings)
        app.state.generator = generator = await open_generator(settings, metrics)
        loaded = await _unless_stopped(in_daemon_thread(load_engine, settings, metrics, name="rlaifv-model-load"), stop)
        if loaded is None:  # stopped while loading: the load thread is abandoned, nothing was taken
            if generator is not None:
                await generator.aclose()
            await redis.aclose()
            log.info("worker stopped while loading")
            return
        engine, load_s = loaded
        app.state.engine = engine
        metrics.model_load.set(load_s)
        if settings.warmup and not stop.is_set():
            metrics.warmup.set(await engine.warmup())
        app.state.serving = serving = Serving.open(settings, engine, metrics, redis=redis, generator=generator)
        workers = None
        if not stop.is_set():  # stopped while loading: nothing is taken, so there is nothing to drain
            app.state.job_workers = workers = JobWorkers(JobStore(redis, settings), serving, settings, metrics)
            workers.start()
            app.state.ready = True
            metrics.ready.set(1)
            log.info(
                "worker ready",
                extra={"consumers": workers.count, "load_s": round(load_s, 3), "stream": settings.jobs_stream},
            )
        try:
            await stop.wait()
        finally:
            app.state.ready, app.state.shutting_down = False, True
            metrics.ready.set(0)
            end = asyncio.get_running_loop().time() + settings.shutdown_grace_s  # one drain for both, as the pod
            if workers is not None:  # grants one (terminationGracePeriodSeconds), not one each
                await workers.stop(settings.shutdown_grace_s)
            await serving.aclose(max(0.0, end - asyncio.get_running_loop().time()))
            await redis.aclose()
            log.info("worker stopped")
    finally:
        if http is not None:
            await http.close()


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None once `stop` is set first (`work` cancelled): a worker told to stop during a
    10-minute model load waited for the load."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


class OperationsServer(uvicorn.Server):
    """uvicorn serving the worker's operations routes beside the consumers; the worker owns the signals."""

    _task: asyncio.Task[None]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @classmethod
    async def open(cls, app: Any, settings: Settings) -> OperationsServer:
        """Bound before the model loads, so a taken port fails the worker at once, naming the setting."""
        try:
            family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET  # "::" binds IPv6 (and v4-mapped)
            sock = socket.create_server((settings.host, settings.worker_port), family=family)
        except OSError as exc:
            where = f"{settings.host}:{settings.worker_port}"
            raise WorkerPortError(f"RLAIFV_WORKER_PORT: cannot listen on {where}: {exc.strerror}") from None
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level=settings.log_level.lower(),
            access_log=False,
            lifespan="off",
            **HTTP_OPTIONS,
        )
        server = cls(config)
        server._task = asyncio.create_task(server.serve(sockets=[sock]), name="rlaifv-worker-http")
        return server

    async def close(self) -> None:
        self.should_exit = True
        await self._task


class WorkerPortError(Exception):
    """The operations port could not be bound."""


def worker(**given: Any) -> None:
    """Run batch-job workers only (no API): same bundle and Redis settings as `rlaifv serve` (every setting an
    RLAIFV_* variable and the same-named flag)."""
    from rlaifv.service.log_format import configure_logging

    settings = build_settings(**given)
    configure_logging(settings.log_level)
    if not settings.redis_url:
        typer.secho("error: a worker needs Redis (--redis-url or RLAIFV_REDIS_URL)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if settings.jobs_workers < 1:
        typer.secho("error: --jobs-workers must be at least 1 for a worker", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    settings = checked_bundle_settings(settings)
    from rlaifv.reward.errors import RewardError
    from rlaifv.service.engines.vllm import VllmStartupError
    from rlaifv.service.generator import GeneratorStartupError

    try:
        asyncio.run(run_worker(settings))
    except (WorkerPortError, GeneratorStartupError, VllmStartupError, RewardError) as exc:  # one line, not 85
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


# Settings of the API a worker does not have: accepted (one environment serves both), not shown in its --help.
API_ONLY = frozenset(
    {
        "port",
        "max_body_bytes",
        "body_timeout_s",
        "api_keys",
        "api_keys_file",
        "allow_placeholder_keys",
        "rate_limit_per_minute",
        "jobs_max_items",
        "jobs_page_size",
    }
)
with_settings_flags(worker, hidden=API_ONLY)

if __name__ == "__main__":
    typer.run(worker)
