"""Fixtures for the SDK tests: the real server (uvicorn on a free port, tiny random-weight bundle), a private
Redis for jobs, an image host the server may fetch from, and images in every form the SDK accepts."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from rlaifv.testing.http_stub import serving
from rlaifv.testing.server import LiveServer as _LiveServer
from rlaifv.testing.server import free_port

API_KEY = "sk-client-tests-0123456789"
QUESTION = "What is in the image?"

# Small limits keep the tiny model fast on a shared 2-core machine.
LIMITS: dict[str, Any] = {
    "max_n": 8,
    "max_tokens": 16,
    "default_max_tokens": 8,
    "max_images": 2,
    "max_image_pixels": 1024 * 1024,
    "batch_window_ms": 2,
    "request_timeout_s": 60,
    "shutdown_grace_s": 2,
    "warmup": False,
}


class LiveServer(_LiveServer):
    """The real server with the SDK tests' limits."""

    def __init__(self, bundle: Path, **overrides: Any) -> None:
        super().__init__(bundle, graceful_shutdown_s=2, **(LIMITS | overrides))


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


class ImageHost:
    """A plain HTTP server on 127.0.0.1 serving one PNG at /red.png (the server is allowed to fetch from it)."""

    def __init__(self, data: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/red.png":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._handler, self._served = Handler, contextlib.ExitStack()

    def __enter__(self) -> ImageHost:
        server = self._served.enter_context(serving(self._handler))
        self.url = f"http://127.0.0.1:{server.server_port}/red.png"
        return self

    def __exit__(self, *exc: object) -> None:
        self._served.close()


@pytest.fixture(scope="session")
def red_png() -> bytes:
    return png_bytes()


@pytest.fixture(scope="session")
def image_host(red_png: bytes) -> Iterator[ImageHost]:
    with ImageHost(red_png) as host:
        yield host


@pytest.fixture(scope="session")
def server(tiny_bundle: Path) -> Iterator[LiveServer]:
    """The main test server: API key required on /v1, remote images allowed from 127.0.0.1."""
    with LiveServer(tiny_bundle, api_keys=[API_KEY], allowed_image_hosts=["127.0.0.1:*"]) as live:
        yield live


@pytest.fixture(scope="module")
def busy_server(tiny_bundle: Path) -> Iterator[LiveServer]:
    """A server with a queue bound of 1 and no batching: concurrent requests get 429 + Retry-After: 1."""
    with LiveServer(tiny_bundle, max_queue=1, max_batch=1, batch_window_ms=0, retry_after_s=1) as live:
        yield live


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free port (skipped where none is installed)."""
    redis_bin, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if redis_bin is None or cli is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    redis = subprocess.Popen([redis_bin, *args], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run([cli, "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        redis.terminate()
        redis.wait(timeout=10)


@pytest.fixture
def client(server: LiveServer) -> Iterator[Any]:
    from rlaifv_client import Client

    with Client(base_url=server.url, api_key=API_KEY, timeout=60) as c:
        yield c


@pytest.fixture
async def async_client(server: LiveServer) -> Any:
    from rlaifv_client import AsyncClient

    async with AsyncClient(base_url=server.url, api_key=API_KEY, timeout=60) as c:
        yield c


@pytest.fixture(params=["path", "str-path", "bytes", "pil", "data-url", "http-url", "file-object"])
def image_input(request: pytest.FixtureRequest, red_png: bytes, tmp_path: Path, image_host: ImageHost) -> Any:
    """The same red PNG given every way the SDK accepts."""
    import base64

    path = tmp_path / "red.png"
    path.write_bytes(red_png)
    kind = request.param
    if kind == "path":
        return path
    if kind == "str-path":
        return str(path)
    if kind == "bytes":
        return red_png
    if kind == "pil":
        from PIL import Image

        return Image.open(io.BytesIO(red_png))
    if kind == "data-url":
        return "data:image/png;base64," + base64.b64encode(red_png).decode()
    if kind == "http-url":
        return image_host.url
    return io.BytesIO(red_png)
