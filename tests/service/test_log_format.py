"""`rlaifv serve`'s JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest


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
