"""Every SDK method, sync and async, against the real server (tiny random-weight model); images given every way."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from rlaifv_client import (
    AsyncClient,
    AuthenticationError,
    BestOfN,
    Client,
    ImageInputError,
    InvalidRequestError,
    ModelList,
    NotFoundError,
    Rewards,
)

from .conftest import API_KEY, QUESTION

pytestmark = pytest.mark.integration

ANSWERS = ["a red square.", "a blue dog on a skateboard."]


@pytest.fixture(scope="module")
def baseline(server: Any, red_png: bytes) -> Rewards:
    """The rewards of ANSWERS for the red PNG, sent as raw bytes: every other image form must give the same."""
    with Client(base_url=server.url, api_key=API_KEY) as client:
        return client.score(image=red_png, question=QUESTION, answers=ANSWERS)


def check_best_of_n(result: BestOfN, n: int) -> None:
    assert isinstance(result, BestOfN) and result.object == "best_of_n"
    assert len(result.candidates) == n == len(result.rewards)
    assert [c.index for c in result.candidates] == list(range(n))
    best = max(range(n), key=lambda k: (result.rewards[k], -k))
    assert result.best_index == best and result.best == result.candidates[best] and result.text == result.best.text
    assert all(c.finish_reason in ("stop", "length") for c in result.candidates)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.request_id


# -- sync -----------------------------------------------------------------------------


def test_score_with_each_image_form(client: Client, image_input: Any, baseline: Rewards) -> None:
    result = client.score(image=image_input, question=QUESTION, answers=ANSWERS)
    assert isinstance(result, Rewards) and len(result.rewards) == 2
    assert result.rewards == pytest.approx(baseline.rewards, abs=1e-5)
    assert result.best is result.candidates[result.best_index]
    assert [c.text for c in result.candidates] == ANSWERS and {c.finish_reason for c in result.candidates} == {"given"}


def test_best_of_n(client: Client, red_png: bytes) -> None:
    result = client.best_of_n(image=red_png, question=QUESTION, n=3, max_tokens=6, seed=7, temperature=1.0, top_k=50)
    check_best_of_n(result, 3)
    again = client.best_of_n(image=red_png, question=QUESTION, n=3, max_tokens=6, seed=7, temperature=1.0, top_k=50)
    assert [c.text for c in again.candidates] == [c.text for c in result.candidates]  # seeded


def test_best_of_n_with_messages_and_reward_options(client: Client, red_png: bytes) -> None:
    from rlaifv_client import data_url

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": QUESTION},
                {"type": "image_url", "image_url": {"url": data_url(red_png)}},
            ],
        }
    ]
    result = client.best_of_n(messages=messages, n=2, max_tokens=4, seed=1, beta=0.5, normalize="sum")
    check_best_of_n(result, 2)
    assert (result.reward.beta, result.reward.normalize) == (0.5, "sum")


def test_claims_mode_reports_verdicts_and_the_implicit_reward(client: Client, red_png: bytes) -> None:
    result = client.score(
        image=red_png, question=QUESTION, answers=["a red circle.", "a cat and a dog."], mode="claims"
    )
    assert result.reward.mode == "claims" and result.reward.claim_score == "count"
    for candidate in result.candidates:
        assert candidate.claims is not None and len(candidate.claims) >= 1
        rejected = sum(not c.accepted for c in candidate.claims) + sum(c.repeated for c in candidate.claims)
        assert candidate.reward == -rejected
    plain = client.score(image=red_png, question=QUESTION, answers=["a red circle.", "a cat and a dog."])
    assert [c.implicit_reward for c in result.candidates] == pytest.approx(plain.rewards, abs=1e-6)
    assert all(c.claims is None for c in plain.candidates)


def test_models_health_ready(client: Client) -> None:
    models = client.models()
    assert isinstance(models, ModelList) and len(models) == 1
    (model,) = list(models)
    assert model.id and model.reward.mode == "dpo" and model.reward.beta > 0
    assert client.health().ok
    ready = client.ready()
    assert ready.ok and ready.checks["model"] == "ok"


def test_model_name_roundtrip_and_unknown_model(client: Client, red_png: bytes) -> None:
    name = client.models().data[0].id
    assert client.score(image=red_png, question=QUESTION, answers=["a"], model=name).model == name
    with pytest.raises(NotFoundError) as info:
        client.score(image=red_png, question=QUESTION, answers=["a"], model="no-such-model")
    assert info.value.param == "model" and info.value.code == "model_not_found"


def test_request_id_is_ours_and_reported(server: Any, red_png: bytes) -> None:
    sent: list[str] = []
    hooks = {"request": [lambda r: sent.append(r.headers["x-request-id"])]}
    with Client(base_url=server.url, api_key=API_KEY, http_client=httpx.Client(event_hooks=hooks)) as client:
        result = client.score(image=red_png, question=QUESTION, answers=["a"])
    assert sent == [result.request_id]


# -- errors from the real server ------------------------------------------------------


def test_missing_and_wrong_api_keys(server: Any, red_png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLAIFV_API_KEY", raising=False)
    with Client(base_url=server.url) as anonymous:
        assert anonymous.health().ok  # health needs no key
        with pytest.raises(AuthenticationError) as info:
            anonymous.models()
    assert info.value.status_code == 401 and info.value.code == "missing_api_key" and info.value.request_id
    with Client(base_url=server.url, api_key="sk-wrong-key-000000") as wrong, pytest.raises(AuthenticationError) as bad:
        wrong.score(image=red_png, question=QUESTION, answers=["a"])
    assert bad.value.status_code == 401 and bad.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"n": 100}, "n", "invalid_value"),
        ({"n": 0}, "n", "invalid_value"),
        ({"max_tokens": 10_000}, "sampling.max_tokens", "invalid_value"),
        ({"top_p": 0.0}, "sampling.top_p", "invalid_value"),
        ({"image": b"definitely not an image"}, "images[0]", "invalid_image"),
        ({"question": "   "}, "question", "invalid_value"),
    ],
)
def test_bad_input_names_the_field(client: Client, red_png: bytes, kwargs: dict, param: str, code: str) -> None:
    args: dict[str, Any] = {"image": red_png, "question": QUESTION, "n": 2, "max_tokens": 4} | kwargs
    with pytest.raises(InvalidRequestError) as info:
        client.best_of_n(**args)
    err = info.value
    assert err.status_code == 400 and err.param == param and err.code == code, err
    assert err.field_errors[0].param == param


def test_every_problem_of_a_request_comes_back_at_once(client: Client, red_png: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.best_of_n(image=red_png, question=QUESTION, n=0, temperature=-1, top_p=0.0)
    err = info.value
    assert [f.param for f in err.field_errors] == ["n", "sampling.temperature", "sampling.top_p"], err.body
    assert err.param == "n" and "(and 2 more problems)" in err.message
    assert all(f.code == "invalid_value" and f.message for f in err.field_errors)


def test_image_errors_are_raised_before_sending(client: Client) -> None:
    with pytest.raises(ImageInputError, match="not found"):
        client.score(image="/no/such/file.png", question=QUESTION, answers=["a"])


# -- async ----------------------------------------------------------------------------


async def test_async_best_of_n_with_each_image_form(async_client: AsyncClient, image_input: Any) -> None:
    result = await async_client.best_of_n(image=image_input, question=QUESTION, n=2, max_tokens=4, seed=3)
    check_best_of_n(result, 2)


async def test_async_score_models_health_ready(async_client: AsyncClient, red_png: bytes, baseline: Rewards) -> None:
    result = await async_client.score(images=[red_png], question=QUESTION, answers=ANSWERS)
    assert result.rewards == pytest.approx(baseline.rewards, abs=1e-5)
    models = await async_client.models()
    assert models.data[0].id == result.model
    assert (await async_client.health()).ok and (await async_client.ready()).ok


async def test_async_errors(server: Any, red_png: bytes) -> None:
    async with AsyncClient(base_url=server.url, api_key="sk-wrong-key-000000") as wrong:
        with pytest.raises(AuthenticationError):
            await wrong.models()
        ok = wrong.with_options(api_key=API_KEY)
        with pytest.raises(InvalidRequestError) as info:
            await ok.best_of_n(image=red_png, question=QUESTION, n=100)
        assert info.value.param == "n"


def test_jobs_on_a_server_without_redis_fail_once_with_501(client: Client, red_png: bytes) -> None:
    """501 means 'not enabled here': the SDK raises at once instead of retrying as it would a 503."""
    from rlaifv_client import ServerError

    with pytest.raises(ServerError) as info:
        client.jobs.submit([{"image": red_png, "question": QUESTION, "answers": ANSWERS}], kind="rewards")
    assert info.value.status_code == 501 and info.value.code == "jobs_not_enabled"


def test_claim_score_expected_ranks_by_the_sum_of_p_no(client: Client, red_png: bytes) -> None:
    result = client.score(
        image=red_png,
        question=QUESTION,
        answers=["a red circle.", "a cat and a dog."],
        mode="claims",
        claim_score="expected",
    )
    assert result.reward.claim_score == "expected"
    for candidate in result.candidates:
        assert candidate.claims
        expected = sum(1 - c.p_yes for c in candidate.claims) + sum(c.repeated for c in candidate.claims)
        assert candidate.reward == pytest.approx(-expected)
