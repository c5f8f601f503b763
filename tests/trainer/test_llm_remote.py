"""The feedback's remote LLM (`feedback.splitter=llm` / `question_writer=llm` at `feedback.llm_url`): what a run
keeps when the server moves, Retry-After and jitter, credentials out of messages and files, URLs with a query,
settings refused before anything loads, errors that name the setting to fix, and SIGTERM while calls are in flight."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import signal
import threading
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from chat_server import ChatServer, Reply
from trainer_testkit import ControlledLabeler, png

from rlaifv.trainer.data import ListPromptSource, PromptItem
from rlaifv.trainer.errors import ConfigError, LLMReplyError, RunStateError, TrainingInterrupted
from rlaifv.trainer.evaluation.llm import ChatClient, ChatResult, ChatSettings
from rlaifv.trainer.feedback_config import FeedbackConfig
from rlaifv.trainer.iterate_config import IterateConfig
from rlaifv.trainer.llm_rewriter import LLMClaimSplitter, OpenAIChatBackend

SPLIT = '["There is a cat."]'


@pytest.fixture()
def serve() -> Iterator[Callable[..., ChatServer]]:
    servers: list[ChatServer] = []

    def start(reply: Callable[[str], Reply]) -> ChatServer:
        servers.append(ChatServer(reply).__enter__())
        return servers[-1]

    yield start
    for server in servers:
        server.__exit__()


def llm(url: str = "http://127.0.0.1:9/v1", **settings: Any) -> FeedbackConfig:
    return FeedbackConfig(splitter="llm", question_writer="llm", llm_url=url, **settings)


def splitter_at(url: str, **settings: Any) -> LLMClaimSplitter:
    return LLMClaimSplitter(OpenAIChatBackend(url, "rewriter-8b", **({"retries": 1, "backoff_s": 0.0} | settings)))


# 1 + 2 + 12: where the server is reached and how long its replies may be decide no score


def test_the_same_server_at_another_address_or_a_raised_max_tokens_resumes_the_run(tmp_path: Path) -> None:
    """The cut-off error says "raise feedback.llm_max_tokens": doing so refused `iterate` in its folder and made
    `feedback` sample everything again; so did the server moving to another address."""
    from rlaifv.trainer.feedback import feedback_key
    from rlaifv.trainer.iterate import DONE_FILE, _check_run_file

    source = ListPromptSource([PromptItem("p0", png((1, 2, 3)), "describe")], description={"kind": "test"})
    run = tmp_path / "run"

    def iterate(feedback: FeedbackConfig) -> IterateConfig:
        return IterateConfig(model="m", output_dir=str(run), feedback=feedback)

    first = llm("http://10.0.0.5:8000/v1")
    assert _check_run_file(run, iterate(first), source) is False
    (run / "round-01").mkdir()
    (run / "round-01" / DONE_FILE).write_text("")
    moved = llm("https://llm.internal/v1", llm_max_tokens=4096)
    assert _check_run_file(run, iterate(moved), source) is True
    assert feedback_key(moved, ["m"]) == feedback_key(first, ["m"])
    other_model = llm("https://llm.internal/v1", llm_name="llama-3-70b")  # another model: other feedback
    assert feedback_key(other_model, ["m"]) != feedback_key(first, ["m"])
    with pytest.raises(RunStateError, match=r"different settings \(feedback\.llm_name\)"):
        _check_run_file(run, iterate(other_model), source)


def test_batches_saved_before_the_key_left_out_the_url_and_max_tokens_still_resume() -> None:
    """A run stopped before this version keyed its batches with llm_url and llm_max_tokens in the settings."""
    from rlaifv.trainer.dpo import saved_identities
    from rlaifv.trainer.feedback import feedback_keys

    config = llm(llm_max_tokens=2048, llm_retries=9)
    earlier_settings = dataclasses.asdict(config) | {"llm_timeout_s": 60.0, "llm_retries": 3, "llm_concurrency": 8}
    earlier = hashlib.sha256(json.dumps([earlier_settings, saved_identities(["org/m"])[0]]).encode()).hexdigest()
    keys = feedback_keys(config, ["org/m"])
    assert earlier in keys[1:] and keys[0] == feedback_keys(llm(llm_max_tokens=16), ["org/m"])[0]


def _saved_batch(folder: Path, key: str, config: FeedbackConfig) -> list[PromptItem]:
    from rlaifv.trainer.feedback import FeedbackShards, PromptFeedback, ScoredAnswer

    prompts = [PromptItem("p0", png((9, 9, 9)), "describe")]
    shards = FeedbackShards(folder, key, config.to_dict())
    assert shards.resume(prompts, 1) == ([], 0, 0)
    shards.add(0, [PromptFeedback("p0", png((9, 9, 9)), "describe", [ScoredAnswer("a cat", 0.0, 0, 0)])], 1, 0)
    return prompts


def test_starting_over_names_only_settings_that_decide_the_feedback(tmp_path: Path) -> None:
    """It named feedback.llm_retries (which resumes) when the models had changed."""
    from rlaifv.trainer.feedback import FeedbackShards

    prompts = _saved_batch(tmp_path / "a", "key-1", llm(llm_retries=3))
    patient = llm("http://10.1.1.1/v1", llm_retries=9, llm_max_tokens=64)
    with pytest.warns(UserWarning, match=r"was sampled from other models \(or the models changed\): starting over"):
        FeedbackShards(tmp_path / "a", "key-2", patient.to_dict()).resume(prompts, 1)
    prompts = _saved_batch(tmp_path / "b", "key-1", llm(llm_retries=3))
    renamed = llm(llm_retries=9, llm_name="other-8b")
    with pytest.warns(UserWarning, match=r"made with other settings \(feedback\.llm_name\): starting over"):
        FeedbackShards(tmp_path / "b", "key-2", renamed.to_dict()).resume(prompts, 1)


# 3: Retry-After, jitter and the longest wait


async def _complete(settings: ChatSettings, *, jitter: float = 0.5, now: float = 1e9) -> tuple[ChatResult, list]:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async with ChatClient(settings, sleep=sleep, jitter=lambda: jitter, clock=lambda: now) as chat:
        return await chat.complete([{"role": "user", "content": "hi"}]), waits


def test_a_retry_waits_for_retry_after_in_seconds_or_as_a_date_and_backs_off_with_jitter(serve) -> None:
    now = 1_700_000_000.0
    script = {
        1: Reply(status=429, headers={"Retry-After": "7"}),
        2: Reply(status=503, headers={"Retry-After": formatdate(now + 30, usegmt=True)}),
        3: Reply(status=500),
        4: Reply(status=429, headers={"Retry-After": "0"}),
    }
    server = serve(lambda prompt: script.get(server.hits[prompt]) or Reply("ok"))
    settings = ChatSettings(url=server.url, model="m", retries=4, backoff_s=1.0)
    result, waits = asyncio.run(_complete(settings, now=now))
    assert result.ok and result.attempts == 5
    assert waits == [7.0, 30.0, 4.0, 8.0]  # Retry-After when longer than the backoff (1, 2, 4, 8 at jitter 0.5)
    once = serve(lambda prompt: Reply("ok") if once.hits[prompt] % 2 == 0 else Reply(status=500))
    settings = ChatSettings(url=once.url, model="m", backoff_s=1.0)
    low, high = (asyncio.run(_complete(settings, jitter=j))[1] for j in (0.0, 0.75))
    assert low == [0.5] and high == [1.25]  # calls that failed together come back apart: 0.5-1.5 x the backoff


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "Thu, 01 Jan 1970 00:00:10 GMT"}, 7.0),
        ({"retry-after": "Thu, 01 Jan 1970 00:00:10 -0000"}, 7.0),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "inf", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
    ],
)  # the SDK's cases (tests/clients/test_unit.py test_parse_retry_after): the two readings agree
def test_retry_after_is_read_as_the_sdk_reads_it(headers: dict[str, str], expected: float | None) -> None:
    import httpx

    from rlaifv.trainer.evaluation.llm import retry_after_s

    assert retry_after_s(httpx.Headers(headers), now=3.0) == expected


def test_a_retry_after_longer_than_a_retry_may_wait_ends_the_call_saying_so(serve) -> None:
    server = serve(lambda _: Reply(status=429, headers={"Retry-After": "3600"}))
    result, waits = asyncio.run(_complete(ChatSettings(url=server.url, model="m", retries=3, max_wait_s=120)))
    assert not result.ok and result.attempts == 1 and waits == []
    assert "retry after 3600 s, longer than the 120 s a retry waits at most: try again later" in result.errors[-1]
    capped = serve(lambda prompt: Reply("ok") if capped.hits[prompt] > 1 else Reply(status=503))
    result, waits = asyncio.run(_complete(ChatSettings(url=capped.url, model="m", backoff_s=900, max_wait_s=120)))
    assert result.ok and waits == [120.0]  # a backoff is capped too
    with pytest.raises(LLMReplyError, match=r"split answer 'a cat': HTTP 429: .*retry after 3600 s.*try again later"):
        splitter_at(server.url, retries=3).split("a cat")


# 10: which statuses are retried


@pytest.mark.parametrize(("status", "hits"), [(520, 2), (529, 2), (425, 2), (501, 1), (505, 1), (400, 1)])
def test_every_5xx_but_501_and_505_is_retried(serve, status: int, hits: int) -> None:
    server = serve(lambda prompt: Reply(SPLIT) if server.hits[prompt] > 1 else Reply(status=status))
    splitter = splitter_at(server.url)
    if hits == 2:
        assert splitter.split("a cat") == ["There is a cat."]
    else:
        with pytest.raises(LLMReplyError, match=f"HTTP {status}"):
            splitter.split("a cat")
    assert sum(server.hits.values()) == hits


# 4 + 5: credentials, and a base URL with a query


def test_a_base_url_with_a_query_keeps_it_and_no_message_shows_credentials(serve) -> None:
    """`http://h/v1?api-version=X` posted to a wrong path; user, password and query key were in every error."""
    good = serve(lambda _: Reply(SPLIT))
    assert splitter_at(f"{good.url}?api-version=2024-06-01").split("a cat") == ["There is a cat."]
    assert good.queries == ["api-version=2024-06-01"]

    echo = "no route /v1/chat/completions?key=sk-0123secret for user:pa55word"  # a server echoing the request
    failing = serve(lambda _: Reply(raw=echo, status=404))
    secret_url = failing.url.replace("http://", "http://user:pa55word@") + "?key=sk-0123secret"
    with pytest.raises(LLMReplyError) as caught:
        splitter_at(secret_url).split("a cat")
    message = " ".join([str(caught.value), *caught.value.errors])
    assert "pa55word" not in message and "sk-0123secret" not in message and "user" not in message
    host = failing.url.removeprefix("http://").removesuffix("/v1")
    assert f"the LLM at http://***@{host}/v1/chat/completions?*** could not split" in message
    with pytest.raises(ConfigError) as refused:
        llm(secret_url.replace("/v1", "/v1/chat/completions"))
    assert "pa55word" not in str(refused.value) and "sk-0123secret" not in str(refused.value)


def test_reports_run_files_and_bundles_keep_the_url_without_credentials(tmp_path: Path) -> None:
    from rlaifv.trainer.iterate import RUN_FILE, _check_run_file

    config = llm("https://user:pa55word@llm.example/v1?key=sk-0123secret")
    assert config.to_dict()["llm_url"] == "https://***@llm.example/v1?***"
    iterate = IterateConfig(model="m", output_dir=str(tmp_path / "run"), feedback=config)
    assert iterate.to_dict()["feedback"]["llm_url"] == "https://***@llm.example/v1?***"  # run.json, provenance
    source = ListPromptSource([PromptItem("p0", png((1, 2, 3)), "describe")], description={"kind": "test"})
    _check_run_file(tmp_path / "run", iterate, source)
    written = (tmp_path / "run" / RUN_FILE).read_text()
    assert "pa55word" not in written and "sk-0123secret" not in written


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("sk-0123secret\n", "has whitespace at its start or end"),
        ("sk-0123sécret", "holds a space, a control character or a non-ASCII character"),
        ("sk-0123 secret", "holds a space"),
    ],
)
def test_an_api_key_no_header_can_carry_is_refused_by_name_before_anything_loads(
    key: str, problem: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It failed at the first request, after the models had loaded, printing the whole header (key included), and
    was retried; a non-ASCII key ended in a UnicodeEncodeError."""
    from typer import Typer
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import feedback

    monkeypatch.setenv("RLAIFV_LLM_API_KEY", key)
    with pytest.raises(ConfigError, match=f"RLAIFV_LLM_API_KEY {problem}") as caught:
        llm()
    assert "0123" not in str(caught.value)
    with pytest.raises(ConfigError, match="RLAIFV_LLM_API_KEY"):
        OpenAIChatBackend("http://127.0.0.1:9/v1")
    app = Typer()
    app.command()(feedback)
    absent = tmp_path / "absent"
    args = [str(absent / "p.jsonl"), "--model", str(absent), "-o", str(tmp_path / "o")]
    args += ["--set", "feedback.splitter=llm", "--set", "feedback.llm_url=http://127.0.0.1:9/v1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"RLAIFV_LLM_API_KEY {problem}" in result.output, result.output
    assert "0123" not in result.output


def test_a_key_beside_a_user_and_password_in_the_url_is_refused_before_anything_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """httpx sends a URL's user and password as Basic authorization, replacing the key's Bearer header: the key was
    never sent, and the server's 401 was reported as "check the key in RLAIFV_LLM_API_KEY"."""
    from typer import Typer
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import feedback
    from rlaifv.trainer.feedback_config import FeedbackConfig

    url = "http://alice:pw12@127.0.0.1:9/v1"
    monkeypatch.setenv("RLAIFV_LLM_API_KEY", "sk-envsecret123")
    with pytest.raises(ConfigError, match="user and password and RLAIFV_LLM_API_KEY is set") as caught:
        FeedbackConfig(splitter="llm", llm_url=url)
    assert "pw12" not in str(caught.value) and "envsecret" not in str(caught.value)
    with pytest.raises(ConfigError, match="RLAIFV_LLM_API_KEY"):
        OpenAIChatBackend(url)
    with pytest.raises(ValueError, match="give one of them"):
        ChatSettings(url=url, model="m", api_key="sk-envsecret123")
    app = Typer()
    app.command()(feedback)
    absent = tmp_path / "absent"
    args = [str(absent / "p.jsonl"), "--model", str(absent), "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--set", "feedback.splitter=llm", "--set", f"feedback.llm_url={url}"])
    assert result.exit_code == 2 and "give one of them" in result.output, result.output

    monkeypatch.delenv("RLAIFV_LLM_API_KEY")  # either alone is taken
    assert FeedbackConfig(splitter="llm", llm_url=url).llm_url == url
    assert ChatSettings(url="http://127.0.0.1:9/v1?x=a@b", model="m", api_key="sk-envsecret123").api_key


def test_a_request_that_cannot_be_written_is_not_retried_nor_shown(serve) -> None:
    from pydantic import ValidationError

    server = serve(lambda _: Reply("ok"))
    with pytest.raises(ValidationError) as refused:
        ChatSettings(url=server.url, model="m", api_key="sk-0123secret\n")  # what `rlaifv eval --llm-key` builds
    assert "0123secret" not in str(refused.value) and "whitespace" in str(refused.value)
    unchecked = ChatSettings(url=server.url, model="m", retries=3).model_copy(update={"api_key": "sk-0123secret\n"})
    result, waits = asyncio.run(_complete(unchecked))
    assert not result.ok and result.attempts == 1 and waits == [] and not server.hits
    assert result.errors[-1].startswith("LocalProtocolError: ") and "0123secret" not in result.errors[-1]


# 8 + 9: settings refused before anything loads


def test_an_empty_model_name_or_a_url_with_spaces_is_refused_by_the_settings(tmp_path: Path) -> None:
    """`feedback.llm_name=` crashed in a pydantic traceback once the models had loaded; a URL with a trailing
    newline or spaces passed the check (urlsplit drops them) and failed at the first request."""
    from typer import Typer
    from typer.testing import CliRunner

    from rlaifv.trainer.cli import feedback

    for name in ("", " rw-8b"):
        with pytest.raises(ConfigError, match="llm_name must name the server's model"):
            llm(llm_name=name)
    for url in (" http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1\n", "http://127.0.0.1:9/v 1"):
        with pytest.raises(ConfigError, match=r"llm_url 'http://127\.0\.0\.1:9/v ?1' has whitespace"):
            llm(url)
    app = Typer()
    app.command()(feedback)
    absent = tmp_path / "absent"
    args = [str(absent / "p.jsonl"), "--model", str(absent), "-o", str(tmp_path / "o")]
    args += ["--set", "feedback.splitter=llm", "--set", "feedback.llm_url=http://127.0.0.1:9/v1"]
    result = CliRunner().invoke(app, [*args, "--set", "feedback.llm_name="])
    assert result.exit_code == 2 and "llm_name must name the server's model" in result.output, result.output
    assert not (tmp_path / "o").exists()


# 11: errors name the setting to fix


@pytest.mark.parametrize(
    ("reply", "named"),
    [
        (Reply(status=404), r"HTTP 404: .*: check feedback\.llm_name \('rewriter-8b': a model the server serves\)"),
        (Reply(status=401), r"HTTP 401: .*: check the key in RLAIFV_LLM_API_KEY \(it is not set\)"),
        (Reply(status=403), r"HTTP 403: .*: check the key in RLAIFV_LLM_API_KEY"),
        (
            Reply(raw='{"error": {"message": "max_tokens must be at most 512"}}', status=400),
            r"max_tokens must be at most 512.*: check feedback\.llm_max_tokens \(1024: more than the server allows\?\)",
        ),
    ],
)
def test_a_refusal_names_the_setting_to_fix(serve, reply: Reply, named: str) -> None:
    server = serve(lambda _: reply)
    with pytest.raises(LLMReplyError, match=named):
        splitter_at(server.url).split("a cat")


def test_a_server_out_of_reach_or_hanging_up_says_so() -> None:
    import httpx

    from rlaifv.testing.server import free_port
    from rlaifv.trainer.evaluation.llm import _detail

    with pytest.raises(LLMReplyError, match=r"ConnectError: .*: check feedback\.llm_url \(is the server up"):
        splitter_at(f"http://127.0.0.1:{free_port()}/v1").split("a cat")
    assert _detail(httpx.ReadError(""), None) == "connection closed by the server"  # it read "ReadError: "
    shown = _detail(httpx.ConnectError("cannot reach http://u:pa55@h/v1?key=sk-1 with sk-2"), "sk-2")
    assert shown == "cannot reach http://***@h/v1?*** with ***"


# 6: an LLM splitter that finds no claims


def test_an_llm_splitter_finding_no_claims_in_most_answers_is_warned_and_named_when_no_pairs(
    tiny_model: Path, serve
) -> None:
    """A server answering [] to every answer passed silently (mean_claims 0), then "no pairs: sample more candidates
    or prompts, or raise the temperature"."""
    from rlaifv.reward.claims import RuleQuestionWriter
    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.trainer.feedback import collect_feedback
    from rlaifv.trainer.preference_pairs import PairConfig, build_pairs, why_no_pairs

    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [PromptItem(f"p{i}", png((60 * i, 9, 9)), "describe the image") for i in range(3)]
    config = llm(num_samples=4, max_tokens=6, drop_truncated=False, temperature=1.0)
    with pytest.warns(UserWarning, match=r"found no claims in 12 of 12 answers.*feedback\.llm_name='default'"):
        results = collect_feedback(
            model,
            processor,
            prompts,
            config,
            labeler=ControlledLabeler(bool),
            splitter=splitter_at(serve(lambda _: Reply("[]")).url),
            writer=RuleQuestionWriter(),
            progress=False,
        )
    rows, stats = build_pairs(results, PairConfig())
    assert not rows and (stats.answers, stats.answers_without_claims) == (12, 12)
    said = why_no_pairs(stats, PairConfig())
    assert "12 of the 12 answers have no claims" in said and "temperature" not in said
    assert "A rerun reads the saved feedback.parquet again" in said  # a mended server was never asked again


# 7: SIGTERM while the LLM's calls are in flight


def _stop_when_asked(server_reply: Callable[[str], bool]) -> Callable[[str], Reply]:
    """A server that, on the requests `server_reply` picks, sends SIGTERM to the main thread and never answers."""
    sent = threading.Event()

    def reply(prompt: str) -> Reply:
        if not server_reply(prompt):
            return Reply(SPLIT)
        if not sent.is_set():
            sent.set()
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
        return Reply(hang=True)

    return reply


def test_sigterm_cancels_the_llm_calls_in_flight_and_their_retries(serve) -> None:
    """SIGTERM waited for the calls: up to (retries + 1) x timeout, then the error of the last attempt (exit 1)."""
    from rlaifv.trainer.interrupt import stop_on_sigterm

    server = serve(_stop_when_asked(lambda _: True))
    splitter = splitter_at(server.url, retries=3, timeout=5.0)
    with pytest.raises(TrainingInterrupted) as caught, stop_on_sigterm():
        splitter.split_many(["a cat", "a dog"])
    assert caught.value.exit_code == 143 and "its calls were cancelled" in str(caught.value)
    assert sum(server.hits.values()) <= 2  # nothing retried


def test_feedback_stopped_while_its_llm_is_asked_keeps_the_saved_batches(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve
) -> None:
    from rlaifv.reward.claims import RuleQuestionWriter
    from rlaifv.reward.models import load_model, load_processor
    from rlaifv.trainer import feedback as feedback_module
    from rlaifv.trainer.feedback import FeedbackShards, collect_feedback, feedback_key

    batches: list[int] = []
    server = serve(_stop_when_asked(lambda _: len(batches) >= 2))
    real = feedback_module.sample_candidates

    def sampling(*args: Any, **kwargs: Any) -> Any:
        batches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(feedback_module, "sample_candidates", sampling)
    model, processor = load_model(tiny_model), load_processor(tiny_model)
    prompts = [PromptItem(f"p{i}", png((60 * i, 9, 9)), "describe the image") for i in range(4)]
    config = llm(server.url, num_samples=2, max_tokens=4, drop_truncated=False, prompt_batch=2, llm_timeout_s=5)
    shards = FeedbackShards(tmp_path / "partial", feedback_key(config, [tiny_model]), config.to_dict())
    splitter = LLMClaimSplitter(OpenAIChatBackend(server.url, retries=2, timeout=5.0))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=r"after 2 of 4 prompts \(the next batch's LLM calls cancelled\)"):
        collect_feedback(
            model,
            processor,
            prompts,
            config,
            labeler=ControlledLabeler(bool),
            splitter=splitter,
            writer=RuleQuestionWriter(),
            progress=False,
            shards=shards,
        )
    assert [p.name for p in sorted((tmp_path / "partial").glob("batch-*.parquet"))] == ["batch-000000000.parquet"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_ctrl_c_lets_the_llm_calls_in_hand_finish(serve) -> None:
    """Ctrl-C says it stops "where the work is saved (the next step or batch)": one that came while the batch was
    sampled cancelled its calls before any was sent, and the batch was sampled again on the rerun. SIGTERM alone
    cancels them. (The handler is called here as the signal would call it, in this thread: a signal sent from
    the server's thread reached it at a time the test could not choose.)"""
    from rlaifv.trainer.interrupt import stop_on_sigterm

    server = serve(lambda prompt: Reply(SPLIT))
    splitter = splitter_at(server.url)
    results: list[Any] = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a background job's is
    # ignored, and `stop_on_sigterm` leaves an ignored SIGINT alone)
    try:
        with pytest.raises(TrainingInterrupted) as caught, stop_on_sigterm():
            handler = signal.getsignal(signal.SIGINT)
            assert callable(handler)
            handler(signal.SIGINT, None)
            results = splitter.split_many(["a cat", "a dog"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert caught.value.exit_code == 130 and "as the work finished" in str(caught.value)
    assert results == [["There is a cat."], ["There is a cat."]] and sum(server.hits.values()) == 2


def test_a_stop_flag_whose_listener_loop_closed_does_not_raise_in_the_signal_handler() -> None:
    from rlaifv.trainer.interrupt import StopFlag

    flag, loop = StopFlag(), asyncio.new_event_loop()
    loop.close()
    with flag.notify(lambda: loop.call_soon_threadsafe(print)):
        flag.set()  # raised "Event loop is closed" from inside the handler
    assert flag() and flag.urgent


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("http://admin:123#s3cretpw@llm.example/v1", "s3cretpw"),
        ("http://bob:hunter2/xyz@llm.example/v1", "hunter2"),
        ("http://bob:pa?ss@llm.example/v1", "pa?ss"),
        ("https://u:pw@llm.example/v1?api-key=k3y#frag", "k3y"),
    ],
)
def test_a_password_with_an_unencoded_delimiter_is_never_shown(url: str, secret: str) -> None:
    """urlsplit ends the host part at the first '#', '/' or '?': the rest of such a password came back as a
    fragment or a path, and urlsplit's own error quoted it."""
    from rlaifv.trainer.credentials import shown_url
    from rlaifv.trainer.feedback_config import check_llm_url

    shown = shown_url(url)
    assert secret not in shown and shown.startswith(url.split(":")[0] + "://***@llm.example"), shown
    if "api-key" not in url:
        with pytest.raises(ConfigError) as refused:
            check_llm_url(url)
        assert secret not in str(refused.value) and "percent-encode" in str(refused.value)


def test_printed_settings_keep_the_url_credentials_out() -> None:
    """A config in a log line or a traceback's locals showed llm_url whole."""
    from rlaifv.trainer.feedback_config import FeedbackConfig

    url = "https://bob:s3cretpw@llm.example/v1?api-key=k3y"
    config = FeedbackConfig(splitter="llm", llm_url=url, llm_name="m")
    settings = ChatSettings(url=url, model="m")
    keyed = ChatSettings(url="https://llm.example/v1?api-key=k3y", model="m", api_key="sk-0123456789")
    for shown in (repr(config), str(config), repr(settings), str(settings), repr(keyed)):
        assert "s3cretpw" not in shown and "k3y" not in shown and "sk-0123" not in shown, shown
        assert "llm.example" in shown, shown
    assert "splitter='llm'" in repr(config) and "model='m'" in repr(settings)


def test_a_key_echoed_across_the_cut_of_an_error_body_is_hidden(serve) -> None:
    """The body was cut to 300 characters before the key was hidden: a key that straddled the cut kept its head."""
    key = "sk-live-0123456789abcdef"
    echo = " /v1/chat/completions?api-key="
    body = "x" * (294 - len(echo)) + echo + key  # the key's first 6 characters inside the first 300
    server = serve(lambda _: Reply(status=404, raw=body))

    async def main() -> ChatResult:
        settings = ChatSettings(url=f"{server.url}?api-key={key}", model="m", retries=0)
        async with ChatClient(settings) as chat:
            return await chat.complete([{"role": "user", "content": "hi"}])

    result = asyncio.run(main())
    assert server.queries == [f"api-key={key}"]  # the server saw the key: its echo is what must be hidden
    assert result.errors and not any(key[:6] in error for error in result.errors), result.errors
