"""`rlaifv serve` answers while its model loads: /readyz 503 "loading", /v1 503 `not_ready`; a failed load exits 3
naming why; a stop during the load exits without waiting for it.

The slow load is the vLLM engine waiting for servers that never come (`RLAIFV_VLLM_WAIT_S`): before, uvicorn took
connections it did not answer until the lifespan had loaded everything (startup probes timed out, curl hung).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rlaifv.testing.server import free_port
from rlaifv.testing.tiny_text import build_tiny_text_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_text_bundle(tmp_path_factory.mktemp("text") / "bundle")


def _serve(bundle: Path, port: int, wait_s: int) -> subprocess.Popen[str]:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    script = Path(sys.executable).with_name("rlaifv")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rlaifv.cli.main"]
    flags = ["--bundle", str(bundle), "--port", str(port), "--engine", "vllm", "--vllm-wait-s", str(wait_s)]
    flags += ["--vllm-policy-url", nowhere, "--vllm-reference-url", nowhere]
    flags += ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"]  # jobs are set up with the model
    env = os.environ | {
        "RLAIFV_WARMUP": "false",
        "RLAIFV_TORCH_THREADS": "1",
    }
    return subprocess.Popen([*command, "serve", *flags], env=env, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def loading(text_bundle: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    process = _serve(text_bundle, port, request.param)
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _first_answer(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    """/readyz's first answer (polled until the server takes connections; each try bounded)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited before answering"
        try:
            return httpx.get(url + "/readyz", timeout=5)
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(f"{url}/readyz never answered")


@pytest.mark.parametrize("loading", [20], indirect=True)
def test_while_loading_readyz_says_so_and_a_failed_load_exits_3_naming_why(loading) -> None:
    process, url = loading
    ready = _first_answer(url, process)
    assert ready.status_code == 503 and ready.json()["checks"]["model"] == "loading", ready.text
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    refused = httpx.post(url + "/v1/rewards", json={"question": "q", "answers": ["a"]}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready", refused.text
    assert refused.headers["retry-after"]
    jobs = httpx.post(url + "/v1/jobs", json={"kind": "rewards", "items": [{"question": "q", "answers": ["a"]}]})
    assert jobs.status_code == 503 and jobs.json()["error"]["code"] == "not_ready", jobs.text  # not 501 "no Redis"
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr
    assert "start-up failed" in stderr and "RLAIFV_VLLM_POLICY_URL" in stderr, stderr


@pytest.mark.parametrize("loading", [600], indirect=True)
def test_a_stop_while_loading_exits_without_waiting_for_the_load(loading) -> None:
    process, url = loading
    assert _first_answer(url, process).status_code == 503
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)  # the load would go on for 600 s
    assert process.returncode in (0, -signal.SIGTERM), stderr  # uvicorn re-raises the signal it stopped on
    assert "stopped" in stderr


async def test_a_load_that_ends_after_the_stop_signal_starts_no_job_consumers(
    service_bundle: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while loading found no drain to begin; a load ending within uvicorn's HTTP drain then started the
    job consumers and said ready. Now it starts nothing, is never ready, and the lifespan's end releases it."""
    import asyncio
    import threading

    from rlaifv.service import engines
    from rlaifv.service.app import create_app
    from rlaifv.service.serve_cli import DrainingServer
    from rlaifv.service.settings import Settings

    entered, release, load = threading.Event(), threading.Event(), engines.load_engine

    def gated_load(*args, **kwargs):
        entered.set()
        release.wait(timeout=60)
        return load(*args, **kwargs)

    monkeypatch.setattr(engines, "load_engine", gated_load)
    settings = Settings(bundle=service_bundle, redis_url=redis_url, warmup=False, torch_threads=1)
    app = create_app(settings, load_in_background=True)
    server = DrainingServer(__import__("uvicorn").Config(app))
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(entered.wait, 60)
        server.handle_exit(signal.SIGTERM, None)  # what the signal does while nothing is loaded yet
        release.set()
        while app.state.drain is None:  # the load ends
            await asyncio.sleep(0.01)
        assert app.state.ready is False and app.state.job_workers is None
    assert app.state.serving.scheduler._closing  # released at the lifespan's end
