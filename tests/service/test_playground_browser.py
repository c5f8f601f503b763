"""GET /playground in headless Chromium (Debian's package, installed by scripts/browser) against the real server
on the shipped shapes-world bundle: ranked candidates with the chosen one highlighted, and the API's 401 (no key,
wrong key), 413 and 429 errors shown on the page. Playwright drives /usr/bin/chromium; it never downloads a browser.

The page's own behaviour (which image is sent, keyboard use, error shapes the server cannot easily produce, layout
on a phone) is checked with answers mocked by `page.route`, on the same servers."""

from __future__ import annotations

import base64
import io
import json
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
from rlaifv.testing.tiny_text import build_tiny_text_bundle

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "service" / "static" / "playground" / "sample.png"
# The docs' screenshot is refreshed only on request (RLAIFV_UPDATE_DOCS=1): a test run leaves the checkout clean.
SCREENSHOT = ROOT / "docs" / "playground.png" if os.environ.get("RLAIFV_UPDATE_DOCS") else None
CHROMIUM = Path(os.environ.get("RLAIFV_CHROMIUM", "/usr/bin/chromium"))
KEY = "playground-test-key"
BODY_LIMIT = 8 * 1024
QUESTION = "Describe the image."
WAIT_MS = 120_000
FAST_MS = 10_000  # waits on mocked answers: nothing runs a model, so a broken page fails in seconds, not minutes


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
    two requests. Refused keys, which count against their client address's own quota, get none: they stay 401.
    """
    from rlaifv.service.rate_limit import RateLimiter

    class KeyedOut(RateLimiter):
        async def hit(self, client: str) -> int | None:
            return None if client.startswith("refused-key:") else await super().hit(client)

    with LiveServer(default_bundle(), api_keys=[KEY], max_body_bytes=BODY_LIMIT, warmup=False) as server:
        server.app.state.limiter = KeyedOut(per_minute=0)
        yield server


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A text-only bundle (a plain causal LM): its requests take no images (400 "this model reads text only")."""
    bundle = build_tiny_text_bundle(tmp_path_factory.mktemp("text") / "bundle")
    with LiveServer(bundle, warmup=False) as server:
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
    # The button keeps the focus through the request (aria-disabled, never disabled, which would drop it to
    # <body>), and the live status says how it ended.
    assert page.evaluate("document.activeElement.id") == "submit"
    assert page.inner_text("#status") == f"Ranked 4 candidates; chosen: sample {best_index}."

    if mode == "claims":
        for item, index in zip(items.all(), indices, strict=True):
            claims = payload["candidates"][index]["claims"]
            verdicts = item.locator("table.claims tbody td.verdict").all_inner_texts()
            assert len(verdicts) == len(claims) or (not claims and len(verdicts) == 0)
            shown_claims = item.locator("table.claims tbody td.claim").all_inner_texts()
            for claim, verdict, cell in zip(claims, verdicts, shown_claims, strict=False):
                assert ("accepted" if claim["accepted"] else "rejected") in verdict
                assert claim["question"] in cell, "the yes/no question is on show, not only in a tooltip"
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


# --- The page's own behaviour, with mocked answers where the model's output does not matter ---------------------


def _candidate(index: int, text: str, reward: float, claims: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "reward": reward,
        "implicit_reward": reward,
        "policy_logprob": -12.5,
        "reference_logprob": -13.25,
        "num_tokens": 7,
        "finish_reason": "stop",
        "claims": claims,
    }


def _answer(
    texts: list[str], claims: list[dict[str, Any]] | None = None, model: str = "shapes-rlaifv"
) -> dict[str, Any]:
    """A well-formed best-of-N answer (protocol.BestOfNResponse) for mocked requests; candidate 0 is the best."""
    candidates = [_candidate(i, text, 1.0 - i / 4, claims) for i, text in enumerate(texts)]
    return {
        "id": "bon-test",
        "object": "best_of_n",
        "created": 0,
        "model": model,
        "best_index": 0,
        "candidates": candidates,
        "best": candidates[0],
        "reward": {"mode": "claims" if claims else "dpo", "beta": 0.1, "normalize": "mean", "claim_score": None},
        "usage": {"prompt_tokens": 12, "completion_tokens": 7 * len(texts), "total_tokens": 12 + 7 * len(texts)},
        "timings": {"queue_s": 0.0, "generate_s": 0.1, "score_s": 0.1, "total_s": 0.2},
    }


def _mock(
    page: Any,
    status: int = 200,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> list[dict[str, Any]]:
    """Answer POST /v1/best-of-n with `body` (JSON unless a str); returns the request bodies the page sent."""
    sent: list[dict[str, Any]] = []
    text = body if isinstance(body, str) else json.dumps(_answer(["a red circle."]) if body is None else body)

    def answer(route: Any) -> None:
        sent.append(json.loads(route.request.post_data or "null"))
        route.fulfill(status=status, headers=headers or {}, content_type=content_type, body=text)

    page.route("**/v1/best-of-n", answer)
    return sent


def _submit_for_error(page: Any) -> None:
    """Submit and wait for the error box (submitting hides it first, so the wait sees the new error)."""
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=FAST_MS)


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _submit_sends_the_image_shown(page: Any, sent: list[dict[str, Any]], image: Path) -> None:
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert sent[-1]["images"] == [page.get_attribute("#preview", "src")] == [_data_url(image)]


def _files(page: Any) -> list[str]:
    return page.eval_on_selector("#file", "input => [...input.files].map(f => f.name)")


@pytest.mark.slow
@pytest.mark.integration
def test_the_image_sent_is_the_image_shown(page: Any, open_server: LiveServer, tmp_path: Path) -> None:
    """A refused file leaves no image (not the previous one), the file input names a file only while its image is
    shown (so picking the same file again works), and a valid image clears an earlier client error."""
    sent = _mock(page)
    noise = _noise_png(tmp_path / "noise.png", side=16)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    _open(page, open_server)
    _upload(page, noise)

    page.set_input_files("#file", str(notes))
    page.wait_for_selector('#error[data-status="client"]', timeout=FAST_MS)
    assert "notes.txt is not an image" in page.inner_text("#error-message")
    assert _files(page) == [], "the file input does not name the refused file"
    assert page.locator("#preview").is_hidden()
    _submit_for_error(page)
    assert "image first" in page.inner_text("#error-message")
    assert sent == [], "the previous image is not sent in its place"

    page.set_input_files("#file", str(noise))
    page.wait_for_function("() => document.getElementById('image-info').textContent.startsWith('noise.png')")
    assert page.locator("#error").is_hidden(), "a valid image clears the old error"
    page.click("#sample")
    page.wait_for_function("() => document.getElementById('image-info').textContent.startsWith('sample scene')")
    assert _files(page) == [], "the sample replaced the file"
    page.set_input_files("#file", str(noise))  # the same file again: a change event only if the input was reset
    page.wait_for_function(
        "() => document.getElementById('image-info').textContent.startsWith('noise.png')", timeout=FAST_MS
    )
    page.evaluate(
        """async () => {
            const blob = await (await fetch('playground/sample.png')).blob();
            const data = new DataTransfer();
            data.items.add(new File([blob], 'clip.png', { type: 'image/png' }));
            document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data }));
        }"""
    )
    page.wait_for_function(
        "() => document.getElementById('image-info').textContent.startsWith('pasted image')", timeout=FAST_MS
    )
    assert _files(page) == [], "the pasted image replaced the file"
    _submit_sends_the_image_shown(page, sent, SAMPLE)


@pytest.mark.slow
@pytest.mark.integration
def test_back_navigation_shows_and_sends_the_restored_file(page: Any, open_server: LiveServer, tmp_path: Path) -> None:
    """Chromium restores the file input after Back (without a change event): the page shows and sends that file."""
    sent = _mock(page)
    noise = _noise_png(tmp_path / "noise.png", side=16)
    _open(page, open_server)
    _upload(page, noise)
    page.goto(open_server.url + "/healthz")
    page.go_back()
    page.wait_for_selector("body.ready")
    assert _files(page) == ["noise.png"], "the browser restored the file input"
    assert page.inner_text("#image-info").startswith("noise.png")
    _submit_sends_the_image_shown(page, sent, noise)


@pytest.mark.slow
@pytest.mark.integration
def test_a_slow_sample_does_not_replace_a_picked_file(page: Any, open_server: LiveServer, tmp_path: Path) -> None:
    held: list[Any] = []
    page.route("**/playground/sample.png", lambda route: held.append(route))  # held until released below
    noise = _noise_png(tmp_path / "noise.png", side=16)
    with page.expect_request("**/playground/sample.png", timeout=FAST_MS):  # after the model card: it reads images
        page.goto(open_server.url + "/playground")
    _upload(page, noise)
    assert held, "the sample was requested"
    held[0].fulfill(path=str(SAMPLE))
    page.wait_for_selector("body.ready", timeout=FAST_MS)
    assert page.inner_text("#image-info").startswith("noise.png"), "the older load finished last but is dropped"
    assert page.get_attribute("#preview", "src") == _data_url(noise)


@pytest.mark.slow
@pytest.mark.integration
def test_the_drop_zone_is_a_keyboard_button(page: Any, open_server: LiveServer) -> None:
    page.on("filechooser", lambda _: None)  # intercept choosers from the start (the first expect can miss one)
    _open(page, open_server)
    assert page.locator("#drop").and_(page.get_by_role("button", name="Choose an image file")).count() == 1
    page.focus("#drop")
    for key in ("Enter", " "):
        with page.expect_file_chooser(timeout=FAST_MS):
            page.keyboard.press(key)


@pytest.mark.slow
@pytest.mark.integration
def test_submit_stays_focusable_and_ignores_repeats_while_busy(page: Any, open_server: LiveServer) -> None:
    held: list[Any] = []
    page.route("**/v1/best-of-n", lambda route: held.append(route))
    _open(page, open_server)
    page.focus("#submit")
    page.keyboard.press("Enter")
    page.wait_for_selector('#submit[aria-disabled="true"]', timeout=FAST_MS)
    assert page.inner_text("#status").startswith("Sampling 4 candidates")
    page.keyboard.press("Enter")  # ignored: a request is running
    page.click("#submit", force=True)  # force: Playwright waits for aria-disabled buttons to be enabled
    assert page.evaluate("document.activeElement.id") == "submit"
    assert len(held) == 1
    held[0].fulfill(status=200, content_type="application/json", body=json.dumps(_answer(["a", "b"])))
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert page.get_attribute("#submit", "aria-disabled") == "false"
    assert page.inner_text("#status") == "Ranked 2 candidates; chosen: sample 0."
    assert len(held) == 1, "no second request"


NGINX_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr>"
    "<center>nginx/1.25.3</center></body></html>"
)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "body", "headers", "content_type", "shown", "title", "message", "hint"),
    [
        pytest.param(
            503,
            _error("generator_unavailable", "generator 10.0.0.5:8000 is unreachable"),
            {"Retry-After": "7"},
            "application/json",
            "503",
            "HTTP 503 Service unavailable",
            "is unreachable",
            "generator model",
            id="503-generator",
        ),
        pytest.param(
            503,
            _error("not_ready", "the model is not loaded yet"),
            {"Retry-After": "5"},
            "application/json",
            "503",
            "HTTP 503 Service unavailable",
            "not loaded",
            "not ready yet",
            id="503-not-ready",
        ),
        pytest.param(
            502,
            _error("generator_error", "generator answered HTTP 500"),
            {},
            "application/json",
            "502",
            "HTTP 502 Bad gateway",
            "generator answered",
            "operator",
            id="502-generator",
        ),
        pytest.param(
            502,
            NGINX_502,
            {},
            "text/html",
            "502",
            "HTTP 502 Bad gateway",
            "502 Bad Gateway",
            "proxy",
            id="502-proxy-html",
        ),
        pytest.param(
            200,
            "<html>captive portal</html>",
            {},
            "text/html",
            "answer",
            "Unexpected answer",
            "HTTP 200, but not with JSON: captive portal",
            "",
            id="200-not-json",
        ),
        pytest.param(
            200,
            {"candidates": []},
            {},
            "application/json",
            "answer",
            "Unexpected answer",
            "lists no candidates",
            "",
            id="200-no-candidates",
        ),
        pytest.param(
            200,
            {"candidates": [_candidate(0, "x", 0.5)], "best_index": 0},
            {},
            "application/json",
            "answer",
            "Unexpected answer",
            "cannot be shown",
            "",
            id="200-partial",
        ),
    ],
)
def test_error_shapes_are_told_apart(
    page: Any,
    open_server: LiveServer,
    status: int,
    body: Any,
    headers: dict[str, str],
    content_type: str,
    shown: str,
    title: str,
    message: str,
    hint: str,
) -> None:
    """Hints follow the error's code (503 is not always "not ready"), Retry-After is shown for 503, a proxy's HTML
    page is reduced to its title, and an answer the page cannot use is not "could not reach the server"."""
    _mock(page, status, body, headers=headers, content_type=content_type)
    _open(page, open_server)
    _submit_for_error(page)
    assert page.get_attribute("#error", "data-status") == shown
    assert page.inner_text("#error-title") == title
    assert message in page.inner_text("#error-message")
    assert "<" not in page.inner_text("#error-message")
    assert hint in page.inner_text("#error-hint")
    if status == 503:
        assert f"Retry after {headers['Retry-After']} s." in page.inner_text("#error-hint")
    if "generator" in hint:
        assert "not ready" not in page.inner_text("#error-hint")
    assert page.locator("#results").is_hidden()
    assert page.get_attribute("#submit", "aria-disabled") == "false"


@pytest.mark.slow
@pytest.mark.integration
def test_network_and_key_errors(page: Any, open_server: LiveServer) -> None:
    sent: list[str] = []
    page.route("**/v1/best-of-n", lambda route: (sent.append(route.request.url), route.abort("connectionreset")))
    _open(page, open_server)
    _submit_for_error(page)
    assert page.get_attribute("#error", "data-status") == "network"
    assert page.inner_text("#error-message").startswith("could not reach the server")
    assert len(sent) == 1

    page.fill("#api-key", "ключ-“key”")  # not Latin-1: fetch would throw, which read as "could not reach"
    page.press("#api-key", "Tab")  # the change event: the model card is fetched with the new key
    page.wait_for_selector('#error[data-status="client"]', timeout=FAST_MS)
    assert "printable ASCII" in page.inner_text("#error-message")
    _submit_for_error(page)
    assert page.get_attribute("#error", "data-status") == "client"
    assert "printable ASCII" in page.inner_text("#error-message")
    assert len(sent) == 1, "nothing sent with a key that cannot be a header"
    page.fill("#api-key", "")
    page.press("#api-key", "Tab")
    page.wait_for_selector("#error", state="hidden", timeout=FAST_MS)


@pytest.mark.slow
@pytest.mark.integration
def test_empty_fields_take_the_server_defaults_and_bad_ones_are_refused(page: Any, open_server: LiveServer) -> None:
    sent = _mock(page)
    _open(page, open_server)
    for field in ("#n", "#temperature", "#max-tokens", "#seed"):
        page.fill(field, "")
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert "n" not in sent[-1] and "sampling" not in sent[-1], sent[-1]

    page.fill("#n", "3")
    page.fill("#temperature", "0.5")
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert sent[-1]["n"] == 3 and sent[-1]["sampling"] == {"temperature": 0.5}

    for field, text, message in (
        ("#n", "-", "N must be a whole number"),
        ("#n", "2.5", "N must be a whole number"),
        ("#temperature", "9", "Temperature must be"),
        ("#max-tokens", "0", "Max tokens must be"),
    ):
        page.fill("#n", "3")
        page.fill(field, "")
        page.type(field, text)  # typed, as fill refuses text a number field cannot hold
        _submit_for_error(page)
        assert page.get_attribute("#error", "data-status") == "client"
        assert message in page.inner_text("#error-message")
        assert page.get_attribute(field, "aria-invalid") == "true"
        page.fill(field, "")
    assert len(sent) == 2, "refused values are not sent"


def _marks(page: Any) -> dict[str, str | None]:
    """Each input marked aria-invalid, with the text its aria-describedby names (the problem it is told)."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('[aria-invalid="true"]')].map(input => [
            input.id,
            (document.getElementById(input.getAttribute('aria-describedby')) || {}).textContent || null,
        ]))"""
    )


@pytest.mark.slow
@pytest.mark.integration
def test_every_problem_of_a_400_is_listed_and_its_input_marked(page: Any, open_server: LiveServer) -> None:
    """The server's 400 for N and max tokens over its limits names both (`error.errors`): both are listed and
    both inputs marked and described by their own problem; the next submit clears the marks."""
    _open(page, open_server)
    page.fill("#n", "100")
    page.fill("#max-tokens", "100000")
    with page.expect_response(lambda r: r.url.endswith("/v1/best-of-n")) as answer:
        page.click("#submit")
    assert answer.value.status == 400 and len(answer.value.json()["error"]["errors"]) == 2
    page.wait_for_selector('#error[data-status="400"]', timeout=FAST_MS)
    assert page.inner_text("#error-message") == "2 problems:"
    problems = page.locator("#error-list li").all_inner_texts()
    assert len(problems) == 2 and problems[0].startswith("n must be <=") and "max_tokens must be <=" in problems[1]
    assert _marks(page) == {"n": problems[0], "max-tokens": problems[1]}

    sent = _mock(page)
    page.fill("#n", "2")
    page.fill("#max-tokens", "")
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert _marks(page) == {} and len(sent) == 1
    assert page.locator("[aria-describedby]").evaluate_all("nodes => nodes.map(n => n.id)") == ["drop"], (
        "only the drop zone's own description is left"
    )


@pytest.mark.slow
@pytest.mark.integration
def test_listed_problems_are_text_and_unknown_params_mark_nothing(page: Any, open_server: LiveServer) -> None:
    """Problem texts are shown as text, never HTML; a param the page has no input for (or an Object key) marks
    nothing; images[0] marks the file input; a list the server cut short says how many there were."""
    errors = [
        {"message": "<img src=x onerror=alert(1)> is not valid", "param": "images[0]", "code": "invalid_image"},
        {"message": "reward.beta: must be > 0", "param": "reward.beta", "code": "invalid_value"},
        {"message": "constructor: unknown field", "param": "constructor", "code": "unknown_field"},
        {"message": "sampling.temperature: too hot", "param": "sampling.temperature", "code": "invalid_value"},
    ]
    body = _error("invalid_value", "<img src=x> is not valid (and 5 more problems; the first 4 are listed)")
    body["error"]["errors"] = errors
    _mock(page, 400, body)
    _open(page, open_server)
    _submit_for_error(page)
    assert page.inner_text("#error-message") == "6 problems; the first 4:"
    assert page.locator("#error-list li").all_inner_texts() == [e["message"] for e in errors]
    assert page.locator("#error img").count() == 0
    assert _marks(page) == {"file": errors[0]["message"], "temperature": errors[3]["message"]}


@pytest.mark.slow
@pytest.mark.integration
def test_an_empty_question_is_refused_on_the_page(page: Any, open_server: LiveServer) -> None:
    """The form is novalidate: the page itself refuses an empty question (the server would say 400), marked as the
    server's problems are; with a bad N as well, both are listed."""
    sent = _mock(page)
    _open(page, open_server)
    page.fill("#question", "   ")
    _submit_for_error(page)
    assert page.get_attribute("#error", "data-status") == "client"
    assert page.inner_text("#error-message") == "the question must not be empty."
    assert page.locator("#error-list").is_hidden()
    assert _marks(page) == {"question": "the question must not be empty."}

    page.type("#n", "-")
    _submit_for_error(page)
    assert page.inner_text("#error-message") == "2 problems:"
    problems = page.locator("#error-list li").all_inner_texts()
    assert _marks(page) == {"question": problems[0], "n": problems[1]} and problems[1].startswith("N must be")
    assert sent == [], "nothing is sent"

    page.fill("#question", "What is red?")
    page.fill("#n", "2")
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert _marks(page) == {} and sent[-1]["question"] == "What is red?"


@pytest.mark.slow
@pytest.mark.integration
def test_an_image_model_takes_a_question_without_an_image(page: Any, open_server: LiveServer) -> None:
    """No image: the implicit reward is asked without one (the API takes it); the claims reward, which checks
    claims against the image, is refused on the page, marked on the reward."""
    _open(page, open_server)
    page.click("#no-image")
    assert page.locator("#preview").is_hidden() and page.inner_text("#image-info").startswith("no image")
    page.fill("#n", "2")
    page.fill("#max-tokens", "8")
    with page.expect_response(lambda r: r.url.endswith("/v1/best-of-n")) as answer:
        page.click("#submit")
    assert answer.value.status == 200, answer.value.json()
    assert "images" not in answer.value.request.post_data_json
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)

    sent = _mock(page)
    page.select_option("#mode", "claims")
    _submit_for_error(page)
    assert "claims reward checks each claim against the image" in page.inner_text("#error-message")
    assert list(_marks(page)) == ["mode"] and sent == []


@pytest.mark.slow
@pytest.mark.integration
def test_a_text_only_model_is_asked_without_an_image(page: Any, text_server: LiveServer) -> None:
    """The model card says the model reads text only: no sample scene is loaded, the picker gives way to a note,
    the claims reward (which needs an image) cannot be chosen, a pasted image is ignored, and the request sent to
    the real server has no images and is answered."""
    samples: list[str] = []
    page.on("request", lambda request: samples.append(request.url) if "sample.png" in request.url else None)
    _open(page, text_server)
    assert page.locator("#image-picker").is_hidden() and page.locator("#text-only").is_visible()
    assert page.locator('#mode option[value="claims"]').is_disabled()
    page.evaluate(
        """() => {
            const data = new DataTransfer();
            data.items.add(new File([new Uint8Array([137, 80, 78, 71])], 'clip.png', { type: 'image/png' }));
            document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data }));
        }"""
    )
    page.fill("#question", "Name a shape.")
    page.fill("#n", "2")
    page.fill("#max-tokens", "4")
    with page.expect_response(lambda r: r.url.endswith("/v1/best-of-n")) as answer:
        page.click("#submit")
    assert answer.value.status == 200, answer.value.json()
    assert "images" not in answer.value.request.post_data_json
    page.wait_for_selector("#results:not([hidden]) li.candidate", timeout=FAST_MS)
    assert page.locator("#candidates li.candidate").count() == 2
    assert samples == [], "the sample scene is not even fetched"
    assert page.get_attribute("#preview", "src") is None


def test_the_model_card_says_what_the_model_reads(text_server: LiveServer, open_server: LiveServer) -> None:
    import httpx

    for server, modalities in ((text_server, ["text"]), (open_server, ["text", "image"])):
        card = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]
        assert card["input_modalities"] == modalities, server.url
    assert httpx.get(text_server.url + "/v1/models", timeout=30).json()["data"][0]["image_limits"] is None
    defaults = Settings()
    assert httpx.get(open_server.url + "/v1/models", timeout=30).json()["data"][0]["image_limits"] == {
        "formats": sorted(defaults.allowed_image_formats),
        "max_bytes": defaults.max_image_bytes,
        "max_pixels": defaults.max_image_pixels,
        "max_aspect": defaults.max_image_aspect,
    }


def _contrast(page: Any, script: str) -> float:
    """WCAG contrast ratio of the two computed colours (rgb(...) strings) that `script` returns."""

    def luminance(css: str) -> float:
        channels = [int(v) / 255 for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    light, dark = sorted(map(luminance, page.evaluate(script)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@pytest.mark.slow
@pytest.mark.integration
def test_long_text_wraps_on_a_phone(page: Any, open_server: LiveServer) -> None:
    """A 375 px viewport: long unbroken server text (a URL) never widens the page, an answer keeps its line
    breaks, a stat's term stays beside its value, and text and control borders have enough contrast."""
    width = 375
    url = "https://example.com/" + "very_long_path_segment" * 14
    claims = [
        {
            "claim": f"The page {url} exists.",
            "question": f"Is {url} shown?",
            "p_yes": 0.9,
            "accepted": True,
            "repeated": False,
        }
    ]
    page.set_viewport_size({"width": width, "height": 800})
    card = {"data": [{"id": "model-" + "m" * 300, "reward": {"mode": "dpo", "beta": 0.1}}]}
    page.route("**/v1/models", lambda route: route.fulfill(content_type="application/json", body=json.dumps(card)))
    _mock(page, body=_answer([f"See {url}\nsecond line", "a red circle."], claims, model="m" * 300))
    _open(page, open_server)
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert page.inner_text("#model").startswith("model model-mmm")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    text = page.locator("#candidates .candidate .text").first
    assert text.evaluate("node => getComputedStyle(node).whiteSpace") == "pre-wrap"
    assert "\nsecond line" in text.inner_text()
    pairs = page.locator(".stats .stat").evaluate_all(
        "groups => groups.map(g => [...g.children].map(c => Math.round(c.getBoundingClientRect().top)))"
    )
    assert pairs and all(len(set(tops)) == 1 for tops in pairs), pairs
    assert (
        _contrast(
            page,
            "() => { const s = getComputedStyle(document.querySelector('.badge')); "
            "return [s.color, s.backgroundColor]; }",
        )
        >= 4.5
    )
    assert (
        _contrast(
            page,
            "() => [getComputedStyle(document.querySelector('.claims .accepted .verdict')).color, "
            "getComputedStyle(document.querySelector('.candidate')).backgroundColor]",
        )
        >= 4.5
    )
    assert (
        _contrast(
            page,
            "() => [getComputedStyle(document.getElementById('question')).borderTopColor, "
            "getComputedStyle(document.getElementById('ask')).backgroundColor]",
        )
        >= 3
    )

    page.unroute("**/v1/best-of-n")
    _mock(page, 400, _error("invalid_image", "images[0] could not be decoded: " + "A" * 300))
    _submit_for_error(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= width


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


def test_head_answers_like_get_without_a_body(page_client: TestClient) -> None:
    """Uptime checkers probe with HEAD (405 before): the page's status and headers, no body, as /healthz."""
    varying = {"date", "x-request-id"}
    for path in ("/playground", "/playground/playground.js"):
        head, get = page_client.head(path), page_client.get(path)
        assert head.status_code == 200 and head.content == b"", path
        assert {k: v for k, v in head.headers.items() if k not in varying} == {
            k: v for k, v in get.headers.items() if k not in varying
        }, path
    assert page_client.head("/playground/nothing.js").status_code == 404


# --- The model card, cancelling, time limits, image checks, what the results were for -------------------------


def _card(modalities: list[str] | None = None, model: str = "shapes-rlaifv") -> dict[str, Any]:
    card: dict[str, Any] = {"id": model, "object": "model", "reward": {"mode": "dpo", "beta": 0.1}}
    if modalities is not None:
        card["input_modalities"] = modalities
    return {"object": "list", "data": [card]}


NOT_READY = _error("not_ready", "the model is not loaded yet")


def _cards(page: Any, answers: list[tuple[int, dict[str, Any], dict[str, str]]]) -> None:
    """Answer GET /v1/models with each (status, body, headers) in turn, the last one from then on."""
    left = list(answers)

    def answer(route: Any) -> None:
        status, body, headers = left.pop(0) if len(left) > 1 else left[0]
        route.fulfill(status=status, headers=headers, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/models", answer)


def _record_statuses(page: Any) -> None:
    """Every text the live status is given, in `window.statuses` (some last only a moment)."""
    page.add_init_script(
        """document.addEventListener('DOMContentLoaded', () => {
            window.statuses = [];
            new MutationObserver((records) => {
                for (const r of records) for (const n of r.addedNodes) window.statuses.push(n.textContent);
            }).observe(document.getElementById('status'), { childList: true });
        });"""
    )


def _wait_model(page: Any, name: str) -> None:
    page.wait_for_function(
        "name => document.getElementById('model').textContent.startsWith('model ' + name)", arg=name, timeout=FAST_MS
    )


@pytest.mark.slow
@pytest.mark.integration
def test_a_card_refused_while_the_server_loads_is_asked_again(page: Any, open_server: LiveServer) -> None:
    """Opened while the server loads its model (503 not_ready), the page says so and asks for the card again after
    Retry-After: a text-only model then loses the image picker and is asked without an image."""
    _cards(page, [(503, NOT_READY, {"Retry-After": "1"}), (200, _card(["text"], "tiny-text"), {})])
    _record_statuses(page)
    sent = _mock(page)
    _open(page, open_server)
    _wait_model(page, "tiny-text")
    assert "The server is loading the model: asking again in 1 s…" in page.evaluate("window.statuses")
    assert page.inner_text("#status") == "The model is loaded."
    assert page.locator("#image-picker").is_hidden() and page.locator('#mode option[value="claims"]').is_disabled()
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert "images" not in sent[-1]


@pytest.mark.slow
@pytest.mark.integration
def test_a_submit_without_a_card_fetches_it_first(page: Any, open_server: LiveServer) -> None:
    """A submit before any card came (the next try is minutes away) fetches it first, so a text-only model is never
    sent the image it would refuse (400 "this model reads text only")."""
    _cards(page, [(503, NOT_READY, {"Retry-After": "600"}), (200, _card(["text"], "tiny-text"), {})])
    _record_statuses(page)
    sent = _mock(page)
    _open(page, open_server)
    assert page.inner_text("#model") == "" and page.locator("#image-picker").is_visible()
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert "images" not in sent[-1]
    assert page.locator("#image-picker").is_hidden() and page.inner_text("#model").startswith("model tiny-text")
    assert "Loading the model card…" in page.evaluate("window.statuses")


@pytest.mark.slow
@pytest.mark.integration
def test_a_refused_key_is_told_by_the_key_field(page: Any, open_server: LiveServer) -> None:
    """The card refused (401) puts a note under the key field, which it marks and describes; a key that works
    clears both; switching to a wrong key clears the model line the right one showed. A submit's error leaves the
    note's mark."""

    def answer(route: Any) -> None:
        key = route.request.headers.get("authorization")
        status, body = (
            (200, _card())
            if key == f"Bearer {KEY}"
            else (401, _error("invalid_api_key" if key else "missing_api_key", "refused"))
        )
        route.fulfill(status=status, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/models", answer)
    _mock(page, 401, _error("invalid_api_key", "the API key is not valid"))
    _open(page, open_server)
    assert page.inner_text("#key-note") == "This server needs an API key."
    assert _marks(page) == {"api-key": "This server needs an API key."}
    assert page.inner_text("#model") == ""

    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    _wait_model(page, "shapes-rlaifv")
    assert page.locator("#key-note").is_hidden() and _marks(page) == {}

    page.fill("#api-key", "not-the-right-key")
    page.press("#api-key", "Tab")
    page.wait_for_selector("#key-note:not([hidden])", timeout=FAST_MS)
    assert page.inner_text("#key-note") == "This key is not valid."
    assert page.inner_text("#model") == "", "the model line the right key showed is gone"
    _submit_for_error(page)
    assert page.get_attribute("#error", "data-status") == "401"
    assert _marks(page) == {"api-key": "This key is not valid."}


@pytest.mark.slow
@pytest.mark.integration
def test_a_request_can_be_cancelled(page: Any, open_server: LiveServer) -> None:
    """While busy, Cancel (a button, and Escape) stops waiting: no error, the button back, the focus kept; the next
    submit works."""
    held: list[Any] = []
    page.route("**/v1/best-of-n", lambda route: held.append(route))
    _open(page, open_server)
    assert page.locator("#cancel").is_hidden()
    for how in ("button", "Escape"):
        page.click("#submit")
        page.wait_for_selector("#cancel:not([hidden])", timeout=FAST_MS)
        if how == "button":
            page.click("#cancel", timeout=FAST_MS)
        else:
            page.keyboard.press("Escape")
        page.wait_for_selector('#submit[aria-disabled="false"]', timeout=FAST_MS)
        assert page.inner_text("#status") == "Cancelled: the page stopped waiting for the answer.", how
        assert page.locator("#error").is_hidden() and page.locator("#results").is_hidden()
        assert page.locator("#cancel").is_hidden()
        assert page.evaluate("document.activeElement.id") == "submit", "the focus is not dropped to <body>"
    assert len(held) == 2
    page.click("#submit")
    page.wait_for_selector("#cancel:not([hidden])", timeout=FAST_MS)
    held[-1].fulfill(status=200, content_type="application/json", body=json.dumps(_answer(["a", "b"])))
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert page.locator("#cancel").is_hidden()


@pytest.mark.slow
@pytest.mark.integration
def test_a_hung_card_and_a_hung_request_are_given_up(page: Any, open_server: LiveServer) -> None:
    """With Playwright's clock: a submit waiting for a card that never comes says so and sends after the card's
    limit; a request that never gets an answer ends as "Timed out" after the page's limit (past the server's own
    504 deadline)."""
    page.clock.install()
    held: list[Any] = []
    page.route("**/v1/models", lambda route: held.append(route))
    page.route("**/v1/best-of-n", lambda route: held.append(route))
    with page.expect_request("**/v1/models", timeout=FAST_MS):
        page.goto(open_server.url + "/playground")
    page.click("#submit")
    page.wait_for_function(
        "() => document.getElementById('status').textContent === 'Loading the model card…'", timeout=FAST_MS
    )
    assert page.locator("#cancel").is_visible()
    with page.expect_request("**/v1/best-of-n", timeout=FAST_MS):
        page.clock.run_for(page.evaluate("CARD_LIMIT_MS"))
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('Sampling')", timeout=FAST_MS
    )
    limit = page.evaluate("REQUEST_LIMIT_MS")
    assert limit > 120_000, "past the server's default deadline, so its 504 comes first"
    page.clock.run_for(limit)
    page.wait_for_selector('#error[data-status="timeout"]', timeout=FAST_MS)
    assert page.inner_text("#error-title") == "Timed out"
    assert page.inner_text("#error-message") == f"no answer within {limit // 1000} s, so the page stopped waiting."
    assert "RLAIFV_REQUEST_TIMEOUT_S" in page.inner_text("#error-hint")
    assert page.get_attribute("#submit", "aria-disabled") == "false" and page.locator("#cancel").is_hidden()


def _image_file(path: Path, fmt: str) -> Path:
    from PIL import Image

    Image.new("RGB", (12, 10), (200, 30, 30)).save(path, fmt)
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_images_are_decoded_and_typed_by_their_bytes(page: Any, open_server: LiveServer, tmp_path: Path) -> None:
    """The file input offers the server's formats; a file is typed by its magic bytes (an image whose name gives the
    browser no type is taken, with its real type in the data URL) and decoded before it is taken: SVG, TIFF and a
    damaged PNG are refused on the page and leave no image."""
    sent = _mock(page)
    _open(page, open_server)
    assert page.get_attribute("#file", "accept") == "image/png,image/jpeg,image/webp,image/gif,image/bmp"
    for fmt, ext in (("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp")):
        _upload(page, _image_file(tmp_path / f"scene.{ext}", fmt))
        assert page.locator("#error").is_hidden(), fmt

    svg = tmp_path / "vector.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>')
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(SAMPLE.read_bytes()[:40] + b"\0" * 200)
    for path, message in (
        (svg, "vector.svg is image/svg+xml, which the server does not take: send PNG, JPEG, WebP, GIF or BMP."),
        (_image_file(tmp_path / "scan.tiff", "TIFF"), "scan.tiff is image/tiff, which the server does not take"),
        (damaged, "damaged.png could not be decoded as PNG"),
    ):
        page.set_input_files("#file", str(path))
        page.wait_for_selector('#error[data-status="client"]', timeout=FAST_MS)
        assert message in page.inner_text("#error-message")
        assert page.locator("#preview").is_hidden() and page.inner_text("#image-info") == "no image"
        assert _files(page) == [] and _marks(page) == {"file": page.inner_text("#error-message")}
        page.click("#sample")
        page.wait_for_selector("#error", state="hidden", timeout=FAST_MS)

    page.evaluate(
        """async () => {
            const blob = await (await fetch('playground/sample.png')).blob();
            const data = new DataTransfer();
            data.items.add(new File([blob], 'IMG_0001', { type: '' }));
            document.getElementById('drop').dispatchEvent(
                new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
        }"""
    )
    page.wait_for_function(
        "() => document.getElementById('image-info').textContent.startsWith('IMG_0001')", timeout=FAST_MS
    )
    _submit_sends_the_image_shown(page, sent, SAMPLE)  # data:image/png, not application/octet-stream


@pytest.mark.slow
@pytest.mark.integration
def test_the_cards_image_limits_decide_what_is_taken(page: Any, open_server: LiveServer, tmp_path: Path) -> None:
    """A server taking PNG and TIFF only, with small bounds: the file input offers PNG alone, a JPEG is refused naming
    PNG (and TIFF as the API's), and a PNG over each of the card's bounds is refused naming that bound."""
    card = _card(["text", "image"], "picky")
    limits = {"formats": ["PNG", "TIFF"], "max_bytes": 2000, "max_pixels": 400, "max_aspect": 3}
    card["data"][0]["image_limits"] = limits
    _cards(page, [(200, card, {})])
    _mock(page)
    _open(page, open_server)
    _wait_model(page, "picky")
    assert page.get_attribute("#file", "accept") == "image/png"

    def png(name: str, size: tuple[int, int]) -> Path:
        from PIL import Image

        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name, "PNG")
        return tmp_path / name

    noisy = _noise_png(tmp_path / "noisy.png", side=30)  # incompressible: over 2,000 bytes

    _upload(page, png("fits.png", (20, 15)))
    assert page.locator("#error").is_hidden()
    for path, message in (
        (
            _image_file(tmp_path / "photo.jpg", "JPEG"),
            "photo.jpg is image/jpeg, which the server does not take: send PNG (the server also takes TIFF, which"
            " this page cannot show: use the API).",
        ),
        (
            noisy,
            f"noisy.png is {noisy.stat().st_size:,} bytes, over the server's limit of 2,000.",
        ),
        (png("large.png", (25, 25)), "large.png is 25x25 pixels, over the server's limit of 400 pixels."),
        (png("thin.png", (40, 5)), "thin.png is 40x5: one side is over 3 times the other."),
    ):
        page.set_input_files("#file", str(path))
        page.wait_for_selector('#error[data-status="client"]', timeout=FAST_MS)
        assert message in page.inner_text("#error-message"), path.name
        assert page.inner_text("#image-info") == "no image"


@pytest.mark.slow
@pytest.mark.integration
def test_an_image_taken_before_the_card_is_checked_against_it(page: Any, open_server: LiveServer) -> None:
    """The sample scene (a PNG) loads while the server still loads its model (503): checked against the defaults
    then, it is checked again when the card comes, which takes JPEG only, and dropped with the reason; a submit then
    sends nothing."""
    card = _card(["text", "image"], "jpeg-only")
    card["data"][0]["image_limits"] = {"formats": ["JPEG"], "max_bytes": 0, "max_pixels": 0, "max_aspect": 0}
    _cards(page, [(503, NOT_READY, {"Retry-After": "1"}), (200, card, {})])
    sent = _mock(page)
    _open(page, open_server)
    _wait_model(page, "jpeg-only")
    page.wait_for_selector('#error[data-status="client"]', timeout=FAST_MS)
    assert "is image/png, which the server does not take: send JPEG." in page.inner_text("#error-message")
    assert page.inner_text("#image-info") == "no image"
    page.click("#submit")
    page.wait_for_selector('#error[data-status="client"]', timeout=FAST_MS)
    assert sent == []


@pytest.mark.slow
@pytest.mark.integration
def test_a_card_arriving_while_a_new_image_loads_keeps_the_new_one(
    page: Any, open_server: LiveServer, tmp_path: Path
) -> None:
    """The card came while the sample was loading in place of a large picked PNG: the re-check of the PNG (over the
    card's byte limit) dropped it, and with it the sample's load, which the page then threw away."""
    card = _card(["text", "image"], "small-images")
    card["data"][0]["image_limits"] = {"formats": ["PNG"], "max_bytes": 5000, "max_pixels": 0, "max_aspect": 0}
    cards: list[Any] = []

    def answer(route: Any) -> None:
        if not cards:
            cards.append(route)
            route.fulfill(status=503, headers={"Retry-After": "1"}, content_type="application/json",
                          body=json.dumps(NOT_READY))  # fmt: skip
        else:
            cards.append(route)  # held until released below

    page.route("**/v1/models", answer)
    _open(page, open_server)
    _upload(page, _noise_png(tmp_path / "large.png"))  # 96 x 96 noise: ~27 KB
    samples: list[Any] = []
    page.route("**/playground/sample.png", lambda route: samples.append(route))
    page.click("#sample")
    for _ in range(FAST_MS // 50):  # polled: the page's next card fetch (after Retry-After) and the sample request
        if len(cards) > 1 and samples:
            break
        page.wait_for_timeout(50)
    assert len(cards) > 1 and samples
    cards[1].fulfill(status=200, content_type="application/json", body=json.dumps(card))
    _wait_model(page, "small-images")
    page.evaluate("() => recheckImage()")  # the check the card started, settled
    samples[0].fulfill(path=str(SAMPLE))
    page.wait_for_function(
        "() => document.getElementById('image-info').textContent.startsWith('sample scene')", timeout=FAST_MS
    )
    assert page.locator("#error").is_hidden()


@pytest.mark.slow
@pytest.mark.integration
def test_results_show_the_question_and_image_they_answer(page: Any, open_server: LiveServer, tmp_path: Path) -> None:
    """Inputs changed while a request runs: the results still say which question and image they answer."""
    held: list[Any] = []
    page.route("**/v1/best-of-n", lambda route: held.append(route))
    _open(page, open_server)
    page.fill("#question", QUESTION)
    page.click("#submit")
    page.wait_for_selector("#cancel:not([hidden])", timeout=FAST_MS)
    page.fill("#question", "Another question?")
    _upload(page, _noise_png(tmp_path / "noise.png", side=16))
    held[0].fulfill(status=200, content_type="application/json", body=json.dumps(_answer(["a red circle."])))
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert page.inner_text("#summary .sent-question") == QUESTION
    assert page.get_attribute("#summary .sent-image img", "src") == _data_url(SAMPLE)
    assert page.inner_text("#summary .sent-image").startswith("sample scene")

    sent = _mock(page)
    page.click("#no-image")
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert "images" not in sent[-1] and page.inner_text("#summary .sent-image") == "none"


@pytest.mark.slow
@pytest.mark.integration
def test_the_question_keeps_its_lines(page: Any, open_server: LiveServer) -> None:
    """The question is a textarea: Enter starts a new line, Ctrl+Enter sends, and the lines are sent and shown."""
    sent = _mock(page)
    _open(page, open_server)
    page.fill("#question", "")
    page.focus("#question")
    page.keyboard.type("Line one.")
    page.keyboard.press("Enter")
    page.keyboard.type("Line two.")
    assert page.input_value("#question") == "Line one.\nLine two."
    with page.expect_request("**/v1/best-of-n", timeout=FAST_MS):
        page.keyboard.press("Control+Enter")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    assert [body["question"] for body in sent] == ["Line one.\nLine two."], "Enter sent nothing"
    assert page.inner_text("#summary .sent-question") == "Line one.\nLine two."


@pytest.mark.slow
@pytest.mark.integration
def test_seeds_up_to_2_63_minus_1_are_sent_exactly(page: Any, open_server: LiveServer) -> None:
    """A seed past 2^53 (which a JS number rounds) goes into the JSON as its digits, and the real server takes
    2^63 - 1; past it, or not a whole number, the page says the real bound."""
    top = 2**63 - 1
    _open(page, open_server)
    page.fill("#n", "2")
    page.fill("#max-tokens", "4")
    page.fill("#seed", str(top))
    with page.expect_response(lambda r: r.url.endswith("/v1/best-of-n")) as answer:
        page.click("#submit")
    assert answer.value.status == 200, answer.value.json()
    assert f'"seed":{top}' in (answer.value.request.post_data or "")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)

    sent = _mock(page)
    for text, seed in ((" 0042 ", 42), (str(2**53 + 1), 2**53 + 1)):
        page.fill("#seed", text)
        page.click("#submit")
        page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
        assert sent[-1]["sampling"] == {"temperature": 1, "max_tokens": 4, "seed": seed}
    for text in (str(top + 1), "-1", "1.5", "1e3"):
        page.fill("#seed", text)
        _submit_for_error(page)
        assert page.inner_text("#error-message") == (
            f"Seed must be a whole number from 0 to {top} (2^63 - 1), or empty for a random one."
        ), text
        assert list(_marks(page)) == ["seed"]
    assert len(sent) == 2


@pytest.mark.slow
@pytest.mark.integration
def test_stray_file_drops_and_the_finish_reason(page: Any, open_server: LiveServer) -> None:
    """A file dropped beside the drop zone does not replace the page (text still drops into the question); the
    finish reason is named for screen readers."""
    _mock(page)
    _open(page, open_server)
    prevented = page.evaluate(
        """() => ['file', 'text'].map((kind) => {
            const data = new DataTransfer();
            if (kind === 'file') data.items.add(new File(['x'], 'a.png', { type: 'image/png' }));
            else data.setData('text/plain', 'words');
            return ['dragover', 'drop'].map((type) => {
                const event = new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true });
                document.getElementById('question').dispatchEvent(event);
                return event.defaultPrevented;
            });
        })"""
    )
    assert prevented == [[True, True], [False, False]]
    page.click("#submit")
    page.wait_for_selector("#results:not([hidden])", timeout=FAST_MS)
    finish = page.locator("#candidates .finish").first
    assert finish.text_content() == "finish reason: stop"
    assert "finish reason: stop" in page.locator("#candidates li").first.aria_snapshot()
    assert finish.locator(".visually-hidden").bounding_box()["width"] <= 1
