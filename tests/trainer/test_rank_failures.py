"""A save that fails on one rank of a multi-process run ends every rank, each naming the failing rank's error.

The ranks that had not failed went on into the next collective and waited there for the one that had left: for
ever where a peer's exit is not seen (NCCL, a rank on another node), on gloo until its "Connection closed by peer"
traceback, which said nothing of why. The two-process tests launch gloo ranks directly (a launcher would kill the
rest once one exits, hiding the wait) and keep a rank that has ended alive until the test lets it go, as a rank
whose exit the others cannot see: each rank must end by itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from trainer_testkit import preference_rows, write_rlaifv_parquet

from rlaifv.testing.server import free_port
from rlaifv.trainer.errors import RunStateError
from rlaifv.trainer.interrupt import together

# Runs `python -m rlaifv.trainer.cli ...` in this process, writes its exit code to $RANKS_DONE/<rank> (whole, by a
# rename: the test reads it as soon as the name exists), then stays until $RANKS_DONE/release exists. With
# $FAIL_READING=<rank>:<function>, that rank's `function` fails as a read of a disk only it has would (one shared disk
# gives no real way to fail one rank's read).
CHILD = """
import os, runpy, sys, time
from pathlib import Path

rank, _, function = os.environ.get("FAIL_READING", "").partition(":")
if rank == os.environ["RANK"]:
    import accelerate
    import rlaifv.reward.models

    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error")

    owner = accelerate.Accelerator if function == "load_state" else rlaifv.reward.models
    setattr(owner, function, fail)
sys.argv = ["rlaifv.trainer.cli", *sys.argv[1:]]
try:
    runpy.run_module("rlaifv.trainer.cli", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
sys.stdout.flush()
sys.stderr.flush()
done = Path(os.environ["RANKS_DONE"])
(done / "partial").mkdir(exist_ok=True)
(done / "partial" / os.environ["RANK"]).write_text(str(code))
(done / "partial" / os.environ["RANK"]).rename(done / os.environ["RANK"])
deadline = time.monotonic() + 600
while not (done / "release").exists() and time.monotonic() < deadline:
    time.sleep(0.1)
os._exit(code)
"""
DEADLINE_S = 240.0


def _accelerators(n: int) -> list[types.SimpleNamespace]:
    return [types.SimpleNamespace(num_processes=n, is_main_process=rank == 0) for rank in range(n)]


def _gathered(monkeypatch: pytest.MonkeyPatch, reports: list) -> None:
    """`gather_object` as every rank sees it: the ranks' reports, in rank order."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: list(reports))


def test_the_rank_that_failed_raises_its_error_and_the_others_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    main, other = _accelerators(2)
    _gathered(monkeypatch, [None, None])
    with together(main, "saving the policy"):
        pass

    _gathered(monkeypatch, ["OSError: [Errno 28] No space left on device", None])
    with pytest.raises(OSError, match="No space left"), together(main, "saving the policy"):
        raise OSError(28, "No space left on device")
    with (
        pytest.raises(
            RunStateError,
            match=r"^process 0 of 2 failed saving the policy, so every process stopped: OSError: \[Errno 28\] No space",
        ),
        together(other, "saving the policy"),
    ):
        pass

    _gathered(monkeypatch, [None, "cannot save the checkpoint in x", "cannot save the checkpoint in x"])
    three = _accelerators(3)[0]
    with (
        pytest.raises(RunStateError, match=r"^process 1 of 3 \(and 1 more\) failed saving a checkpoint, .*: cannot"),
        together(three, "saving a checkpoint"),
    ):
        pass


def test_a_rank_that_failed_raises_its_error_even_where_the_others_are_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate.utils

    def gone(mine: list) -> list:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(accelerate.utils, "gather_object", gone)
    with pytest.raises(OSError, match="No space left"), together(_accelerators(2)[0], "saving the policy"):
        raise OSError(28, "No space left on device")
    with pytest.raises(RuntimeError, match="Connection closed"), together(_accelerators(2)[1], "saving the policy"):
        pass


def test_a_single_process_meets_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: pytest.fail("a collective in one process"))
    with pytest.raises(KeyError), together(_accelerators(1)[0], "saving the policy"):
        raise KeyError("x")


def _run_ranks(command: list[str], tmp_path: Path, name: str, ranks: int = 2, **env: str) -> list[tuple[int, str]]:
    """(exit code, stderr) of each rank of `command` under gloo, once every rank has ended by itself; fails naming the
    ranks still inside the run after `DEADLINE_S` (waiting in a collective for a rank that has already ended)."""
    root = Path(__file__).resolve().parents[2]
    done = tmp_path / f"{name}-done"
    done.mkdir()
    env = (
        os.environ
        | env
        | {
            "PYTHONPATH": str(root),
            "OMP_NUM_THREADS": "1",
            "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "RANKS_DONE": str(done),
        }
    )
    logs = [tmp_path / f"{name}-rank-{rank}.log" for rank in range(ranks)]
    processes = []
    try:
        for rank, log in enumerate(logs):
            with log.open("w") as stderr:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-c", CHILD, *command],
                        cwd=root,
                        env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                    )
                )
        deadline = time.monotonic() + DEADLINE_S
        while (running := [r for r in range(ranks) if not (done / str(r)).exists()]) and time.monotonic() < deadline:
            if crashed := [r for r in running if processes[r].poll() is not None]:
                pytest.fail(f"rank {crashed[0]} died: {logs[crashed[0]].read_text()[-3000:]}")
            time.sleep(0.2)
        if running:
            pytest.fail(
                f"rank(s) {running} still inside the run {DEADLINE_S:.0f} s on, the others done:\n"
                + "\n".join(f"rank {r}: {logs[r].read_text()[-1500:]}" for r in range(ranks))
            )
        return [(int((done / str(rank)).read_text()), log.read_text()) for rank, log in enumerate(logs)]
    finally:
        (done / "release").touch()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _command(tiny_model: Path, tmp_path: Path, out: Path, *settings: str) -> list[str]:
    good = ["red", "circle", "green", "tree", "big", "cat", "white", "house"]
    bad = ["blue", "square", "black", "dog", "small", "car", "yellow", "star"]
    pairs = [(f"a {good[k]} {good[(3 * k + 1) % 8]} .", f"a {bad[k]} {bad[(3 * k + 1) % 8]} .") for k in range(8)]
    data = write_rlaifv_parquet(tmp_path / "data.parquet", preference_rows(pairs))
    command = ["dpo", str(data), "--model", str(tiny_model), "-o", str(out), "--lr", "1e-3", "--epochs", "1"]
    command += ["--batch-size", "2", "--cpu", "--no-progress"]
    for setting in settings:
        command += ["--set", setting]
    return command


def _all_ended_with(ranks: list[tuple[int, str]], failing: int, message: str) -> None:
    """Every rank exited 1 saying `message` (a pattern), the others naming process `failing` too, no traceback."""
    for rank, (code, stderr) in enumerate(ranks):
        assert code == 1, f"rank {rank}: {stderr[-3000:]}"
        flat = " ".join(stderr.split())  # the console may wrap the message
        assert re.search(message, flat), f"rank {rank}: {stderr[-3000:]}"
        assert "Traceback" not in stderr and "Connection closed" not in stderr, f"rank {rank}: {stderr[-3000:]}"
        if rank != failing:
            assert f"process {failing} of {len(ranks)} failed" in flat, f"rank {rank}: {stderr[-3000:]}"


# A path taken by a folder fails a write for real (a read-only folder does not stop root): the path, the settings,
# the rank that fails and what every rank must say.
CASES = {
    "checkpoint": (
        "checkpoints/step-0000001/random_states_1.pkl",
        ("dpo.checkpoint_every_steps=1",),
        1,
        r"cannot save the checkpoint in \S+/step-0000001 \(.*Is a directory\)",
    ),
    "reference cache": ("reference_logprobs.tmp", (), 0, r"cannot save the reference log-probs in \S+logprobs.parquet"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_save_failing_on_one_rank_ends_every_rank_with_its_error(tiny_model: Path, tmp_path: Path, case: str) -> None:
    blocked, settings, failing, message = CASES[case]
    out = tmp_path / "out"
    (out / "dpo" / blocked).mkdir(parents=True)
    _all_ended_with(_run_ranks(_command(tiny_model, tmp_path, out, *settings), tmp_path, "run"), failing, message)
    if case == "checkpoint":  # removed once neither rank wrote into it any more
        assert not (out / "dpo" / "checkpoints" / "step-0000001").exists()


@pytest.mark.slow
def test_the_main_process_failing_to_save_the_policy_or_a_rank_failing_to_resume_ends_every_rank(
    tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    command = _command(tiny_model, tmp_path, out, "dpo.checkpoint_every_steps=1")
    (out / "dpo" / "dpo_report.json").mkdir(parents=True)
    policy = r"cannot save the policy in \S+/policy \(.*Is a directory: \S+dpo_report.json"
    _all_ended_with(_run_ranks(command, tmp_path, "save"), 0, policy)

    (out / "dpo" / "dpo_report.json").rmdir()
    assert (out / "dpo" / "checkpoints" / "step-0000001" / "trainer_state.json").is_file()
    unread = r"checkpoint \S+/step-0000001 cannot be read \(\[Errno 5\] Input/output error\): delete it"
    _all_ended_with(_run_ranks(command, tmp_path, "resume", FAIL_READING="1:load_state"), 1, unread)


@pytest.mark.slow
def test_a_rank_that_cannot_load_the_model_ends_every_rank(tiny_model: Path, tmp_path: Path) -> None:
    """The main process waited for it in the fingerprints' broadcast."""
    command = _command(tiny_model, tmp_path, tmp_path / "out")
    unread = r"OSError: \[Errno 5\] Input/output error"
    _all_ended_with(_run_ranks(command, tmp_path, "load", FAIL_READING="1:load_model"), 1, unread)
