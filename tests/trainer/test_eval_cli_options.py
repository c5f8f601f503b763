"""What `rlaifv eval` does with its options before any work, and what a report keeps of them: the answer length left
to a service, secret values kept out of reports, and usage errors (exit 2) for every mistake in the command line."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from chat_server import ChatServer, Reply
from eval_images import truncated_jpeg
from typer.testing import CliRunner

from rlaifv.cli.eval_run import Source
from rlaifv.cli.main import app
from rlaifv.reward.prompt import EncodedPrompt
from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.candidates import Prompt, Sampled, Sampling
from rlaifv.trainer.evaluation.generators import BundleGenerator, ServiceGenerator
from rlaifv.trainer.evaluation.report import shown_command

DATA = Path(__file__).parent / "data" / "eval"
COCO = DATA / "coco"


def _png_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"image_id": i, "image": _png_b64(), "question": "Describe the image."} for i in (101, 103)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Recording:
    """A generator that answers every prompt with one sentence and keeps the sampling settings it was given."""

    fingerprint = "fake:recording"

    def __init__(self) -> None:
        self.sampling: list[Sampling] = []

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]:
        self.sampling.append(sampling)
        return [Sampled(texts=["A dog on the grass."] * n, dpo=[0.0] * n) for _ in prompts]


@pytest.fixture()
def recording(monkeypatch: pytest.MonkeyPatch) -> Recording:
    generator = Recording()
    monkeypatch.setattr(Source, "generator", lambda self: generator)
    return generator


def test_without_max_tokens_a_service_answers_with_its_own_default(
    recording: Recording, prompts: Path, tmp_path: Path
) -> None:
    """The eval default 512 was sent to the service, whose default RLAIFV_MAX_TOKENS is 256: every request a 400.
    Left out, the requests carry no max_tokens (the server fits its own default to the context) and the report says
    null; in process the default stays 512 (fitted to the model's context by the generator)."""
    args = ["eval", "objhal", "--coco", str(COCO), "--prompts", str(prompts)]
    served, local = tmp_path / "served.json", tmp_path / "local.json"
    result = CliRunner().invoke(app, [*args, "--service", "http://127.0.0.1:9", "-o", str(served)])
    assert result.exit_code == 0, result.output
    assert recording.sampling[-1].max_tokens is None
    assert json.loads(served.read_text())["settings"]["sampling"]["max_tokens"] is None
    result = CliRunner().invoke(app, [*args, "--bundle", "default", "-o", str(local)])
    assert result.exit_code == 0, result.output
    assert recording.sampling[-1].max_tokens == 512
    assert json.loads(local.read_text())["settings"]["sampling"]["max_tokens"] == 512
    given = tmp_path / "given.json"
    result = CliRunner().invoke(app, [*args, "--service", "http://127.0.0.1:9", "--max-tokens", "40", "-o", str(given)])
    assert result.exit_code == 0 and recording.sampling[-1].max_tokens == 40
    assert type(recording.sampling[-1]) is Sampling


def test_the_service_request_sends_max_tokens_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []

    def call(self: ServiceGenerator, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if method == "GET":
            return {"data": [{"id": "shapes-rlaifv"}]}
        assert body is not None
        sent.append(body)
        return {"candidates": [{"index": 0, "text": "a red circle.", "implicit_reward": 0.1, "reward": 0.1}]}

    monkeypatch.setattr(ServiceGenerator, "_call", call)
    generator = ServiceGenerator("http://127.0.0.1:9")
    prompt = Prompt("p", base64.b64decode(_png_b64()), "Describe the image.")
    generator.sample([prompt], 1, Sampling(temperature=0.7, max_tokens=None), claims=False)
    generator.sample([prompt], 1, Sampling(temperature=0.7, max_tokens=24), claims=False)
    assert "max_tokens" not in sent[0]["sampling"] and sent[0]["sampling"]["temperature"] == 0.7
    assert sent[1]["sampling"]["max_tokens"] == 24


class FakePair:
    """What `BundleGenerator` uses of a `ModelPair`: a model of 64 positions whose prompts take 50 tokens."""

    max_positions = 64
    reward = SimpleNamespace(mode="dpo")

    def __init__(self, prompt_tokens: int = 50) -> None:
        self.prompt_tokens = prompt_tokens
        self.asked: list[int] = []

    def load_images(self, images: list[Any]) -> list[Any]:
        return images

    def encode(self, images: list[Any], question: str) -> EncodedPrompt:
        return EncodedPrompt(input_ids=torch.zeros(self.prompt_tokens, dtype=torch.long))

    def generate_batch(self, tasks: Sequence[Any]) -> list[Any]:
        self.asked += [task.sampling.max_tokens for task in tasks]
        candidate = SimpleNamespace(text="a red circle.", implicit_reward=0.0, reward=0.0)
        return [SimpleNamespace(candidates=[candidate] * task.n) for task in tasks]


def test_in_process_answers_are_fitted_to_the_model_positions() -> None:
    """512 new tokens after a 50-token prompt on a 64-position model: sampling ran on past the positions the model
    was trained on (the shipped model's 256); now at most what the prompt leaves, as the service fits its default."""
    pair = FakePair()
    generator = BundleGenerator(pair, "bundle:fake")
    prompt = Prompt("p", b"", "Describe the image.")
    generator.sample([prompt], 2, Sampling(max_tokens=512), claims=False)
    generator.sample([prompt], 2, Sampling(max_tokens=8), claims=False)
    assert pair.asked == [14, 8]
    with pytest.raises(DataError, match=r"prompt p \(64 tokens\) leaves no room for an answer in the model's 64"):
        BundleGenerator(FakePair(prompt_tokens=64), "bundle:fake").sample([prompt], 1, Sampling(), claims=False)


def test_an_image_that_fails_at_sampling_names_its_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers decode every image, but a file can change after it was read: the sampler's error named no prompt or
    image ("image could not be decoded: image file is truncated"), in process or from a service."""
    from rlaifv.reward.images import load_image

    class Decoding(FakePair):
        def load_images(self, images: list[Any]) -> list[Any]:
            return [load_image(image) for image in images]

    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    generator = BundleGenerator(Decoding(), "bundle:fake")
    cut = "image could not be decoded: image file is truncated"
    inline = Prompt("262148-0a1b2c3d4e5f", truncated_jpeg(), "Describe.")
    with pytest.raises(DataError, match=rf"^prompt 262148-0a1b2c3d4e5f \(image inline, \d+ bytes\): {cut}"):
        generator.sample([inline], 1, Sampling(), claims=False)
    with pytest.raises(DataError, match=rf"^prompt 7 \(image {re.escape(str(tmp_path / 'cut.jpg'))}\): {cut}"):
        generator.sample([Prompt("7", tmp_path / "cut.jpg", "Describe.")], 1, Sampling(), claims=False)

    def refused(self: ServiceGenerator, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if method == "GET":
            return {"data": [{"id": "shapes-rlaifv"}]}
        raise DataError(f"service {path} failed: HTTP 400: {cut}")

    monkeypatch.setattr(ServiceGenerator, "_call", refused)
    served = ServiceGenerator("http://127.0.0.1:9")
    with pytest.raises(DataError, match=r"^prompt 7 \(image .*cut.jpg\): service /v1/best-of-n failed: HTTP 400"):
        served.sample([Prompt("7", tmp_path / "cut.jpg", "Describe.")], 1, Sampling(), claims=False)


def test_secret_values_are_not_recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--judge-key, --api-key and --llm-key values were in the report's command, its .md and the console header."""
    out = tmp_path / "mmhal.json"
    with ChatServer(lambda _: Reply("Rating: 4")) as server:
        judge_url = f"{server.url}?api-version=pw-3"  # a user and password beside --judge-key are refused
        args = ["eval", "mmhal", "--records", str(DATA / "mmhal_records.json"), "--judge-model", "j"]
        args += ["--judge-url", judge_url, "--judge-key", "sk-1", "--api-key=sk-2", "-o", str(out)]
        monkeypatch.setattr(sys, "argv", ["rlaifv", *args])
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    texts = [result.output, out.read_text(), out.with_suffix(".md").read_text()]
    for secret in ("sk-1", "sk-2", "pw-3"):
        assert not any(secret in text for text in texts), secret
    command = json.loads(out.read_text())["command"]
    assert "--judge-key '***'" in command and "'--api-key=***'" in command and "?***" in command


def test_shown_command_forms() -> None:
    shown = shown_command(["eval", "objhal", "--llm-key=k", "--api-key", "k", "--max-tokens", "16", "-n", "8"])
    assert shown == "rlaifv eval objhal '--llm-key=***' --api-key '***' --max-tokens 16 -n 8"
    assert shown_command(["--service", "http://a:b@h:8/v1"]) == "rlaifv --service 'http://***@h:8/v1'"
    assert shown_command(["--judge-url=https://h/v1?key=k"]) == "rlaifv '--judge-url=https://h/v1?***'"
    assert shown_command(["--service=https://h/v1"]) == "rlaifv --service=https://h/v1"


OBJHAL = ["eval", "objhal", "--coco", str(COCO)]
AMBER = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json")]
MMHAL = ["eval", "mmhal", "--records", str(DATA / "mmhal_records.json"), "--judge-model", "j"]
MMHAL += ["--judge-url", "http://127.0.0.1:9/v1"]
ANSWERS = ["--answers", str(DATA / "objhal_answers.jsonl")]


@pytest.mark.parametrize(
    "args",
    [
        [*OBJHAL, *ANSWERS, "--select", "best"],
        [*OBJHAL, *ANSWERS, "--extractor", "foo"],
        [*OBJHAL, *ANSWERS, "--extractor", "llm"],  # without --llm-url and --llm-model
        [*OBJHAL, *ANSWERS, "--bundle", "default"],
        [*OBJHAL, *ANSWERS, "--best-of", "1,2"],
        [*OBJHAL, *ANSWERS, "-n", "4"],  # no --select: "first" would ignore three of the four
        [*OBJHAL, "--prompts", "p.jsonl"],  # nothing to generate with
        [*OBJHAL, "--prompts", "p.jsonl", "--bundle", "default", "--service", "http://127.0.0.1:9"],
        [*OBJHAL, "--prompts", "p.jsonl", "--bundle", "default", "--best-of", "1,2", "--modes", "dpo,foo"],
        ["eval", "objhal", *ANSWERS],  # no ground truth
        [*AMBER, "--answers", str(DATA / "amber_responses.json"), "--match", "fuzzy"],
        [*AMBER, "--queries", str(DATA / "amber_queries.json"), "--bundle", "default"],  # no --images
        [*MMHAL, "--best-of", "1,2"],
        [*MMHAL, "--bundle", "default"],  # no --images
        [*MMHAL, "--answers", "a.jsonl", "--service", "http://127.0.0.1:9"],
        [*MMHAL, *ANSWERS, "--judge-url", "http://u:p@127.0.0.1:9/v1", "--judge-key", "k"],  # a key never sent
        [*OBJHAL, "--prompts", "p.jsonl", "--service", "http://u:p@127.0.0.1:9", "--api-key", "k"],
        [*OBJHAL, *ANSWERS, "--extractor", "llm", "--llm-url", "http://u:p@h:9/v1", "--llm-model", "m", "--llm-key=k"],
        ["eval", "shapes", "--modes", "dpo,foo"],
        ["eval", "shapes", "--doc", "missing.md"],  # found after the sampling (34 s for 500 images)
        [*OBJHAL, *ANSWERS, "--best-of", "1,2", "--doc", "/dev/null", "--name", "x"],  # no block named x
    ],
)
def test_command_line_mistakes_are_usage_errors_before_any_work(
    args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """docs/evaluation.md promises exit 2 before anything is read or sampled: these exited 1, some after the
    benchmark's files were read (`--answers` with `--bundle`), `eval shapes --modes dpo,foo` after both models
    had loaded."""

    def no_generator(self: Source) -> Any:
        raise AssertionError("a generator was made")

    monkeypatch.setattr(Source, "generator", no_generator)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Invalid value for '--" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_refused_judge_url_is_shown_without_its_password() -> None:
    """The refusal quoted the URL whole, and a password with an unencoded '#', '/' or '?' passed the check and was
    shown by the URL parser's own error."""
    import typer

    from rlaifv.cli.eval_run import http_url

    for url in ("htps://judge:s3cret@llm.example/v1", "http://admin:123#s3cret@x.example/v1", "http://b:s3cret/y@x.io"):
        with pytest.raises(typer.BadParameter) as refused:
            http_url(url)
        assert "s3cret" not in str(refused.value), refused.value
