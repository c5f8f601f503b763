"""API keys: /v1 routes need one when configured (401 missing or wrong, as OpenAI and RFC 7235 answer); health
stays open; metrics optional."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

KEY = "sk-test-0123456789abcdef"
FILE_KEY = "sk-from-file-abcdef0123"


@pytest.fixture(scope="module")
def auth_server(service_bundle, tmp_path_factory):
    from tests.service.conftest import LiveServer

    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# operator keys\n{FILE_KEY}\n\n")
    server = LiveServer(service_bundle, api_keys=[KEY], api_keys_file=keys_file, protect_metrics=True).start()
    yield server
    server.stop()


ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/rewards", {"images": [], "question": "q", "answers": ["a"]}),
    ("POST", "/v1/best-of-n", {"images": [], "question": "q", "n": 1}),
    ("POST", "/v1/chat/completions", {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/metrics", None),
]
HEADERS = [
    ("missing", {}, 401, "missing_api_key"),
    ("wrong-bearer", {"Authorization": "Bearer sk-wrong-key-000000"}, 401, "invalid_api_key"),
    ("wrong-x-api-key", {"X-API-Key": "sk-wrong-key-000000"}, 401, "invalid_api_key"),
    ("not-bearer-scheme", {"Authorization": f"Basic {KEY}"}, 401, "missing_api_key"),
    ("prefix-of-key", {"Authorization": f"Bearer {KEY[:-1]}"}, 401, "invalid_api_key"),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
@pytest.mark.parametrize(("headers", "status", "code"), [h[1:] for h in HEADERS], ids=[h[0] for h in HEADERS])
def test_bad_keys_refused(auth_server, method, path, body, headers, status, code) -> None:
    r = httpx.request(method, auth_server.url + path, json=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    challenge = "Bearer" if code == "missing_api_key" else 'Bearer error="invalid_token"'
    assert r.headers["www-authenticate"] == challenge


@pytest.mark.parametrize(
    "headers", [{"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}, {"Authorization": f"Bearer {FILE_KEY}"}]
)
def test_good_keys_accepted(auth_server, headers, red_url) -> None:
    assert httpx.get(auth_server.url + "/v1/models", headers=headers).status_code == 200
    assert httpx.get(auth_server.url + "/metrics", headers=headers).status_code == 200
    r = httpx.post(
        auth_server.url + "/v1/rewards", json={"images": [red_url], "question": "q", "answers": ["a"]}, headers=headers
    )
    assert r.status_code == 200, r.text


def test_health_stays_open(auth_server) -> None:
    assert httpx.get(auth_server.url + "/healthz").status_code == 200
    assert httpx.get(auth_server.url + "/readyz").status_code == 200


def test_keys_held_only_as_hashes(auth_server) -> None:
    ring = auth_server.app.state.keys
    assert KEY not in repr(vars(ring))
    assert ring.check(KEY) and ring.check(FILE_KEY) and not ring.check(KEY + "x")


def test_metrics_open_without_protect_setting(client: httpx.Client) -> None:
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"{not json", {}),
        ('{"question": "caf\u00e9"}'.encode("latin-1"), {}),  # not UTF-8: FastAPI's other parse failure
        (b"{not json", {"Authorization": "Bearer sk-wrong-key-000000"}),
    ],
    ids=["malformed-no-key", "latin-1-no-key", "malformed-wrong-key"],
)
def test_a_body_that_is_not_json_is_refused_for_the_key_first(auth_server, body, headers) -> None:
    """A client without a valid key hears 401 whatever it sent: the body parse failed before the route's auth
    dependency ran, and answered 400 to anyone."""
    r = httpx.post(
        auth_server.url + "/v1/rewards", content=body, headers={"Content-Type": "application/json"} | headers
    )
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == ("invalid_api_key" if headers else "missing_api_key")
    good = httpx.post(
        auth_server.url + "/v1/rewards", content=body, headers={"Content-Type": "application/json", "X-API-Key": KEY}
    )
    assert good.status_code == 400 and good.json()["error"]["code"] == "invalid_json", good.text


@pytest.mark.parametrize("key", ["sk-wrong-key-000000", ""])
def test_the_openai_client_hears_an_authentication_error(auth_server, key) -> None:
    """A wrong key is 401, as OpenAI answers it: the client raises AuthenticationError (a 403 raised
    PermissionDeniedError, which code written for OpenAI does not catch as a bad key)."""
    import openai

    client = openai.OpenAI(base_url=auth_server.url + "/v1", api_key=key or "unused", max_retries=0)
    if not key:
        client = client.with_options(default_headers={"Authorization": ""})
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401
    assert info.value.code == ("invalid_api_key" if key else "missing_api_key")


def test_refused_keys_count_against_their_client_address(make_server) -> None:
    """With rate limits on, a client guessing keys was answered 401 as fast as it asked (300 in 0.4 s); refused
    keys now use up their address's quota (429 after it), while a valid key keeps its own."""
    import time

    good = "sk-good-key-123456"
    for attempt in range(2):  # quotas are per clock minute: a run across a minute boundary is run again
        server = make_server(api_keys=[good], rate_limit_per_minute=3)
        minute = int(time.time() // 60)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            guesses = [
                client.get("/v1/models", headers={"Authorization": f"Bearer sk-guess-{i:08d}"}) for i in range(5)
            ]
            accepted = client.get("/v1/models", headers={"Authorization": f"Bearer {good}"}).status_code
        if int(time.time() // 60) == minute or attempt:
            break
    assert [r.status_code for r in guesses] == [401, 401, 401, 429, 429]
    refused = guesses[-1]
    assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["retry-after"]) >= 1
    assert accepted == 200
