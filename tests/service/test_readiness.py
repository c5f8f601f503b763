"""/readyz checks its dependencies side by side, each within a bound: kubelet gives the probe 5 s in all."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from rlaifv.service.routes import health


class Probed:
    """A dependency whose probe answers once `answer` is set, after setting `asked` (both events: no sleeps)."""

    def __init__(self, answer: asyncio.Event, asked: asyncio.Event) -> None:
        self.answer, self.asked = answer, asked

    async def probe(self) -> str:
        self.asked.set()
        await self.answer.wait()
        return "ok"


def app_with(**state: object) -> FastAPI:
    app = FastAPI()
    app.include_router(health.router)
    settings = SimpleNamespace(ready_requires_redis=False, redis_connect_timeout_s=2.0)
    for name, value in {"ready": True, "settings": settings, **state}.items():
        setattr(app.state, name, value)
    return app


async def ready(app: FastAPI) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get("/readyz")


async def test_the_engine_and_the_generator_are_probed_side_by_side() -> None:
    """Each probe answers only once the other has been asked: one after the other, neither would."""
    engine_asked, generator_asked = asyncio.Event(), asyncio.Event()
    app = app_with(engine=Probed(generator_asked, engine_asked), generator=Probed(engine_asked, generator_asked))
    response = await asyncio.wait_for(ready(app), timeout=30)
    assert response.status_code == 200
    assert response.json()["checks"] == {"model": "ok", "engine": "ok", "generator": "ok"}


async def test_a_probe_that_hangs_is_an_answer_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTP client's timeout bounds each phase (connect, read...), not a probe as a whole."""
    monkeypatch.setattr(health, "READY_PROBE_S", 0.05)
    never = asyncio.Event()
    app = app_with(engine=Probed(never, asyncio.Event()), generator=Probed(never, asyncio.Event()))
    response = await asyncio.wait_for(ready(app), timeout=30)
    assert response.status_code == 503  # the engine is required; the generator is reported only
    checks = response.json()["checks"]
    assert checks["engine"] == checks["generator"] == "unavailable: no answer within 0.05 s"


def test_the_bound_leaves_room_in_the_probe_timeout() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
    probes = 0
    for path in root.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            for container in (
                (((doc or {}).get("spec") or {}).get("template") or {}).get("spec", {}).get("containers", [])
            ):
                probe = container.get("readinessProbe") or {}
                if probe.get("httpGet", {}).get("path") == "/readyz":
                    assert probe["timeoutSeconds"] >= health.READY_PROBE_S + 1, path
                    probes += 1
    assert probes >= 2  # the server's and the worker's
