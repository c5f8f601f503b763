"""GET /playground in headless Chromium (Debian's package, installed by scripts/browser) against the real server
on the shipped shapes-world bundle: ranked candidates with the chosen one highlighted, and the API's 401 (no key,
wrong key), 413 and 429 errors shown on the page. Playwright drives /usr/bin/chromium; it never downloads a browser."""

from __future__ import annotations

import io
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rlaifv.service.app import create_app
from rlaifv.service.default_model import default_bundle
from rlaifv.service.settings import Settings
from rlaifv.testing.server import LiveServer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "service" / "static" / "playground" / "sample.png"
# The docs' screenshot is refreshed only on request (RLAIFV_UPDATE_DOCS=1): a test run leaves the checkout clean.
SCREENSHOT = ROOT / "docs" / "playground.png" if os.environ.get("RLAIFV_UPDATE_DOCS") else None
CHROMIUM = Path(os.environ.get("RLAIFV_CHROMIUM", "/usr/bin/chromium"))
KEY = "playground-test-key"
BODY_LIMIT = 8 * 1024
QUESTION = "Describe the image."
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: scripts/test installs it with scripts/browser")
        pytest.skip(f"{CHROMIUM} is missing: run scripts/browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def open_server() -> Iterator[LiveServer]:
    """The shipped bundle with default settings: what `scripts/serve` runs."""
    with LiveServer(default_bundle()) as server:
        yield server


@pytest.fixture(scope="module")
def strict_server() -> Iterator[LiveServer]:
    """API keys on, a tiny body limit, and a rate limit no request fits in.

    The quota is 0 (a RateLimiter the settings cannot build, as they read 0 as "off") so that every request with
    the right key gets 429 whatever the minute: a quota of 1 would reset when a minute boundary falls between
    two requests.
    """
    from rlaifv.service.rate_limit import RateLimiter

    with LiveServer(default_bundle(), api_keys=[KEY], max_body_bytes=BODY_LIMIT, warmup=False) as server:
        server.app.state.limiter = RateLimiter(per_minute=0)
        yield server


def _open(page: Any, server: LiveServer) -> None:
    response = page.goto(server.url + "/playground")
    assert response is not None and response.status == 200
    page.wait_for_selector("body.ready")


def _upload(page: Any, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function("name => document.getElementById('image-info').textContent.startsWith(name)", arg=path.name)


def _noise_png(path: Path, side: int = 96) -> Path:
    from PIL import Image

    rng = random.Random(0)
    data = bytes(rng.getrandbits(8) for _ in range(side * side * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), data).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("mode", ["dpo", "claims"])
def test_candidates_are_ranked_and_the_argmax_is_highlighted(page: Any, open_server: LiveServer, mode: str) -> None:
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    _open(page, open_server)
    _upload(page, SAMPLE)
    page.fill("#question", QUESTION)
    page.fill("#n", "4")
    page.fill("#seed", "4")
    page.select_option("#mode", mode)
    with page.expect_response(lambda r: r.url.endswith("/v1/best-of-n")) as answer:
        page.click("#submit")
    payload = answer.value.json()
    assert answer.value.status == 200, payload
    page.wait_for_selector("#results:not([hidden]) li.candidate")

    items = page.locator("#candidates li.candidate")
    assert items.count() == 4
    shown = [float(text) for text in page.locator("#candidates .reward-value").all_inner_texts()]
    indices = [int(i) for i in items.evaluate_all("nodes => nodes.map(n => n.dataset.index)")]
    assert shown == sorted(shown, reverse=True), "candidates are listed best first"
    assert shown == [round(payload["candidates"][i]["reward"], 4) for i in indices]

    best = page.locator("#candidates li.candidate.best")
    assert best.count() == 1
    best_index = int(best.get_attribute("data-index") or -1)
    best_shown = float(best.locator(".reward-value").inner_text())
    assert best_shown == max(shown)
    rewards = [c["reward"] for c in payload["candidates"]]  # full precision: two rewards may show the same 4 digits
    assert best_index == min(i for i, r in enumerate(rewards) if r == max(rewards)), "ties go low"
    assert best_index == payload["best_index"]
    assert best.locator(".badge").inner_text() == "chosen"
    for name in ("policy", "reference", "tokens"):
        assert best.locator(f".{name}-value").inner_text()
    assert "server" in page.inner_text("#summary") and "round trip" in page.inner_text("#summary")

    if mode == "claims":
        for item, index in zip(items.all(), indices, strict=True):
            claims = payload["candidates"][index]["claims"]
            verdicts = item.locator("table.claims tbody td.verdict").all_inner_texts()
            assert len(verdicts) == len(claims) or (not claims and len(verdicts) == 0)
            for claim, verdict in zip(claims, verdicts, strict=False):
                assert ("accepted" if claim["accepted"] else "rejected") in verdict
        shot = SCREENSHOT or Path(tempfile.mkdtemp()) / "playground.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert not problems, problems


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    ("key", "image", "status", "message"),
    [
        ("", "sample", 401, "an API key is required"),
        ("not-the-right-key", "sample", 401, "the API key is not valid"),
        (KEY, "large", 413, f"over the limit of {BODY_LIMIT} bytes"),
        (KEY, "sample", 429, "rate limit exceeded"),
    ],
)
def test_api_errors_are_shown(
    page: Any, strict_server: LiveServer, tmp_path: Path, key: str, image: str, status: int, message: str
) -> None:
    _open(page, strict_server)
    path = _noise_png(tmp_path / "noise.png") if image == "large" else SAMPLE
    assert (path.stat().st_size > BODY_LIMIT) == (image == "large")
    _upload(page, path)
    page.fill("#api-key", key)
    page.click("#submit")
    page.wait_for_selector(f'#error[data-status="{status}"]')
    assert page.inner_text("#error-title").startswith(f"HTTP {status} ")
    assert message in page.inner_text("#error-message")
    if status == 429:
        assert "Retry after" in page.inner_text("#error-hint")
    if status == 401:  # one status for both: the hint follows the error's code
        assert ("did not accept this API key" if key else "enter it in the API key field") in page.inner_text(
            "#error-hint"
        )
    assert page.locator("#results").is_hidden()
    assert page.locator("#submit").is_enabled()


@pytest.fixture(scope="module")
def page_client() -> TestClient:
    """The app without its lifespan (no `with`): the page's routes need no model."""
    return TestClient(create_app(Settings(bundle=default_bundle(), api_keys=[KEY])))


def test_page_and_assets_are_open_and_locked_down(page_client: TestClient) -> None:
    page = page_client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'src="playground/playground.js"' in page.text
    for asset, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css"), ("sample.png", "image")):
        response = page_client.get(f"/playground/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), asset
    for bad in ("index.html", "nothing.js", "..%2F..%2Fsettings.py"):
        assert page_client.get(f"/playground/{bad}").status_code == 404, bad
    assert not any(path.startswith("/playground") for path in page_client.get("/openapi.json").json()["paths"])
    assert page_client.post("/v1/best-of-n", json={}).status_code == 401, "the API keeps its keys"
    assert 'route="/playground' not in page_client.get("/metrics").text, "page loads are not API traffic"
