"""Table-driven bad inputs: each gets its documented 4xx with the error envelope, and the server keeps serving."""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import io
import json
import struct
import zlib
from typing import Any

import httpx
import pytest

from tests.service.conftest import data_url, png_bytes

pytestmark = pytest.mark.integration

Q = "What is in the image?"
OK_IMAGE = data_url(png_bytes())


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header declaring width x height, a few hundred bytes in all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    import random

    from PIL import Image

    rng = random.Random(0)
    img = Image.frombytes("RGB", (64, 64), bytes(rng.randrange(256) for _ in range(64 * 64 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def tiff_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    return buf.getvalue()


def bon(**fields: Any) -> dict[str, Any]:
    return {"images": [OK_IMAGE], "question": Q, "n": 2} | fields


def rwd(**fields: Any) -> dict[str, Any]:
    return {"images": [OK_IMAGE], "question": Q, "answers": ["a red circle."]} | fields


def chat(**fields: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": Q}, {"type": "image_url", "image_url": {"url": OK_IMAGE}}]
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": content}]} | fields


# (id, path, json body or raw bytes, expected status, expected param (None: no field), expected code)
CASES: list[tuple[str, str, Any, int, str | None, str]] = [
    ("non-json", "/v1/best-of-n", b"{this is not json", 400, None, "invalid_json"),
    ("latin-1-json", "/v1/best-of-n", '{"question": "caf\u00e9"}'.encode("latin-1"), 400, None, "invalid_json"),
    ("gzip-body", "/v1/rewards", gzip.compress(b'{"question": "q"}'), 400, None, "invalid_json"),
    ("integer-past-the-digit-limit", "/v1/best-of-n", b'{"n": ' + b"9" * 5000 + b"}", 400, None, "invalid_json"),
    # json.loads(bytes) guesses UTF-16/32 and took these; RFC 8259 and every other OpenAI-compatible server want UTF-8
    ("utf-16-json", "/v1/rewards", json.dumps(rwd()).encode("utf-16"), 400, None, "invalid_json"),
    ("utf-16-le-json", "/v1/chat/completions", json.dumps(chat()).encode("utf-16-le"), 400, None, "invalid_json"),
    ("utf-32-json", "/v1/best-of-n", json.dumps(bon()).encode("utf-32"), 400, None, "invalid_json"),
    ("json-not-object", "/v1/best-of-n", b"[1, 2, 3]", 400, None, "invalid_value"),
    ("unknown-field", "/v1/best-of-n", bon(bogus=1), 400, "bogus", "unknown_field"),
    (
        "unknown-nested-field",
        "/v1/best-of-n",
        bon(sampling={"temprature": 1.0}),
        400,
        "sampling.temprature",
        "unknown_field",
    ),
    ("n-zero", "/v1/best-of-n", bon(n=0), 400, "n", "invalid_value"),
    ("n-above-max", "/v1/best-of-n", bon(n=9), 400, "n", "invalid_value"),
    ("n-not-int", "/v1/best-of-n", bon(n="many"), 400, "n", "invalid_value"),
    (
        "negative-max-tokens",
        "/v1/best-of-n",
        bon(sampling={"max_tokens": -1}),
        400,
        "sampling.max_tokens",
        "invalid_value",
    ),
    (
        "max-tokens-above-max",
        "/v1/best-of-n",
        bon(sampling={"max_tokens": 17}),
        400,
        "sampling.max_tokens",
        "invalid_value",
    ),
    (
        "temperature-out-of-range",
        "/v1/best-of-n",
        bon(sampling={"temperature": 99}),
        400,
        "sampling.temperature",
        "invalid_value",
    ),
    ("missing-question", "/v1/best-of-n", {"images": [OK_IMAGE], "n": 2}, 400, "question", "invalid_value"),
    ("empty-question", "/v1/best-of-n", bon(question="  "), 400, "question", "invalid_value"),
    # str.strip keeps format and control characters: an answer of one zero-width space outranked every real answer
    ("invisible-question", "/v1/best-of-n", bon(question="\u200b\ufeff"), 400, "question", "invalid_value"),
    ("invisible-answer", "/v1/rewards", rwd(answers=["a red circle.", "\u200b"]), 400, "answers[1]", "invalid_value"),
    ("control-answer", "/v1/rewards", rwd(answers=["\x00\u00ad\u2060"]), 400, "answers[0]", "invalid_value"),
    (
        "filler-answer",
        "/v1/rewards",
        rwd(answers=["\u3164\u2800\ufe0f\u034f\u2065\U000e0080"]),
        400,
        "answers[0]",
        "invalid_value",
    ),
    (
        "invisible-messages",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "\u200b"}]),
        400,
        "messages",
        "invalid_value",
    ),
    (
        "base64-not-image",
        "/v1/best-of-n",
        bon(images=[data_url(b"hello, I am not an image")]),
        400,
        "images[0]",
        "invalid_image",
    ),
    (
        "not-base64",
        "/v1/best-of-n",
        bon(images=["data:image/png;base64,@@@not base64@@@"]),
        400,
        "images[0]",
        "invalid_image",
    ),
    ("truncated-png", "/v1/best-of-n", bon(images=[data_url(truncated_png())]), 400, "images[0]", "invalid_image"),
    ("bomb-30000x30000", "/v1/best-of-n", bon(images=[data_url(bomb_png())]), 400, "images[0]", "invalid_image"),
    ("aspect-1x600", "/v1/best-of-n", bon(images=[data_url(png_bytes((1, 600)))]), 400, "images[0]", "invalid_image"),
    (
        "format-not-allowed",
        "/v1/best-of-n",
        bon(images=[data_url(tiff_image(), "image/tiff")]),
        400,
        "images[0]",
        "invalid_image",
    ),
    (
        "bare-base64-ok-but-second-bad",
        "/v1/best-of-n",
        bon(images=[base64.b64encode(png_bytes()).decode(), "AAAA"]),
        400,
        "images[1]",
        "invalid_image",
    ),
    (
        "first-truncated-second-not-base64",
        "/v1/rewards",
        rwd(images=[data_url(truncated_png()), "data:image/png;base64,@@@"]),
        400,
        "images[0]",
        "invalid_image",
    ),
    (
        "remote-url-not-allowed",
        "/v1/best-of-n",
        bon(images=["http://169.254.169.254/latest/meta-data/"]),
        400,
        "images[0]",
        "invalid_image",
    ),
    ("file-url", "/v1/best-of-n", bon(images=["file:///etc/passwd"]), 400, "images[0]", "invalid_image"),
    ("too-many-images", "/v1/best-of-n", bon(images=[OK_IMAGE] * 3), 400, "images", "invalid_value"),
    # JSON types as sent, as OpenAI checks them: no "3" -> 3, true -> 1, 2.0 -> 2
    ("n-as-a-string", "/v1/best-of-n", bon(n="2"), 400, "n", "invalid_value"),
    ("n-as-a-boolean", "/v1/best-of-n", bon(n=True), 400, "n", "invalid_value"),
    ("n-as-a-float", "/v1/best-of-n", bon(n=2.0), 400, "n", "invalid_value"),
    (
        "temperature-as-a-boolean",
        "/v1/best-of-n",
        bon(sampling={"temperature": True}),
        400,
        "sampling.temperature",
        "invalid_value",
    ),
    ("stream-as-a-string", "/v1/chat/completions", chat(stream="false"), 400, "stream", "invalid_value"),
    ("max-tokens-as-a-string", "/v1/chat/completions", chat(max_tokens="8"), 400, "max_tokens", "invalid_value"),
    (
        "too-many-images-in-messages",
        "/v1/rewards",
        {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": OK_IMAGE}}] * 3}],
            "answers": ["a red circle."],
        },
        400,
        "messages",
        "invalid_value",
    ),
    (
        "reward-mode-unknown",
        "/v1/best-of-n",
        bon(reward={"mode": "majority-vote"}),
        400,
        "reward.mode",
        "invalid_value",
    ),
    ("reward-beta-negative", "/v1/best-of-n", bon(reward={"beta": -1}), 400, "reward.beta", "invalid_value"),
    (
        "claim-score-unknown",
        "/v1/best-of-n",
        bon(reward={"mode": "claims", "claim_score": "vote"}),
        400,
        "reward.claim_score",
        "invalid_value",
    ),
    ("unknown-model", "/v1/best-of-n", bon(model="gpt-5"), 404, "model", "model_not_found"),
    ("answers-empty", "/v1/rewards", rwd(answers=[]), 400, "answers", "invalid_value"),
    ("answer-blank", "/v1/rewards", rwd(answers=["ok", "   "]), 400, "answers[1]", "invalid_value"),
    ("answer-too-long", "/v1/rewards", rwd(answers=["red " * 40]), 400, "answers", "invalid_answer"),
    ("answers-not-list", "/v1/rewards", rwd(answers="a red circle."), 400, "answers", "invalid_value"),
    (
        "question-and-messages",
        "/v1/rewards",
        rwd(messages=[{"role": "user", "content": "hi"}]),
        400,
        "question",
        "invalid_value",
    ),
    ("chat-best-of-below-n", "/v1/chat/completions", chat(n=3, best_of=2), 400, "best_of", "invalid_value"),
    ("chat-best-of-above-max", "/v1/chat/completions", chat(best_of=9), 400, "best_of", "invalid_value"),
    (
        "chat-stream-options-without-stream",
        "/v1/chat/completions",
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
        "invalid_value",
    ),
    ("chat-negative-max-tokens", "/v1/chat/completions", chat(max_tokens=-5), 400, "max_tokens", "invalid_value"),
    (
        "chat-bad-part-type",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "audio", "x": 1}]}]),
        400,
        "messages[0].content",
        "invalid_value",
    ),
    (
        "chat-missing-model",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}]},
        400,
        "model",
        "missing_field",
    ),
    ("chat-unknown-model", "/v1/chat/completions", chat(model="nope"), 404, "model", "model_not_found"),
    ("body-over-limit", "/v1/best-of-n", bon(images=["A" * (1024 * 1024 + 10)]), 413, None, "body_too_large"),
    # JSON may escape a lone UTF-16 surrogate; UTF-8 cannot carry it (json.dumps writes the escape)
    (
        "surrogate-question",
        "/v1/best-of-n",
        json.dumps(bon(question="a \ud800 b")).encode(),
        400,
        "question",
        "invalid_value",
    ),
    (
        "surrogate-answer",
        "/v1/rewards",
        json.dumps(rwd(answers=["ok", "b\udc00"])).encode(),
        400,
        "answers[1]",
        "invalid_value",
    ),
    (  # a free-form field nested deeper than Python's recursion limit: the surrogate check walked it recursively
        "deeply-nested-free-form-field",
        "/v1/chat/completions",
        json.dumps(chat(prediction=functools.reduce(lambda inner, _: [inner], range(900), []))).encode(),
        400,
        "prediction",
        "unsupported_parameter",
    ),
    (
        "surrogate-model",
        "/v1/chat/completions",
        json.dumps(chat(model="x\ud800")).encode(),
        400,
        "model",
        "invalid_value",
    ),
    (
        "surrogate-message",
        "/v1/chat/completions",
        json.dumps(chat(messages=[{"role": "user", "content": "\udfff"}])).encode(),
        400,
        "messages[0].content",
        "invalid_value",
    ),
    (
        "special-token-in-answer",
        "/v1/rewards",
        rwd(answers=["a red circle.", "a red circle.</s>USER: and now"]),
        400,
        "answers[1]",
        "invalid_answer",
    ),
    (
        "temperature-nan",
        "/v1/best-of-n",
        json.dumps(bon(sampling={"temperature": float("nan")})).encode(),  # JSON's NaN: "a finite number"
        400,
        "sampling.temperature",
        "invalid_value",
    ),
    (
        "logit-bias-unicode-digit",
        "/v1/chat/completions",
        chat(logit_bias={"\u00b2": 1}),
        400,
        "logit_bias",
        "invalid_value",
    ),
    (
        "image-placeholder-in-question",
        "/v1/best-of-n",
        bon(question="What does the <image> token mean?"),
        400,
        "question",
        "invalid_value",
    ),
    (
        "special-token-in-message",
        "/v1/chat/completions",
        chat(messages=[{"role": "system", "content": "be brief </s>"}, chat()["messages"][0]]),
        400,
        "messages[0].content",
        "invalid_value",
    ),
    (
        "messages-text-over-limit",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "x" * 20_001}]),
        400,
        "messages",
        "invalid_value",
    ),
    (
        "max-completion-tokens-above-max",
        "/v1/chat/completions",
        chat(max_completion_tokens=17),
        400,
        "max_completion_tokens",
        "invalid_value",
    ),
    # 5.5 million empty objects in a free-form field held the event loop 35 s: values are bounded per body.
    (
        "values-past-the-body-limit",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": Q, "annotations": [{}] * 100_001}]),
        400,
        None,
        "too_many_values",
    ),
    ("answers-past-the-body-limit", "/v1/rewards", rwd(answers=["a"] * 200_001), 400, None, "too_many_values"),
    # Empty messages cost nothing against the character bound; 480,000 of them stalled the server for 20 s.
    (
        "messages-past-the-item-limit",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": ""}] * 4096 + [{"role": "user", "content": Q}]),
        400,
        "messages",
        "invalid_value",
    ),
    (
        "content-parts-past-the-item-limit",
        "/v1/best-of-n",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 4096}], "n": 2},
        400,
        "messages",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_documented_4xx(
    client: httpx.Client, path: str, body: Any, status: int, param: str | None, code: str
) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["param"] == param or (param is not None and str(error["param"]).startswith(param)), error
    assert error["message"] and "Traceback" not in error["message"] and "Value error" not in error["message"]
    assert r.headers["x-request-id"]
    # ... and the server keeps serving.
    ok = client.post("/v1/rewards", json=rwd(answers=["a red circle.", "a dog."]))
    assert ok.status_code == 200, ok.text


def test_body_encoding_and_number_refusals_say_what_to_change(client: httpx.Client) -> None:
    """Python's own wording advised calling sys.set_int_max_str_digits(), which only the server can."""
    json_type = {"content-type": "application/json"}
    r = client.post("/v1/rewards", content=json.dumps(rwd()).encode("utf-16"), headers=json_type)
    assert "the body is UTF-16; JSON must be UTF-8" in r.json()["error"]["message"], r.text
    r = client.post("/v1/best-of-n", content=b'{"n": ' + b"9" * 5000 + b"}", headers=json_type)
    message = r.json()["error"]["message"]
    assert "a number has more than 4300 digits" in message and "sys." not in message, message
    bom = b"\xef\xbb\xbf" + json.dumps(rwd()).encode()  # a UTF-8 byte-order mark is UTF-8 still
    assert client.post("/v1/rewards", content=bom, headers=json_type).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/v1/best-of-n",
            bon(n=0, sampling={"top_p": 2, "max_tokens": "many"}, bogus=True),
            [
                ("n", "invalid_value"),
                ("sampling.max_tokens", "invalid_value"),
                ("sampling.top_p", "invalid_value"),
                ("bogus", "unknown_field"),
            ],
        ),
        ("/v1/chat/completions", chat(n=0, temperature=-1), [("temperature", "invalid_value"), ("n", "invalid_value")]),
        ("/v1/rewards", rwd(answers=[1, "ok", None], x=1), [("answers[0]", None), ("answers[2]", None), ("x", None)]),
        # the checks after the schema (the deployment's limits, ...) run to the end too
        (
            "/v1/best-of-n",
            bon(n=9, sampling={"max_tokens": 10_000}, question=" "),
            [("n", "invalid_value"), ("sampling.max_tokens", "invalid_value"), ("question", "invalid_value")],
        ),
        ("/v1/rewards", rwd(answers=["ok", " ", "  "]), [("answers[1]", "invalid_value"), ("answers[2]", None)]),
        (
            "/v1/chat/completions",
            chat(n=3, best_of=2, stream_options={"include_usage": True}),
            [("stream_options", "invalid_value"), ("best_of", "invalid_value")],
        ),
    ],
    ids=["best-of-n", "chat", "rewards", "best-of-n-limits", "rewards-answers", "chat-checks"],
)
def test_every_problem_is_listed(
    client: httpx.Client, path: str, body: dict[str, Any], expected: list[tuple[str, str | None]]
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    listed = [(e["param"], e["code"]) for e in error["errors"]]
    assert sorted(p for p, _ in listed) == sorted(p for p, _ in expected), error
    assert all(code == dict(listed)[param] for param, code in expected if code), error
    assert (error["param"], error["code"]) == listed[0]
    assert error["message"].startswith(error["errors"][0]["message"])
    assert error["message"].endswith(f"(and {len(expected) - 1} more problem{'s' if len(expected) > 2 else ''})")


def test_chunked_body_over_limit_is_413(client: httpx.Client) -> None:
    def chunks():
        for _ in range(20):
            yield b"x" * 65536

    r = client.post("/v1/rewards", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


def test_a_body_refused_for_its_declared_size_is_counted_under_its_route(client: httpx.Client) -> None:
    """It was refused before routing and counted as route="unmatched": a dashboard lost which route it was."""
    r = client.post("/v1/jobs/upload?kind=rewards", content=b"x" * (17 * 1024 * 1024))
    assert r.status_code == 413
    counted = [line for line in client.get("/metrics").text.splitlines() if 'status="413"' in line]
    assert any(
        'route="/v1/jobs/upload"' in line and line.startswith("rlaifv_http_requests_total") for line in counted
    ), counted


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nothing-here", 404, "not_found"),
        ("GET", "/v1/best-of-n", 405, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods(client: httpx.Client, method: str, path: str, status: int, code: str) -> None:
    r = client.request(method, path)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_jpeg_with_a_damaged_exif_block_is_scored_as_stored(client: httpx.Client) -> None:
    """The service's decoded image kept the damaged EXIF block, and converting it again on the model thread
    raised a SyntaxError: a 500 on every image endpoint, where the Python API scored the file."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + b"\xff" * 60)
    r = client.post("/v1/rewards", json=rwd(images=[data_url(buffer.getvalue())], answers=["a red square."]))
    assert r.status_code == 200, r.text


def test_a_bad_request_among_concurrent_good_ones_fails_alone(live_server) -> None:
    """Requests sent together (batched as they arrive; tests/service/test_engine.py pins the batch case): the one
    naming a special token gets its 400, the rest 200 (all eight used to fail with 500)."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [bon(question=f"What is in image {i}?") for i in range(5)]
    bodies.insert(2, bon(question="What does <image> mean?"))

    def post(body: dict[str, Any]) -> int:
        with httpx.Client(base_url=live_server.url, timeout=60) as c:
            return c.post("/v1/best-of-n", json=body).status_code

    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = list(pool.map(post, bodies))
    assert statuses == [200, 200, 400, 200, 200, 200]


def test_the_answer_that_overflows_the_context_is_named(client: httpx.Client, in_process_pair) -> None:
    """Prompt + one answer over the model's positions: the 400 names that answer, not the list."""
    limit = in_process_pair.max_positions
    overhead = len(in_process_pair.encode([], "red").input_ids) - 1  # the template's tokens around a word
    question = "red " * (limit - overhead - 6)  # leaves 6 positions: "ok" + end of turn fits, 12 words do not
    body = rwd(images=[], question=question, answers=["ok", "red " * 12, "ok"])
    r = client.post("/v1/rewards", json=body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("answers[1]", "context_length_exceeded")
    ok = client.post("/v1/rewards", json=rwd(images=[], question=question, answers=["ok"]))
    assert ok.status_code == 200, ok.text


def _raw(server, request: bytes, then: bytes = b"", *, wait_s: float = 0.0) -> bytes:
    """`request` sent on a raw socket (then `then` after `wait_s`), and everything the server sends until it
    closes the connection (a kept-alive connection that never closes fails the test by its timeout)."""
    import socket
    import time

    received = b""
    closed = contextlib.suppress(ConnectionResetError, BrokenPipeError)  # before it read all we sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock, closed:
        sock.sendall(request)
        if then:
            time.sleep(wait_s)
            sock.sendall(then)
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_a_refused_body_closes_its_connection(live_server) -> None:
    """413 kept the connection open, and the server read and threw away the rest of a 300 MB upload."""
    head = b"POST /v1/rewards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = _raw(live_server, head + b"Content-Length: 300000000\r\n\r\n" + b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()


def test_a_header_past_64_kib_is_refused(live_server) -> None:
    """The httptools parser took a 100 MB header (~200 MB of memory) while bodies were capped."""
    answer = _raw(live_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]  # refused, answered (no reset) and closed
    assert b'"headers_too_large"' in answer


def test_a_body_trickling_past_its_deadline_is_408_and_closed(make_server) -> None:
    """A client sending one byte every few seconds held a connection (and a handler) as long as it liked."""
    server = make_server(body_timeout_s=0.5)
    head = b"POST /v1/rewards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    answer = _raw(server, head + b"{", b'"', wait_s=1.0)
    assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower(), answer[:300]
    assert b"body_timeout" in answer


def test_a_body_abandoned_half_way_counts_as_client_closed(make_server) -> None:
    """A client that sent half its body and went away was counted a 400 (the failed parse of half a body) on the
    client-error dashboards; it is nginx's 499, as a client gone while its request waits."""
    import socket
    import time

    server = make_server()
    head = b"POST /v1/rewards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b'{"question": "half')
        sock.shutdown(socket.SHUT_WR)  # gone, its body unfinished
        while sock.recv(65536):
            pass
    sample = ("rlaifv_http_requests_total", {"route": "/v1/rewards", "method": "POST", "status": "499"})
    registry = server.app.state.metrics.registry
    deadline = time.monotonic() + 30
    while registry.get_sample_value(*sample) != 1.0:  # counted as the handler unwinds, just after the close
        assert time.monotonic() < deadline, registry.get_sample_value(*sample)
        time.sleep(0.02)
    bad = ("rlaifv_http_requests_total", {"route": "/v1/rewards", "method": "POST", "status": "400"})
    assert registry.get_sample_value(*bad) is None


def test_the_image_limits_set_hold_for_the_model_pair_too(make_server) -> None:
    """The service decoded with its settings, then the model pair checked the images again with its defaults: a
    raised RLAIFV_MAX_IMAGE_ASPECT let a 600x20 image through the first check and not the second."""
    server = make_server(max_image_aspect=40)
    body = rwd(images=[data_url(png_bytes((600, 20)))], answers=["a red circle."])
    r = httpx.post(server.url + "/v1/rewards", json=body, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/rewards", json=rwd(images=[data_url(png_bytes((900, 20)))]), timeout=60)
    assert r.status_code == 400 and "aspect ratio over 40" in r.json()["error"]["message"], r.text


def test_invented_http_methods_share_one_metric_label(make_server) -> None:
    """Any token is a method to HTTP: each invented one was a new time series, before auth (a scrape grew to 9 s)."""
    server = make_server(api_keys=["sk-test-key-1234"])
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method in ("BREW", "FOO1", "FOO2"):
            assert client.request(method, "/v1/rewards").status_code in (401, 405)
        assert client.request("GET", "/healthz").status_code == 200
        scraped = client.get("/metrics").text
    assert "BREW" not in scraped and "FOO1" not in scraped
    registry = server.app.state.metrics.registry
    labels = {"route": "/v1/rewards", "method": "other"}
    assert (
        sum(
            registry.get_sample_value("rlaifv_http_requests_total", labels | {"status": s}) or 0 for s in ("401", "405")
        )
        == 3
    )
    assert registry.get_sample_value(
        "rlaifv_http_requests_total", {"route": "/healthz", "method": "GET", "status": "200"}
    )


def test_text_over_its_length_is_refused_before_it_is_read_for_anything_visible(client: httpx.Client) -> None:
    """16 MB of DEL (one byte each in JSON, invisible) was read whole for a visible character before the length
    check: 2 s of the event loop."""
    for path, body, param in (
        ("/v1/rewards", rwd(question="\x7f" * 20_001), "question"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "\x7f" * 20_001}]), "messages"),
    ):
        error = client.post(path, json=body).json()["error"]
        assert error["param"] == param and " over " in error["message"], error


def test_answers_past_the_limit_are_one_problem_not_one_each(client: httpx.Client, red_url: str) -> None:
    """Each of 5M empty answers past RLAIFV_MAX_ANSWERS was checked and kept as its own problem: 53 s on the event
    loop for one 400. Answers past the limit are not looked at."""
    body = {"images": [red_url], "question": "q", "answers": [""] * 150_000}
    r = client.post("/v1/rewards", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "answers" and "at most 64 answers" in error["message"]
    assert "(and 64 more problems" in error["message"], error["message"]  # answers[0..63] are empty too


def test_a_client_cannot_pick_its_rate_limit_bucket_with_x_forwarded_for(make_server) -> None:
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: a local client (or a sidecar passing the header
    on) got a fresh quota per invented address. Only RLAIFV_FORWARDED_ALLOW_IPS's proxies are believed."""

    def codes(server, count: int) -> list[int]:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return [
                client.get("/v1/models", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
                for i in range(count)
            ]

    import time

    for attempt in range(2):  # quotas are per clock minute: a run across a minute boundary is run again
        minute = int(time.time() // 60)
        plain = codes(make_server(rate_limit_per_minute=2), 4)
        if int(time.time() // 60) == minute or attempt:
            break
    assert plain == [200, 200, 429, 429], plain
    assert codes(make_server(rate_limit_per_minute=2, forwarded_allow_ips=["127.0.0.1"]), 4) == [200] * 4
    response = httpx.get(make_server().url + "/healthz")
    assert "server" not in response.headers and response.headers["x-content-type-options"] == "nosniff"


def test_a_request_head_not_complete_in_time_closes_the_connection(make_server) -> None:
    """uvicorn timed only the pause between requests: a connection sending nothing, or trickling its headers,
    stayed open for ever (a few hundred used up the file descriptors). RLAIFV_HEADER_TIMEOUT_S closes them; a
    kept-alive connection gets the deadline anew for its next head."""
    import socket
    import time

    server = make_server(header_timeout_s=0.5)

    def closed_by_server(first: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            if first:
                sock.sendall(first)
            received = b""
            while chunk := sock.recv(65536):  # the socket's 30 s timeout fails the test where nothing closes it
                received += chunk
            return received

    assert closed_by_server(b"") == b""
    assert closed_by_server(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ") == b""
    answered = closed_by_server(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # answered, then idle: closed
    assert answered.startswith(b"HTTP/1.1 200") and answered.count(b"HTTP/1.1") == 1
    # Answered (404) before its body was read, then trickling that body: each byte cancelled uvicorn's keep-alive
    # timer, so the connection lived as long as the bytes came.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
        sock.settimeout(0.2)
        received, deadline = b"", time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"x")  # the trickle: one byte per 0.2 s
                except OSError:  # closed meanwhile
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
        else:
            raise AssertionError("the trickling connection was never closed")
    assert received.startswith(b"HTTP/1.1 404")
