"""`rlaifv bench engine` end to end on a tiny shape: every path runs, the report and its ratios are whole.

The numbers themselves are the benchmark's business (docs/performance.md); this checks that the paths it
compares run the code they claim to: our engine on packed weights where packing is on, the naive way and
HF `generate` on the plain ones, and that the engine's log-probs match a plain forward.
"""

from __future__ import annotations

import pytest
import torch

from rlaifv.bench.engine import EngineBench, render
from rlaifv.bench.engine_models import SHAPES
from rlaifv.reward.packed_weights import packing_supported


@pytest.mark.slow
@pytest.mark.parametrize("pack", ["on", "off"])
def test_the_engine_benchmark_measures_every_path(pack: str) -> None:
    if pack == "on" and not packing_supported():
        pytest.skip("this CPU has neither AVX512_BF16 nor AMX")
    torch.set_num_threads(1)
    bench = EngineBench(
        SHAPES["llava-tiny"],
        dtype="bfloat16",
        ns=(1, 4),
        headline=4,
        answer_tokens=8,
        repeats=1,
        naive_repeats=1,
        claims=False,
        pack_weights=pack,
        log=lambda _: None,
    )
    report = bench.run()
    paths = report["paths"]
    assert {"hf_generate", "single", "best_of_1", "best_of_4", "naive"} <= set(paths)
    assert ("naive_packed" in paths) == (pack == "on") and (report["packed_layers"] > 0) == (pack == "on")
    split = paths["best_of_4"]["split"]
    assert split["request_s"] > split["scoring_s"] > 0 and split["decode_s"] > 0
    ratios = report["ratios"]
    assert ratios["naive_over_best"] > 0 and 0 < ratios["scoring_share"] < 1
    assert ("naive_packed_over_best" in ratios) == (pack == "on")
    assert report["exactness"]["policy_per_token"] < 0.05 and report["exactness"]["reference_per_token"] < 0.05
    assert report["vs_float32"]["max_abs_reward_diff"] < 0.01
    assert "lora" in report and report["ratios"]["lora_memory_share"] < 1
    text = render(report)
    assert "best-of-4 vs naive" in text and ("weights packed for oneDNN" in text) == (pack == "on")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "1,2"], "--headline 8 must be one of --n 1,2"),  # crashed after every timing run
        (["--n", "1,x"], "comma-separated counts"),
        (["--n", "0,8"], "at least 1"),
    ],
)
def test_flag_combinations_that_cannot_run_are_refused_first(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from rlaifv.cli.main import app

    result = CliRunner().invoke(app, ["bench", "engine", *args])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hidden", "32"], "not a multiple of 12"),  # a model with 6 heads of 5.33 dimensions crashed in torch
        (["--hidden", "0"], "--hidden"),
        (["--n", "0"], "--n"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_reward_bench_refuses_a_model_it_cannot_build(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from rlaifv.cli.main import app

    result = CliRunner().invoke(app, ["bench", "reward", *args])
    assert result.exit_code == 2 and message in result.output, result.output
