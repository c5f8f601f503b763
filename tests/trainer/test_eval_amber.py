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
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlaifv.cli.main import app
from rlaifv.trainer.errors import DataError
from rlaifv.trainer.evaluation.amber import Response, evaluate_amber, read_annotations, read_responses

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
    with pytest.raises(DataError, match="twice"):
        read_responses(path)


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
    """Queries + images -> answers from the shipped bundle, best-of-1 and 2 by each rule, AMBER per point."""
    from PIL import Image

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
    assert result.exit_code == 0, result.output
    curve = json.loads(out.read_text())["metrics"]["curve"]
    assert set(curve) == {"dpo", "claims", "random"}
    assert curve["dpo"]["2"]["overall.questions"] == 9 and 0 <= curve["dpo"]["2"]["overall.accuracy"] <= 1
