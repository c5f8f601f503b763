"""Validation errors as the client's problems: paths through the request itself, union members sorted out, bounds,
and the envelope's list of every problem."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlaifv.service.errors import error_body
from rlaifv.service.jobs import REQUEST_MODELS
from rlaifv.service.protocol import ChatCompletionRequest, JobItem, JobRequest
from rlaifv.service.validation_errors import MAX_LISTED_PROBLEMS, TAG_KEYS, FieldProblem, Problems, field_problems


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Text(Strict):
    type: Literal["text"]
    text: str


class Picture(Strict):
    type: Literal["picture"]
    picture: dict[str, int]


class Body(Strict):
    n: int = Field(ge=1)
    parts: list[Annotated[Text | Picture, Field(discriminator="type")]] = []
    stop: str | list[str] | None = None
    query: int = 0


def problems(data: Any, prefix: str = "", model: type[BaseModel] = Body, **kwargs: Any) -> Problems:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return field_problems(info.value.errors(), data, prefix, **kwargs)


def params(data: Any, prefix: str = "", model: type[BaseModel] = Body) -> list[tuple[str | None, str | None]]:
    return [(p.param, p.code) for p in problems(data, prefix, model).listed]


def test_paths_codes_and_messages() -> None:
    found = problems({"n": 0, "parts": [{"type": "text", "text": "a"}, {"type": "text", "text": 3, "x": 1}], "y": 2})
    assert [(p.param, p.code) for p in found.listed] == [
        ("n", "invalid_value"),
        ("parts[1].text", "invalid_value"),
        ("parts[1].x", "unknown_field"),
        ("y", "unknown_field"),
    ]
    assert found.listed[0].message.startswith("n: ") and found.listed[3].message == "unknown field 'y'"
    assert found.message == found.listed[0].message + " (and 3 more problems)"
    assert [(p.param, p.message) for p in problems({}).listed] == [("n", "field 'n' is required")]
    assert [p.message for p in problems([1, 2]).listed] == [
        "request body must be a JSON object, sent as Content-Type: application/json"
    ]


def test_union_labels_and_tags_are_not_fields() -> None:
    """Pydantic's loc for a part is (parts, 0, <tag>, <field>, ...); the tag may equal the field's name."""
    assert params({"n": 1, "parts": [{"type": "picture", "picture": {"x": "no"}}]}) == [
        ("parts[0].picture.x", "invalid_value")
    ]
    assert params({"n": 1, "parts": [{"type": "picture"}]}) == [("parts[0].picture", "missing_field")]
    # the same name one level down is a real key, not a tag
    assert params({"n": 1, "parts": [{"type": "picture", "picture": {"picture": "no"}}]}) == [
        ("parts[0].picture.picture", "invalid_value")
    ]
    assert params({"n": 1, "parts": [{"type": "text", "text": {"text": 1}}]}) == [("parts[0].text", "invalid_value")]
    # without the input to walk, the schema's labels stay (what the envelope said before)
    with pytest.raises(ValidationError) as info:
        Body.model_validate({"n": 1, "parts": [{"type": "picture"}]})
    assert field_problems(info.value.errors()).listed[0].param == "parts[0].picture.picture"


def test_the_chat_request_blames_the_part_not_the_string_form() -> None:
    def chat(*parts: dict[str, Any]) -> dict[str, Any]:
        return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}

    text = {"type": "text", "text": "q"}
    assert params(chat(text, {"type": "image_url", "image_url": {"url": 5}}), model=ChatCompletionRequest) == [
        ("messages[0].content[1].image_url.url", "invalid_value")
    ]
    both = chat({"type": "image_url", "image_url": {"url": "x", "text": 1}, "text": "hi"})
    assert params(both, model=ChatCompletionRequest) == [
        ("messages[0].content[0].image_url.text", "unknown_field"),
        ("messages[0].content[0].text", "unknown_field"),
    ]
    assert params(chat(text) | {"logit_bias": {"50256": "x"}}, model=ChatCompletionRequest) == [
        ("logit_bias.50256", "invalid_value")  # a digit key is a key (as `token_bias` names it), not an index
    ]


def test_union_members_the_input_was_not_of_are_dropped_or_merged() -> None:
    assert [(p.param, p.message) for p in problems({"n": 1, "stop": ["a", 5]}).listed] == [
        ("stop[1]", "stop[1]: Input should be a valid string")
    ]
    assert [(p.param, p.message) for p in problems({"n": 1, "stop": 5}).listed] == [
        ("stop", "stop: Input should be a valid string or a valid list")
    ]


def test_request_parts_are_stripped_only_from_fastapi_errors() -> None:
    """`body`, `query`... lead FastAPI's locs; in a plain model they are field names (a job item's `body`)."""
    assert params({"n": 1, "query": "x"}) == [("query", "invalid_value")]
    assert params({"custom_id": "a", "body": [1]}, "items[0]", JobItem) == [("items[0].body", "invalid_value")]
    http = [{"type": "int_parsing", "loc": ("body", "n"), "msg": "bad"}, {"type": "missing", "loc": ("query", "k")}]
    assert [p.param for p in field_problems(http, {"n": "x"}, http=True).listed] == ["n", "k"]


def test_a_prefix_places_problems_inside_a_bigger_body() -> None:
    found = problems({"n": 1, "parts": [{"type": "text", "text": 1}]}, prefix="items[3].body")
    assert [p.param for p in found.listed] == ["items[3].body.parts[0].text"]
    assert found.listed[0].message.startswith("items[3].body.parts[0].text: ")
    invalid_json = field_problems([{"type": "json_invalid", "loc": ("body", 7), "ctx": {"error": "x"}}], None)
    assert [(p.param, p.code) for p in invalid_json.listed] == [(None, "invalid_json")]


def test_problems_are_bounded() -> None:
    many = problems({"n": 1, "parts": [{"type": "text", "text": i} for i in range(1000)]})
    assert len(many.listed) == MAX_LISTED_PROBLEMS and many.unlisted == 1000 - MAX_LISTED_PROBLEMS
    assert many.message.endswith(f"(and 999 more problems; the first {MAX_LISTED_PROBLEMS} are listed)")
    long_key = problems({"n": 1, "k" * 5000: 1}).listed[0]
    assert long_key.param is not None and len(long_key.param) <= 200
    assert params({"n": 1, "": 1}) == [("['']", "unknown_field")]
    summed = Problems(many.listed[:30]) + Problems(many.listed[:30], 5)
    assert len(summed.listed) == MAX_LISTED_PROBLEMS and summed.unlisted == 15


def test_the_tag_keys_cover_every_discriminator_of_the_api() -> None:
    def discriminators(schema: Any) -> set[str]:
        found: set[str] = set()
        if isinstance(schema, dict):
            if schema.get("type") == "tagged-union":
                found.add(str(schema["discriminator"]))
            for value in schema.values():
                found |= discriminators(value)
        elif isinstance(schema, list):
            for value in schema:
                found |= discriminators(value)
        return found

    models = [ChatCompletionRequest, JobRequest, JobItem, *REQUEST_MODELS.values()]
    used = set().union(*(discriminators(m.__pydantic_core_schema__) for m in models))
    assert used and used <= set(TAG_KEYS)


def test_the_envelope_lists_problems_only_when_there_are_several() -> None:
    one = [FieldProblem(message="n: bad", param="n", code="invalid_value")]
    assert set(error_body("invalid_request_error", "n: bad", "n", "invalid_value", one)["error"]) == {
        "message", "type", "param", "code",
    }  # fmt: skip
    many = [FieldProblem(message=f"f{i}: bad", param=f"f{i}") for i in range(3)]
    error = error_body("invalid_request_error", Problems(many).message, "f0", None, many)["error"]
    assert error["errors"][1] == {"message": "f1: bad", "param": "f1", "code": None}
    assert error["message"] == "f0: bad (and 2 more problems)"
    assert Problems(many[:2]).message.endswith("(and 1 more problem)")


def test_checks_run_to_the_end_and_raise_one_400() -> None:
    from rlaifv.service.errors import BadRequest, Checks, NotFound

    checks = Checks()
    with checks.one():
        raise BadRequest("n must be <= 8, got 9", param="n")
    with checks.one():
        pass
    checks.add(BadRequest("'tools' is not supported", param="tools", code="unsupported_parameter"))
    with pytest.raises(BadRequest) as info:
        checks.done()
    assert (info.value.param, info.value.code) == ("n", "invalid_value")
    assert info.value.message == "n must be <= 8, got 9 (and 1 more problem)"
    listed = [(e.param, e.code) for e in info.value.errors or []]
    assert listed == [("n", "invalid_value"), ("tools", "unsupported_parameter")]

    alone = Checks()
    only = BadRequest("x", param="x", code="unsupported_value")
    with alone.one():
        raise only
    with pytest.raises(BadRequest) as single:
        alone.done()
    assert single.value is only  # one problem: the very exception, its code and headers kept
    Checks().done()  # nothing found: nothing raised
    with pytest.raises(NotFound), Checks().one():  # anything but a 400 stops the request at once
        raise NotFound("no such model", param="model")


def test_job_labels_with_a_lone_surrogate_are_refused_but_items_are_left_to_their_own_checks() -> None:
    """A job's metadata is echoed by every GET: refused up front. An item is validated as its own request, so
    one bad item is stored as that item's problem and the job's other items still run."""
    assert params({"kind": "rewards", "items": [{"q": 1}], "metadata": {"run": "\ud800"}}, model=JobRequest) == [
        ("metadata.run", "invalid_value")
    ]
    assert params({"kind": "rewards", "items": [{"q": 1}], "metadata": {"r\ud800": "1"}}, model=JobRequest) == [
        ("metadata", "invalid_value")  # a bad key: named by the object holding it, never echoed
    ]
    JobRequest.model_validate({"kind": "rewards", "items": [{"question": "\ud800"}]})


def test_an_echoed_lone_surrogate_cannot_break_the_error_response() -> None:
    import json

    body = error_body("not_found_error", "model 'x\ud800' does not exist", "model\udfff", "model_not_found")
    json.dumps(body, ensure_ascii=False).encode("utf-8")  # what JSONResponse does; raises on a lone surrogate
    assert body["error"]["message"] == "model 'x\\ud800' does not exist"
    assert body["error"]["param"] == "model\\udfff"


async def test_an_unexpected_error_is_answered_in_the_envelope_without_re_raising() -> None:
    """Starlette's outermost handler re-raises after its 500, and uvicorn then drops the keep-alive connection
    (the client's next request on it fails). The request middleware answers instead: nothing re-raises."""
    import httpx

    from rlaifv.service.app import create_app
    from rlaifv.service.settings import Settings

    app = create_app(Settings(bundle="unused"))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)  # a re-raise would fail this test
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {
        "error": {"message": "internal server error", "type": "internal_error", "param": None, "code": "internal_error"}
    }
    assert response.headers["x-request-id"]
