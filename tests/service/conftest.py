"""Fixtures for the service tests: a tiny bundle, real uvicorn servers on free ports, image helpers."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlaifv.testing.server import LiveServer as _LiveServer
from rlaifv.testing.server import free_port


@pytest.fixture(scope="session")
def service_bundle(tiny_bundle: Path) -> Path:
    """The tiny random-weight bundle of tests/conftest.py (policy = perturbed reference, name 'tiny-llava')."""
    return tiny_bundle


@pytest.fixture(scope="session")
def in_process_pair(service_bundle: Path):
    """The same bundle loaded in the test process: the in-process API the server must agree with."""
    from rlaifv.reward.bundle import load_bundle

    return load_bundle(service_bundle)


TEST_LIMITS: dict[str, Any] = {
    "max_n": 8,
    "max_tokens": 16,
    "default_max_tokens": 8,
    "max_images": 2,
    "max_image_pixels": 1024 * 1024,
    "max_body_bytes": 1024 * 1024,
    "batch_window_ms": 5,
    "request_timeout_s": 60,
    "shutdown_grace_s": 5,
}


class LiveServer(_LiveServer):
    """The real server with the service tests' limits."""

    def __init__(self, bundle: Path, **overrides: Any) -> None:
        super().__init__(bundle, **(TEST_LIMITS | overrides))


@pytest.fixture(scope="session")
def live_server(service_bundle: Path) -> Iterator[LiveServer]:
    """The default server: no auth, test limits."""
    server = LiveServer(service_bundle).start()
    yield server
    server.stop()


@pytest.fixture
def make_server(service_bundle: Path) -> Iterator:
    """Start servers with settings overrides; stopped after the test."""
    started: list[LiveServer] = []

    def make(**overrides: Any) -> LiveServer:
        server = LiveServer(service_bundle, **overrides).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        yield c


def png_bytes(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (220, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="session")
def red_png() -> bytes:
    return png_bytes()


@pytest.fixture(scope="session")
def red_url(red_png: bytes) -> str:
    return data_url(red_png)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server on a free port (the shared one on 6379 is left alone)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    import redis

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@contextlib.contextmanager
def logs_to(handler: logging.Handler) -> Iterator[logging.Handler]:
    """`handler` takes every record of our loggers and uvicorn's, whatever an earlier test in this process made of
    their propagation (`configure_logging` turns it off); their levels come back afterwards."""
    loggers = [logging.getLogger(name) for name in ("rlaifv", "uvicorn.error")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
