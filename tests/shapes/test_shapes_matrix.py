"""`rlaifv demo matrix` on a tiny recipe: each cell builds and evaluates in its own process, then resumes."""

from __future__ import annotations

import pytest

from rlaifv.trainer.shapes.matrix import render_matrix, run_matrix

pytestmark = pytest.mark.slow

TINY = [
    "reference.train_images=200",
    "reference.vision_steps=5",
    "reference.sft_steps=5",
    "reference.judge_target=0",
    "prompts_per_round=32",
]


def test_a_cell_builds_evaluates_and_is_not_redone(tmp_path):
    result = run_matrix(tmp_path, seeds=[0], threads=[1], eval_seeds="0", eval_images=40, cores=1, overrides=TINY)
    cell = result["seed0-threads1"]
    assert (cell["seed"], cell["threads"], cell["served"]) == (0, 1, "round 1")
    assert {c["name"] for c in cell["targets"]} == {
        "chair_i_vs_reference", "recall_change", "yes_no_f1_change", "claims_bon_vs_random", "implicit_bon_vs_random",
    }  # fmt: skip
    assert cell["times"]["build_s"] > 0 and cell["times"]["eval_s"] > 0
    report = tmp_path / "seed0-threads1" / "report.json"
    stamp = report.stat().st_mtime_ns
    again = run_matrix(tmp_path, seeds=[0], threads=[1], eval_seeds="0", eval_images=40, cores=1, overrides=TINY)
    assert report.stat().st_mtime_ns == stamp and again == result
    table = render_matrix(result)
    assert table.splitlines()[2].startswith("| 0 | 1 |") and "| target | limit |" in table


def test_a_failing_cell_names_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"seed0-threads1.*log\.txt"):
        run_matrix(tmp_path, seeds=[0], threads=[1], eval_seeds="0", cores=1, overrides=["no_such_setting=1"])
