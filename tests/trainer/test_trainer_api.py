"""The trainer's public surface: pinned exports, cheap imports, CLI help, the LLM claim rewriter over HTTP."""

from __future__ import annotations

import collections.abc
import json
import subprocess
import sys
import typing
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest
from trainer_testkit import ControlledLabeler

from rlaifv import trainer
from rlaifv.testing.http_stub import serving

ROOT = Path(__file__).resolve().parents[2]


def test_exports_are_pinned_and_resolve() -> None:
    assert trainer.__all__ == sorted(trainer.__all__)
    assert set(trainer.__all__) == {
        "ConfigError", "DPOConfig", "DPOResult", "DataError", "EmptyAnswerError", "EvalHook", "FeedbackConfig",
        "ImageDecodeError", "IterateConfig", "IterateResult", "ListPromptSource", "MissingColumnError", "PairConfig",
        "PreferenceRow", "PromptFeedback", "PromptItem", "PromptSource", "RoundContext", "RunStateError",
        "ScoredAnswer", "TrainerError", "build_pairs", "collect_feedback", "export_bundle", "read_preferences",
        "read_prompts", "run_iterate", "train_dpo",
    }  # fmt: skip
    assert typing.get_origin(trainer.EvalHook) is collections.abc.Callable
    for name in set(trainer.__all__) - {"EvalHook"}:
        obj = getattr(trainer, name)
        assert getattr(obj, "__name__", name) == name and obj.__module__.startswith("rlaifv.trainer."), (name, obj)
    assert issubclass(trainer.MissingColumnError, trainer.DataError)
    assert issubclass(trainer.DataError, trainer.TrainerError)


def test_cli_module_imports_without_torch() -> None:
    code = (
        "import sys, rlaifv.trainer, rlaifv.trainer.cli\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_cli_help_and_options() -> None:
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import train_app

    runner = CliRunner()
    result = runner.invoke(train_app, ["--help"])
    assert result.exit_code == 0 and "dpo" in result.output and "iterate" in result.output
    options = runner.invoke(train_app, ["options"])
    assert options.exit_code == 0
    assert "dpo.nll_weight" in options.output and "feedback.num_samples" in options.output
    assert "pairs.min_score_gap" in options.output


class _ChatHandler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions endpoint with canned rewriting behaviour."""

    requests: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        prompt = body["messages"][0]["content"]
        if "Answer:" in prompt:
            answer = prompt.split("Answer:", 1)[1].strip()
            reply = json.dumps([f"There is {part.strip().rstrip('.')}" for part in answer.split(" with ")])
        else:
            claim = prompt.split("Claim:", 1)[1].strip().rstrip(".")
            reply = f"Sure.\nIs there {claim.removeprefix('There is ')} in the image?"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def chat_server():
    _ChatHandler.requests = []
    with serving(_ChatHandler) as server:
        yield f"http://127.0.0.1:{server.server_port}/v1"


def test_llm_splitter_and_writer_over_an_openai_compatible_url(chat_server: str) -> None:
    from PIL import Image

    from rlaifv.reward.claims import verify_answers
    from rlaifv.trainer.feedback import make_splitter_and_writer
    from rlaifv.trainer.feedback_config import FeedbackConfig

    config = FeedbackConfig(splitter="llm", question_writer="llm", llm_url=chat_server, llm_name="splitter-8b")
    splitter, writer = make_splitter_and_writer(config)
    assert splitter.split("a red circle with a blue square.") == ["There is a red circle.", "There is a blue square."]
    assert writer.question("There is a red circle.") == "Is there a red circle in the image? Please answer yes or no."
    labeler = ControlledLabeler(lambda q: "red" in q)
    verdicts = verify_answers(Image.new("RGB", (8, 8)), ["a red circle with a blue square"], labeler, splitter, writer)
    assert verdicts[0].score == -1.0 and verdicts[0].rejected == 1
    assert all(
        r["path"] == "/v1/chat/completions" and r["body"]["model"] == "splitter-8b" for r in _ChatHandler.requests
    )
    assert all(r["body"]["temperature"] == 0.0 for r in _ChatHandler.requests)


def test_llm_backend_errors_are_trainer_errors() -> None:
    from rlaifv.trainer.errors import TrainerError
    from rlaifv.trainer.llm_rewriter import LLMClaimSplitter, OpenAIChatBackend

    splitter = LLMClaimSplitter(OpenAIChatBackend("http://127.0.0.1:9/v1", timeout=2, retries=1, backoff_s=0))
    with pytest.raises(TrainerError, match="could not split answer 'a cat' after 2 attempts: ConnectError"):
        splitter.split("a cat")


def test_llm_settings_need_a_model_or_url() -> None:
    from rlaifv.trainer.errors import ConfigError
    from rlaifv.trainer.feedback_config import FeedbackConfig

    with pytest.raises(ConfigError, match="llm_model or llm_url"):
        FeedbackConfig(splitter="llm")
    with pytest.raises(ConfigError, match="llm_model or llm_url"):
        FeedbackConfig(question_writer="llm", llm_model="m", llm_url="http://x")
