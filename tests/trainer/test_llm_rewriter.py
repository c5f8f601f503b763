"""The LLM claim splitter and question writer: strict replies, retries, settings, memoised concurrent calls."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chat_server import ChatServer, Reply

from rlaifv.trainer.errors import ConfigError, TrainerError
from rlaifv.trainer.feedback_config import FeedbackConfig
from rlaifv.trainer.llm_rewriter import (
    LLMClaimSplitter,
    LLMQuestionWriter,
    LLMReplyError,
    LocalChatBackend,
    OpenAIChatBackend,
    make_backend,
    make_llm_rewriters,
)


def rewrite(prompt: str) -> Reply:
    """A well-behaved rewriter: "x with y" -> ["There is x.", "There is y."]; a claim -> "Is there ...?"."""
    if "Answer:" in prompt:
        answer = prompt.split("Answer:", 1)[1].strip().rstrip(".")
        return Reply(json.dumps([f"There is {part.strip()}." for part in answer.split(" with ")]))
    claim = prompt.split("Claim:", 1)[1].strip().rstrip(".")
    return Reply(f"Is there {claim.removeprefix('There is ')} in the image?")


def completion(content: str | None, finish_reason: str = "stop") -> Reply:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
    return Reply(raw=json.dumps({"choices": [choice]}))


@pytest.fixture()
def serve() -> Iterator[Callable[..., ChatServer]]:
    servers: list[ChatServer] = []

    def start(reply: Callable[[str], Reply], **kw: int) -> ChatServer:
        servers.append(ChatServer(reply, **kw).__enter__())
        return servers[-1]

    yield start
    for server in servers:
        server.__exit__()


def backend(server: ChatServer, **kw: float) -> OpenAIChatBackend:
    settings = {"retries": 1, "backoff_s": 0.0, "timeout": 10.0} | kw
    return OpenAIChatBackend(server.url, "rewriter-8b", **settings)  # type: ignore[arg-type]


def split_hits(server: ChatServer) -> int:
    return sum(n for prompt, n in server.hits.items() if "Answer:" in prompt)


def test_an_empty_or_null_reply_is_an_error_naming_the_answer_not_zero_claims(serve) -> None:
    replies = {"a red circle": Reply(""), "a blue square": completion(None)}
    server = serve(lambda prompt: next(r for a, r in replies.items() if a in prompt))
    splitter = LLMClaimSplitter(backend(server))
    with pytest.raises(LLMReplyError, match=r"split answer 'a red circle' after 2 attempts: empty reply") as caught:
        splitter.split("a red circle")
    assert caught.value.text == "a red circle" and caught.value.replies == ["", ""]
    with pytest.raises(LLMReplyError, match=r"'a blue square' after 2 attempts: message content is not text: None"):
        splitter.split("a blue square")
    assert isinstance(caught.value, TrainerError)
    assert splitter.split("  ") == [] and split_hits(server) == 4  # nothing to split: no call


def test_an_explicit_empty_array_is_an_answer_without_claims(serve) -> None:
    server = serve(lambda _: Reply("[]"))
    assert LLMClaimSplitter(backend(server)).split("I cannot tell from this image.") == []


def test_rate_limits_server_errors_and_timeouts_are_retried(serve) -> None:
    script = {1: Reply(status=429), 2: Reply(hang=True), 3: Reply(status=503)}

    def flaky(prompt: str) -> Reply:
        return script.get(server.hits[prompt]) or rewrite(prompt)

    server = serve(flaky)
    splitter = LLMClaimSplitter(backend(server, retries=3, timeout=0.3))
    assert splitter.split("a cat with a dog") == ["There is a cat.", "There is a dog."]
    assert split_hits(server) == 4
    assert set(server.models) == {"rewriter-8b"}


def test_a_failing_server_gives_one_clean_line_after_its_retries(serve) -> None:
    server = serve(lambda _: Reply(status=500))
    with pytest.raises(LLMReplyError) as caught:
        LLMClaimSplitter(backend(server, retries=2)).split("a cat")
    message = str(caught.value)
    assert "\n" not in message and "mozilla" not in message and "For more information" not in message
    assert re.fullmatch(r"the LLM at http://\S+/v1/chat/completions could not split answer 'a cat' after 3 attempts:"
                        r" HTTP 500: .*unavailable.*", message), message  # fmt: skip
    assert split_hits(server) == 3


def test_feedback_settings_reach_the_client(serve) -> None:
    server = serve(rewrite)
    config = FeedbackConfig(
        splitter="llm",
        question_writer="llm",
        llm_url=server.url,
        llm_name="rw",
        llm_timeout_s=7.5,
        llm_retries=5,
        llm_max_tokens=77,
        llm_concurrency=3,
    )
    splitter, writer = make_llm_rewriters(config)
    assert splitter is not None and writer is not None and splitter.backend is writer.backend
    assert isinstance(splitter.backend, OpenAIChatBackend)
    s = splitter.backend.settings
    assert (s.model, s.timeout_s, s.retries, s.max_tokens, s.concurrency) == ("rw", 7.5, 5, 77, 3)
    assert splitter.split("a cat") == ["There is a cat."]
    only_questions = make_llm_rewriters(FeedbackConfig(question_writer="llm", llm_url=server.url))
    assert only_questions[0] is None and only_questions[1] is not None
    assert make_llm_rewriters(FeedbackConfig()) == (None, None)
    from rlaifv.trainer.feedback import make_splitter_and_writer

    feedback_splitter, _ = make_splitter_and_writer(config)  # what a feedback run uses
    assert feedback_splitter.backend.settings.max_tokens == 77  # type: ignore[attr-defined]
    # `make_backend` without settings uses the same defaults.
    default = make_backend(url=server.url)
    assert isinstance(default, OpenAIChatBackend)
    d, c = default.settings, FeedbackConfig()
    assert (d.timeout_s, d.retries, d.max_tokens, d.concurrency) == (
        c.llm_timeout_s, c.llm_retries, c.llm_max_tokens, c.llm_concurrency,
    )  # fmt: skip


def test_options_list_the_llm_settings() -> None:
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import train_app

    output = CliRunner().invoke(train_app, ["options"]).output
    for name in ("llm_timeout_s", "llm_retries", "llm_max_tokens", "llm_concurrency"):
        assert re.search(rf"^feedback\.{name} +\S+ +\w", output, re.MULTILINE), name


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("notaurl", "is not an http"),
        ("127.0.0.1:8000/v1", "is not an http"),
        ("ftp://host/v1", "is not an http"),
        ("http://host:99999/v1", "is not a valid URL"),
        ("http://host:8000/v1/chat/completions", "is the chat route itself"),
    ],
)
def test_a_malformed_llm_url_is_refused_by_the_config(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"llm_url '{re.escape(url)}' {problem}"):
        FeedbackConfig(splitter="llm", llm_url=url)
    with pytest.raises(ConfigError, match=problem):
        OpenAIChatBackend(url)


def test_the_feedback_command_refuses_a_malformed_llm_url_before_reading_anything(tmp_path: Path) -> None:
    from typer import Typer
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import feedback

    app = Typer()
    app.command()(feedback)
    args = ["--set", "feedback.splitter=llm", "--set", "feedback.llm_url=notaurl"]
    missing = tmp_path / "absent"
    result = CliRunner().invoke(
        app, [str(missing / "p.jsonl"), "--model", str(missing), "-o", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2 and "llm_url 'notaurl' is not an http(s) URL" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_chat_filler_is_not_read_as_claims_and_refusals_are_errors(serve) -> None:
    chatty = (
        'Sure! Here are the claims:\n```json\n["There is a cat.", "The cat is black"]\n```\n'
        "Let me know if you need anything else."
    )
    replies = {
        "a black cat": Reply(chatty),
        "a bulleted cat": Reply(
            "Sure! Here are the claims:\n- There is a cat.\nLet me know if you need anything else."
        ),
        "a refused cat": Reply("I'm sorry, but I can't help with that."),
        "a refused empty cat": Reply("I’m sorry, I cannot do that. []"),
        "Claim: There is a cat.": Reply("Sure.\nQuestion: Is there a cat in the image? Please answer yes or no."),
        "Claim: The cat is black.": Reply("I'm sorry, but I can't help with that."),
        "Claim: Two cats.": Reply("Is there a cat?\nAre there two cats?"),
    }
    server = serve(lambda prompt: next(r for key, r in replies.items() if key in prompt))
    chat = backend(server)
    splitter, writer = LLMClaimSplitter(chat), LLMQuestionWriter(chat)
    assert splitter.split("a black cat") == ["There is a cat.", "The cat is black."]
    with pytest.raises(LLMReplyError, match=r"'a bulleted cat' after 2 attempts: no JSON array of claims: 'Sure!"):
        splitter.split("a bulleted cat")
    with pytest.raises(LLMReplyError, match=r"'a refused cat' after 2 attempts: a refusal: \"I'm sorry"):
        splitter.split("a refused cat")
    with pytest.raises(LLMReplyError, match="a refusal"):
        splitter.split("a refused empty cat")
    assert writer.question("There is a cat.") == "Is there a cat in the image? Please answer yes or no."
    with pytest.raises(LLMReplyError, match=r"rewrite claim 'The cat is black.' after 2 attempts: a refusal"):
        writer.question("The cat is black.")
    with pytest.raises(LLMReplyError, match="2 questions"):
        writer.question("Two cats.")
    assert server.hits[splitter.instruction.format(answer="a refused cat")] == 2  # retried, then refused


def test_a_reply_cut_at_max_tokens_is_an_error_not_fewer_claims(serve) -> None:
    cut = completion('["There is a cat.", "There is a dog.", "There is a red ca', finish_reason="length")
    server = serve(lambda _: cut)
    expected = (
        r"'a cat, a dog and a red car': reply cut off at max_tokens=64 \(finish_reason 'length'\): raise feedback"
    )
    with pytest.raises(LLMReplyError, match=expected):
        LLMClaimSplitter(backend(server, retries=3, max_tokens=64)).split("a cat, a dog and a red car")
    assert split_hits(server) == 1  # at temperature 0 a retry would be cut at the same place


def test_llm_settings_the_run_would_ignore_are_refused() -> None:
    for settings in ({"llm_url": "http://127.0.0.1:8000/v1"}, {"llm_model": "m"}, {"llm_retries": 5}):
        with pytest.raises(ConfigError, match=f"{next(iter(settings))} would be ignored.*splitter=llm"):
            FeedbackConfig(**settings)
    with pytest.raises(ConfigError, match=r"llm_name, llm_timeout_s would be ignored.*not llm_model"):
        FeedbackConfig(splitter="llm", llm_model="m", llm_name="x", llm_timeout_s=5)
    with pytest.raises(ConfigError, match="llm_concurrency must be >= 1"):
        FeedbackConfig(splitter="llm", llm_url="http://h/v1", llm_concurrency=0)
    FeedbackConfig(splitter="llm", llm_model="m", llm_max_tokens=64)


def test_distinct_answers_and_claims_are_asked_once_and_together(serve) -> None:
    from rlaifv.reward.claims import plan_claims

    server = serve(rewrite, gate_at=2)  # a request waits until two are in flight: one at a time would time out
    config = FeedbackConfig(
        splitter="llm", question_writer="llm", llm_url=server.url, llm_concurrency=2, llm_timeout_s=10, llm_retries=0
    )
    splitter, writer = make_llm_rewriters(config)
    assert splitter is not None and writer is not None
    answers = ["a cat with a dog with a bird", "a cat with a dog with a bird", "a bird with a cat"]
    splitter.split_many(answers)  # what a caller with the whole batch at hand does; plan_claims then asks nothing
    plans, questions = plan_claims(answers, splitter, writer)
    assert [len(plan) for plan in plans] == [3, 3, 2]
    assert questions == [f"Is there a {x} in the image? Please answer yes or no." for x in ("cat", "dog", "bird")]
    assert set(server.hits.values()) == {1} and len(server.hits) == 2 + 3  # 2 distinct answers, 3 distinct claims
    assert server.max_in_flight == 2
    assert splitter.split_many(["a fish with a cow", "a cow with a fish", "a cat with a dog with a bird"]) == [
        ["There is a fish.", "There is a cow."],
        ["There is a cow.", "There is a fish."],
        ["There is a cat.", "There is a dog.", "There is a bird."],
    ]
    assert set(server.hits.values()) == {1} and len(server.hits) == 5 + 2 + 2 and server.max_in_flight == 2


def test_the_feedback_splitter_and_writer_remember_their_calls(serve) -> None:
    """`feedback.make_splitter_and_writer` builds them as before; they still ask each distinct text once."""
    from rlaifv.reward.claims import plan_claims
    from rlaifv.trainer.feedback import make_splitter_and_writer

    server = serve(rewrite)
    config = FeedbackConfig(splitter="llm", question_writer="llm", llm_url=server.url)
    splitter, writer = make_splitter_and_writer(config)
    plan_claims(["a cat with a dog", "a cat with a dog", "a dog with a cat"], splitter, writer)
    assert set(server.hits.values()) == {1} and len(server.hits) == 2 + 2


class CountingBackend:
    """A `ChatBackend` without a server: every prompt's reply comes from `rewrite`, and each prompt is counted."""

    where = "memory"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def ask(self, prompts, accept):
        from rlaifv.trainer.evaluation.llm import ChatResult

        self.asked += prompts
        replies = [rewrite(prompt).text for prompt in prompts]
        return [ChatResult(ok=accept(r), content=r, attempts=1, replies=[r]) for r in replies]


def test_the_memo_is_bounded_and_a_batch_larger_than_it_still_splits() -> None:
    chat = CountingBackend()
    splitter = LLMClaimSplitter(chat, cache_size=2)
    assert splitter.split_many(["a cat", "a dog", "a cow", "a cat"]) == [
        ["There is a cat."],
        ["There is a dog."],
        ["There is a cow."],
        ["There is a cat."],
    ]
    assert len(chat.asked) == 3
    splitter.split_many(["a cow", "a dog", "a cat"])  # the two most recent are remembered, the oldest asked again
    assert len(chat.asked) == 4 and "a cat" in chat.asked[-1]


@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama causal LM with a chat template, saved like any local instruction model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlaifv.trainer.shapes.tiny_vlm import DEFAULT_WORDS, build_tokenizer

    folder = tmp_path_factory.mktemp("llm") / "chat"
    tokenizer = build_tokenizer(DEFAULT_WORDS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_llm_backend_drives_the_splitter_and_writer(tiny_chat_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlaifv.trainer.feedback import make_splitter_and_writer

    config = FeedbackConfig(splitter="llm", question_writer="llm", llm_model=str(tiny_chat_lm), llm_max_tokens=12)
    splitter, writer = make_llm_rewriters(config)
    assert splitter is not None and writer is not None and isinstance(splitter.backend, LocalChatBackend)
    assert splitter.backend.max_new_tokens == 12
    assert isinstance(make_splitter_and_writer(config)[0].backend, LocalChatBackend)  # type: ignore[attr-defined]
    prompt = splitter.instruction.format(answer="a red circle")
    reply, cut_off = splitter.backend.generate(prompt)
    assert reply.strip() and (reply, cut_off) == _greedy(splitter.backend, prompt, 12)  # chat template, greedy
    with pytest.raises(LLMReplyError, match=r"could not split answer 'a red circle': "):
        splitter.split("a red circle")  # random weights write no JSON array (or are cut off): an error, once
    replies = {"Answer:": '["There is a red circle"]', "Claim:": "Is there a red circle in the image?"}
    monkeypatch.setattr(splitter.backend, "generate", lambda p: (next(r for k, r in replies.items() if k in p), False))
    assert splitter.split("a red circle, again") == ["There is a red circle."]
    assert writer.question("There is a red circle.") == "Is there a red circle in the image? Please answer yes or no."
    monkeypatch.setattr(splitter.backend, "generate", lambda p: ('["There is a red', True))
    with pytest.raises(LLMReplyError, match=r"cut off at max_new_tokens=12: raise feedback\.llm_max_tokens"):
        splitter.split("a long answer")


def test_a_local_folder_that_is_no_chat_llm_is_a_config_error(
    tiny_chat_lm: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A vision-language model, or a causal LM without a chat template, used to fail in a 118-line traceback."""
    import shutil

    with pytest.raises(ConfigError, match=r"holds a LlavaForConditionalGeneration model, which is no causal LM"):
        LocalChatBackend(tiny_model)
    plain = shutil.copytree(tiny_chat_lm, tmp_path / "plain")
    settings = json.loads((plain / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(settings))
    for extra in plain.glob("chat_template*"):
        extra.unlink()
    with pytest.raises(ConfigError, match=r"has no chat template \(a base model\?\): llm_model needs"):
        LocalChatBackend(plain)
    with pytest.raises(ConfigError, match="does not exist"):
        LocalChatBackend(tmp_path / "absent")


def _greedy(backend: LocalChatBackend, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    """Reference decoding, one argmax at a time: the reply, and whether it ran out of tokens before the end."""
    import torch

    tokenizer, model = backend.tokenizer, backend.model
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(
                model(input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits[0, -1].argmax()
            )
            if token == tokenizer.eos_token_id:
                return tokenizer.decode(new, skip_special_tokens=True), False
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True), True
