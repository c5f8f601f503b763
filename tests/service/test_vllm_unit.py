"""The vllm engine without vLLM: settings, start-up failures, response parsing, the image path's payload, and, against
recorded fakes of vLLM's answers, the token-in route with its prompt check, the claims judge and LoRA routing; text-only
bundles on the transformers engine (the bundles the vLLM tests serve)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from rlaifv.reward.errors import InvalidInputError
from rlaifv.service.engines import vllm as vllm_engine
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


# -- the image path's payload -------------------------------------------------------


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlaifv.testing.tiny_text import build_vision_model

    return build_vision_model(tmp_path_factory.mktemp("vision") / "model")


def _decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_images_become_data_url_parts_in_order() -> None:
    red, blue = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (5, 5), (0, 0, 255))
    parts = vllm_payload.content_parts([red, blue])
    assert [p["type"] for p in parts] == ["image_url", "image_url"]
    first, second = (_decode(p["url"]) for p in parts)
    assert first.size == (8, 6) and first.getpixel((0, 0)) == (255, 0, 0)
    assert second.size == (5, 5) and second.getpixel((0, 0)) == (0, 0, 255)


def test_encoded_bytes_keep_their_format() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="JPEG")
    assert vllm_payload.image_url(buffer.getvalue()).startswith("data:image/jpeg;base64,")


def test_prompt_ids_are_ours_with_one_placeholder_per_image(vision_model: Path) -> None:
    """What vLLM gets: our rendering with each image's placeholder unexpanded (vLLM's processor expands it)."""
    from rlaifv.reward.models import load_processor
    from rlaifv.reward.prompt import encode_prompt

    processor = load_processor(vision_model)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    images = [Image.new("RGB", (40, 28), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is"}, {"type": "image"}]}
    ]
    for question, turns in (("what is a red circle", None), (None, messages)):
        ours = encode_prompt(processor, images, question, messages=turns).input_ids.tolist()
        sent = vllm_payload.prompt_ids(processor, images, question, turns)
        assert sent.count(image_id) == 2 and ours.count(image_id) > 2
        assert sent[:2] == ours[:2] and sent[-4:] == ours[-4:]  # same template around the images
    text_only = vllm_payload.prompt_ids(processor, [], "what is a red circle", None)
    assert text_only == encode_prompt(processor, [], "what is a red circle").input_ids.tolist()


def test_generate_body_and_the_prompt_check() -> None:
    parts = vllm_payload.content_parts([Image.new("RGB", (4, 4))])
    body = vllm_payload.generate_body("policy", [1, 2, 3], parts, {"n": 2, "logprobs": 0})
    assert body["token_ids"] == [1, 2, 3] and body["content_parts"] == parts and body["model"] == "policy"
    assert body["return_token_ids"] and body["output_mode"] == "tokens" and body["sampling_params"]["n"] == 2
    assert "content_parts" not in vllm_payload.generate_body("policy", [1], [], {})
    vllm_payload.check_prompt_ids([1, 2, 3], [1, 2, 3], server="policy")
    with pytest.raises(ValueError, match="first difference at position 1"):
        vllm_payload.check_prompt_ids([1, 2, 3], [1, 5, 3], server="policy")
    with pytest.raises(ValueError, match="did not return the prompt"):
        vllm_payload.check_prompt_ids([1], None, server="policy")
    assert vllm_payload.serve_flags(3) == ["--enable-scale-out", "--limit-mm-per-prompt", json.dumps({"image": 3})]
    from rlaifv.service.engines.vllm import Prompt

    text = Prompt.of([1, 2])  # a text prompt's ids, as rlaifv.bench.vllm_scoring passes them
    assert (text.ids, text.sent, text.has_images) == ([1, 2], [1, 2], False) and Prompt.of(text) is text


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
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content[0]"


# -- the engine without servers: what it refuses, how it reads vLLM, how failures map --------------------


@pytest.fixture
def engine(text_bundle: Path):
    from rlaifv.service.engines.vllm import VllmEngine

    settings = Settings(
        bundle=text_bundle, engine="vllm", vllm_policy_url="http://policy:1/v1", vllm_reference_url="http://ref:2/v1"
    )
    return VllmEngine(text_bundle, settings)


def test_a_text_only_bundle_refuses_images_and_claims_need_an_image(engine) -> None:
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service.engines.base import GenerateRequest

    image = Image.new("RGB", (4, 4))
    params = SamplingParams(max_tokens=4)
    assert not engine.accepts_images
    with pytest.raises(InvalidInputError, match="reads text only") as exc:
        engine._prompt(GenerateRequest([image], "q", None, 2, params, engine.reward))
    assert exc.value.param == "images"
    with pytest.raises(InvalidInputError, match="needs the request's image") as exc:
        engine._prompt(GenerateRequest([], "q", None, 2, params, RewardConfig(mode="claims")))
    assert exc.value.param == "reward.mode"
    prompt = engine._prompt(GenerateRequest([], "q", None, 2, params, engine.reward))
    assert prompt.ids == prompt.sent and not prompt.has_images and prompt.ids


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
    junk = {**choice["logprobs"], "top_logprobs": [{"token_id:19": -1.0, "token_id:0": -9999.0}, {}, {}]}
    assert engine._sampled({**choice, "logprobs": junk}).top[0] == [(19, -1.0)]  # vLLM's -inf is no alternative
    cut = engine._sampled({**choice, "stop_reason": "red", "logprobs": {**choice["logprobs"], "top_logprobs": None}})
    assert cut.cut and cut.finish_reason == "stop"
    longest = engine._sampled({**choice, "logprobs": {**choice["logprobs"], "tokens": ["token_id:19"] * 3}})
    assert longest.finish_reason == "length"
    body = engine._sampling_body([1, 2, 3], _generate_request(engine, logit_bias={19: 5.0}))
    assert body["prompt"] == [1, 2, 3] and body["return_tokens_as_token_ids"] and body["stop_token_ids"] == [eot]
    assert body["logit_bias"]["19"] == 5.0 and all(body["logit_bias"][str(t)] == -100.0 for t in engine.blocked_ids)
    # Every sampling field is sent, neutral ones too: vLLM fills a missing field from generation_config.json.
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0}
    assert {k: body[k] for k in neutral} == neutral and body["top_k"] == -1 and body["top_p"] == 1.0


def test_rows_past_the_tokenizer_are_never_sampled(text_bundle: Path, tmp_path: Path) -> None:
    """A model whose embedding was resized past its tokenizer (LLaVA-1.5: 32064 rows, 32002 tokens): vLLM samples
    over every row, so the padding rows are banned as the in-process engine bans them."""
    import shutil

    from rlaifv.service.engines.vllm import VllmEngine

    bundle = tmp_path / "bundle"
    shutil.copytree(text_bundle, bundle)
    config = json.loads((bundle / "policy" / "config.json").read_text())
    tokens = config["vocab_size"]
    (bundle / "policy" / "config.json").write_text(json.dumps(config | {"vocab_size": tokens + 6}))
    settings = Settings(
        bundle=bundle, engine="vllm", vllm_policy_url="http://p:1/v1", vllm_reference_url="http://r:2/v1"
    )
    engine = VllmEngine(bundle, settings)
    assert set(range(tokens, tokens + 6)) <= set(engine.blocked_ids)
    bias = engine._sampling_params(_generate_request(engine))["logit_bias"]
    assert all(bias[str(t)] == -100.0 for t in range(tokens, tokens + 6))
    with pytest.raises(InvalidInputError, match="not in the vocabulary"):  # a padding row is no token to bias
        engine._sampling_params(_generate_request(engine, logit_bias={tokens + 1: 5.0}))


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


async def test_a_request_the_server_dropped_unanswered_is_sent_once_more(engine) -> None:
    """vLLM closes idle connections after 5 s: a request sent as it closes one gets no answer at all."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1 or drop_all:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"choices": []})

    server = engine.policy
    for drop_all in (False, True):
        calls.clear()
        server._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        if drop_all:
            with pytest.raises(Exception, match="unreachable") as exc:
                await server.complete({"prompt": [1]})
            assert type(exc.value).__name__ == "EngineUnavailable"
        else:
            assert await server.complete({"prompt": [1]}) == {"choices": []}
        assert len(calls) == 2
        await server.aclose()


async def test_the_pool_drops_idle_connections_before_vllm_does(engine) -> None:
    """Limits given to a client with a transport were ignored (httpx takes them from the transport): the pool kept
    httpx's 5 s keep-alive, vLLM's own, and 100 connections."""
    from rlaifv.service.engines.vllm import KEEPALIVE_S

    server = engine.policy
    pool = server.client._transport._pool  # httpcore's pool: what the client really uses
    # 8 concurrent batches of 16 (the defaults), each request holding a connection for its decode, twice for claims
    assert (pool._max_connections, pool._keepalive_expiry) == (2 * 8 * 16, KEEPALIVE_S) == (256, 2.0)
    await server.aclose()


def test_the_pool_holds_every_request_the_concurrent_batches_send(text_bundle: Path) -> None:
    """64 connections for up to 8 x 16 requests in flight: a short request waited in the pool behind long ones."""
    from rlaifv.service.engines.vllm import VllmServer

    url = "http://127.0.0.1:9/v1"
    settings = Settings(
        bundle=text_bundle,
        engine="vllm",
        vllm_policy_url=url,
        vllm_reference_url=url,
        vllm_concurrent_batches=3,
        max_batch=40,
    )
    assert VllmServer("policy", "http://127.0.0.1:9/v1", None, settings, None).max_connections == 240
    small = settings.model_copy(update={"vllm_concurrent_batches": 1, "max_batch": 1})
    assert VllmServer("policy", "http://127.0.0.1:9/v1", None, small, None).max_connections == 64


async def test_readiness_has_its_own_connections(engine) -> None:
    """Requests holding every pooled connection do not make the replica look down."""

    def busy(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("every connection is taken")

    server = engine.policy
    server._client = httpx.AsyncClient(transport=httpx.MockTransport(busy))
    server._probe_client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    assert await server.probe() == "ok"
    await server.aclose()
    assert server._client is None and server._probe_client is None


# -- the token-in API (images), the claims judge and LoRA routing, against recorded fakes of vLLM ------------------


class FakeVllm:
    """Answers /v1/completions and /inference/v1/generate as vLLM 0.32 does (log-probs -1 per token, -2 for 'no'
    labels), and records every request body: which model each half of the pair was asked for."""

    def __init__(self, expand: dict[int, list[int]] | None = None) -> None:
        self.bodies: list[tuple[str, dict]] = []
        self.expand = expand or {}  # what the server's processor turns a placeholder id into

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append((request.url.path, body))
        if request.url.path.endswith("/completions"):
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            if body.get("prompt_logprobs") is not None:
                choices = [{"index": i, "prompt_logprobs": self._positions(p)} for i, p in enumerate(prompts)]
            else:
                choices = [
                    {
                        "index": i,
                        "text": "",
                        "stop_reason": None,
                        "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-1.0], "top_logprobs": None},
                    }
                    for i in range(body["n"])
                ]
            return httpx.Response(200, json={"choices": choices})
        ids = [t for token in body["token_ids"] for t in self.expand.get(token, [token])]
        params = body["sampling_params"]
        if params.get("logprob_token_ids"):
            labels = params["logprob_token_ids"]
            step = {
                "token_id": labels[0],
                "logprob": -1.0,
                "top_logprobs": [
                    {"token_id": t, "logprob": -1.0 if i < len(labels) // 2 else -2.0} for i, t in enumerate(labels)
                ],
            }
            choices = [{"index": 0, "token_ids": [labels[0]], "logprobs": {"content": [step]}}]
        elif params.get("prompt_logprobs") is not None:
            choices = [{"index": 0, "token_ids": [7]}]
            return httpx.Response(
                200, json={"choices": choices, "prompt_token_ids": ids, "prompt_logprobs": self._positions(ids)}
            )
        else:
            # As vLLM's token-in route: the first `logprobs` entries of a step, the sampled token (7, ranked 5th)
            # first, then the top ones, each with its rank.
            step = [(7, -1.0, 5), (3, -0.1, 1), (4, -0.2, 2), (5, -0.3, 3), (6, -0.4, 4)][: params.get("logprobs") or 0]
            top = [{"token_id": t, "logprob": v, "rank": r} for t, v, r in step]
            content = [{"token_id": 7, "logprob": -1.0, "top_logprobs": top}]
            choices = [{"index": i, "token_ids": [7], "logprobs": {"content": content}} for i in range(params["n"])]
        return httpx.Response(200, json={"choices": choices, "prompt_token_ids": ids})

    @staticmethod
    def _positions(ids: list[int]) -> list:
        return [None, *({str(t): {"logprob": -1.0}} for t in ids[1:])]

    def models(self) -> list[str]:
        return [body.get("model") for _, body in self.bodies]


def _fake_engine(bundle: Path, fake: FakeVllm, **settings):
    from rlaifv.service.engines.vllm import VllmEngine
    from rlaifv.service.metrics import Metrics

    engine = VllmEngine(
        bundle,
        Settings(
            bundle=bundle,
            engine="vllm",
            vllm_policy_url="http://policy:1/v1",
            vllm_reference_url="http://ref:2/v1",
            **settings,
        ),
        Metrics(),
    )
    for server, name in ((engine.policy, "adapter-or-policy"), (engine.reference, "base-or-reference")):
        server.model = name
        server.metrics = engine.policy.metrics
        server._client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return engine


@pytest.fixture(scope="module")
def vision_bundle(tmp_path_factory: pytest.TempPathFactory, vision_model: Path) -> Path:
    from rlaifv.reward.bundle import write_bundle

    folder = tmp_path_factory.mktemp("vision-bundle")
    write_bundle(folder, policy=vision_model, reference=vision_model, name="tiny-vision", copy=False)
    return folder


def _expansion(bundle: Path) -> dict[int, list[int]]:
    """The placeholder -> expanded ids map of the bundle's processor for `_image()` (as vLLM's would expand it)."""
    from rlaifv.reward.bundle import read_manifest, resolve
    from rlaifv.reward.models import load_processor
    from rlaifv.reward.prompt import encode_prompt

    processor = load_processor(resolve(bundle, read_manifest(bundle).reference))
    ours = encode_prompt(processor, [_image()], "q").input_ids.tolist()
    sent = vllm_payload.prompt_ids(processor, [_image()], "q", None)
    at = sent.index(processor.tokenizer.convert_tokens_to_ids("<image>"))
    return {sent[at]: ours[at : len(ours) - (len(sent) - at - 1)]}


def _image() -> Image.Image:
    return Image.new("RGB", (40, 28), (255, 0, 0))


async def test_images_go_to_the_token_in_api_and_drift_is_refused(vision_bundle: Path) -> None:
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines.base import GenerateRequest, ScoreRequest
    from rlaifv.service.errors import BadGateway

    fake = FakeVllm(_expansion(vision_bundle))
    engine = _fake_engine(vision_bundle, fake)
    params = SamplingParams(max_tokens=4, seed=1)
    results = await engine.run(
        [
            GenerateRequest([_image()], "q", None, 3, params, engine.reward),
            ScoreRequest([_image()], "q", None, ["a red circle", "yes"], engine.reward, 8),
        ]
    )
    assert not any(isinstance(r, Exception) for r in results), results
    generated, scored = (r.ranking for r in results)
    assert [c.policy_logprob for c in generated.candidates] == [-1.0] * 3
    assert [c.num_tokens for c in scored.candidates] == [4, 2]  # word tokens + end-of-turn, sliced from the end
    assert all(c.reference_logprob == -c.num_tokens for c in scored.candidates)
    paths = {path for path, _ in fake.bodies}
    assert paths == {"/inference/v1/generate"}
    sample = next(body for _, body in fake.bodies if body["sampling_params"].get("n") == 3)
    assert sample["content_parts"][0]["url"].startswith("data:image/png;base64,")
    assert sample["sampling_params"]["logit_bias"] and sample["sampling_params"]["seed"] == 1

    # Alternatives: the route sends [sampled, top1, ..., top(k-1)] for a sample outside the top k; one more asked
    # gives the whole top k.
    [asked] = await engine.run([GenerateRequest([_image()], "q", None, 1, params, engine.reward, top_logprobs=2)])
    assert not isinstance(asked, Exception), asked
    assert [b["sampling_params"]["logprobs"] for _, b in fake.bodies if b["sampling_params"].get("logprobs")] == [3]
    [token] = asked.ranking.candidates[0].token_logprobs
    assert [(t.token_id, t.logprob) for t in token.top_logprobs] == [(3, -0.1), (4, -0.2)]
    # At the server's limit (20; 3 here) no more can be asked: the sampled token, ranked past the list, is not
    # one of the top k (it was shown as the k-th).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_engine, "MAX_LOGPROBS", 3)
        [capped] = await engine.run([GenerateRequest([_image()], "q", None, 1, params, engine.reward, top_logprobs=3)])
    [token] = capped.ranking.candidates[0].token_logprobs
    assert [t.token_id for t in token.top_logprobs] == [3, 4]

    drifting = FakeVllm({})  # a server that does not expand the placeholder the way our processor does
    engine = _fake_engine(vision_bundle, drifting)
    [result] = await engine.run([ScoreRequest([_image()], "q", None, ["yes"], engine.reward, 8)])
    assert isinstance(result, BadGateway) and "expanded the prompt differently" in result.message
    counted = {s.labels["reason"] for m in engine.policy.metrics.vllm_errors.collect() for s in m.samples}
    assert "prompt_mismatch" in counted


async def test_the_claims_judge_asks_the_policy_server_for_the_yes_no_tokens(vision_bundle: Path) -> None:
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service.engines.base import ScoreRequest
    from rlaifv.service.engines.vllm import p_yes

    fake = FakeVllm(_expansion(vision_bundle))
    engine = _fake_engine(vision_bundle, fake)
    reward = RewardConfig(mode="claims")
    answers = ["There is a red circle and a blue square.", "There is a cat."]
    [result] = await engine.run([ScoreRequest([_image()], "q", None, answers, reward, 16)])
    assert not isinstance(result, Exception), result
    candidates = result.ranking.candidates
    expected = p_yes(
        {t: -1.0 for t in engine.yes_ids} | {t: -2.0 for t in engine.no_ids}, engine.yes_ids, engine.no_ids
    )
    assert [len(c.claims) for c in candidates] == [2, 1]
    assert all(math.isclose(claim.p_yes, expected) for c in candidates for claim in c.claims)
    assert [c.reward for c in candidates] == [0.0, 0.0] and "claims_s" in result.ranking.timings
    judged = [body for _, body in fake.bodies if body["sampling_params"].get("logprob_token_ids")]
    assert len(judged) == 3 and all(body["model"] == "adapter-or-policy" for body in judged)
    assert judged[0]["sampling_params"]["logprob_token_ids"] == [*engine.yes_ids, *engine.no_ids]
    assert p_yes({1: math.log(0.3), 2: math.log(0.1), 3: math.log(0.2)}, [1, 2], [3]) == pytest.approx(0.4 / 0.6)


def test_lora_models_are_picked_and_checked() -> None:
    from rlaifv.service.engines.vllm import VllmServer

    models = {"base": {"parent": None}, "tiny-lora": {"parent": "base", "max_model_len": None}}
    settings = Settings(engine="vllm", vllm_policy_url="http://p:1", vllm_reference_url="http://p:1")

    def server(role: str, model: str | None = None) -> VllmServer:
        return VllmServer(role, "http://p:1", model, settings, None)

    policy, reference, full = server("policy"), server("reference"), server("reference")
    policy._pick(models, "adapter")
    reference._pick(models, "base")
    full._pick(models, None)  # a full pair's reference on a server that also lists adapters: its base model
    assert (policy.model, reference.model, full.model) == ("tiny-lora", "base", "base")
    with pytest.raises(VllmStartupError, match="is a base model: serve the adapter with"):
        server("policy", "base")._pick(models, "adapter")
    with pytest.raises(VllmStartupError, match=r"0 LoRA models .* --enable-lora --lora-modules"):
        server("policy")._pick({"base": {"parent": None}}, "adapter")
    with pytest.raises(VllmStartupError, match="is a LoRA module"):
        server("reference", "tiny-lora")._pick(models, "base")


async def test_a_lora_bundle_sends_policy_requests_to_the_adapter(text_bundle: Path, tmp_path: Path) -> None:
    from rlaifv.reward.bundle import write_bundle
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines.base import GenerateRequest, ScoreRequest
    from rlaifv.testing.tiny_text import build_lora_adapter

    adapter = build_lora_adapter(text_bundle / "reference", tmp_path / "adapter")
    write_bundle(tmp_path, policy=adapter, reference=text_bundle / "reference", policy_type="lora", copy=False)
    fake = FakeVllm()
    engine = _fake_engine(tmp_path, fake)
    assert engine.lora and engine.stop_ids == [engine.eot_id]
    params = SamplingParams(max_tokens=4)
    results = await engine.run(
        [
            GenerateRequest([], "q", None, 2, params, engine.reward),
            ScoreRequest([], "q", None, ["a red circle"], engine.reward, 8),
        ]
    )
    assert not any(isinstance(r, Exception) for r in results), results
    sampling = [body["model"] for _, body in fake.bodies if "n" in body]
    scoring = [body["model"] for _, body in fake.bodies if "prompt_logprobs" in body]
    assert sampling == ["adapter-or-policy"]
    assert sorted(scoring) == ["adapter-or-policy", "base-or-reference", "base-or-reference"]


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, {}),  # a server without the route
        # vLLM 0.32 registers the route and refuses it without the flag
        (
            403,
            {
                "error": {
                    "message": "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to "
                    "enable them.",
                    "type": "PermissionDeniedError",
                    "code": 403,
                }
            },
        ),
    ],
)
def test_start_up_names_the_flag_images_need(
    vision_bundle: Path, monkeypatch: pytest.MonkeyPatch, status: int, body: dict
) -> None:
    from rlaifv.service.engines import vllm

    listed = {"data": [{"id": "m", "parent": None, "max_model_len": 512}]}

    def get(url: str, **kwargs) -> httpx.Response:
        return httpx.Response(200, json=listed if url.endswith("/models") else {}, request=httpx.Request("GET", url))

    def post(url: str, **kwargs) -> httpx.Response:
        if not url.endswith("/inference/v1/generate"):
            return httpx.Response(200, json={}, request=httpx.Request("POST", url))
        return httpx.Response(status, json=body, request=httpx.Request("POST", url))

    monkeypatch.setattr(vllm.httpx, "get", get)
    monkeypatch.setattr(vllm.httpx, "post", post)
    engine = _fake_engine(vision_bundle, FakeVllm())
    engine.policy.model = engine.reference.model = ""
    with pytest.raises(VllmStartupError, match=r"policy server .* no /inference/v1/generate.*--enable-scale-out"):
        engine.start()


class CutAtWord(FakeVllm):
    """Samples "<word> <word>" and reports a stop string met at the second word: the cut text ends in a space."""

    def __init__(self, first: int, second: int, stop: str, text: str) -> None:
        super().__init__()
        self.ids, self.stop, self.text = [first, second], stop, text

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path.endswith("/completions") and body.get("prompt_logprobs") is None:
            self.bodies.append((request.url.path, body))
            tokens = [f"token_id:{t}" for t in self.ids]
            logprobs = {"tokens": tokens, "token_logprobs": [-1.0, -1.0], "top_logprobs": None}
            choice = {"index": 0, "text": self.text, "stop_reason": self.stop, "logprobs": logprobs}
            return httpx.Response(200, json={"choices": [choice] * body["n"]})
        return super().__call__(request)


async def test_a_stop_cut_answer_is_scored_stripped_as_in_process(text_bundle: Path) -> None:
    """vLLM decodes "a red" and cuts before "red": "a " is returned as "a" and must be scored as "a" (+ end of
    turn), as the in-process engine and /v1/rewards score it; the space token would change both log-prob sums."""
    from rlaifv.reward.prompt import encode_answer
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines.base import GenerateRequest

    probe = _fake_engine(text_bundle, FakeVllm())
    tokenizer = probe.tokenizer
    first, second = tokenizer("a red", add_special_tokens=False)["input_ids"][:2]
    assert tokenizer.decode([first, second]).startswith(tokenizer.decode([first]) + " ")
    cut_text = tokenizer.decode([first]) + " "  # what vLLM returns: the text up to the stop string
    fake = CutAtWord(first, second, stop=tokenizer.decode([second]).strip(), text=cut_text)
    engine = _fake_engine(text_bundle, fake)
    (result,) = await engine.run([GenerateRequest([], "q", None, 1, SamplingParams(max_tokens=4), engine.reward)])
    assert not isinstance(result, Exception), result
    text = result.ranking.candidates[0].text
    assert text == text.strip() and text
    scored = [body["prompt"] for _, body in fake.bodies if body.get("prompt_logprobs") is not None]
    expected = encode_answer(tokenizer, text, eot_id=engine.eot_id)
    prompts = [p for batch in scored for p in (batch if isinstance(batch[0], list) else [batch])]
    assert prompts and all(p[-len(expected) :] == expected for p in prompts)


def test_both_vllm_servers_share_one_start_up_wait(text_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RLAIFV_VLLM_WAIT_S bounds the whole start-up: a wait per server doubled the worst case, past the startup
    probe's budget (fake clock: the policy server takes 700 s of a 900 s wait to come up)."""
    import time
    import types

    from rlaifv.service.engines import load_engine
    from rlaifv.service.engines import vllm as module

    clock, waits = [1000.0], []

    def start(server: Any, wait_s: float, **_: Any) -> None:
        waits.append((server.role, wait_s))
        clock[0] += 700.0

    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter, sleep=time.sleep)
    monkeypatch.setattr(module, "time", fake_time)
    monkeypatch.setattr(module.VllmServer, "start", start)
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    settings = Settings(
        bundle=text_bundle, engine="vllm", vllm_policy_url=nowhere, vllm_reference_url=nowhere, vllm_wait_s=900
    )
    load_engine(settings)
    assert waits == [("policy", 900.0), ("reference", 200.0)]


async def test_a_withdrawn_request_closes_its_vllm_requests_and_the_batch_runs_on(text_bundle: Path) -> None:
    """A request whose client left kept its vLLM sequences running to the end: its HTTP request is now cancelled
    (vLLM aborts a request whose connection closes) and the others of the batch are answered."""
    from rlaifv.reward.errors import Withdrawn
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines.base import GenerateRequest

    fake = FakeVllm()
    arrived, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("n") == 3:  # the leaving request's samples: vLLM still at work
            arrived.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return fake(request)

    engine = _fake_engine(text_bundle, fake)
    for server in (engine.policy, engine.reference):
        server._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    staying, leaving = (GenerateRequest([], "q", None, n, SamplingParams(max_tokens=4), engine.reward) for n in (2, 3))
    batch = asyncio.create_task(engine.run([staying, leaving]))
    await arrived.wait()
    leaving.withdrawal.set()
    kept, withdrawn = await asyncio.wait_for(batch, timeout=30)  # a guard: without withdrawal it never ends
    assert cancelled.is_set() and isinstance(withdrawn, Withdrawn)
    assert not isinstance(kept, Exception) and len(kept.ranking.candidates) == 2
    await engine.aclose()


async def test_credentials_in_a_vllm_url_are_never_shown(text_bundle: Path) -> None:
    """The start-up log, /readyz (no key needed) and 503 messages showed http://user:password@host."""
    from rlaifv.service.engines.vllm import VllmEngine

    settings = Settings(
        bundle=text_bundle,
        engine="vllm",
        vllm_policy_url="http://u:vllmS3CRET@127.0.0.1:9/v1",
        vllm_reference_url="http://u:vllmS3CRET@127.0.0.1:9/v1",
    )
    engine = VllmEngine(text_bundle, settings)
    assert "vllmS3CRET" not in str(engine.policy._unusable("down")) and "127.0.0.1:9" in engine.policy.shown
    assert "vllmS3CRET" not in await engine.policy.probe()
    assert "vllmS3CRET" in engine.policy.root  # the requests themselves still carry it
    await engine.aclose()


def test_several_images_for_a_family_vllm_lays_out_otherwise_are_a_400(engine) -> None:
    """vLLM tiles each of LLaVA-OneVision's images as if alone, transformers uses its multi-image mode: such a
    prompt failed the expansion check (a 502) instead of a 400 naming `images`."""
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines.base import GenerateRequest

    engine._model_type = "llava_onevision"
    images = [Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))]
    with pytest.raises(InvalidInputError, match="one image per request") as exc:
        engine._prompt(GenerateRequest(images, "q", None, 2, SamplingParams(max_tokens=4), engine.reward))
    assert exc.value.param == "images"
