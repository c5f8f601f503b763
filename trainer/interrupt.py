"""Stopping long trainer work where it can be kept: SIGTERM (a pod evicted, a preemptible node reclaimed) and a
first Ctrl-C only ask; the work checks between units it can save (a batch of prompts, a reference batch, an
optimizer step), saves and raises `TrainingInterrupted`, and the same command resumes. A second Ctrl-C stops at
once, as Python's default does. Under several processes the ranks agree on stopping (`agreed`) and a failure of
one rank's files ends them all (`together`). Work that waits on others (the feedback's calls to an LLM server,
retried for minutes) asks to be told at once instead (`active_stop().notify`)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from rlaifv.trainer.errors import RunStateError, TrainerError, TrainingInterrupted

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}
CTRL_C_NOTE = b"\nCtrl-C: stopping where the work is saved (the next step or batch); Ctrl-C again stops at once\n"


class StopFlag:
    """Whether a stop was asked (call it), and who to tell when one must not wait for the work in hand (`urgent`:
    SIGTERM, whose grace is short): `notify(callback)` runs the callback in the signal handler (or at once, if such
    a stop came first), so it must only schedule (`call_soon_threadsafe`). A Ctrl-C stops where the work is saved,
    as it says: the batch in hand finishes first."""

    def __init__(self) -> None:
        self._asked = threading.Event()
        self.urgent = False
        self._callbacks: list[Callable[[], object]] = []

    def __call__(self) -> bool:
        return self._asked.is_set()

    def set(self, *, urgent: bool = True) -> None:
        self.urgent = self.urgent or urgent
        self._asked.set()
        if self.urgent:
            for callback in list(self._callbacks):
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile (the work ended)
                    callback()

    @contextmanager
    def notify(self, callback: Callable[[], object]) -> Iterator[None]:
        self._callbacks.append(callback)
        try:
            if self.urgent:
                callback()
            yield
        finally:
            self._callbacks.remove(callback)


_ACTIVE: list[StopFlag] = []


def active_stop() -> StopFlag | None:
    """The flag of the innermost `stop_on_sigterm` the main thread is in (None outside one): deep work the flag is
    not passed to (an LLM call inside claim splitting) stops on it too."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def stop_on_sigterm() -> Iterator[StopFlag]:
    """While inside, SIGTERM and a first SIGINT set a flag (the yielded function reads it) instead of ending the
    process; a second SIGINT raises KeyboardInterrupt at once; the previous handlers come back on exit. The
    `TrainingInterrupted` the work raises names the signal that asked and exits with 128 + it (a Ctrl-C lost the
    steps since the last checkpoint). A stop the work inside never acted on (it came during its last unit) is
    signalled again then, so the process still stops, with everything saved, before the next stage begins. Off
    the main thread (which alone may take signals) the flag stays unset."""
    asked = StopFlag()
    by: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def note(signum: int, frame: Any) -> None:
        if signal.SIGINT in by:  # a second stop after a Ctrl-C (a launcher forwards it as SIGTERM): at once
            raise KeyboardInterrupt
        if signum == signal.SIGINT:  # os.write: a print here can re-enter a buffered write it interrupted
            os.write(2, CTRL_C_NOTE)
        by.append(signal.Signals(signum))
        asked.set(urgent=signum != signal.SIGINT)

    # A SIGINT ignored by the caller (a job started in the background by a shell) stays ignored.
    taken = [s for s in NAMES if s != signal.SIGINT or signal.getsignal(s) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, note) for signum in taken}

    def restore() -> None:
        _ACTIVE.remove(asked)
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    _ACTIVE.append(asked)
    try:
        yield asked
    except TrainingInterrupted as exc:
        restore()
        if by:
            exc.signal_name, exc.exit_code = NAMES[by[0]], 128 + by[0]
        raise
    except BaseException:
        restore()
        raise
    restore()
    if by and by[0] == signal.SIGINT:  # came during the last unit: the work is whole, the next stage not begun
        raise TrainingInterrupted(
            "as the work finished, before the next stage: rerun the same command to go on",
            step=-1,
            signal_name=NAMES[signal.SIGINT],
            exit_code=128 + signal.SIGINT,
        )
    if by:
        signal.raise_signal(by[0])


def agreed(accelerator: Any, asked: bool) -> bool:
    """Whether any process was asked to stop: every rank must save at the same point (a launcher may signal one)."""
    if accelerator.num_processes == 1:
        return asked
    import torch

    return bool(accelerator.reduce(torch.tensor([float(asked)], device=accelerator.device), "sum").item() > 0)


@contextmanager
def together(accelerator: Any, what: str) -> Iterator[None]:
    """Run the block on this rank, then meet every other rank: an error on any of them (a full disk, a read-only
    folder, a model file a node lacks) is raised on all, the others' `RunStateError` naming the rank and its error.

    Without it the ranks that did not fail went on into the next collective and waited there for the one that had
    left: for ever where a peer's exit is not seen (NCCL until its timeout, ranks on another node), or, on gloo, to
    end with "Connection closed by peer" and nothing of why. The meeting is itself the barrier that followed such
    I/O; every rank must enter the block, whether it has work there or not."""
    if accelerator.num_processes == 1:
        yield
        return
    from accelerate.utils import gather_object

    failure: Exception | None = None
    try:
        yield
    except Exception as exc:  # sent to the others before it is raised here
        failure = exc
    detail = None
    if failure is not None:
        detail = str(failure) if isinstance(failure, TrainerError) else f"{type(failure).__name__}: {failure}"
    try:
        reports = cast(list[str | None], gather_object([detail]))  # accelerate is untyped: one entry per rank
    except Exception:
        if failure is not None:  # the others are gone too (a peer's exit seen): this rank's error is the news
            raise failure from None
        raise
    if failure is not None:
        raise failure
    failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
    if failed:
        rank, text = failed[0]
        also = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise RunStateError(
            f"process {rank} of {accelerator.num_processes}{also} failed {what}, so every process stopped: {text}"
        )
