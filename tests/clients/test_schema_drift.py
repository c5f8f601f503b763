"""The SDK's models against the server app's OpenAPI schema: a field added, removed, renamed, retyped or made
(not) required on either side fails here. Request bodies the SDK builds must use only fields the server declares."""

from __future__ import annotations

import typing
from typing import Any

import pydantic
import pytest

from rlaifv_client import types
from rlaifv_client._base_client import best_of_n_body, job_body, score_body

# SDK model -> the server's component schema. Every model in `types` must be listed.
SCHEMAS: dict[type[pydantic.BaseModel], str] = {
    types.Usage: "Usage",
    types.RewardInfo: "RewardInfo",
    types.Timings: "Timings",
    types.Candidate: "CandidateOut",
    types.ClaimCheck: "ClaimCheck",
    types.BestOfN: "BestOfNResponse",
    types.GeneratorInfo: "GeneratorInfo",
    types.Rewards: "RewardsResponse",
    types.ImageLimits: "ImageLimitsInfo",
    types.Model: "ModelCard",
    types.ModelList: "ModelList",
    types.Health: "Health",
    types.ErrorDetail: "ErrorDetail",
    types.FieldProblem: "FieldProblem",
    types.Job: "Job",
    types.JobList: "JobList",
    types.JobResult: "JobItemResult",
    types.JobResultList: "JobResults",
}
NAME_OF = {cls.__name__: name for cls, name in SCHEMAS.items()}


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    """The server's schema as the app declares it: no model, no server needed."""
    from rlaifv.service.app import create_app
    from rlaifv.service.settings import Settings

    return create_app(Settings()).openapi()["components"]["schemas"]


def _component(components: dict[str, Any], name: str) -> dict[str, Any] | None:
    return components.get(name) or components.get(f"{name}-Output")


def shape(schema: dict[str, Any], rename: dict[str, str]) -> Any:
    """A comparable summary of a property schema: types, enums/consts, items, refs (by server name)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1].removesuffix("-Output")
        return ("ref", rename.get(name, name))
    for key in ("anyOf", "oneOf"):
        if key in schema:  # `BaseType` in a union is the SDK's fallback for a kind newer than itself
            return ("union", frozenset(shape(s, rename) for s in schema[key]) - {("ref", "BaseType")})
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return shape(schema["allOf"][0], rename)
    if "const" in schema:
        return ("enum", frozenset([schema["const"]]))
    if "enum" in schema:
        return ("enum", frozenset(schema["enum"]))
    kind = schema.get("type")
    if kind == "array":
        return ("array", shape(schema.get("items", {}), rename))
    if kind == "object":
        extra = schema.get("additionalProperties")
        return ("object", shape(extra, rename) if isinstance(extra, dict) else None)
    return (kind or "any",)


def summary(schema: dict[str, Any], rename: dict[str, str]) -> dict[str, Any]:
    required = set(schema.get("required", []))
    return {name: (shape(prop, rename), name in required) for name, prop in schema.get("properties", {}).items()}


def test_every_sdk_model_is_checked() -> None:
    models = {
        obj
        for obj in vars(types).values()
        if isinstance(obj, type) and issubclass(obj, types.BaseType) and obj is not types.BaseType
    }
    assert models == set(SCHEMAS), "add new SDK models to SCHEMAS (and to the server)"


@pytest.mark.parametrize("model", list(SCHEMAS), ids=lambda m: m.__name__)
def test_sdk_model_matches_server_schema(model: type[pydantic.BaseModel], components: dict[str, Any]) -> None:
    name = SCHEMAS[model]
    server = _component(components, name)
    if server is None:
        pytest.fail(f"the server's OpenAPI lost the '{name}' schema that {model.__name__} mirrors")
    ours = model.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
    theirs, mine = summary(server, {}), summary(ours, NAME_OF)
    assert sorted(mine) == sorted(theirs), f"{model.__name__} fields differ from the server's {name}"
    for field, (their_shape, their_required) in theirs.items():
        my_shape, my_required = mine[field]
        assert my_shape == their_shape, f"{model.__name__}.{field}: type {my_shape} != server's {their_shape}"
        assert my_required == their_required, f"{model.__name__}.{field}: required {my_required} != server's"


def test_literals_match_server_enums(components: dict[str, Any]) -> None:
    from rlaifv_client._client import Normalize

    normalize = components["RewardOptions"]["properties"]["normalize"]
    assert shape(normalize, {}) == ("union", frozenset({("enum", frozenset(typing.get_args(Normalize))), ("null",)}))


def _props(components: dict[str, Any], name: str) -> set[str]:
    schema = _component(components, name) or components[f"{name}-Input"]
    return set(schema["properties"])


def test_request_bodies_use_only_server_fields(components: dict[str, Any]) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    prompt = {"image": png, "question": "q", "model": "m", "beta": 0.1, "normalize": "mean"}
    body = best_of_n_body(**prompt, n=2, temperature=1.0, top_p=0.9, top_k=5, min_p=0.05, max_tokens=4, seed=1)
    assert set(body) <= _props(components, "BestOfNRequest")
    assert set(body["sampling"]) == _props(components, "SamplingOptions")  # every sampling option is exposed
    claims = best_of_n_body(question="q", mode="claims", claim_score="expected", repeat_penalty=0.5, beta=0.1)
    assert set(claims["reward"]) | {"normalize"} == _props(components, "RewardOptions")  # every reward option
    assert set(score_body(**prompt, answers=["a"])) <= _props(components, "RewardsRequest")
    assert set(job_body("best_of_n", [{"question": "q"}], {"k": "v"})) == _props(components, "JobRequest")
    from rlaifv_client._base_client import JobKind

    kinds = shape(components["JobRequest"]["properties"]["kind"], {})
    assert kinds == ("enum", frozenset(typing.get_args(JobKind)))


def test_the_check_catches_drift(components: dict[str, Any]) -> None:
    """The comparison has teeth: a renamed, retyped or optional field differs from the server's Usage."""

    class Renamed(types.BaseType):
        prompt_tokens: int
        completion_tokens: int
        tokens: int

    class Retyped(types.BaseType):
        prompt_tokens: int
        completion_tokens: float
        total_tokens: int

    class Optional(types.BaseType):
        prompt_tokens: int
        completion_tokens: int
        total_tokens: int | None = None

    server = summary(components["Usage"], {})
    assert summary(types.Usage.model_json_schema(mode="serialization"), {}) == server
    for drifted in (Renamed, Retyped, Optional):
        assert summary(drifted.model_json_schema(mode="serialization"), {}) != server, drifted.__name__
