"""The official `openai` client pointed at the server."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_openai_client_chat_with_image_n_and_best_of(live_server, red_url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    assert client.models.retrieve(model).id == model
    completion = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in the image?"},
                    {"type": "image_url", "image_url": {"url": red_url}},
                ],
            }
        ],
        n=2,
        max_tokens=8,
        seed=5,
        extra_body={"best_of": 4},
    )
    assert completion.object == "chat.completion"
    assert len(completion.choices) == 2
    rewards = [choice.model_extra["reward"] for choice in completion.choices]
    assert rewards == sorted(rewards, reverse=True)
    all_rewards = completion.model_extra["rewards"]
    assert len(all_rewards) == 4 and completion.model_extra["best_of"] == 4
    assert rewards == sorted(all_rewards, reverse=True)[:2]
    assert all(isinstance(choice.message.content, str) for choice in completion.choices)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_openai_client_sees_errors_as_typed_exceptions(live_server) -> None:
    import openai

    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny-llava", messages=[{"role": "user", "content": "hi"}], n=3, extra_body={"best_of": 2}
        )
    assert info.value.body["param"] == "best_of"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("openai/gpt-4o")
    assert missing.value.body["code"] == "model_not_found"


def test_langchain_chat_openai_gets_an_answer(live_server, red_url: str) -> None:
    """LangChain's `ChatOpenAI` (what many applications already use) against the server, image included."""
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    model = _model_id(live_server.url)
    chat = ChatOpenAI(base_url=live_server.url + "/v1", api_key="unused", model=model, max_retries=0, max_tokens=8)
    message = HumanMessage(
        content=[
            {"type": "text", "text": "What is in the image?"},
            {"type": "image_url", "image_url": {"url": red_url}},
        ]
    )
    reply = chat.invoke([message], seed=3)
    assert isinstance(reply.content, str)  # a random-weight model may end its turn at once
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(str(chunk.content) for chunk in chat.stream([message], seed=3))
    assert streamed == reply.content  # the same seed gives the same best answer, streamed or not


def _model_id(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def test_openai_client_sends_a_reply_back_in_the_next_turn(live_server, red_url: str) -> None:
    """The SDK's multi-turn pattern: the reply's `message` appended as it came (its refusal, annotations,
    tool_calls, function_call and audio included, as null), whether as the object or its `model_dump()`."""
    from openai import OpenAI

    client = OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)
    content = [{"type": "text", "text": "What is in the image?"}, {"type": "image_url", "image_url": {"url": red_url}}]
    asked = [{"role": "user", "content": content}]
    first = client.chat.completions.create(model="tiny-llava", messages=asked, max_tokens=4, seed=1)
    reply = first.choices[0].message
    for sent_back in (reply, reply.model_dump()):
        follow_up = [*asked, sent_back, {"role": "user", "content": "And its colour?"}]
        second = client.chat.completions.create(model="tiny-llava", messages=follow_up, max_tokens=4, seed=1)
        assert isinstance(second.choices[0].message.content, str)
