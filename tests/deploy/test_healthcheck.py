"""The images' HEALTHCHECK finds the API or the worker, whichever the container runs, and fails on a 503."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from rlaifv.service import healthcheck
from rlaifv.service.settings import Settings
from rlaifv.testing.http_stub import serving


@contextmanager
def answering(status: int) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as server:
        yield server.server_port


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(port: int, worker_port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RLAIFV_PORT": str(port), "RLAIFV_WORKER_PORT": str(worker_port)}
    return subprocess.run(
        [sys.executable, "-m", "rlaifv.service.healthcheck"], env=env, capture_output=True, text=True, timeout=60
    )


def check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, port: int, worker_port: int, *argv: str) -> str | None:
    """The check in a container whose first process is `argv` (none: a command that says neither)."""
    monkeypatch.setenv("RLAIFV_PORT", str(port))
    monkeypatch.setenv("RLAIFV_WORKER_PORT", str(worker_port))
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join(arg.encode() for arg in argv or ("sh", "start.sh")) + b"\0")
    return healthcheck.check(cmdline=cmdline)


def test_the_api_or_the_worker_whichever_the_container_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with answering(200) as up:
        assert check(monkeypatch, tmp_path, up, closed_port(), "/opt/venv/bin/rlaifv", "serve") is None
        assert check(monkeypatch, tmp_path, closed_port(), up, "tini", "--", "rlaifv", "worker") is None
        assert check(monkeypatch, tmp_path, up, closed_port()) is None  # a wrapper: the port that answers
        assert check(monkeypatch, tmp_path, closed_port(), up) is None
        assert check(monkeypatch, tmp_path, closed_port(), 0, "rlaifv", "worker") is None  # no port: not asked


def test_the_other_process_answering_does_not_stand_for_this_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With the host's network the API's port answered for a stuck worker (and the reverse)."""
    with answering(200) as api:
        problem = check(monkeypatch, tmp_path, api, closed_port(), "rlaifv", "worker")
        assert problem is not None and "nothing answers" in problem
        assert check(monkeypatch, tmp_path, closed_port(), api, "rlaifv", "serve") is not None


def test_a_503_fails_even_when_another_port_would_answer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with answering(503) as stuck, answering(200) as other:
        assert check(monkeypatch, tmp_path, stuck, other) == f"port {stuck}: /healthz HTTP 503"
    result = run(closed_port(), closed_port())  # the module as the image runs it
    assert result.returncode == 1 and "nothing answers /healthz" in result.stderr


def test_the_defaults_are_the_settings() -> None:
    fields = Settings.model_fields
    assert (
        ("RLAIFV_PORT", fields["port"].default),
        ("RLAIFV_WORKER_PORT", fields["worker_port"].default),
    ) == healthcheck.DEFAULTS
