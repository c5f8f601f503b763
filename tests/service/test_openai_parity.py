"""OpenAI chat parity: stop, logprobs, penalties and logit_bias, streaming, accepted and refused fields.

The tiny model ends most answers at once, so requests bias its end-of-turn token away (`logit_bias`) to get
answers long enough to cut, penalise and stream.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def no_eot(in_process_pair) -> dict[str, int]:
    return {str(in_process_pair.eot_id): -100}


@pytest.fixture(scope="module")
def messages(red_url: str) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": red_url}}]
    return [{"role": "user", "content": content}]


def chat(client: httpx.Client, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": messages, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def openai_client(live_server):
    from openai import OpenAI

    return OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


# -- stop ---------------------------------------------------------------------------------------


def test_stop_cuts_the_text_like_openai_and_the_reward_scores_the_cut_text(
    client: httpx.Client, messages, no_eot
) -> None:
    one = {"n": 1, "best_of": 1, "max_tokens": 12, "seed": 11, "logit_bias": no_eot}
    full = chat(client, messages, **one)["choices"][0]
    assert full["finish_reason"] == "length"
    words = full["message"]["content"].split(" ")
    stop = " " + words[3]
    expected = full["message"]["content"][: full["message"]["content"].find(stop)].strip()

    cut = chat(client, messages, **one, stop=[stop, "never-sampled"])["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == expected
    assert cut["num_tokens"] < full["num_tokens"]

    rewards = client.post(
        "/v1/rewards", json={"model": "tiny-llava", "messages": messages, "answers": [cut["message"]["content"]]}
    ).json()
    given = rewards["candidates"][0]
    assert cut["reward"] == pytest.approx(given["reward"], abs=1e-5)
    assert cut["policy_logprob"] == pytest.approx(given["policy_logprob"], abs=1e-4)
    assert cut["reference_logprob"] == pytest.approx(given["reference_logprob"], abs=1e-4)
    assert cut["num_tokens"] == given["num_tokens"]


def test_a_stop_string_inside_a_word_the_tokenizer_cannot_spell_cuts_at_the_whole_word_before(
    client: httpx.Client, messages, no_eot
) -> None:
    """The default model's vocabulary is words: 'a red triang' re-tokenized to 'a red <unk>', so the reward and the
    log-probs scored the unknown token, not the text the client got."""
    one = {"n": 1, "best_of": 1, "max_tokens": 12, "temperature": 0, "logit_bias": no_eot}
    text = chat(client, messages, **one)["choices"][0]["message"]["content"]
    word = next(w for w in text.split(" ")[1:] if len(w) >= 3)
    stop = word[1:] + " "  # the first match may fall inside an earlier word: what is kept is decided by it
    at = (text + " ").find(stop)
    assert at > 0 and text[at - 1] != " "
    kept = text[:at].rsplit(" ", 1)[0].strip()

    cut = chat(client, messages, **one, stop=stop, logprobs=True)["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == kept
    tokens = [t["token"] for t in cut["logprobs"]["content"]]
    assert "".join(tokens).strip() == kept and "<unk>" not in tokens
    given = client.post("/v1/rewards", json={"model": "tiny-llava", "messages": messages, "answers": [kept]}).json()
    assert cut["reward"] == pytest.approx(given["rewards"][0], abs=1e-5)


def test_a_single_stop_string_cuts_every_answer_that_contains_it(client: httpx.Client, messages, no_eot) -> None:
    body = chat(client, messages, n=4, max_tokens=12, seed=2, logit_bias=no_eot, stop=" ")
    for choice in body["choices"]:
        assert " " not in choice["message"]["content"]
        assert choice["finish_reason"] == "stop"


# -- logprobs -----------------------------------------------------------------------------------


def test_logprobs_have_openais_shape_and_are_the_rewards_policy_terms(live_server, messages, no_eot) -> None:
    completion = openai_client(live_server).chat.completions.create(
        model="tiny-llava",
        messages=messages,
        n=2,
        max_tokens=8,
        seed=4,
        logprobs=True,
        top_logprobs=3,
        logit_bias=no_eot,
    )
    for choice in completion.choices:
        assert choice.finish_reason == "length"
        tokens = choice.logprobs.content
        assert len(tokens) == choice.model_extra["num_tokens"] == 8
        assert "".join(t.token for t in tokens).strip() == choice.message.content
        assert sum(t.logprob for t in tokens) == pytest.approx(choice.model_extra["policy_logprob"], abs=1e-4)
        for t in tokens:
            assert t.bytes == list(t.token.encode())
            assert len(t.top_logprobs) == 3
            values = [top.logprob for top in t.top_logprobs]
            assert values == sorted(values, reverse=True)
            assert t.logprob <= values[0] + 1e-6
            for top in t.top_logprobs:
                if top.token == t.token:
                    assert top.logprob == pytest.approx(t.logprob, abs=1e-5)


def test_logprobs_of_a_cut_answer_are_teacher_forced_over_the_scored_tokens(
    client: httpx.Client, messages, no_eot
) -> None:
    body = chat(
        client, messages, n=1, max_tokens=12, seed=11, logit_bias=no_eot, stop=" ", logprobs=True, top_logprobs=2
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == choice["num_tokens"] - 1  # the end-of-turn token is scored but not content
    assert "".join(t["token"] for t in tokens).strip() == choice["message"]["content"]
    assert all(len(t["top_logprobs"]) == 2 for t in tokens)
    assert sum(t["logprob"] for t in tokens) > choice["policy_logprob"]  # plus log p(end-of-turn) < 0


def test_without_logprobs_choices_carry_none(client: httpx.Client, messages) -> None:
    body = chat(client, messages, max_tokens=4, seed=0)
    assert body["choices"][0]["logprobs"] is None


# -- penalties and logit_bias: the sampling distribution only ------------------------------------


def _sample(pair, prompt, **params: Any):
    from rlaifv.reward.sampling import SamplingParams

    bias = {pair.eot_id: -100.0} | params.pop("logit_bias", {})
    return pair.sample([prompt], [4], [SamplingParams(max_tokens=12, seed=7, logit_bias=bias, **params)])[0]


def _assert_raw_logprobs(pair, prompt, samples) -> None:
    from rlaifv.reward.logprobs import full_forward_logprobs

    for sample in samples:
        forced = full_forward_logprobs(pair.policy, prompt, sample.token_ids)
        torch.testing.assert_close(sample.logprobs, forced.float().cpu(), atol=1e-4, rtol=0)


def test_penalties_change_the_draws_but_not_the_recorded_logprobs(in_process_pair, red_png: bytes) -> None:
    pair = in_process_pair
    prompt = pair.encode([red_png], QUESTION)
    plain = _sample(pair, prompt)
    for penalties in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"presence_penalty": -2.0}):
        penalised = _sample(pair, prompt, **penalties)
        assert [s.token_ids for s in penalised] != [s.token_ids for s in plain], penalties
        _assert_raw_logprobs(pair, prompt, penalised)
    repeats = sum(len(s.token_ids) - len(set(s.token_ids)) for s in _sample(pair, prompt, frequency_penalty=2.0))
    assert repeats <= sum(len(s.token_ids) - len(set(s.token_ids)) for s in plain)


def test_logit_bias_forces_and_bans_tokens_but_not_the_recorded_logprobs(in_process_pair, red_png: bytes) -> None:
    pair = in_process_pair
    prompt = pair.encode([red_png], QUESTION)
    plain = _sample(pair, prompt)
    forced_token = plain[0].token_ids[1]
    forced = _sample(pair, prompt, logit_bias={forced_token: 100.0})
    assert all(set(s.token_ids) == {forced_token} for s in forced)
    _assert_raw_logprobs(pair, prompt, forced)
    assert all(float(s.logprobs.max()) < -0.5 for s in forced)  # raw: the +100 bias is not in them
    banned = _sample(pair, prompt, logit_bias={forced_token: -100.0})
    assert all(forced_token not in s.token_ids for s in banned)


def test_penalties_over_http_change_the_answers(client: httpx.Client, messages, no_eot) -> None:
    base = {"n": 4, "max_tokens": 12, "seed": 3, "logit_bias": no_eot}
    plain = [c["message"]["content"] for c in chat(client, messages, **base)["choices"]]
    penalised = [
        c["message"]["content"]
        for c in chat(client, messages, **base, frequency_penalty=2, presence_penalty=2)["choices"]
    ]
    assert sorted(plain) != sorted(penalised)


def test_top_k_is_vllms_extension(client: httpx.Client, messages, no_eot) -> None:
    """`top_k` (vLLM's extra parameter, extra_body in the official client): 1 samples the greedy answer at any
    temperature; 0 and -1 (vLLM's 'off') sample as without it."""
    base = {"n": 3, "max_tokens": 8, "seed": 5, "logit_bias": no_eot, "temperature": 1.5}
    greedy = chat(client, messages, **{**base, "n": 1, "temperature": 0})["choices"][0]["message"]["content"]
    assert {c["message"]["content"] for c in chat(client, messages, **base, top_k=1)["choices"]} == {greedy}
    plain = [c["message"]["content"] for c in chat(client, messages, **base)["choices"]]
    for off in (0, -1):
        assert [c["message"]["content"] for c in chat(client, messages, **base, top_k=off)["choices"]] == plain
    bad = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": messages, "top_k": -2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"


def test_top_p_0_keeps_the_likeliest_token_and_a_negative_seed_is_taken_modulo_2_63(
    client: httpx.Client, messages, no_eot
) -> None:
    """OpenAI accepts top_p 0 and any 64-bit seed (both were 400s): top_p 0 samples as top_k 1 (vLLM refuses
    0; the nucleus of mass 0 is the likeliest token), seed -1 as 2^63 - 1."""
    base = {"n": 3, "max_tokens": 8, "seed": 5, "logit_bias": no_eot, "temperature": 1.5}
    top_1 = [c["message"]["content"] for c in chat(client, messages, **base, top_k=1)["choices"]]
    assert [c["message"]["content"] for c in chat(client, messages, **base, top_p=0)["choices"]] == top_1

    def texts(seed: int) -> list[str]:
        return [c["message"]["content"] for c in chat(client, messages, **{**base, "seed": seed})["choices"]]

    assert texts(-1) == texts(2**63 - 1) != texts(5)
    assert chat(client, messages, **{**base, "seed": -(2**63)})["choices"]


def test_a_temperature_under_0_01_samples_at_0_01_as_vllm(client: httpx.Client, messages, no_eot) -> None:
    """OpenAI accepts 0.001 ("almost greedy"); it was a 400. vLLM raises it to 0.01: the logits overflow below."""
    from rlaifv.service.protocol import BestOfNRequest, ChatCompletionRequest

    assert ChatCompletionRequest(model="m", messages=messages, temperature=1e-9).temperature == 0.01
    assert BestOfNRequest(question="q", sampling={"temperature": 1e-300}).sampling.temperature == 0.01
    base = {"n": 2, "max_tokens": 8, "seed": 5, "logit_bias": no_eot}
    tiny = [c["message"]["content"] for c in chat(client, messages, **base, temperature=0.001)["choices"]]
    assert tiny == [c["message"]["content"] for c in chat(client, messages, **base, temperature=0.01)["choices"]]


def test_continue_final_message_continues_the_assistant_prefill(
    client: httpx.Client, messages, no_eot, in_process_pair, red_png: bytes
) -> None:
    """vLLM's extension: the answer continues the last (assistant) message instead of starting a new turn; the
    choice holds the continuation with its leading space, so prefill + content reads as one text. It is what the
    in-process pair samples after the prompt rendered with transformers' continue_final_message."""
    from rlaifv.reward.sampling import SamplingParams

    prefill = "a red"
    turns = [*messages, {"role": "assistant", "content": prefill}]
    fields = {"max_tokens": 6, "temperature": 0, "logit_bias": no_eot, "logprobs": True}
    reply = chat(client, turns, **fields, continue_final_message=True, add_generation_prompt=False)
    content = reply["choices"][0]["message"]["content"]

    hf = [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": prefill}]},
    ]
    pair = in_process_pair
    prompt = pair.encode([red_png], messages=hf, continue_final=True)
    assert pair.tokenizer.decode(prompt.input_ids[-2:].tolist()).endswith(prefill)  # the turn is left open
    params = SamplingParams(temperature=0, max_tokens=6, logit_bias={pair.eot_id: -100.0})
    ids = pair.sample([prompt], [1], [params])[0][0].token_ids
    assert content == pair.raw_text(ids, prompt.input_ids[-4:].tolist()).rstrip()
    assert content.startswith(" ") and not (prefill + content).startswith(prefill + "  ")
    tokens = [t["token"] for t in reply["choices"][0]["logprobs"]["content"]]
    assert len(tokens) == len(ids) and "".join(tokens) == content  # its tokens, the first one's space included
    new_turn = chat(client, turns, **fields)["choices"][0]["message"]["content"]  # a new assistant turn instead
    assert not new_turn.startswith(" ")

    for bad, param in (
        ({"continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
    ):
        r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": turns, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = client.post(
        "/v1/chat/completions", json={"model": "tiny-llava", "messages": messages, "continue_final_message": True}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]", r.text
    assert "assistant turn with text" in r.json()["error"]["message"]


def test_min_p_is_vllms_extension(client: httpx.Client, messages, no_eot) -> None:
    """`min_p` (vLLM's extra parameter): 1 keeps only the likeliest token, the greedy answer at any temperature;
    0 samples as without it; the log-probs returned stay the raw policy's."""
    base = {"n": 3, "max_tokens": 8, "seed": 5, "logit_bias": no_eot, "temperature": 1.5, "logprobs": True}
    greedy = chat(client, messages, **{**base, "n": 1, "temperature": 0})["choices"][0]
    only = chat(client, messages, **base, min_p=1)["choices"]
    assert {c["message"]["content"] for c in only} == {greedy["message"]["content"]}
    # Filtered sampling, raw log-probs (min_p's own distribution would give the one token kept 0.0). Three rows
    # against one: batch-size-dependent kernels (oneDNN on AMX) differ in the last bits, so values are compared
    # to 1e-4 and the tokens exactly.
    got, want = only[0]["logprobs"]["content"], greedy["logprobs"]["content"]
    assert [t["token"] for t in got] == [t["token"] for t in want]
    assert [t["logprob"] for t in got] == pytest.approx([t["logprob"] for t in want], abs=1e-4)
    assert max(t["logprob"] for t in got) < -1e-2
    plain = [c["message"]["content"] for c in chat(client, messages, **base)["choices"]]
    assert [c["message"]["content"] for c in chat(client, messages, **base, min_p=0)["choices"]] == plain
    assert len(set(plain)) > 1
    bad = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": messages, "min_p": 1.5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_p"


def test_an_image_alone_is_a_prompt_and_nothing_at_all_is_a_400(client: httpx.Client, red_url: str) -> None:
    """OpenAI and vLLM take a user turn of one image part (a caption is asked by showing the image)."""
    image_only = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red_url}}]}]
    answer = chat(client, image_only, n=2, max_tokens=6, seed=1)
    assert len(answer["choices"]) == 2 and answer["usage"]["prompt_tokens"] > 0
    empty = [{"role": "user", "content": [{"type": "text", "text": "  "}]}]
    r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": empty})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_a_conversation_ending_with_an_assistant_turn_gets_a_new_turn(client: httpx.Client, messages) -> None:
    """As OpenAI and vLLM: the answer is a new assistant turn after the conversation, not a 400."""
    turns = [*messages, {"role": "assistant", "content": "a red circle"}]
    answer = chat(client, turns, n=2, max_tokens=6, seed=3)
    assert len(answer["choices"]) == 2
    assert answer["usage"]["prompt_tokens"] > chat(client, messages, n=1, max_tokens=1)["usage"]["prompt_tokens"]


def test_a_chat_template_that_refuses_the_messages_is_a_400_naming_them(in_process_pair, red_png: bytes) -> None:
    """Templates enforce rules of their own (Mistral's: roles must alternate); a refusal is the caller's 400."""
    from jinja2 import TemplateError
    from PIL import Image

    from rlaifv.reward.errors import InvalidInputError
    from rlaifv.reward.prompt import encode_prompt

    class Strict:
        def __init__(self, processor) -> None:
            self.processor, self.tokenizer = processor, processor.tokenizer

        def apply_chat_template(self, *args, **kwargs):
            raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    import io

    image = Image.open(io.BytesIO(red_png))
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}] * 2
    with pytest.raises(InvalidInputError, match="roles must alternate") as refused:
        encode_prompt(Strict(in_process_pair.processor), [image, image], messages=turns)
    assert refused.value.param == "messages"


# -- streaming ----------------------------------------------------------------------------------


def test_official_client_streams_the_ranked_choices(live_server, messages) -> None:
    client = openai_client(live_server)
    request: dict[str, Any] = {
        "model": "tiny-llava",
        "messages": messages,
        "n": 2,
        "max_tokens": 8,
        "seed": 9,
        "extra_body": {"best_of": 3},
    }
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.model_dump() == whole.usage.model_dump()
    assert all(chunk.usage is None for chunk in chunks[:-1])
    text: dict[int, str] = {}
    roles: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        if choice.delta.role:
            roles[choice.index] = choice.delta.role
        text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert text == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}


def test_raw_sse_stream(live_server, messages) -> None:
    body = {"model": "tiny-llava", "messages": messages, "max_tokens": 6, "seed": 1, "stream": True}
    with (
        httpx.Client(base_url=live_server.url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert len(chunks) == 3  # role, content, finish_reason
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert isinstance(chunks[2]["choices"][0]["reward"], float)
    assert all("usage" not in c for c in chunks)  # as OpenAI: the key only when stream_options asked for it


def test_stream_errors_are_json_before_the_stream(live_server, messages) -> None:
    body = {"model": "tiny-llava", "messages": messages, "stream": True, "n": 99}
    r = httpx.post(live_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"


# -- accepted, refused and unknown fields -------------------------------------------------------


def test_official_client_fields_that_are_accepted(live_server, messages) -> None:
    completion = openai_client(live_server).chat.completions.create(
        model="tiny-llava",
        messages=[{"role": "developer", "content": "Answer briefly."}, *messages],
        max_completion_tokens=4,
        seed=0,
        response_format={"type": "text"},
        metadata={"run": "parity"},
        store=False,
        user="someone",
        safety_identifier="someone-hashed",
        service_tier="auto",
        prompt_cache_key="k",
        modalities=["text"],
        tool_choice="none",
        tools=[],
        temperature=0.7,
        top_p=0.9,
    )
    assert completion.service_tier == "default"
    assert isinstance(completion.choices[0].message.content, str)


REFUSED: list[tuple[str, Any, str]] = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tools"),
    ("tool_choice", "auto", "tool_choice"),
    ("tool_choice", "required", "tool_choice"),
    ("parallel_tool_calls", False, "parallel_tool_calls"),
    ("functions", [{"name": "f"}], "functions"),
    ("function_call", "auto", "function_call"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio"),
    ("modalities", ["text", "audio"], "modalities"),
    ("prediction", {"type": "content", "content": "x"}, "prediction"),
    ("web_search_options", {}, "web_search_options"),
    ("reasoning_effort", "low", "reasoning_effort"),
    ("verbosity", "low", "verbosity"),
    ("moderation", {"model": "omni-moderation-latest"}, "moderation"),
    ("response_format", {"type": "json_object"}, "response_format.type"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, "response_format.type"),
]


@pytest.mark.parametrize(("field", "value", "param"), REFUSED, ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSED)])
def test_fields_that_cannot_be_honoured_get_400_naming_them(
    client: httpx.Client, messages, field: str, value: Any, param: str
) -> None:
    r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": messages, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["code"] in ("unsupported_parameter", "unsupported_value")
    assert "not supported" in error["message"] or "only" in error["message"]


def test_tools_the_model_must_not_call_are_accepted(live_server, messages) -> None:
    """Agent frameworks keep their tools in every request and turn calling off with tool_choice 'none' (OpenAI and
    vLLM answer in plain text); the answer is a plain message."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                "strict": True,
            },
        }
    ]
    tools.append({"type": "custom", "custom": {"name": "sql", "format": {"type": "text"}}})
    grammar = {"type": "grammar", "grammar": {"definition": "start: WORD", "syntax": "lark"}}
    tools.append({"type": "custom", "custom": {"name": "words", "format": grammar}})
    completion = openai_client(live_server).chat.completions.create(
        model="tiny-llava",
        messages=messages,
        tools=tools,  # type: ignore[arg-type]
        tool_choice="none",
        parallel_tool_calls=False,
        max_completion_tokens=4,
    )
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_official_client_sees_refusals_as_bad_request(live_server, messages) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        openai_client(live_server).chat.completions.create(
            model="tiny-llava",
            messages=messages,
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    assert info.value.body["param"] == "tools"
    assert "tool calling" in info.value.body["message"]


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"bogus": 1}, "bogus", "unknown_field"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"stop": ["a", ""]}, "stop[1]", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5", "invalid_value"),
    ({"logit_bias": {"999999": 1}}, "logit_bias.999999", "invalid_value"),
    ({"logit_bias": {"7" * 5000: 1}}, "logit_bias", "invalid_value"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    (
        {"tool_choice": "none", "tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools[0].function.name",
        "invalid_value",
    ),
    ({"tool_choice": "none", "tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0]", "invalid_value"),
    (
        {
            "tool_choice": "none",
            "tools": [
                {
                    "type": "custom",
                    "custom": {
                        "name": "g",
                        "format": {"type": "grammar", "grammar": {"definition": "x", "syntax": "peg"}},
                    },
                }
            ],
        },
        "tools[0].custom.format.grammar.syntax",
        "invalid_value",
    ),
    (
        {"tool_choice": "none", "tools": [{"type": "function", "function": {"name": "f", "bogus": 1}}]},
        "tools[0].function.bogus",
        "unknown_field",
    ),
    ({"stream": True, "stream_options": {"bogus": True}}, "stream_options.bogus", "unknown_field"),
    ({"service_tier": "fastest"}, "service_tier", "invalid_value"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
    ({"metadata": {"k": "v" * 513}}, "metadata", "invalid_value"),
    ({"seed": 2**63}, "seed", "invalid_value"),
    ({"top_p": -0.1}, "top_p", "invalid_value"),
]


@pytest.mark.parametrize(("fields", "param", "code"), BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_values_get_400_naming_the_field(
    client: httpx.Client, messages, fields: dict[str, Any], param: str, code: str
) -> None:
    r = client.post(
        "/v1/chat/completions", json={"model": "tiny-llava", "messages": messages, "max_tokens": 2, **fields}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["code"] == code


def test_content_part_fields_of_the_official_client_are_accepted(client: httpx.Client, red_url: str) -> None:
    """`detail: "original"` and per-part `prompt_cache_breakpoint` (hints, like the request's prompt_cache_*)."""
    breakpoint_ = {"prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}}
    content = [
        {"type": "image_url", "image_url": {"url": red_url, "detail": "original"}, **breakpoint_},
        {"type": "text", "text": QUESTION, **breakpoint_},
    ]
    chat(client, [{"role": "user", "content": content}], max_tokens=2)


MESSAGE_REFUSED: list[tuple[str, Any]] = [
    ("tool_calls", [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
    ("function_call", {"name": "f", "arguments": "{}"}),
    ("audio", {"id": "audio-1"}),
]


@pytest.mark.parametrize("content", ["a dot", None], ids=["with-content", "null-content"])
@pytest.mark.parametrize(("field", "value"), MESSAGE_REFUSED, ids=[r[0] for r in MESSAGE_REFUSED])
def test_assistant_turns_asking_for_tools_or_audio_get_400_naming_them(
    client: httpx.Client, messages, field: str, value: Any, content: str | None
) -> None:
    """Null or empty, these fields of a reply sent back are accepted; else refused, not ignored, and named: OpenAI's
    tool-call turn has `content: null` (that was blamed on `content`)."""
    turns = [*messages, {"role": "assistant", "content": content, field: value}, {"role": "user", "content": "why?"}]
    r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": turns, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (f"messages[1].{field}", "unsupported_parameter")
    assert "not supported" in error["message"]


@pytest.mark.parametrize("role", ["tool", "function"])
def test_a_tool_result_message_is_refused_as_unsupported_naming_its_role(
    client: httpx.Client, messages, role: str
) -> None:
    """A replayed tool-calling conversation got pydantic's "Input should be 'system', ..." and `tool_call_id`
    called an unknown field (OpenAI has it): the refusal now says why, as the request's `tools` does."""
    turns = [*messages, {"role": "assistant", "content": "a dot"}, {"role": role, "tool_call_id": "c1", "content": "1"}]
    r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": turns, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("messages[2].role", "unsupported_value"), error
    assert "tool calling" in error["message"] and "errors" not in error


def test_stream_deltas_carry_only_their_own_keys(live_server, messages) -> None:
    """As OpenAI and vLLM stream: no `"content": null` (a client reading `delta.get("content", "")` would get
    None), the last delta of a choice is `{}`, and the `reward` extension comes on that chunk only."""
    body = {"model": "tiny-llava", "messages": messages, "max_tokens": 4, "seed": 1, "n": 2, "stream": True}
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        text = client.post("/v1/chat/completions", json=body).text
    chunks = [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e and e != "data: [DONE]"]
    for index in (0, 1):
        role, content, last = (c["choices"][0] for c in chunks if c["choices"][0]["index"] == index)
        assert role["delta"] == {"role": "assistant", "content": "", "refusal": None}
        assert set(content["delta"]) == {"content"} and isinstance(content["delta"]["content"], str)
        assert last["delta"] == {} and last["finish_reason"] in ("stop", "length")
        assert "reward" not in role and "reward" not in content and isinstance(last["reward"], float)
        assert role["finish_reason"] is None and content["finish_reason"] is None  # OpenAI sends the null


def test_context_overflow_has_openais_code_and_langchain_sees_it(live_server, in_process_pair, red_url: str) -> None:
    """A prompt over the model's positions, or a max_tokens that does not fit after it: 400 with OpenAI's
    `context_length_exceeded`; LangChain turns a prompt that is too long into its ContextOverflowError (what agents
    trim and retry on: it reads the code in older `openai` clients, the words "prompt is too long" in newer ones)."""
    import openai
    from langchain_core.exceptions import ContextOverflowError
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    limit = in_process_pair.max_positions
    too_long = [{"role": "user", "content": "red " * (limit + 10)}]
    near = [{"role": "user", "content": "red " * (limit - 8)}]
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        for messages, fields, param in ((too_long, {}, "messages"), (near, {"max_tokens": 16}, "max_tokens")):
            r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": messages, **fields})
            assert r.status_code == 400, r.text
            assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("context_length_exceeded", param)
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(live_server).chat.completions.create(model="tiny-llava", messages=too_long)
    assert info.value.code == "context_length_exceeded"
    chat = ChatOpenAI(base_url=live_server.url + "/v1", api_key="unused", model="tiny-llava", max_retries=0)
    with pytest.raises(ContextOverflowError):
        chat.invoke([HumanMessage(content="red " * (limit + 10))])


def test_best_of_n_and_rewards_continue_a_prefill_as_the_chat_does(
    client: httpx.Client, messages, no_eot, red_url: str
) -> None:
    """`continue_final_message` on /v1/best-of-n and /v1/rewards: the same continuation as the chat's, and the
    reward of that text continuing the prefill is the chat's (a new turn scores it otherwise); it needs messages."""
    turns = [*messages, {"role": "assistant", "content": "a red"}]
    fields = {"max_tokens": 8, "temperature": 0, "logit_bias": no_eot, "continue_final_message": True}
    full = chat(client, turns, **fields, add_generation_prompt=False)["choices"][0]["message"]["content"]
    last = full.rstrip().rsplit(" ", 1)[-1]  # cut before the last word: a finished turn, as /v1/rewards scores one
    reply = chat(client, turns, **fields, add_generation_prompt=False, stop=[" " + last])["choices"][0]
    text = reply["message"]["content"]
    assert reply["finish_reason"] == "stop" and text.strip() and full.startswith(text)
    sampling = {"temperature": 0, "max_tokens": 6}
    bon = client.post(
        "/v1/best-of-n",
        json={"messages": turns, "continue_final_message": True, "n": 1, "sampling": sampling},
    )
    assert bon.status_code == 200, bon.text
    assert full.startswith(bon.json()["best"]["text"])  # greedy: the chat's continuation up to its end of turn
    scored = client.post("/v1/rewards", json={"messages": turns, "continue_final_message": True, "answers": [text]})
    assert scored.status_code == 200, scored.text
    assert scored.json()["rewards"][0] == pytest.approx(reply["reward"], abs=1e-5)
    plain = client.post("/v1/rewards", json={"messages": turns, "answers": [text]})  # a new turn after the prefill
    assert plain.json()["rewards"][0] != pytest.approx(reply["reward"], abs=1e-5)
    bad = client.post(
        "/v1/rewards",
        json={"images": [red_url], "question": QUESTION, "continue_final_message": True, "answers": ["x"]},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"


def test_a_refusal_sent_back_with_null_content_is_the_assistants_turn(client: httpx.Client, messages) -> None:
    turns = [*messages, {"role": "assistant", "content": None, "refusal": "I can't help with that."},
             {"role": "user", "content": "What colour is it?"}]  # fmt: skip
    r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": turns, "max_tokens": 2})
    assert r.status_code == 200, r.text
    for turn, param in (({"role": "user", "content": None}, "messages[1].content"),
                        ({"role": "assistant", "content": None}, "messages[1].content")):  # fmt: skip
        r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": [*messages, turn]})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert r.json()["error"]["code"] == "missing_field"


def test_a_refusal_content_part_is_the_assistants_text(client: httpx.Client, messages) -> None:
    """OpenAI's assistant messages may hold `{"type": "refusal"}` parts; they were refused as an unknown tag."""
    said = "I can't help with that."
    as_part = [*messages, {"role": "assistant", "content": [{"type": "refusal", "refusal": said}]},
               {"role": "user", "content": "What colour is it?"}]  # fmt: skip
    as_field = [*as_part[:-2], {"role": "assistant", "content": None, "refusal": said}, as_part[-1]]
    rewards = [
        client.post("/v1/rewards", json={"messages": turns, "answers": ["red."]}).json()["rewards"][0]
        for turns in (as_part, as_field)
    ]
    assert rewards[0] == rewards[1]
    r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": as_part, "max_tokens": 2})
    assert r.status_code == 200, r.text
    user_refusal = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "refusal", "refusal": "no"}]}]
    r = client.post("/v1/chat/completions", json={"model": "tiny-llava", "messages": user_refusal})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1]", r.text


def test_tool_choice_other_than_none_is_named_even_with_tools(client: httpx.Client, messages) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    for choice in ("auto", "required", {"type": "function", "function": {"name": "f"}}):
        body = {"model": "tiny-llava", "messages": messages, "tools": tools, "tool_choice": choice}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
