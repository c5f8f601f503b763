"""Stopping long trainer work where it can be kept: SIGTERM (a pod evicted, a preemptible node reclaimed) only
asks; the work checks between units it can save (a batch of prompts, a reference batch, an optimizer step), saves
and raises `TrainingInterrupted`, and the same command resumes. SIGINT still stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def stop_on_sigterm() -> Iterator[Callable[[], bool]]:
    """While inside, SIGTERM sets a flag (the yielded function reads it) instead of ending the process; the
    previous handler comes back on exit. A SIGTERM the work inside never acted on (it came during its last unit)
    is sent again then, so the process still stops, with everything saved, before the next stage begins. Off the
    main thread (which alone may take signals) the flag stays unset."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked.is_set
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: asked.set())
    try:
        yield asked.is_set
    except BaseException:
        signal.signal(signal.SIGTERM, previous)
        raise
    signal.signal(signal.SIGTERM, previous)
    if asked.is_set():
        signal.raise_signal(signal.SIGTERM)


def agreed(accelerator: Any, asked: bool) -> bool:
    """Whether any process was asked to stop: every rank must save at the same point (a launcher may signal one)."""
    if accelerator.num_processes == 1:
        return asked
    import torch

    return bool(accelerator.reduce(torch.tensor([float(asked)], device=accelerator.device), "sum").item() > 0)
