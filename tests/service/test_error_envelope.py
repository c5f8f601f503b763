"""Validation errors as the client's problems: paths through the request itself, union members sorted out, and the
envelope's list of every problem."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlaifv.service.errors import error_body
from rlaifv.service.protocol import ChatCompletionRequest
from rlaifv.service.validation_errors import MAX_LISTED_PROBLEMS, FieldProblem, field_problems, summary


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


def problems(data: Any, prefix: str = "", *, walk: bool = True) -> list[tuple[str | None, str | None, str]]:
    with pytest.raises(ValidationError) as info:
        Body.model_validate(data)
    found = field_problems(info.value.errors(), data, prefix) if walk else field_problems(info.value.errors())
    return [(p.param, p.code, p.message) for p in found]


def test_paths_codes_and_messages() -> None:
    found = problems({"n": 0, "parts": [{"type": "text", "text": "a"}, {"type": "text", "text": 3, "x": 1}], "y": 2})
    assert [(param, code) for param, code, _ in found] == [
        ("n", "invalid_value"),
        ("parts[1].text", "invalid_value"),
        ("parts[1].x", "unknown_field"),
        ("y", "unknown_field"),
    ]
    assert found[0][2].startswith("n: ") and found[3][2] == "unknown field 'y'"
    assert problems({}) == [("n", "missing_field", "field 'n' is required")]


def test_union_labels_and_tags_are_not_fields() -> None:
    """Pydantic's loc for parts[0] here is (parts, 0, picture, picture, x): the tag, then the field."""
    assert [p[:2] for p in problems({"n": 1, "parts": [{"type": "picture", "picture": {"x": "no"}}]})] == [
        ("parts[0].picture.x", "invalid_value")
    ]
    assert [p[:2] for p in problems({"n": 1, "parts": [{"type": "picture"}]})] == [
        ("parts[0].picture", "missing_field")
    ]
    # Without the input to walk, the schema's labels stay (what the envelope said before).
    assert problems({"n": 1, "parts": [{"type": "picture"}]}, walk=False)[0][0] == "parts[0].picture.picture"


def test_union_members_the_input_was_not_of_are_dropped_or_merged() -> None:
    deeper = problems({"n": 1, "stop": ["a", 5]})
    assert deeper == [("stop[1]", "invalid_value", "stop[1]: Input should be a valid string")]
    neither = problems({"n": 1, "stop": 5})
    assert neither == [("stop", "invalid_value", "stop: Input should be a valid string or a valid list")]


def test_a_prefix_places_problems_inside_a_bigger_body() -> None:
    found = problems({"n": 1, "parts": [{"type": "text", "text": 1}]}, prefix="items[3].body")
    assert [p[0] for p in found] == ["items[3].body.parts[0].text"]
    assert found[0][2].startswith("items[3].body.parts[0].text: ")
    invalid_json = field_problems([{"type": "json_invalid", "loc": ("body", 7), "ctx": {"error": "x"}}], None)
    assert [(p.param, p.code) for p in invalid_json] == [(None, "invalid_json")]


def test_the_chat_request_blames_the_part_not_the_string_form() -> None:
    bad_url = {"type": "image_url", "image_url": {"url": 5}}
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, bad_url]}]}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    found = field_problems(info.value.errors(), body)
    assert [(p.param, p.code) for p in found] == [("messages[0].content[1].image_url.url", "invalid_value")]


def test_the_envelope_lists_problems_only_when_there_are_several() -> None:
    one = [FieldProblem(message="n: bad", param="n", code="invalid_value")]
    assert set(error_body("invalid_request_error", summary(one), "n", "invalid_value", one)["error"]) == {
        "message", "type", "param", "code",
    }  # fmt: skip
    many = [FieldProblem(message=f"f{i}: bad", param=f"f{i}") for i in range(MAX_LISTED_PROBLEMS + 5)]
    error = error_body("invalid_request_error", summary(many), "f0", None, many)["error"]
    assert len(error["errors"]) == MAX_LISTED_PROBLEMS and error["errors"][1] == {
        "message": "f1: bad", "param": "f1", "code": None,
    }  # fmt: skip
    assert error["message"] == f"f0: bad (and {MAX_LISTED_PROBLEMS + 4} more problems)"
    assert summary(many[:2]).endswith("(and 1 more problem)")
