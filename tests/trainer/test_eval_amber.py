"""AMBER discriminative metrics on a hand-made annotation file, computed by hand.

amber_annotations.json / amber_responses.json (question id: dimension, truth -> response):
 1 generative                            (skipped)
 2 existence  yes -> "Yes"               correct
 3 existence  no  -> "No"                correct, a hit (no & No)
 4 existence  no  -> "Yes"               wrong
 5 attribute/state  yes -> "No"          wrong
 6 attribute/number no  -> "No"          correct, a hit
 7 attribute/action no  -> "Yes, he is running."  wrong; exact match: unparsed; first word: yes
 8 relation   yes -> "Yes"               correct
 9 relation   no  -> "No"                correct, a hit
10 existence  yes -> "no"                wrong; exact match: unparsed; first word: no
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from eval_images import truncated_jpeg
from PIL import Image
from typer.testing import CliRunner

from rlaifv.cli.eval_run import Source, default_cache
from rlaifv.cli.main import app
from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.amber import Response, evaluate_amber, read_annotations, read_responses, scores
from rlaifv.trainer.evaluation.candidates import Prompt, Sampled, Sampling
from rlaifv.trainer.evaluation.files import read_rows
from rlaifv.trainer.evaluation.report import Report, report_name, sibling, write_report

DATA = Path(__file__).parent / "data" / "eval"


def f1(p: float, r: float, eps: float = 1e-4) -> float:
    return 2 * p * r / (p + r + eps)


def test_official_exact_match() -> None:
    report = evaluate_amber(
        read_responses(DATA / "amber_responses.json"), read_annotations(DATA / "amber_annotations.json")
    )
    m = report["metrics"]
    # overall: correct 2,3,6,8,9; "No" answers 3,5,6,9; truly no 3,4,6,7,9; hits 3,6,9
    assert m["overall"] == {
        "accuracy": 5 / 9,
        "precision": 3 / 4,
        "recall": 3 / 5,
        "f1": f1(3 / 4, 3 / 5),
        "questions": 9,
        "unparsed": 2,
        "yes_rate": 3 / 9,
    }
    # existence (2,3,4,10): correct 2,3; "No" 3; truly no 3,4; hit 3; the official eps is 1e-3 here
    assert m["existence"]["accuracy"] == 2 / 4
    assert (m["existence"]["precision"], m["existence"]["recall"]) == (1.0, 1 / 2)
    assert m["existence"]["f1"] == f1(1.0, 1 / 2, eps=1e-3)
    # attribute (5,6,7): correct 6; "No" 5,6; truly no 6,7; hit 6
    assert (m["attribute"]["accuracy"], m["attribute"]["precision"], m["attribute"]["recall"]) == (1 / 3, 1 / 2, 1 / 2)
    assert m["attribute"]["f1"] == f1(1 / 2, 1 / 2)
    # relation (8,9): all correct, one "No", one hit
    assert (m["relation"]["accuracy"], m["relation"]["f1"]) == (1.0, f1(1.0, 1.0))
    assert m["attribute_state"]["accuracy"] == 0.0 and m["attribute_number"]["accuracy"] == 1.0
    assert m["generative_skipped"] == 1


def test_first_word_match() -> None:
    responses = read_responses(DATA / "amber_responses.json")
    m = evaluate_amber(responses, read_annotations(DATA / "amber_annotations.json"), match="first-word")["metrics"]
    # "no" (10) now counts as No: "No" answers 3,5,6,9,10; hits unchanged
    assert (m["overall"]["accuracy"], m["overall"]["precision"], m["overall"]["recall"]) == (5 / 9, 3 / 5, 3 / 5)
    assert m["overall"]["unparsed"] == 0
    assert (m["existence"]["precision"], m["existence"]["recall"]) == (1 / 2, 1 / 2)


def test_annotations_are_looked_up_by_position_without_ids(tmp_path: Path) -> None:
    """The official script indexes annotations[id - 1]."""
    rows = json.loads((DATA / "amber_annotations.json").read_text())
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "id"} for r in rows]))
    assert read_annotations(path)[3].truth == "no"


def test_unknown_question_ids_are_refused() -> None:
    with pytest.raises(DataError, match="99"):
        evaluate_amber([Response(id=99, response="Yes")], read_annotations(DATA / "amber_annotations.json"))


def test_a_question_answered_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": 2, "response": "Yes"}\n{"id": 2, "response": "No"}\n')
    with pytest.raises(DataError, match="row 2: question id 2 is answered twice in rows 1 and 2"):
        read_responses(path)


def test_a_bad_image_or_a_repeated_query_is_named_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the image's existence was checked: a truncated one failed at its batch, after the model loaded and
    earlier batches were sampled, as "image could not be decoded" naming no file, row or question. A query id given
    twice was sampled twice and scored twice."""
    monkeypatch.setattr(Source, "generator", lambda self: pytest.fail("a model was loaded"))
    (tmp_path / "AMBER_1.jpg").write_bytes(truncated_jpeg())
    queries = DATA / "amber_queries.json"
    args = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json"), "--images", str(tmp_path)]
    args += ["--service", "http://x", "-o", str(tmp_path / "r.json")]
    result = CliRunner().invoke(app, [*args, "--queries", str(queries)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    image = tmp_path / "AMBER_1.jpg"
    expected = f"error: {queries}, row 1: image {image}: undecodable image: image could not be decoded: image file is"
    assert result.output.replace("\n", "").startswith(expected), result.output
    Image.new("RGB", (8, 8)).save(image)
    repeated = tmp_path / "queries.json"
    rows = json.loads(queries.read_text())
    repeated.write_text(json.dumps([*rows, rows[1]]))
    result = CliRunner().invoke(app, [*args, "--queries", str(repeated)])
    assert result.exit_code == 1, result.output
    assert "row 10: question id 3 is asked twice in rows 2 and 10" in result.output.replace("\n", "")


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "amber.json"
    args = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json")]
    result = CliRunner().invoke(app, [*args, "--answers", str(DATA / "amber_responses.json"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["metrics"]["overall"]["accuracy"] == 5 / 9
    assert report["settings"]["match"] == "exact"
    assert "| overall.f1 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_cli_generates_with_a_bundle_in_scaling_mode(tmp_path: Path) -> None:
    """Queries + images -> answers from the shipped bundle, best-of-1 and 2 by each rule, AMBER per point. The
    shapes world captions rather than says yes or no: the curve is written, and the run fails saying so."""
    Image.new("RGB", (64, 64), (40, 80, 220)).save(tmp_path / "AMBER_1.jpg")
    out = tmp_path / "amber.json"
    args = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json")]
    args += ["--queries", str(DATA / "amber_queries.json"), "--images", str(tmp_path), "--bundle", "default"]
    args += [
        "--best-of",
        "1,2",
        "--max-tokens",
        "4",
        "--match",
        "first-word",
        "-o",
        str(out),
        "--plot",
        str(tmp_path / "a.png"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "are neither yes nor no by --match first-word" in result.output, result.output
    curve = json.loads(out.read_text())["metrics"]["curve"]
    assert set(curve) == {"dpo", "claims", "random"}
    assert curve["dpo"]["2"]["overall.questions"] == 9 and 0 <= curve["dpo"]["2"]["overall.accuracy"] <= 1


TRUTH = {2: "yes", 3: "no", 4: "no", 5: "yes", 6: "no", 7: "no", 8: "yes", 9: "no", 10: "yes"}  # the docstring's


class SaysYesOrNo:
    """A generator that answers every AMBER query correctly, in a model's words ("Yes." / "No, there is not.")."""

    fingerprint = "fake:says-yes-or-no"

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: Sampling, claims: bool) -> list[Sampled]:
        texts = ["Yes." if TRUTH[int(p.id)] == "yes" else "No, there is not." for p in prompts]
        return [Sampled(texts=[t] * n, dpo=[0.0] * n, claims=[0.0] * n if claims else None) for t in texts]


@pytest.fixture()
def generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The CLI's generation arguments, answered by `SaysYesOrNo` through the real sampling and caching path."""
    monkeypatch.setattr(Source, "generator", lambda self: SaysYesOrNo())
    Image.new("RGB", (8, 8), (40, 80, 220)).save(tmp_path / "AMBER_1.jpg")  # decoded when the queries are read
    args = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json")]
    return [*args, "--queries", str(DATA / "amber_queries.json"), "--images", str(tmp_path), "--service", "http://x"]


def test_generated_answers_are_read_as_the_yes_or_no_they_say(generate: list[str], tmp_path: Path) -> None:
    out = tmp_path / "gen.json"
    result = CliRunner().invoke(app, [*generate, "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["match"] == "first-word"
    assert report["metrics"]["overall"]["accuracy"] == 1.0 and report["metrics"]["overall"]["unparsed"] == 0
    result = CliRunner().invoke(app, [*generate, "--best-of", "1,2", "-o", str(tmp_path / "curve.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "curve.json").read_text())["metrics"]["curve"]["dpo"]["2"]["overall.accuracy"] == 1.0


def test_mostly_unparsed_answers_fail_the_run(generate: list[str], tmp_path: Path) -> None:
    """Asked for the official exact match, generated text is unparsed: the run says so and exits 1."""
    out = tmp_path / "exact.json"
    result = CliRunner().invoke(app, [*generate, "--match", "exact", "-o", str(out)])
    assert result.exit_code == 1
    assert "error: 9 of 9 answers (100%) are neither yes nor no by --match exact (e.g. 'Yes.')" in result.output
    assert "--match first-word" in result.output
    assert json.loads(out.read_text())["metrics"]["overall"]["accuracy"] == 0.0  # the report is still written
    some = tmp_path / "some.json"  # two of nine unparsed: a warning
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "amber",
            "--annotations",
            str(DATA / "amber_annotations.json"),
            "--answers",
            str(DATA / "amber_responses.json"),
            "-o",
            str(some),
        ],
    )
    assert result.exit_code == 0 and "warning: 2 of 9 answers (22%)" in result.output


def test_nothing_to_divide_by_is_none_and_an_empty_file_is_refused(tmp_path: Path) -> None:
    """No question, no "No" answer or no question whose truth is no: None, where the official script divides by
    zero; a file with nothing to score is refused rather than reported as accuracy 0."""
    truth = read_annotations(DATA / "amber_annotations.json")
    m = evaluate_amber([Response(id=2, response="Yes"), Response(id=8, response="Yes")], truth)["metrics"]
    assert m["overall"]["accuracy"] == 1.0 and m["overall"]["recall"] is None
    assert (m["overall"]["precision"], m["overall"]["f1"]) == (None, None)
    assert scores([])["accuracy"] is None and scores([])["yes_rate"] is None
    with pytest.raises(DataError, match="no discriminative question"):
        evaluate_amber([Response(id=1, response="A dog on grass.")], truth)
    args = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json"), "-o", str(tmp_path / "r.json")]
    for text in ("[]", "", '[{"id": 1, "response": "A dog on grass."}]'):
        (tmp_path / "answers.json").write_text(text)
        result = CliRunner().invoke(app, [*args, "--answers", str(tmp_path / "answers.json")])
        assert result.exit_code == 1 and result.output.startswith("error: "), result.output
        assert len(result.output.strip().splitlines()) == 1


def test_a_json_object_is_not_read_as_one_row(tmp_path: Path) -> None:
    """AMBER's files and answers are JSON lists (or JSONL): one object is a wrapper or a mistake, not one answer."""
    path = tmp_path / "answers.json"
    path.write_text('{"id": 2, "response": "Yes"}')
    with pytest.raises(DataError, match="expected a JSON list or JSONL"):
        read_responses(path)
    path.write_text(json.dumps({"records": [{"id": 2, "response": "Yes"}]}, indent=1))
    with pytest.raises(DataError, match=r"expected a JSON list or JSONL, .* under 'records'"):
        read_rows(path)
    one_row = tmp_path / "answers.jsonl"  # JSONL of one line is fine
    one_row.write_text('{"id": 2, "response": "Yes"}\n')
    assert read_responses(one_row) == [Response(id=2, response="Yes")]


@pytest.mark.parametrize(
    "bad",
    [
        ["--best-of", "0,2"],
        ["--best-of", "1,abc"],
        ["-n", "0"],
        ["--temperature", "9"],
        ["--max-tokens", "0"],
        ["--batch", "0"],
        ["--service", "localhost:8000"],
    ],
)
def test_bad_options_are_one_usage_error(bad: list[str], generate: list[str], tmp_path: Path) -> None:
    """Refused as usage errors before anything is read or sampled, even where sampling does not apply."""
    answers = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json")]
    answers += ["--answers", str(DATA / "amber_responses.json")]
    for args in (answers, generate):
        result = CliRunner().invoke(app, [*args, *bad, "-o", str(tmp_path / "r.json")])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "Invalid value" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "r.json").exists()


def test_files_beside_the_report_are_named_after_its_whole_name(tmp_path: Path) -> None:
    """`-o out/llava-v1.5` (a dot, no .json): the ".5" was cut as a suffix, so the runs of llava-v1.5 and llava-v1.6
    wrote one llava-v1.md (and would share one cache), and both reports were named llava-v1 in `compare`."""
    args = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json")]
    args += ["--answers", str(DATA / "amber_responses.json")]
    for version in ("1.5", "1.6"):
        result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / f"llava-v{version}")])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava-v1.5", "llava-v1.5.md", "llava-v1.6", "llava-v1.6.md"]
    assert json.loads((tmp_path / "llava-v1.5").read_text())["name"] == "llava-v1.5"
    result = CliRunner().invoke(app, ["eval", "compare", str(tmp_path / "llava-v1.5"), str(tmp_path / "llava-v1.6")])
    assert result.exit_code == 0 and "| metric | llava-v1.5 (amber) | llava-v1.6 (amber) |" in result.output

    assert sibling("out/run.json", ".judged.jsonl") == Path("out/run.judged.jsonl")  # .json is replaced
    assert sibling("out/run.JSON", ".md") == Path("out/run.md")
    assert sibling("out/llava-v1.5", ".objects.jsonl") == Path("out/llava-v1.5.objects.jsonl")  # else appended to
    assert default_cache(Path("out/llava-v1.5")) == Path("out/llava-v1.5.candidates.jsonl")
    assert report_name("out/llava-v1.5.json") == report_name("out/llava-v1.5") == "llava-v1.5"
    unnamed = Report(benchmark="amber", metrics={"x": 1.0})  # compare's column falls back to the file's name
    written = write_report(unnamed, tmp_path / "md" / "llava-v1.5.md")  # the Markdown's name given
    assert written == (tmp_path / "md" / "llava-v1.5.json", tmp_path / "md" / "llava-v1.5.md")
    result = CliRunner().invoke(app, ["eval", "compare", str(written[0])])
    assert "| metric | llava-v1.5 (amber) |" in result.output


def test_compare_refuses_what_is_no_report_in_one_line(tmp_path: Path) -> None:
    """A PNG given to `compare` printed a UnicodeDecodeError traceback; a folder an IsADirectoryError."""
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    for path in (png, tmp_path):
        result = CliRunner().invoke(app, ["eval", "compare", str(path)])
        assert result.exit_code == 1 and result.output.startswith("error: "), result.output
        assert len(result.output.strip().splitlines()) == 1 and str(path) in result.output


def test_a_byte_order_mark_is_read_as_utf8(tmp_path: Path) -> None:
    """Files saved by Notepad or PowerShell start with a UTF-8 BOM: JSON lists and JSONL (CRLF too) are read, not
    refused as "not JSON"."""
    rows = [{"id": 2, "response": "Yes"}, {"id": 3, "response": "No"}]
    listed, lines = tmp_path / "answers.json", tmp_path / "answers.jsonl"
    listed.write_bytes(json.dumps(rows).encode("utf-8-sig"))
    lines.write_bytes("".join(json.dumps(r) + "\r\n" for r in rows).encode("utf-8-sig"))
    assert read_rows(listed) == read_rows(lines) == rows
    out = tmp_path / "r.json"
    args = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json"), "--answers", str(listed)]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["metrics"]["overall"]["accuracy"] == 1.0


def test_queries_with_no_discriminative_question_are_refused_before_sampling() -> None:
    """A generative query file was sampled whole (1,004 queries on a real model), then refused."""
    from rlaifv.trainer.evaluation.amber import Annotation, check_scorable

    truth = {
        1: Annotation(id=1, type="generative", truth=["cat"]),
        2: Annotation(id=2, type="discriminative-hallucination", truth="yes"),
    }
    with pytest.raises(DataError, match="no discriminative question among the 1 queries"):
        check_scorable([1], truth)
    with pytest.raises(DataError, match="question id 9 is not in the annotations"):
        check_scorable([1, 9], truth)
    check_scorable([1, 2], truth)


def test_responses_gzip_compressed_read_alike_and_a_bad_value_is_named_by_its_line(tmp_path: Path) -> None:
    """A JSONL row's error names the line an editor shows (blank lines included), not the row's place."""
    import gzip

    rows = [{"id": 2, "response": "Yes"}, {"id": 3, "response": "No"}]
    lines = tmp_path / "answers.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    zipped = tmp_path / "answers.jsonl.gz"
    zipped.write_bytes(gzip.compress(lines.read_bytes()))
    assert read_responses(zipped) == read_responses(lines)
    lines.write_text(json.dumps(rows[0]) + "\n\n\n" + json.dumps({"id": "three", "response": "No"}) + "\n")
    with pytest.raises(DataError, match=r"answers.jsonl, row 4, column 'id'"):
        read_responses(lines)
    listed = tmp_path / "answers.json"
    listed.write_text(json.dumps([rows[0], {"id": "three", "response": "No"}], indent=2))
    with pytest.raises(DataError, match=r"answers.json, row 2, column 'id'"):
        read_responses(listed)


@pytest.mark.parametrize(
    ("env", "key"),
    [({"RLAIFV_API_KEY": "sk-client"}, "sk-client"), ({"RLAIFV_API_KEY": "a", "RLAIFV_EVAL_API_KEY": "b"}, "b")],
)
def test_the_service_key_comes_from_the_python_clients_variable_too(
    env: dict[str, str], key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who set RLAIFV_API_KEY for the SDK got 401s from `eval --service` (it read only RLAIFV_EVAL_API_KEY)."""
    keys: list[str | None] = []

    def generator(self: Source) -> SaysYesOrNo:
        keys.append(self.api_key)
        return SaysYesOrNo()

    monkeypatch.setattr(Source, "generator", generator)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    Image.new("RGB", (8, 8), (40, 80, 220)).save(tmp_path / "AMBER_1.jpg")  # decoded when the queries are read
    args = ["eval", "amber", "--annotations", str(DATA / "amber_annotations.json"), "--service", "http://x"]
    args += ["--queries", str(DATA / "amber_queries.json"), "--images", str(tmp_path), "-o", str(tmp_path / "r.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert keys == [key]
