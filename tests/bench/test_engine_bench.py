"""`rlaifv bench engine` end to end on a toy shape: every path measured, the overlap ablation side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_engine_bench_reports_the_overlap_beside_the_reference_after_sampling(tmp_path: Path) -> None:
    from rlaifv.bench.engine import bench_engine

    before = torch.get_num_threads()
    try:
        bench_engine(
            shape="llava-tiny",
            device="cpu",
            dtype="float32",
            threads=2,
            n="1,4",
            headline=4,
            answer_tokens=20,
            repeats=1,
            naive_repeats=1,
            lora=True,
            claims=False,
            concurrency=0,
            output=tmp_path / "engine.json",
        )
    finally:
        torch.set_num_threads(before)
    report = json.loads((tmp_path / "engine.json").read_text())[0]
    paths = report["paths"]
    assert {"hf_generate", "single", "best_of_1", "best_of_4", "best_of_4_after", "naive"} <= set(paths)
    ratios = report["ratios"]
    assert ratios["overlap_speedup"] > 0 and 0 <= ratios["scoring_share"] < 1
    # beside sampling, the reference's prefill is not on the request's path
    assert paths["best_of_4"]["split"]["reference_prefill_s"] == 0
    assert paths["best_of_4_after"]["split"]["reference_prefill_s"] > 0
    assert report["exactness"]["reference_per_token"] < 1e-4
    assert "reference after sampling" in (tmp_path / "engine.md").read_text()
