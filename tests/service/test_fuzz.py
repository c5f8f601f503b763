"""Property-based fuzzing of the API from its OpenAPI schema (Schemathesis): no 5xx, responses match the schema."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _register_jsonl() -> None:
    """JSONL (job uploads and result streams) is declared as a string: sent as generated, read back as text."""
    import schemathesis

    @schemathesis.serializer("application/x-ndjson")
    def to_jsonl(ctx, value) -> bytes:
        return value.encode() if isinstance(value, str) else json.dumps(value).encode()

    @schemathesis.deserializer("application/x-ndjson")
    def from_jsonl(ctx, response) -> str:
        return response.content.decode()


@pytest.fixture(scope="module")
def fuzz_server(service_bundle, redis_url):
    """Redis configured, so the jobs routes are live too (their items run through the real workers)."""
    from tests.service.conftest import LiveServer

    server = LiveServer(service_bundle, redis_url=redis_url, jobs_stream="rlaifv:jobs:fuzz", jobs_max_items=4).start()
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz_finds_no_server_errors(fuzz_server, mode: str) -> None:
    live_server = fuzz_server
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    _register_jsonl()
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    strategy = schema.as_strategy(generation_mode=generation)
    checks = [not_a_server_error]
    if mode == "positive":
        from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

        checks += [response_schema_conformance, status_code_conformance]

    @given(case=strategy)
    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def fuzz(case) -> None:
        case.call_and_validate(base_url=live_server.url, checks=checks, timeout=60)

    fuzz()
