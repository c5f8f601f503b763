"""`rlaifv serve`'s JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _release_warnings() -> Iterator[None]:
    """`configure_logging` captures Python's warnings, once per process: each test starts and ends without."""
    logging.captureWarnings(False)
    yield
    logging.captureWarnings(False)


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler holding the stderr of its creation wrote to a closed file ("--- Logging error ---" in CI) once a
    runner that had swapped stderr (click's CliRunner in the CLI tests) closed it."""
    from rlaifv.service.log_format import configure_logging

    for name in ("rlaifv", "uvicorn", "uvicorn.error", "uvicorn.access"):  # restored after the test
        logger = logging.getLogger(name)
        for attribute in ("handlers", "propagate", "level", "disabled"):
            monkeypatch.setattr(logger, attribute, getattr(logger, attribute))
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    configure_logging("info")
    swapped.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    logging.getLogger("rlaifv.service").info("after the swap", extra={"request_id": "r1"})
    line = json.loads(now.getvalue())
    assert line["message"] == "after the swap" and line["level"] == "info"


def test_model_libraries_log_json_and_draw_no_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers drew "Loading weights" bars and wrote its warnings as plain text among the JSON lines."""
    from transformers.utils import logging as transformers_logging

    from rlaifv.service.log_format import LIBRARY_LOGGERS, configure_logging

    for name in ("rlaifv", "uvicorn", "uvicorn.error", "uvicorn.access", *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        for attribute in ("handlers", "propagate", "level", "disabled"):
            value = getattr(logger, attribute)
            monkeypatch.setattr(logger, attribute, list(value) if attribute == "handlers" else value)
    bars = transformers_logging.is_progress_bar_enabled()
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    try:
        configure_logging("debug")
        transformers_logging.get_logger("transformers.modeling_utils").warning("some weights were not used")
        transformers_logging.get_logger("transformers.modeling_utils").info("chatter below warning")
        for _ in transformers_logging.tqdm(range(3), desc="Loading weights"):
            pass
        logging.getLogger("torch._subclasses").warning("a torch warning")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library's UserWarning", UserWarning, stacklevel=1)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [(line["logger"], line["message"]) for line in lines[:2]] == [
        ("transformers.modeling_utils", "some weights were not used"),
        ("torch._subclasses", "a torch warning"),
    ]
    assert len(lines) == 3 and lines[2]["logger"] == "py.warnings" and "a library's UserWarning" in lines[2]["message"]
