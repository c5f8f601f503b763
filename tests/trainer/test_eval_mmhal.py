"""MMHal-Bench judging end to end against a real OpenAI-compatible chat server on loopback.

mmhal_records.json holds 10 records (types in the original's order, i % 8); each answer tells the server how
to judge:
 0 attribute    rate=6          -> 6
 1 adversarial  rate=2          -> 2
 2 comparison   [two-ratings]   -> a reply with two ratings, every attempt: unparsed, counted as 0
 3 counting     rate=4          -> 4
 4 relation     [hang]          -> the judge never answers: timeouts, retried, failed
 5 environment  [garbage]       -> a body that is no chat completion: retried, failed
 6 holistic     [flaky] rate=4  -> 503 first, then 4
 7 other        rate=1          -> 1
 8 attribute    rate=5          -> 5
 9 adversarial  rate=3          -> 3
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from chat_server import ChatServer, Reply
from eval_images import truncated_jpeg
from PIL import Image
from typer.testing import CliRunner

from rlaifv.cli.eval_run import Source
from rlaifv.cli.main import app
from rlaifv.testing.server import free_port
from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.candidates import Prompt, Sampled, Sampling
from rlaifv.trainer.evaluation.llm import ChatSettings
from rlaifv.trainer.evaluation.mmhal import (
    evaluate_mmhal,
    judge_key,
    judge_prompt,
    mmhal_prompts,
    parse_rating,
    read_records,
    read_template,
)
from rlaifv.trainer.evaluation.store import JsonlStore, digest

DATA = Path(__file__).parent / "data" / "eval"
RECORDS = DATA / "mmhal_records.json"


class Judge:
    """The scripted judge; `healthy` turns the hanging and garbage judges into normal ones."""

    def __init__(self) -> None:
        self.healthy = False
        self.server = ChatServer(self.reply)

    def reply(self, prompt: str) -> Reply:
        answer = prompt.split("### LMM Answer to Evaluate", 1)[1]
        if "[hang]" in answer and not self.healthy:
            return Reply(hang=True)
        if "[garbage]" in answer and not self.healthy:
            return Reply(raw="<html>upstream error</html>")
        if "[flaky]" in answer and self.server.hits[prompt] == 1:
            return Reply(status=503)
        if "[two-ratings]" in answer:
            return Reply("Rating: 2 at first sight, but on reflection Rating: 4.")
        rating = re.search(r"rate=(\d)", answer)
        assert rating is not None
        return Reply(f"The answer matches the image.\nRating: {rating.group(1)}, as the rubric says")


@pytest.fixture()
def judge():
    judge = Judge()
    with judge.server:
        yield judge


def settings(url: str, **kw) -> ChatSettings:
    return ChatSettings(url=url, model="judge-1", api_key="sk-test", timeout_s=0.3, retries=1, backoff_s=0, **kw)


def test_parse_rating_as_the_original() -> None:
    assert parse_rating("Clear.\nRating: 5, very informative") == 5
    assert parse_rating("RATING: 3") == 3
    assert parse_rating("Rating: 4\n\n- 2 objects are wrong") == 4  # a list below is not a range "4 - 2"
    assert parse_rating("rating: 4 ... as said, rating: 4") == 4  # one distinct rating
    assert parse_rating("Rating: 2 or Rating: 4") is None
    assert parse_rating("I give it a 5.") is None


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("**Rating:** 4", 4),  # Markdown bold, as chat models write it
        ("**Rating: 5**, very informative", 5),
        ("Rating: **3**", 3),
        ("__Rating__ : 2", 2),
        ("<think>Could be Rating: 2 or Rating: 5</think>\nFinal: Rating: 5", 5),  # the answer after the thinking
        ("The answer is fine.</think>\n\nRating: 6", 6),  # a server that put <think> in the prompt
        ("<think>Rating: 2 at first, Rating: 4 maybe", None),  # cut off while thinking: no final answer
        ("<think>Surely Rating: 4.</think> I cannot judge this.", None),  # the final answer has no rating
        ("Rating: 2 at first sight, but on reflection Rating: 4.", None),  # which one is meant: not guessed
        ("Rating: 10", None),  # the original read these as 1 and 4
        ("Rating: 4.5", None),
        ("Rating: 4-5", None),
        ("Rating: 5.", 5),
        ("Score 5/6.", None),
    ],
)
def test_parse_rating_reads_what_judges_write(reply: str, rating: int | None) -> None:
    assert parse_rating(reply) == rating


def test_judging_end_to_end(judge: Judge, tmp_path: Path) -> None:
    records = read_records(RECORDS)
    store = tmp_path / "judged.jsonl"
    report = evaluate_mmhal(records, settings(judge.server.url), store, progress=False)
    m = report["metrics"]
    # counted (not failed): 0,1,2,3,6,7,8,9 -> 6, 2, 0 (unparsed), 4, 4, 1, 5, 3
    assert m["score"] == 25 / 8
    assert m["hallucination_rate"] == 3 / 8  # 2, 0, 1
    assert m["informativeness"] == 100 * (3 + 2 + 0 + 1 + 1 + 1 + 2 + 0) / 3 / 8
    assert (m["items"], m["rated"], m["unparsed"], m["failed"]) == (10, 7, 1, 2)
    assert m["failed_items"] == [4, 5] and m["complete"] is False
    assert m["by_type"] == {
        "attribute": (6 + 5) / 2,
        "adversarial": (2 + 3) / 2,
        "comparison": 0,
        "counting": 4,
        "holistic": 4,
        "other": 1,
    }
    items = report["items"]
    assert [i["status"] for i in items] == ["rated"] * 2 + ["unparsed", "rated", "failed", "failed"] + ["rated"] * 4
    assert items[2]["rating"] is None and len(items[2]["replies"]) == 2  # raw replies kept
    assert items[4]["errors"] == ["timeout after 0.3 s"] * 2 and items[4]["review"] is None
    assert items[5]["errors"][0].startswith("not a chat completion: <html>") and items[5]["attempts"] == 2
    assert items[6]["rating"] == 4 and items[6]["attempts"] == 2 and items[6]["errors"][0].startswith("HTTP 503")
    assert set(judge.server.auth) == {"Bearer sk-test"} and set(judge.server.models) == {"judge-1"}
    assert len(store.read_text().splitlines()) == 10  # failures are recorded too

    # Resume: the two failed items are judged again (one call each), and so is the unparsed one (two attempts).
    judge.healthy = True
    before = sum(judge.server.hits.values())
    again = evaluate_mmhal(records, settings(judge.server.url), store, progress=False)["metrics"]
    assert sum(judge.server.hits.values()) - before == 1 + 1 + 2
    assert (again["failed"], again["complete"]) == (0, True)
    assert again["score"] == (25 + 5 + 0) / 10 and again["hallucination_rate"] == 4 / 10


def test_concurrency_limit(tmp_path: Path) -> None:
    """Requests wait at the server until two are in flight together; the client never sends a third."""
    records = read_records(RECORDS)[:1] * 6
    records = [r.model_copy(update={"model_answer": f"answer {i}: rate=5"}) for i, r in enumerate(records)]
    with ChatServer(lambda _: Reply("Rating: 5"), gate_at=2) as server:
        report = evaluate_mmhal(records, settings(server.url, concurrency=2), tmp_path / "j.jsonl", progress=False)
    assert report["metrics"]["rated"] == 6
    assert server.max_in_flight == 2


def test_answers_file_and_template(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"text": f"Assistant: answer {{{i}}}"}) + "\n" for i in range(10)))
    records = read_records(RECORDS, answers)
    assert records[3].model_answer == "answer {3}"
    template = tmp_path / "template.txt"
    template.write_text("C: {contents}\nQ: {question}\nR: {reference}\nA: {answer}\n")
    assert judge_prompt(records[3], read_template(template)).endswith("A: answer {3}\n")
    template.write_text("{question} {answer}")
    with pytest.raises(DataError, match="contents"):
        read_template(template)
    answers.write_text('{"text": "one"}\n')
    with pytest.raises(DataError, match="1 answers for the 10 records"):
        read_records(RECORDS, answers)


def test_cli_reports_failures_with_exit_code_2(judge: Judge, tmp_path: Path) -> None:
    out = tmp_path / "mmhal.json"
    args = ["eval", "mmhal", "--records", str(RECORDS), "--judge-url", judge.server.url, "--judge-model", "judge-1"]
    args += ["--timeout", "0.3", "--retries", "1", "--backoff", "0", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "2 item(s) failed" in result.output
    report = json.loads(out.read_text())
    assert report["metrics"]["failed"] == 2 and len(report["items"]) == 10
    assert (tmp_path / "mmhal.judged.jsonl").is_file()
    judge.healthy = True
    assert CliRunner().invoke(app, args).exit_code == 0


@pytest.mark.slow
def test_cli_generates_answers_with_a_bundle(tmp_path: Path) -> None:
    """Images named after image_src -> answers from the shipped bundle -> judged."""
    for i in range(10):
        Image.new("RGB", (64, 64), (200, 40 + 10 * i, 40)).save(tmp_path / f"img{i}.jpg")
    with ChatServer(lambda _: Reply("Rating: 4")) as server:
        out = tmp_path / "mmhal.json"
        args = ["eval", "mmhal", "--records", str(RECORDS), "--judge-url", server.url, "--judge-model", "j"]
        args += ["--images", str(tmp_path), "--bundle", "default", "--max-tokens", "8", "-o", str(out)]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["metrics"]["score"] == 4 and report["settings"]["n"] == 1
    assert all(not item["model_answer"].startswith("Answer ") for item in report["items"])  # generated, not given


def _rate_or_zero(prompt: str) -> Reply:
    """A judge that rates an empty answer 0 (as gpt-4 does) and others by their `rate=N`."""
    answer = prompt.split("### LMM Answer to Evaluate", 1)[1].strip()
    rating = re.search(r"rate=(\d)", answer)
    return Reply(f"Rating: {rating.group(1) if rating else 0}")


def test_an_empty_answer_is_judged_and_an_unfilled_template_refused(tmp_path: Path) -> None:
    """One empty answer is judged as the original judges it; a file whose every answer is empty (the published
    template, `model_answer: ""`) is refused before any judge call."""
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"answer": "" if i == 3 else "rate=5"}) + "\n" for i in range(10)))
    with ChatServer(_rate_or_zero) as server:
        args = ["eval", "mmhal", "--records", str(RECORDS), "--judge-url", server.url, "--judge-model", "j"]
        out = tmp_path / "mmhal.json"
        result = CliRunner().invoke(app, [*args, "--answers", str(answers), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "warning: 1 answer(s) are empty" in result.output
        report = json.loads(out.read_text())
        assert report["metrics"]["score"] == 45 / 10 and report["metrics"]["empty_answers"] == 1
        assert (report["items"][3]["status"], report["items"][3]["rating"]) == ("rated", 0)

        template = tmp_path / "template.json"
        rows = json.loads(RECORDS.read_text())
        template.write_text(json.dumps([{**r, "model_answer": ""} for r in rows]))
        calls = sum(server.hits.values())
        result = CliRunner().invoke(app, ["eval", "mmhal", "--records", str(template), *args[4:], "-o", str(out)])
        assert result.exit_code == 1 and "every model_answer is empty (the unfilled template)" in result.output
        assert sum(server.hits.values()) == calls


def test_an_empty_generated_answer_is_judged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that says nothing for one record: judged (rated 0 here), not a stop with "has no model_answer"."""

    class Generator:
        fingerprint = "fake:one-empty"

        def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]:
            texts = ["" if p.id == "3" else "rate=4" for p in prompts]
            return [Sampled(texts=[t] * n, dpo=[0.0] * n) for t in texts]

    monkeypatch.setattr(Source, "generator", lambda self: Generator())
    for i in range(10):
        Image.new("RGB", (8, 8), (200, 40 + 10 * i, 40)).save(tmp_path / f"img{i}.jpg")
    with ChatServer(_rate_or_zero) as server:
        args = ["eval", "mmhal", "--records", str(RECORDS), "--judge-url", server.url, "--judge-model", "j"]
        args += ["--images", str(tmp_path), "--service", "http://x", "-o", str(tmp_path / "mmhal.json")]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "mmhal.json").read_text())
    assert report["items"][3]["model_answer"] == "" and report["items"][3]["rating"] == 0
    assert report["metrics"]["score"] == 36 / 10


def test_a_failing_judge_is_named_on_the_console(tmp_path: Path) -> None:
    """Every judgement fails: the first error's cause is printed; a URL httpx cannot call, and a bad option, are
    usage errors before anything runs."""
    args = ["eval", "mmhal", "--records", str(RECORDS), "--judge-model", "j", "--retries", "0", "--backoff", "0"]
    with ChatServer(lambda _: Reply(status=404)) as server:
        result = CliRunner().invoke(app, [*args, "--judge-url", server.url, "-o", str(tmp_path / "a.json")])
    assert result.exit_code == 2 and "10 item(s) failed" in result.output
    assert "first error: HTTP 404" in result.output
    closed = f"http://127.0.0.1:{free_port()}/v1"
    result = CliRunner().invoke(app, [*args, "--judge-url", closed, "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "first error: ConnectError" in result.output
    for bad in (["--judge-url", "notaurl"], ["--judge-url", closed, "--concurrency", "0"]):
        result = CliRunner().invoke(app, [*args, *bad, "-o", str(tmp_path / "c.json")])
        assert result.exit_code == 2 and "Invalid value" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.json").exists()


def test_nothing_judged_is_no_score_and_leaves_a_gap_in_the_curve(tmp_path: Path) -> None:
    """Every judgement failed: the three numbers are None (a 0.0 score would read as a model that hallucinates
    everywhere); a scaling point averages only the draws that were judged; the table and plot show the gap."""
    from rlaifv.trainer.evaluation.mmhal import Judged, summarize_mmhal
    from rlaifv.trainer.evaluation.scaling import _mean, curve_table, plot_curve

    failed = [Judged(index=i, question_type="attribute", status="failed", rating=None, review=None) for i in range(2)]
    m = summarize_mmhal(failed)
    assert (m["score"], m["hallucination_rate"], m["informativeness"]) == (None, None, None)
    assert m["failed"] == 2 and m["complete"] is False

    assert _mean([{"score": None, "n": 1}, {"score": 3.0, "n": 2}, {"score": 4.0, "n": 3}]) == {"score": 3.5, "n": 2}
    assert _mean([{"score": None}, {"score": None}]) == {"score": None}
    assert _mean([{"flag": True}, {"flag": False}]) == {"flag": True}
    by_type = [{"by_type": {"attribute": 4.0}}, {"by_type": {}}, {"by_type": {"attribute": 2.0, "other": 1.0}}]
    assert _mean(by_type) == {"by_type": {"attribute": 3.0, "other": 1.0}}  # a type no judged item had: left out
    assert _mean(by_type[1:]) == _mean(by_type[::-1][:2]) == {"by_type": {"attribute": 2.0, "other": 1.0}}

    from rlaifv.trainer.evaluation.report import Report, compare, report_markdown, write_report

    report = Report(benchmark="mmhal", name="all-failed", settings={}, metrics=m)
    assert "| score | n/a |" in report_markdown(report)
    judged = Report(benchmark="mmhal", name="judged", settings={}, metrics={"score": 3.0, "by_type": {"other": 3.0}})
    paths = [write_report(r, tmp_path / f"{r.name}.json")[0] for r in (report, judged)]
    table = compare(paths)
    assert "| score | n/a | 3.0000 |" in table and "| by_type.other | n/a | 3.0000 |" in table
    as_md = write_report(judged, tmp_path / "md" / "r.md")  # the Markdown was written over the JSON
    assert as_md == (tmp_path / "md" / "r.json", tmp_path / "md" / "r.md") and compare([as_md[0]])
    with pytest.raises(DataError, match="is a folder"):
        write_report(judged, tmp_path / "md")

    result = {
        "ns": [1, 2],
        "rules": ["dpo"],
        "prompts": 2,
        "curve": {
            "dpo": {"1": {"score": None, "hallucination_rate": None}, "2": {"score": 3.5, "hallucination_rate": 0.25}}
        },
    }
    table = curve_table(result, ["score", "hallucination_rate"], percent=["hallucination_rate"])
    assert "| score | dpo | n/a | 3.5000 |" in table and "| hallucination_rate % | dpo | n/a | 25.0 |" in table
    assert plot_curve(result, ["score", "hallucination_rate"], tmp_path / "c.png").stat().st_size > 0


def test_a_judge_whose_replies_have_no_rating_fails_the_run(tmp_path: Path) -> None:
    """Replies the parser cannot read count as 0 (as in the original): every one of them made a 0.0 score that
    read as a model that hallucinates everywhere, with exit 0. As `eval amber` does for its unparsed answers:
    more than half is an error (exit 1, the report still written), fewer a warning."""
    args = ["eval", "mmhal", "--records", str(RECORDS), "--judge-model", "j", "--retries", "0"]
    with ChatServer(lambda _: Reply("I think it's decent. Score 5/6.")) as server:
        out = tmp_path / "none.json"
        result = CliRunner().invoke(app, [*args, "--judge-url", server.url, "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert 'error: 10 of 10 judgements (100%) have no rating (e.g. "I think it\'s decent. Score 5/6.")' in result.output
    assert "count as 0" in result.output and "--template" in result.output
    assert json.loads(out.read_text())["metrics"]["unparsed"] == 10

    def two_unread(prompt: str) -> Reply:
        return Reply("Looks fine.") if re.search(r"Answer [12]:", prompt) else _rate_or_zero(prompt)

    with ChatServer(two_unread) as server:
        out = tmp_path / "some.json"
        result = CliRunner().invoke(app, [*args, "--judge-url", server.url, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: 2 of 10 judgements (20%) have no rating (e.g. 'Looks fine.')" in result.output


def test_unparsed_items_are_asked_again_and_another_judge_is_asked_anew(tmp_path: Path) -> None:
    """The store kept unparsed judgements and was keyed by the model name only: a fixed judge at another URL could
    not change the score. Unparsed items are asked again (as failed ones are), a judge at another URL is another
    judge, and ratings taken from the store are said on the console."""
    out = tmp_path / "llava-v1.5"
    args = ["eval", "mmhal", "--records", str(RECORDS), "--judge-model", "gpt-4", "--retries", "0", "-o", str(out)]
    store = tmp_path / "llava-v1.5.judged.jsonl"

    def run(url: str) -> tuple[str, dict]:
        result = CliRunner().invoke(app, [*args, "--judge-url", url])
        assert result.exit_code in (0, 1), result.output
        return result.output, json.loads(out.read_text())

    with (
        ChatServer(lambda _: Reply("Rating: four")) as broken,
        ChatServer(lambda _: Reply("**Rating:** 4")) as fixed,
        ChatServer(lambda _: Reply("Rating: 2")) as other,
    ):
        run(broken.url)
        output, report = run(broken.url)
        assert sum(broken.hits.values()) == 20 and "taken from" not in output
        assert report["metrics"]["unparsed"] == 10
        output, report = run(fixed.url)  # same model name, another URL: nothing reused, every item asked
        assert sum(fixed.hits.values()) == 10 and "taken from" not in output
        assert (report["metrics"]["score"], report["metrics"]["unparsed"]) == (4, 0)
        output, report = run(fixed.url)  # the same judge again: nothing asked, and the console says so
        assert sum(fixed.hits.values()) == 10 and report["metrics"]["score"] == 4
        assert f"10 judgement(s) taken from {store}" in output
        assert all(item["stored"] for item in report["items"])
        output, report = run(other.url)
        assert sum(other.hits.values()) == 10 and report["metrics"]["score"] == 2
    assert report["settings"]["judge_url"] == other.url and report["name"] == "llava-v1.5"


def test_stored_replies_are_read_again_and_older_stores_are_not_reused(tmp_path: Path) -> None:
    """A stored reply an older parser could not read is rated from the store without a call; a row of a store
    written when the key was (model, prompt) is read without error but not reused: it does not say which URL
    judged it."""
    records = read_records(RECORDS)[:2]
    prompts = [judge_prompt(r) for r in records]
    path = tmp_path / "judged.jsonl"
    with ChatServer(lambda _: Reply("Rating: 3")) as server:
        judge = settings(server.url)
        old = JsonlStore(path)
        row = {"status": "rated", "rating": 6, "review": "Rating: 6", "replies": ["Rating: 6"], "attempts": 1}
        old.put(digest("mmhal", judge.model, prompts[0]), row)
        row = {"status": "unparsed", "rating": None, "review": "**Rating:** 4", "replies": ["**Rating:** 4"]}
        old.put(judge_key(judge, prompts[1]), row)
        report = evaluate_mmhal(records, judge, path, progress=False)
    assert dict(server.hits) == {prompts[0]: 1}
    assert [(i["rating"], i["status"], i["stored"]) for i in report["items"]] == [
        (3, "rated", False),
        (4, "rated", True),
    ]


def test_by_type_is_each_records_own_question_type(tmp_path: Path) -> None:
    """A subset or reordered file keeps its records' types (the original reads the type from the position, i % 8,
    which only the full file in its order gets right); a record without one falls back to its position, and a
    type of its own is reported after the original's eight."""
    rows = json.loads(RECORDS.read_text())
    untyped = {k: v for k, v in rows[9].items() if k != "question_type"}  # position 3: counting
    subset = [rows[3], rows[7], rows[0], untyped, {**rows[8], "question_type": "scenery"}]
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(subset))
    with ChatServer(_rate_or_zero) as server:
        report = evaluate_mmhal(read_records(path), settings(server.url), None, progress=False)
    by_type = report["metrics"]["by_type"]
    assert by_type == {"attribute": 6, "counting": (4 + 3) / 2, "other": 1, "scenery": 5}
    assert list(by_type) == ["attribute", "counting", "other", "scenery"]
    assert [i["question_type"] for i in report["items"]] == ["counting", "other", "attribute", "counting", "scenery"]


def test_a_curve_of_unrated_judgements_fails_and_a_rerun_says_where_ratings_come_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scaling mode checks every point as a single run does, and says which judgements came from the store."""

    class Generator:
        fingerprint = "fake:rate"

        def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]:
            return [Sampled(texts=[f"rate={k % 7}" for k in range(n)], dpo=[0.0] * n) for _ in prompts]

    monkeypatch.setattr(Source, "generator", lambda self: Generator())
    for i in range(10):
        Image.new("RGB", (8, 8), (200, 40 + 10 * i, 40)).save(tmp_path / f"img{i}.jpg")
    args = ["eval", "mmhal", "--records", str(RECORDS), "--judge-model", "j", "--retries", "0", "--modes", "dpo"]
    args += ["--images", str(tmp_path), "--service", "http://x", "--best-of", "1,2", "-o", str(tmp_path / "c.json")]
    with ChatServer(lambda _: Reply("No idea.")) as server:
        result = CliRunner().invoke(app, [*args, "--judge-url", server.url])
    assert sum(server.hits.values()) == len(server.hits)  # an unrated answer is not asked again at the next point
    assert result.exit_code == 1 and "error: 10 of 10 judgements (100%) have no rating" in result.output
    assert (tmp_path / "c.json").is_file()
    with ChatServer(_rate_or_zero) as server:
        assert CliRunner().invoke(app, [*args, "--judge-url", server.url]).exit_code == 0
        judged = len(server.hits)  # the distinct answers the points picked, each judged once
        result = CliRunner().invoke(app, [*args, "--judge-url", server.url])
        assert sum(server.hits.values()) == judged
    assert result.exit_code == 0 and f"{judged} judgement(s) taken from {tmp_path / 'c.judged.jsonl'}" in result.output


def test_a_bad_image_is_named_before_any_model_loads(tmp_path: Path) -> None:
    """Only the image's existence was checked: a truncated one failed at its batch, after the model loaded and
    earlier batches were sampled, naming no record or file."""
    for i in range(10):
        Image.new("RGB", (8, 8), (200, 40 + 10 * i, 40)).save(tmp_path / f"img{i}.jpg")
    assert [p.id for p in mmhal_prompts(read_records(RECORDS), tmp_path)] == [str(i) for i in range(10)]
    (tmp_path / "img3.jpg").write_bytes(truncated_jpeg())
    message = f"record 3: image {tmp_path / 'img3.jpg'}: undecodable image: image could not be decoded: image file is"
    with pytest.raises(DataError, match=re.escape(message)):
        mmhal_prompts(read_records(RECORDS), tmp_path)
