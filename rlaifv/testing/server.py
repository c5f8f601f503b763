"""Run the real app under uvicorn in a background thread: for tests, notebooks and the benchmarks.

    with LiveServer(bundle, max_queue=4) as server:
        httpx.get(server.url + "/readyz")

Keyword arguments are `Settings` fields; the host is loopback and the port a free one unless `port` is given
(to bring a stopped server back at the same address).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def uvicorn_thread(
    app: Any, *, deadline_s: float = 30.0, must_stop: bool = False, **options: Any
) -> Iterator[tuple[int, Any]]:
    """`app` (any ASGI app) under uvicorn with `rlaifv serve`'s HTTP stack (`HTTP_OPTIONS`, overridden by
    `options`) on a free loopback port, in a thread; yields the port and the `uvicorn.Server`, stopped and joined
    (within `deadline_s`; `must_stop`: an AssertionError where it has not stopped by then) at the end."""
    import uvicorn

    from rlaifv.service.serve_cli import HTTP_OPTIONS

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="off", **(HTTP_OPTIONS | options)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + deadline_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port, server
    finally:
        server.should_exit = True
        thread.join(timeout=deadline_s)
    assert not (must_stop and thread.is_alive()), "uvicorn did not stop"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]  # (host, port) for AF_INET
        return port


def wait_until_ready(
    url: str, process: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None, timeout_s: float = 120
) -> None:
    """Poll `url`/readyz until it answers 200 (the model is loaded and warm); fail fast if `process` exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited during start-up (code {process.returncode})")
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout_s} s")
        time.sleep(0.1)


class LiveServer:
    """`service.app.create_app(settings)` under uvicorn in a daemon thread, on a free loopback port."""

    def __init__(
        self, bundle: Path | None, *, graceful_shutdown_s: int = 5, port: int | None = None, **settings: Any
    ) -> None:
        import uvicorn

        from rlaifv.service.app import create_app
        from rlaifv.service.serve_cli import HTTP_OPTIONS, proxy_options
        from rlaifv.service.settings import Settings

        self.port = port or free_port()
        self.settings = Settings(bundle=bundle, host="127.0.0.1", port=self.port, **settings)
        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=graceful_shutdown_s,
            **HTTP_OPTIONS,  # the HTTP stack `rlaifv serve` runs
            **proxy_options(self.settings),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> LiveServer:
        """Start and wait until uvicorn accepts connections (the model is loaded and warm by then)."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout_s)

    def openapi(self) -> dict[str, Any]:
        import httpx

        spec: dict[str, Any] = httpx.get(self.url + "/openapi.json", timeout=30).raise_for_status().json()
        return spec

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
