"""The images' HEALTHCHECK finds the API or the worker, whichever the container runs, and fails on a 503."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlaifv.service import healthcheck
from rlaifv.service.settings import Settings


@contextmanager
def answering(status: int) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(port: int, worker_port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RLAIFV_PORT": str(port), "RLAIFV_WORKER_PORT": str(worker_port)}
    return subprocess.run(
        [sys.executable, "-m", "rlaifv.service.healthcheck"], env=env, capture_output=True, text=True, timeout=60
    )


def test_the_api_or_the_worker_whichever_answers() -> None:
    with answering(200) as up:
        assert run(up, closed_port()).returncode == 0  # rlaifv serve
        assert run(closed_port(), up).returncode == 0  # rlaifv worker: nothing on the API's port
        assert run(closed_port(), 0).returncode == 1  # a worker without an operations port cannot be checked


def test_a_503_fails_even_when_another_port_would_answer() -> None:
    with answering(503) as stuck, answering(200) as other:
        result = run(stuck, other)
    assert result.returncode == 1 and f"port {stuck}: /healthz HTTP 503" in result.stderr
    result = run(closed_port(), closed_port())
    assert result.returncode == 1 and "nothing answers /healthz" in result.stderr


def test_the_defaults_are_the_settings() -> None:
    fields = Settings.model_fields
    assert (
        ("RLAIFV_PORT", fields["port"].default),
        ("RLAIFV_WORKER_PORT", fields["worker_port"].default),
    ) == healthcheck.DEFAULTS
