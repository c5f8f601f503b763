"""`python -m service.serve_cli` (what `rlaifv serve` runs): starts, logs JSON, drains in-flight requests on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlaifv.testing.server import free_port, wait_until_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _serve(bundle: Path, log_file: Path, **settings: str) -> tuple[subprocess.Popen, str, Any]:
    """`rlaifv serve` (its module) in a process of its own, on a free port, with these RLAIFV_* settings."""
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT), "RLAIFV_MAX_BATCH": "1", "RLAIFV_TORCH_THREADS": "1"}
    env |= {f"RLAIFV_{name.upper()}": value for name, value in settings.items()}
    log = log_file.open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlaifv.service.serve_cli", "--bundle", str(bundle), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}", log


async def test_sigterm_finishes_in_flight_requests(service_bundle, red_url: str, tmp_path) -> None:
    proc, url, log = _serve(service_bundle, tmp_path / "server.log", shutdown_grace_s="30", max_tokens="16")
    try:
        await asyncio.to_thread(wait_until_ready, url, proc)

        body = {"images": [red_url], "question": "What is in the image?", "n": 8, "sampling": {"max_tokens": 16}}
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            tasks = [asyncio.create_task(client.post("/v1/best-of-n", json=body)) for _ in range(12)]
            depth = 0.0
            async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
                while depth < 6 and not all(t.done() for t in tasks):
                    metrics = (await probe.get("/metrics")).text
                    depth = max(
                        float(line.split()[-1])
                        for line in metrics.splitlines()
                        if line.startswith("rlaifv_queue_depth")
                    )
            assert depth >= 6, "the requests finished before the signal: nothing was in flight"
            proc.send_signal(signal.SIGTERM)  # requests are queued and running
            responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200] * 12
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    lines = [json.loads(line) for line in log.read().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert "ready" in messages and "stopped" in messages
    (ready,) = [e for e in lines if e["message"] == "ready"]  # what an operator checks a rollout by
    assert (ready["engine"], ready["dtype"], ready["api_keys"], ready["redis"]) == ("transformers", "auto", 0, False)
    requests = [e for e in lines if e["message"] == "request" and e.get("route") == "/v1/best-of-n"]
    assert len(requests) == 12 and all(e["status"] == 200 and len(e["request_id"]) == 32 for e in requests)


async def test_what_the_grace_cannot_finish_is_answered_503_and_the_process_exits_within_it(
    service_bundle, in_process_pair, red_url: str, tmp_path
) -> None:
    """A batch running past RLAIFV_SHUTDOWN_GRACE_S, and the requests queued behind it: each got a bare 500 with an
    untagged traceback when uvicorn cancelled its handler, and the process waited for the batch to end (6 s with
    a 2 s grace; a long GPU batch meets the pod's SIGKILL). Now: 503 `shutting_down` with Retry-After, and the
    model thread stops at its next step."""
    import time

    proc, url, log = _serve(service_bundle, tmp_path / "server.log", max_n="64", max_tokens="400", shutdown_grace_s="2")
    content = [{"type": "text", "text": "What is in the image?"}, {"type": "image_url", "image_url": {"url": red_url}}]
    slow = {  # 64 answers of 400 tokens (end of turn banned): seconds on the model, longer than the grace
        "model": "tiny-llava",
        "messages": [{"role": "user", "content": content}],
        "best_of": 64,
        "max_tokens": 400,
        "logit_bias": {str(in_process_pair.eot_id): -100},
    }
    quick = {"images": [red_url], "question": "What is in the image?", "answers": ["a red square"]}
    try:
        await asyncio.to_thread(wait_until_ready, url, proc)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            running = asyncio.create_task(client.post("/v1/chat/completions", json=slow))
            queued = []
            async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
                while not running.done():
                    metrics = (await probe.get("/metrics")).text
                    if "rlaifv_batch_size_count" in metrics and len(queued) < 2:
                        answer = {"answers": [f"a red square {len(queued)}"]}  # not identical: each is queued
                        queued.append(asyncio.create_task(client.post("/v1/rewards", json=quick | answer)))
                    depth = [line for line in metrics.splitlines() if line.startswith("rlaifv_queue_depth ")]
                    if depth and float(depth[0].split()[-1]) >= 2:
                        break
            assert not running.done(), "the slow request finished before the signal"
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(running, *queued)
            answered = time.monotonic() - signalled
        code = await asyncio.to_thread(proc.wait, 30)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "shutting_down" and response.headers["Retry-After"].isdigit()
    assert answered < 2.0 and code in (0, -signal.SIGTERM)
    assert exited < 4.0, f"exited {exited:.1f} s after SIGTERM with a 2 s grace"
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


def _serving_state(grace_s: float, note: Any) -> Any:
    """The app state a Drain works on: `note(what, grace_s)` records the scheduler's close and the engine's release."""
    from types import SimpleNamespace

    from rlaifv.service.metrics import Metrics

    class Scheduler:
        async def close(self, grace_s: float) -> None:
            note("scheduler closed", grace_s)

    class Serving:
        scheduler = Scheduler()

        async def aclose(self, grace_s: float) -> None:
            note("engine released", grace_s)

    settings = SimpleNamespace(shutdown_grace_s=grace_s)
    return SimpleNamespace(settings=settings, metrics=Metrics(), serving=Serving(), ready=True)


@pytest.mark.looptime
async def test_the_signal_stops_the_job_consumers_at_once_and_answers_leftovers_before_the_grace_ends() -> None:
    """The replica's own consumers took new job items during the whole HTTP drain (480 entries in one probe),
    competing with the requests that had to finish in time."""

    from rlaifv.service.shutdown import Drain

    events: list[str] = []

    class Jobs:
        async def stop(self) -> None:
            events.append("jobs stopped")

    def note(what: str, grace_s: float) -> None:
        events.append(f"scheduler closed ({grace_s:g} s)" if what == "scheduler closed" else what)

    state = _serving_state(30.0, note)
    drain = Drain(state, Jobs())
    drain.begin()
    await asyncio.sleep(0.01)  # the loop's virtual clock (looptime)
    assert events == ["jobs stopped"] and state.ready is False and state.shutting_down is True
    await asyncio.sleep(28.9)
    assert events == ["jobs stopped"]
    await asyncio.sleep(0.2)  # the grace less its margin (1 s) has passed
    assert events[-1] == "scheduler closed (0 s)"
    await drain.finish()
    assert events[-1] == "engine released"


@pytest.mark.looptime
async def test_a_hung_redis_does_not_push_the_503s_past_the_grace() -> None:
    """The job consumers' stop waited on a hung Redis before the drain armed its deadline: the 503s came after
    uvicorn's own timeout had cancelled the handlers (bare 500s), and the stop was waited on twice."""

    from rlaifv.service.shutdown import Drain

    events: list[str] = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    class HungJobs:
        stops = 0

        async def stop(self) -> None:
            HungJobs.stops += 1
            await asyncio.Event().wait()  # Redis never answers

    state = _serving_state(4.0, lambda what, grace_s: events.append(f"{what} at {loop.time() - start:.1f} s"))
    drain = Drain(state, HungJobs())
    drain.begin()
    await asyncio.sleep(3.5)
    assert events == ["scheduler closed at 3.2 s"]  # the grace less its margin (a fifth of 4 s), not later
    await drain.finish()
    assert events[-1] == "engine released at 3.5 s" and HungJobs.stops == 1
