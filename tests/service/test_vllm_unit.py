"""The vllm engine without vLLM: settings, start-up failures, response parsing, the multimodal payload mapping,
and text-only bundles on the transformers engine (the bundles the vLLM tests serve)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from rlaifv.reward.errors import InvalidInputError
from rlaifv.service.engines import vllm_payload
from rlaifv.service.engines.vllm import VllmStartupError, _logprob_of, _token_id, api_root
from rlaifv.service.settings import Settings
from rlaifv.testing.server import LiveServer, free_port
from rlaifv.testing.tiny_text import build_tiny_text_bundle


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_text_bundle(tmp_path_factory.mktemp("text") / "bundle")


# -- settings and start-up -------------------------------------------------------


def test_vllm_engine_needs_both_server_urls() -> None:
    with pytest.raises(ValidationError, match="RLAIFV_VLLM_POLICY_URL and RLAIFV_VLLM_REFERENCE_URL"):
        Settings(engine="vllm", vllm_policy_url="http://127.0.0.1:1/v1")
    settings = Settings(engine="vllm", vllm_policy_url="http://a:1/v1/", vllm_reference_url="http://b:2")
    assert (settings.vllm_policy_url, settings.vllm_reference_url) == ("http://a:1/v1", "http://b:2")
    with pytest.raises(ValidationError, match="http"):
        Settings(engine="vllm", vllm_policy_url="a:1", vllm_reference_url="http://b:2")


def test_start_up_fails_with_a_clear_message_when_no_vllm_server_answers(text_bundle: Path) -> None:
    from rlaifv.service.engines import load_engine

    settings = Settings(
        bundle=text_bundle,
        engine="vllm",
        vllm_policy_url=f"http://127.0.0.1:{free_port()}/v1",
        vllm_reference_url=f"http://127.0.0.1:{free_port()}/v1",
    )
    with pytest.raises(VllmStartupError, match=r"the policy server http://127\.0\.0\.1:\d+ is not usable: unreachable"):
        load_engine(settings)


def test_the_app_does_not_start_without_its_vllm_servers(text_bundle: Path) -> None:
    from fastapi.testclient import TestClient

    from rlaifv.service.app import create_app

    nowhere = f"http://127.0.0.1:{free_port()}"
    app = create_app(Settings(bundle=text_bundle, engine="vllm", vllm_policy_url=nowhere, vllm_reference_url=nowhere))
    with (
        pytest.raises(VllmStartupError, match=r"RLAIFV_ENGINE=vllm: the policy server .* fix RLAIFV_VLLM_POLICY_URL"),
        TestClient(app),
    ):
        pass


# -- parsing vLLM's answers ------------------------------------------------------


def test_api_root_and_token_ids() -> None:
    assert api_root("http://h:8000/v1/") == ("http://h:8000", "http://h:8000/v1")
    assert api_root("http://h:8000") == ("http://h:8000", "http://h:8000/v1")
    assert _token_id("token_id:42") == 42 and _token_id("7") == 7
    entry = {"5": {"logprob": -1.5, "rank": 3, "decoded_token": "a"}, "token_id:9": {"logprob": -0.25}}
    assert _logprob_of(entry, 5) == -1.5 and _logprob_of(entry, 9) == -0.25
    assert _logprob_of(entry, 6) is None and _logprob_of(None, 5) is None


# -- the multimodal payload -------------------------------------------------------


def _decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_images_become_data_url_parts_in_their_places() -> None:
    red, blue = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (5, 5), (0, 0, 255))
    out = vllm_payload.chat_messages("What is there?", None, [red, blue], max_images=4)
    assert [p["type"] for p in out[0]["content"]] == ["image_url", "image_url", "text"]
    assert out[0]["role"] == "user" and out[0]["content"][2]["text"] == "What is there?"
    first, second = (_decode(p["image_url"]["url"]) for p in out[0]["content"][:2])
    assert first.size == (8, 6) and first.getpixel((0, 0)) == (255, 0, 0)
    assert second.size == (5, 5) and second.getpixel((0, 0)) == (0, 0, 255)

    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Both red."}]},
        {"role": "user", "content": "And now?"},
    ]
    out = vllm_payload.chat_messages(None, messages, [blue, red], max_images=2)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert [p["type"] for p in out[1]["content"]] == ["text", "image_url", "image_url"]
    assert _decode(out[1]["content"][1]["image_url"]["url"]).getpixel((0, 0)) == (0, 0, 255)
    assert out[3]["content"] == "And now?"


def test_encoded_bytes_keep_their_format() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="JPEG")
    assert vllm_payload.image_url(buffer.getvalue()).startswith("data:image/jpeg;base64,")


def test_per_prompt_image_limit_and_counts_name_the_field() -> None:
    image = Image.new("RGB", (4, 4))
    with pytest.raises(InvalidInputError, match="at most 1 images per prompt") as exc:
        vllm_payload.chat_messages("q", None, [image, image], max_images=1)
    assert exc.value.param == "images"
    with pytest.raises(InvalidInputError, match="1 image parts but 2 images") as exc:
        vllm_payload.chat_messages(
            None, [{"role": "user", "content": [{"type": "image"}]}], [image, image], max_images=4
        )
    assert exc.value.param == "messages"
    assert vllm_payload.serve_flags(3) == ["--limit-mm-per-prompt", json.dumps({"image": 3})]


def test_sampling_and_scoring_bodies() -> None:
    messages = vllm_payload.chat_messages("q", None, [], max_images=1)
    body = vllm_payload.sampling_body(
        "policy",
        messages,
        n=8,
        temperature=0.5,
        top_p=0.8,
        top_k=0,
        max_tokens=32,
        seed=3,
        stop_ids=[2],
        top_logprobs=2,
    )
    assert body["n"] == 8 and body["top_k"] == -1 and body["seed"] == 3 and body["stop_token_ids"] == [2]
    assert body["logprobs"] is True and body["return_tokens_as_token_ids"] and body["return_token_ids"]
    score = vllm_payload.scoring_body("reference", messages, "a red circle")
    assert score["messages"][-1] == {"role": "assistant", "content": "a red circle"}
    assert score["continue_final_message"] and not score["add_generation_prompt"]
    assert score["prompt_logprobs"] == 0 and score["max_tokens"] == 1
    vllm_payload.check_prompt_ids([1, 2, 3], [1, 2, 3], server="policy")
    with pytest.raises(ValueError, match="first difference at position 1"):
        vllm_payload.check_prompt_ids([1, 2, 3], [1, 5, 3], server="policy")


# -- text-only bundles on the transformers engine -----------------------------------


def test_a_text_only_bundle_serves_text_and_refuses_images(text_bundle: Path, red_url: str) -> None:
    with LiveServer(text_bundle, max_tokens=16, request_timeout_s=60) as server, httpx.Client(timeout=60) as client:
        assert client.get(server.url + "/readyz").status_code == 200
        body = {"question": "what is a red circle", "n": 3, "sampling": {"max_tokens": 8, "seed": 0}}
        response = client.post(server.url + "/v1/best-of-n", json=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["candidates"]) == 3
        rewards = client.post(
            server.url + "/v1/rewards", json={"question": "what is a red circle", "answers": ["a red circle", "yes"]}
        )
        assert rewards.status_code == 200 and len(rewards.json()["rewards"]) == 2
        refused = client.post(server.url + "/v1/best-of-n", json={**body, "images": [red_url]})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "images" and "text only" in error["message"]
        chat = {
            "model": "tiny-text",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red_url}}]}],
        }
        refused = client.post(server.url + "/v1/chat/completions", json=chat)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"


# -- the engine without servers: what it refuses, how it reads vLLM, how failures map --------------------


@pytest.fixture
def engine(text_bundle: Path):
    from rlaifv.service.engines.vllm import VllmEngine

    settings = Settings(
        bundle=text_bundle, engine="vllm", vllm_policy_url="http://policy:1/v1", vllm_reference_url="http://ref:2/v1"
    )
    return VllmEngine(text_bundle, settings)


def test_the_engine_refuses_images_and_the_claims_reward(engine) -> None:
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service.engines.base import GenerateRequest

    image = Image.new("RGB", (4, 4))
    params = SamplingParams(max_tokens=4)
    with pytest.raises(InvalidInputError, match="text prompts only") as exc:
        engine._prompt(GenerateRequest([image], "q", None, 2, params, engine.reward))
    assert exc.value.param == "images"
    with pytest.raises(InvalidInputError, match="in-process labeler") as exc:
        engine._prompt(GenerateRequest([], "q", None, 2, params, RewardConfig(mode="claims")))
    assert exc.value.param == "reward.mode"
    assert engine._prompt(GenerateRequest([], "q", None, 2, params, engine.reward)).input_ids.numel() > 0


def test_a_vllm_choice_becomes_ids_raw_log_probs_and_a_finish_reason(engine) -> None:
    eot = engine.eot_id
    choice = {
        "index": 0,
        "text": "a red",
        "stop_reason": None,
        "logprobs": {
            "tokens": ["token_id:19", "token_id:111", f"token_id:{eot}"],
            "token_logprobs": [-1.0, -2.0, -0.5],
            "top_logprobs": [
                {"token_id:19": -1.0, "token_id:7": -0.9},
                {"token_id:111": -2.0},
                {f"token_id:{eot}": -0.5},
            ],
        },
    }
    sampled = engine._sampled(choice)
    assert sampled.ids == [19, 111, eot] and sampled.logprobs == [-1.0, -2.0, -0.5]
    assert sampled.finish_reason == "stop" and not sampled.cut
    assert sampled.top[0] == [(7, -0.9), (19, -1.0)]
    cut = engine._sampled({**choice, "stop_reason": "red", "logprobs": {**choice["logprobs"], "top_logprobs": None}})
    assert cut.cut and cut.finish_reason == "stop"
    longest = engine._sampled({**choice, "logprobs": {**choice["logprobs"], "tokens": ["token_id:19"] * 3}})
    assert longest.finish_reason == "length"
    body = engine._sampling_body([1, 2, 3], _generate_request(engine, logit_bias={19: 5.0}))
    assert body["prompt"] == [1, 2, 3] and body["return_tokens_as_token_ids"] and body["stop_token_ids"] == [eot]
    assert body["logit_bias"]["19"] == 5.0 and all(body["logit_bias"][str(t)] == -100.0 for t in engine.blocked_ids)


def _generate_request(engine, **sampling):
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines.base import GenerateRequest

    return GenerateRequest([], "q", None, 2, SamplingParams(max_tokens=4, **sampling), engine.reward)


@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        (httpx.ConnectError("refused"), "EngineUnavailable", "engine_unavailable"),
        (httpx.ReadTimeout("slow"), "EngineUnavailable", "engine_unavailable"),
        (httpx.Response(503, json={"error": {"message": "busy"}}), "EngineUnavailable", "engine_unavailable"),
        (httpx.Response(400, json={"error": {"message": "too long"}}), "BadRequest", "engine_rejected"),
        (httpx.Response(401, json={"error": {"message": "key"}}), "BadGateway", "upstream_error"),
        (httpx.Response(200, text="not json"), "BadGateway", "upstream_error"),
    ],
)
async def test_server_failures_map_to_typed_errors(engine, answer, error: str, code: str) -> None:
    from rlaifv.service.metrics import Metrics

    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    server = engine.policy
    server.metrics = Metrics()
    server._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    with pytest.raises(Exception) as exc:
        await server.complete({"prompt": [1]})
    await server.aclose()
    assert type(exc.value).__name__ == error
    assert exc.value.code == code or exc.value.type == code
    assert "policy" in exc.value.message
    if error == "EngineUnavailable":
        assert exc.value.headers["Retry-After"].isdigit()
    assert (
        sum(s.value for m in server.metrics.vllm_errors.collect() for s in m.samples if s.name.endswith("_total")) == 1
    )
