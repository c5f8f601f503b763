"""clients/python/README.md is true: its Python blocks run as written, top to bottom as a reader goes, against a
fake server (the default httpx transports answer) and against the real one, and its error tree names every
exception the SDK exports."""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

import rlaifv_client

README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
REWARD = {"mode": "dpo", "beta": 0.1, "normalize": "mean"}
TIMINGS = {"queue_s": 0.0, "generate_s": 0.1, "score_s": 0.1, "total_s": 0.2}


def _candidates(texts: list[str], finish: str) -> list[dict[str, Any]]:
    return [
        {"index": i, "text": text, "reward": -i / 10, "implicit_reward": -i / 10, "policy_logprob": -1.0 - i,
         "reference_logprob": -1.5, "num_tokens": 3, "finish_reason": finish}
        for i, text in enumerate(texts)
    ]  # fmt: skip


def _answer(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """A valid body of POST /v1/best-of-n or /v1/rewards for `body`."""
    usage = {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
    common = {"id": "r1", "created": 1, "model": "tiny", "best_index": 0, "reward": REWARD, "usage": usage,
              "timings": TIMINGS}  # fmt: skip
    if kind == "best_of_n":
        candidates = _candidates([f"answer {i}" for i in range(body.get("n", 4))], "stop")
        return common | {"object": "best_of_n", "best": candidates[0], "candidates": candidates}
    candidates = _candidates(body["answers"], "given")
    return common | {"object": "rewards", "rewards": [c["reward"] for c in candidates], "candidates": candidates}


class FakeServer:
    """Answers the routes the README calls, with bodies of the server's schemas."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        self.paths: list[str] = []
        self.bodies: list[dict[str, Any]] = []

    def answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | str]:
        """The status and the JSON body (a str: JSONL) of one request."""
        self.paths.append(f"{method} {path}")
        self.bodies.append(body)
        if path in ("/v1/best-of-n", "/v1/rewards"):
            if body.get("n", 0) > 16:
                error = {"message": f"n must be <= 16, got {body['n']}", "type": "invalid_request_error", "param": "n"}
                return 400, {"error": error}
            return 200, _answer("best_of_n" if path == "/v1/best-of-n" else "rewards", body)
        if path == "/v1/jobs":
            job_id = f"job-{len(self.jobs)}"
            self.jobs[job_id] = (body["kind"], body["items"])
            return 200, self._job(job_id, "queued")
        if match := re.fullmatch(r"/v1/jobs/([^/]+)(/results)?", path):
            job_id, results = match.groups()
            if not results:
                return 200, self._job(job_id, "succeeded")
            kind, items = self.jobs[job_id]
            lines = [json.dumps({"index": i, "status": "succeeded", "result": _answer(kind, item)})
                     for i, item in enumerate(items)]  # fmt: skip
            return 200, "\n".join(lines) + "\n"
        if path == "/readyz":
            return 200, {"status": "ok", "checks": {"model": "ok"}}
        if path == "/v1/models":
            reward = REWARD | {"repeat_penalty": 1.0}
            return 200, {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 1,
                                                      "owned_by": "rlaifv", "reward": reward}]}  # fmt: skip
        if path == "/v1/chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": "A cat."}, "finish_reason": "stop"}
            return 200, {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                         "choices": [choice]}  # fmt: skip
        return 404, {"error": {"message": f"no route {path}", "type": "not_found"}}

    def _job(self, job_id: str, status: str) -> dict[str, Any]:
        kind, items = self.jobs[job_id]
        done = len(items) if status == "succeeded" else 0
        return {"id": job_id, "kind": kind, "status": status, "created": 1, "updated": 2, "total": len(items),
                "completed": done, "failed": 0}  # fmt: skip

    def patch(self, monkeypatch: pytest.MonkeyPatch, http: Any) -> None:
        """Make `http`'s default transports (httpx's, or the httpx2 that openai uses) answer from this fake."""

        def handle(transport: Any, request: Any) -> Any:
            content = request.read()
            is_json = request.headers.get("content-type") == "application/json"
            status, payload = self.answer(request.method, request.url.path, json.loads(content) if is_json else {})
            if isinstance(payload, str):
                return http.Response(status, text=payload)
            return http.Response(status, json=payload)

        async def handle_async(transport: Any, request: Any) -> Any:
            return handle(transport, request)

        monkeypatch.setattr(http.HTTPTransport, "handle_request", handle)
        monkeypatch.setattr(http.AsyncHTTPTransport, "handle_async_request", handle_async)


def _blocks(language: str) -> list[str]:
    """The fenced blocks of `language` ("" for the unlabelled ones), in order."""
    blocks: list[str] = []
    fence: str | None = None
    lines: list[str] = []
    for line in README.read_text().splitlines(keepends=True):
        if fence is None:
            if line.startswith("```"):
                fence, lines = line[3:].strip(), []
        elif line.startswith("```"):
            if fence == language:
                blocks.append("".join(lines))
            fence = None
        else:
            lines.append(line)
    return blocks


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeServer:
    """Every default transport of httpx (the SDK's) and of httpx2 (openai's) answers from the fake; cat.png and
    dog.png exist."""
    server = FakeServer()
    server.patch(monkeypatch, httpx)
    with contextlib.suppress(ImportError):
        server.patch(monkeypatch, importlib.import_module("httpx2"))
    for name in ("RLAIFV_BASE_URL", "RLAIFV_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    for name in ("cat.png", "dog.png"):
        (tmp_path / name).write_bytes(PNG)
    return server


def test_readme_python_blocks_run_as_written(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openai")
    blocks = _blocks("python")
    assert len(blocks) >= 6
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "answer 0" in out and "n must be <= 16, got 64" in out and "Black." in out
    scored = [body for body in fake_server.bodies if "answers" in body and "messages" in body]
    assert scored[-1]["messages"][1] == {"role": "assistant", "content": "A cat."}  # the openai reply, as it is
    assert "POST /v1/chat/completions" in fake_server.paths and "GET /v1/jobs/job-0/results" in fake_server.paths
    assert "GET /readyz" in fake_server.paths


def test_readme_error_tree_names_every_exception() -> None:
    (tree,) = [block for block in _blocks("") if block.startswith("RLAIFVError")]
    named = set(re.findall(r"\b([A-Z]\w+Error)\b", tree))
    exported = {
        name
        for name in rlaifv_client.__all__
        if isinstance(getattr(rlaifv_client, name), type) and issubclass(getattr(rlaifv_client, name), Exception)
    }
    assert exported - {"TimeoutError"} <= named, exported - named


@pytest.mark.integration
@pytest.mark.slow
def test_readme_python_blocks_run_against_the_real_server(
    tiny_bundle: Path,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The fake server answers what the README expects; the real one (jobs, the openai client, its limits) must too.
    Only the address changes: the blocks' `localhost:8000` is this server's, and the README's key `sk-...` its key."""
    pytest.importorskip("openai")
    from .conftest import LiveServer, png_bytes

    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(png_bytes((200, 120, 30)))
    (tmp_path / "dog.png").write_bytes(png_bytes((90, 60, 30)))
    settings = {"api_keys": ["sk-..."], "allow_placeholder_keys": True, "redis_url": redis_url, "jobs_workers": 1}
    with LiveServer(tiny_bundle, **settings) as live:
        monkeypatch.setenv("RLAIFV_BASE_URL", live.url)
        monkeypatch.setenv("RLAIFV_API_KEY", "sk-...")
        namespace: dict[str, Any] = {"__name__": "__readme__"}
        for i, block in enumerate(_blocks("python")):
            code = block.replace("http://localhost:8000", live.url)
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "n must be <= 8, got 64" in out and "{'model': 'ok'" in out  # the server's limit, its readiness
    assert out.rstrip().endswith("n must be <= 8, got 64") and ("Black." in out or "Orange." in out)
