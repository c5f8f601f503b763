"""Stopping a replica in the order a rolling update needs, within `RLAIFV_SHUTDOWN_GRACE_S` in all.

`rlaifv serve`'s signal handler calls `Drain.begin` the moment SIGTERM comes: /readyz fails (the replica leaves
the Service) and the replica's job consumers stop (their entries stay pending for another worker). uvicorn stops
accepting connections and lets the requests it has finish, new ones on open connections included; at the grace
less a margin, every request still without an answer (queued, or in a batch still running) gets 503
`shutting_down` with Retry-After, so that its handler answers before uvicorn's own timeout cancels it (a bare
500). `finish`, at the lifespan's end, closes the scheduler in what is left of the grace (all of it when no
signal came: tests, a plain uvicorn) and releases the engine, whose model thread stops at its next decoding step.
At the same deadline the HTTP protocol cuts the responses whose clients took nothing of them since the signal
(`service.http_protocol`): uvicorn's timeout cancelled those handlers with an error and a traceback.

Begun only at the lifespan's end, as it was, the drain let job consumers take new work throughout the HTTP
drain, and nothing answered the requests the grace could not finish.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

MARGIN_S = 1.0  # of the grace, kept for the handlers to write their 503s; at most a fifth of it
log = logging.getLogger("rlaifv.service")


def answer_deadline_s(grace_s: float) -> float:
    """Seconds after the stop signal at which what is left gets its answer (the grace less the margin): the
    requests still waiting get 503, and responses their clients took nothing of meanwhile are cut
    (`service.http_protocol`), before uvicorn's own timeout cancels their handlers."""
    return grace_s - min(MARGIN_S, grace_s / 5)


class Drain:
    def __init__(self, state: Any, jobs: Any | None) -> None:
        self.state = state
        self.jobs = jobs
        self.loop = asyncio.get_running_loop()
        self.grace_s: float = state.settings.shutdown_grace_s
        self._deadline: float | None = None  # the loop's time of the last answer, once a signal came
        self._task: asyncio.Task[None] | None = None
        self._http_done = asyncio.Event()  # uvicorn's HTTP drain ended before the deadline

    def begin(self) -> None:
        """Start draining now; safe from a signal handler or another thread, and more than once."""
        self.loop.call_soon_threadsafe(self._start, self.loop.time())

    def _start(self, signalled: float) -> None:
        if self._task is None:
            self._deadline = signalled + answer_deadline_s(self.grace_s)
            self._task = self.loop.create_task(self._run(), name="rlaifv-drain")

    async def _run(self) -> None:
        self._not_ready()
        # Beside the HTTP drain, never before it: stopping the job consumers waits on Redis (a hung one: its
        # timeouts), which made the drain miss its deadline and uvicorn cancel the handlers (bare 500s).
        stopping = self.loop.create_task(self.jobs.stop(), name="rlaifv-jobs-stop") if self.jobs is not None else None
        assert self._deadline is not None
        try:
            await asyncio.wait_for(self._http_done.wait(), max(0.0, self._deadline - self.loop.time()))
        except TimeoutError:
            await self.state.serving.scheduler.close(0.0)
        if stopping is not None:
            try:
                await asyncio.wait_for(stopping, max(0.0, self._deadline - self.loop.time()))
            except TimeoutError:  # their entries stay pending, reclaimed by another worker as a killed one's
                log.warning("job consumers not stopped within the grace (Redis away?)")

    def _not_ready(self) -> None:
        self.state.ready = False
        self.state.shutting_down = True
        self.state.metrics.ready.set(0)

    async def finish(self) -> None:
        """After the HTTP drain: the scheduler closed in what is left of the grace, the engine released."""
        self._not_ready()
        self._http_done.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # the rest of the stop goes on: the engine must still be released
                log.exception("drain failed")
        if self.jobs is not None and self._task is None:  # no signal came (tests, a plain uvicorn): stop them now
            await self.jobs.stop()
        left = self.grace_s if self._deadline is None else max(0.0, self._deadline - self.loop.time())
        await self.state.serving.aclose(left)
