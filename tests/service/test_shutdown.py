"""`python -m service.serve_cli` (what `rlaifv serve` runs): starts, logs JSON, drains in-flight requests on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from rlaifv.testing.server import free_port, wait_until_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


async def test_sigterm_finishes_in_flight_requests(service_bundle, red_url: str, tmp_path) -> None:
    port = free_port()
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "RLAIFV_MAX_BATCH": "1",
        "RLAIFV_SHUTDOWN_GRACE_S": "30",
        "RLAIFV_MAX_TOKENS": "16",
        "RLAIFV_TORCH_THREADS": "1",
    }
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlaifv.service.serve_cli", "--bundle", str(service_bundle), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
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
    requests = [e for e in lines if e["message"] == "request" and e.get("route") == "/v1/best-of-n"]
    assert len(requests) == 12 and all(e["status"] == 200 and len(e["request_id"]) == 32 for e in requests)


def test_the_stop_signal_time_is_noted_so_the_queue_drains_in_what_is_left_of_the_grace() -> None:
    """HTTP requests drain first (uvicorn), then the scheduler's queue: both within one RLAIFV_SHUTDOWN_GRACE_S."""
    import uvicorn

    from rlaifv.service.app import create_app
    from rlaifv.service.serve_cli import DrainingServer
    from rlaifv.service.settings import Settings

    app = create_app(Settings(bundle="unused"))
    server = DrainingServer(uvicorn.Config(app))
    assert getattr(app.state, "shutdown_started", None) is None
    server.handle_exit(signal.SIGTERM, None)
    first = app.state.shutdown_started
    server.handle_exit(signal.SIGTERM, None)  # a second signal (forced exit) keeps the first time
    assert server.should_exit and app.state.shutdown_started == first
