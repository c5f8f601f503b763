"""Structured JSON logs: one object per line, carrying the request id of the request being served."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rlaifv_request_id", default=None)
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _Stderr(logging.StreamHandler[TextIO]):
    """Whatever `sys.stderr` is when a record comes: a handler holding the stream of its creation wrote to a closed
    file once a runner that had swapped stderr (click's CliRunner, pytest's capture) closed it."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for our logger and uvicorn's (its access log is replaced by ours), and for the warnings
    of the model libraries, theirs and Python's `warnings` alike; their progress bars are off (a bar is not a JSON
    line: log shippers stored each redraw as an unparsed record). Model loading time is in the `ready` line. The
    libraries log at WARNING and above, or at the level `TRANSFORMERS_VERBOSITY` names for transformers."""
    import torch  # noqa: F401  (it sets up its loggers on import: a later import would add its plain-text handler)
    from transformers.utils import logging as transformers_logging

    handler = _Stderr()
    handler.setFormatter(JsonFormatter())
    for name in ("rlaifv", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True
    transformers_logging.disable_default_handler()  # its own plain-text handler, made on first use
    transformers_logging.disable_progress_bar()
    logging.captureWarnings(True)  # DeprecationWarning / UserWarning of torch and transformers, as log records
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        if name == "transformers" and os.environ.get("TRANSFORMERS_VERBOSITY"):
            continue  # set from it by transformers (`disable_default_handler` configured it)
        logger.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


LIBRARY_LOGGERS = ("transformers", "accelerate", "peft", "huggingface_hub", "torch", "py.warnings")
