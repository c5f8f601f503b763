"""The `rlaifv bench` commands' own logic, without the servers they measure: flags refused before any work, what
a soak counts as an error, servers stopped on every way out, where outputs go, and the labels of what is reported.

Servers and models are faked where a test is about the benchmark's code rather than the thing it measures."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from typer.testing import CliRunner

from rlaifv.cli.main import app

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["bench", *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's tiny text-only bundle: 1024 positions, fewer than the 2048 the vLLM bench once hard-coded."""
    from rlaifv.testing.tiny_text import build_tiny_text_bundle

    return build_tiny_text_bundle(tmp_path_factory.mktemp("bundles") / "text")


def _nothing_runs(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the benchmark started although a flag was bad")


# -- flags refused before any work ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--threads", "0"], "--threads"),  # torch's RuntimeError traceback
        (["--answer-tokens", "-3"], "--answer-tokens"),  # a pydantic traceback after building the model
        (["--naive-repeats", "-1"], "--naive-repeats"),  # silently no naive path
        (["--concurrency", "1"], "--concurrency"),  # silently no batch measured
        (["--concurrency", "-2"], "--concurrency"),
        (["--shape", "cpu,nope"], "--shape"),  # refused only after the first shape's whole run
    ],
)
def test_engine_bench_refuses_bad_flags_before_any_work(
    monkeypatch: pytest.MonkeyPatch, args: list[str], flag: str
) -> None:
    monkeypatch.setattr("rlaifv.bench.engine.EngineBench", _nothing_runs)
    result = invoke("engine", *args)
    assert result.exit_code == 2 and flag in result.output, result.output


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--concurrency", "0,x"], "--concurrency"),  # a ValueError traceback
        (["--concurrency", "0"], "--concurrency"),  # ran a level with no client
        (["--concurrency", ","], "--concurrency"),
        (["--n", "0"], "--n"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--engine", "tensorrt"], "--engine"),
        (["--engine", "vllm", "--url", "http://127.0.0.1:9"], "--engine"),
    ],
)
def test_service_bench_refuses_bad_flags_before_any_server_starts(
    monkeypatch: pytest.MonkeyPatch, args: list[str], flag: str
) -> None:
    for name in ("run_benchmark", "benchmark_bundle"):
        monkeypatch.setattr(f"rlaifv.bench.service.{name}", _nothing_runs)
    monkeypatch.setattr("rlaifv.bench.vllm_scoring.bench_bundle", _nothing_runs)
    result = invoke("service", *args)
    assert result.exit_code == 2 and flag in result.output, result.output


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--concurrency", "0", "--duration-s", "0"], "--concurrency"),  # reported nothing and exited 0
        (["--duration-s", "0"], "--duration-s"),
        (["--duration-s", "-5"], "--duration-s"),
        (["--max-requests", "0"], "--max-requests"),
    ],
)
def test_soak_refuses_bad_flags_before_the_server_starts(
    monkeypatch: pytest.MonkeyPatch, args: list[str], flag: str
) -> None:
    monkeypatch.setattr("rlaifv.bench.soak.run_soak", _nothing_runs)
    result = invoke("soak", *args)
    assert result.exit_code == 2 and flag in result.output, result.output


# -- bench soak -----------------------------------------------------------------------------------------------


def _job_api(status: str, item_statuses: list[str]) -> httpx.MockTransport:
    """A jobs API whose job ends `status` with one result line per item (failed items have lines too)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json={"id": "job-1", "status": "queued"})
        if request.url.path.endswith("/results"):
            error = {"message": "model failed: out of memory", "type": "server_error", "code": "internal_error"}
            lines = [
                {"index": i, "status": s, **({"result": {}} if s == "succeeded" else {"error": error})}
                for i, s in enumerate(item_statuses)
            ]
            return httpx.Response(200, text="".join(json.dumps(line) + "\n" for line in lines))
        failed = item_statuses.count("failed")
        body = {"id": "job-1", "status": status, "total": 4, "completed": 4 - failed, "failed": failed}
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("status", "items", "code"),
    [
        ("failed", ["failed"] * 4, "job failed: internal_error (model failed: out of memory)"),
        ("succeeded", ["succeeded", "failed", "succeeded", "succeeded"], "job item failed: internal_error"),
        ("cancelled", [], "job cancelled"),
        ("succeeded", ["succeeded"] * 3, "job results: 3 of 4 lines"),
    ],
)
async def test_soak_counts_a_failed_job_as_an_error_with_its_reason(status: str, items: list[str], code: str) -> None:
    from rlaifv.bench.soak import Load, SoakResult

    async with httpx.AsyncClient(base_url="http://soak", transport=_job_api(status, items)) as client:
        load = Load(client, "m", jobs=True)
        assert await load.job(3) is False
    errors = {c: n for c, n in load.codes.items() if not c.startswith("2")}
    assert any(c.startswith(code) for c in errors), errors
    result = SoakResult(1.0, 1, 3, {}, errors, {}, True)
    assert result.server_errors == 1  # so `bench soak` exits 1, as for a 5xx


async def test_soak_counts_a_whole_job_as_a_success() -> None:
    from rlaifv.bench.soak import Load

    async with httpx.AsyncClient(base_url="http://soak", transport=_job_api("succeeded", ["succeeded"] * 4)) as c:
        load = Load(c, "m", jobs=True)
        assert await load.job(3) is True
    assert all(code.startswith("2") for code in load.codes), load.codes


def _soak_result(errors: dict[str, int]) -> Any:
    from rlaifv.bench.soak import SoakResult

    rss = {"ready": 1.0, "after_warmup": 1.0, "end": 1.0}
    return SoakResult(1.0, 1, 4, {}, errors, rss, True, {})


def test_soak_makes_the_output_folder_before_the_soak(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    output = tmp_path / "missing" / "dir" / "soak.json"

    def run_soak(**kwargs: Any) -> Any:
        assert output.parent.is_dir(), "a folder that cannot be made must fail before minutes of load"
        return _soak_result({})

    monkeypatch.setattr("rlaifv.bench.soak.run_soak", run_soak)
    result = invoke("soak", "--duration-s", "1", "--output", str(output))
    assert result.exit_code == 0, result.output
    assert json.loads(output.read_text())["requests"] == 4


def test_soak_exits_1_on_a_failed_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlaifv.bench.soak.run_soak", lambda **_: _soak_result({"job failed: internal_error": 1}))
    result = invoke("soak", "--duration-s", "1")
    assert result.exit_code == 1 and "job failed: internal_error: 1" in result.output, result.output


# -- bench service --------------------------------------------------------------------------------------------


class FakeVllm:
    """Records what `bench service` does with its vLLM servers; `fail` raises from the reference's start-up."""

    fail: ClassVar[BaseException | None] = None
    made: ClassVar[list[FakeVllm]] = []

    def __init__(self, model: Path, *, name: str, max_model_len: int, threads: int, log: Path) -> None:
        self.model, self.name, self.max_model_len = model, name, max_model_len
        self.url = f"http://127.0.0.1:9/{name}"
        self.launched = self.stopped = False
        FakeVllm.made.append(self)

    def launch(self) -> None:
        self.launched = True

    def wait_healthy(self, timeout_s: float) -> None:
        if self.name == "reference" and FakeVllm.fail is not None:
            raise FakeVllm.fail

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture()
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeVllm]:
    monkeypatch.setattr("rlaifv.testing.vllm_server.VllmServer", FakeVllm)
    monkeypatch.setattr(FakeVllm, "made", [])
    monkeypatch.setattr(FakeVllm, "fail", None)
    return FakeVllm


def _run_vllm_bench(bundle: Path) -> None:
    from rlaifv.bench.service import run_benchmark

    run_benchmark(
        bundle=bundle,
        concurrency=[1],
        n=2,
        max_tokens=4,
        requests_per_client=1,
        max_batch=4,
        window_ms=0,
        torch_threads=1,
        engines=["vllm"],
    )


@pytest.mark.parametrize("failure", [RuntimeError("vllm serve exited during start-up"), KeyboardInterrupt()])
def test_service_bench_stops_every_vllm_server_when_start_up_fails(
    fake_vllm: type[FakeVllm], text_bundle: Path, failure: BaseException
) -> None:
    fake_vllm.fail = failure
    with pytest.raises(type(failure)):
        _run_vllm_bench(text_bundle)
    assert [s.name for s in fake_vllm.made] == ["policy", "reference"]
    assert all(s.launched and s.stopped for s in fake_vllm.made)


def test_service_bench_stops_vllm_servers_when_the_service_fails_to_start(
    fake_vllm: type[FakeVllm], text_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_service(*args: Any) -> Any:
        raise RuntimeError("server exited with 1")

    monkeypatch.setattr("rlaifv.bench.service._start_server", no_service)
    with pytest.raises(RuntimeError, match="server exited"):
        _run_vllm_bench(text_bundle)
    assert len(fake_vllm.made) == 2 and all(s.stopped for s in fake_vllm.made)


def test_service_bench_serves_vllm_with_the_bundle_s_own_context(
    fake_vllm: type[FakeVllm], text_bundle: Path, tmp_path: Path
) -> None:
    fake_vllm.fail = RuntimeError("stop after the launch")
    with pytest.raises(RuntimeError):
        _run_vllm_bench(text_bundle)
    assert [s.max_model_len for s in fake_vllm.made] == [1024, 1024]  # 2048 made vLLM refuse this bundle
    from rlaifv.bench.service import VLLM_MAX_MODEL_LEN, vllm_max_model_len

    long = tmp_path / "long"
    for role in ("policy", "reference"):
        (long / role).mkdir(parents=True)
        (long / role / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 32768}}))
    shutil.copy(text_bundle / "rlaifv.json", long / "rlaifv.json")
    assert vllm_max_model_len(long) == VLLM_MAX_MODEL_LEN


def _levels() -> list[Any]:
    from rlaifv.bench.service import LevelResult

    return [LevelResult(mode, 1, 2, 1.0, [0.5, 0.5], [0.4, 0.4], 2) for mode in ("batching off", "batching on")]


@pytest.mark.parametrize(("name", "table", "raw"), [("x.json", "x.md", "x.json"), ("t.md", "t.md", "t.json")])
def test_service_bench_writes_table_and_raw_json_to_distinct_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, table: str, raw: str
) -> None:
    monkeypatch.setattr("rlaifv.bench.service.run_benchmark", lambda **_: _levels())
    monkeypatch.setattr("rlaifv.bench.service.benchmark_bundle", lambda: tmp_path)
    folder = tmp_path / "new" / "folder"
    result = invoke("service", "--output", str(folder / name))
    assert result.exit_code == 0, result.output
    assert (folder / table).read_text().startswith("best-of-8")
    assert [r["mode"] for r in json.loads((folder / raw).read_text())] == ["batching off", "batching on"]


# -- bench reward, the vLLM scoring bench, the GPU script -----------------------------------------------------


def test_reward_bench_labels_the_log_prob_sum_difference_and_reports_the_reward_difference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rlaifv.bench.reward as bench

    results: list[dict[str, Any]] = []
    run = bench.run_reward_benchmark

    def kept(**kwargs: Any) -> dict[str, Any]:
        results.append(run(**kwargs))
        return results[-1]

    monkeypatch.setattr(bench, "run_reward_benchmark", kept)
    out = invoke("reward", "--n", "2", "--answer-tokens", "3", "--repeats", "1", "--hidden", "12", "--layers", "1")
    assert out.exit_code == 0, out.output
    assert "max |reward diff|" not in out.output  # it was the log-prob sums' difference
    (result,) = results
    beta = result["reward"].beta
    assert result["reward"].normalize == "mean"
    assert result["max_abs_reward_diff"] == pytest.approx(result["max_abs_sum_diff"] * beta / 3, rel=1e-6, abs=1e-12)
    assert f"{result['max_abs_sum_diff']:.2e} in log-prob sums" in out.output
    assert f"{result['max_abs_reward_diff']:.2e} in reward at beta {beta:g}" in out.output


def test_vllm_scoring_starts_its_client_once_outside_the_timings(
    monkeypatch: pytest.MonkeyPatch, text_bundle: Path
) -> None:
    import rlaifv.bench.vllm_scoring as bench

    starts: list[float] = []

    class Server:
        url = "http://127.0.0.1:9"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> Server:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    class Client:
        def __init__(self, *args: Any) -> None:
            pass

        def start(self, wait_s: float) -> None:
            starts.append(wait_s)

        async def answer_logprobs(self, prompt: list[int], answers: list[list[int]]) -> list[list[float]]:
            return [[-1.0] * len(a) for a in answers]

        async def aclose(self) -> None:
            pass

    monkeypatch.setattr("rlaifv.testing.vllm_server.VllmServer", Server)
    monkeypatch.setattr("rlaifv.service.engines.vllm.VllmServer", Client)
    monkeypatch.setattr(bench, "bench_bundle", lambda: text_bundle)
    rows = bench.run([4, 6], n=2, answer_tokens=3, repeats=2)
    assert [r["prompt_tokens"] for r in rows] == [4, 6]
    assert len(starts) == 1  # was one per timed run: its /health and /v1/models requests were timed


def _script(tmp_path: Path) -> tuple[Path, Path]:
    """gpu_engine.sh in a copy of the tree, with a .venv interpreter and a PYTHON that log which one ran."""
    script = tmp_path / "rlaifv" / "bench" / "gpu_engine.sh"
    script.parent.mkdir(parents=True)
    shutil.copy(ROOT / "rlaifv" / "bench" / "gpu_engine.sh", script)
    used = tmp_path / "used.log"
    for path, name in ((tmp_path / ".venv" / "bin" / "python", "venv"), (tmp_path / "system-python", "system")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'#!/bin/sh\necho {name} >> "{used}"\ncat > /dev/null\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return script, used


@pytest.mark.parametrize("args", [[], ["run"]])
def test_gpu_engine_script_runs_the_machine_s_python_by_default(tmp_path: Path, args: list[str]) -> None:
    script, used = _script(tmp_path)
    env = os.environ | {
        "PYTHON": str(tmp_path / "system-python"),
        "OUT": str(tmp_path / "out"),
        "TMPDIR": str(tmp_path),
    }
    done = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert set(used.read_text().split()) == {"system"}  # the default is `run`: not .venv's CPU interpreter


@pytest.mark.parametrize("command", ["reward", "engine", "service"])
def test_every_benchmark_takes_n_as_the_eval_commands_do(command: str) -> None:
    """`rlaifv eval -n 8` but `rlaifv bench ... --n 8` only: the short form is the same everywhere."""
    shown = CliRunner().invoke(app, ["bench", command, "--help"], env={"COLUMNS": "250"}).output
    assert "--n" in shown and "-n " in shown.replace("--n", ""), shown
