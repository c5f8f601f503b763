"""Exceptions raised by the trainer.

One root so callers (the CLI, the shapes world) can catch everything at once::

    TrainerError
    ├── ConfigError           a setting is out of range or inconsistent
    ├── DataError             a data file is unusable; names the file, row and column
    │   ├── MissingColumnError    a required column/field is absent
    │   ├── ImageDecodeError      an image cannot be read or decoded
    │   └── EmptyAnswerError      question/chosen/rejected is empty or not text
    ├── RunStateError         an output folder cannot be resumed (settings changed, files damaged)
    ├── LLMReplyError         the feedback's LLM gave no usable reply for an answer or a claim
    └── TrainingInterrupted   SIGTERM or Ctrl-C stopped a run after it saved its state (a rerun resumes)
"""

from __future__ import annotations

from collections.abc import Sequence


class TrainerError(Exception):
    """Root of every error raised by `trainer`."""


class ConfigError(TrainerError, ValueError):
    """A configuration value is invalid."""


class DataError(TrainerError, ValueError):
    """A data file cannot be used. `source`, `row` and `column` locate the problem when known."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        column: str | None = None,
        line: int | None = None,
    ):
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.detail = message
        self.source = source
        self.row = row
        self.column = column
        self.line = line

    def at_line(self, line: int | None) -> DataError:
        """The same error naming the text line its row came from (JSONL: blank lines make rows and lines differ)."""
        if line is None or self.line is not None:
            return self
        return type(self)(self.detail, source=self.source, row=self.row, column=self.column, line=line)


class MissingColumnError(DataError):
    """A required column (parquet) or field (JSONL) is missing."""


class ImageDecodeError(DataError):
    """An image could not be found, read or decoded."""


class ImageNotFoundError(ImageDecodeError):
    """A value read as an image's path names no file (and is no base64 of an image)."""


class EmptyAnswerError(DataError):
    """A question or answer is empty or not a string."""


class RunStateError(TrainerError):
    """An existing output folder does not match this run and cannot be resumed."""


class TrainingInterrupted(TrainerError):
    """A stop asked for (SIGTERM, or a first Ctrl-C) ended training where its work is saved; the same command
    resumes it. `message` says where ("after step 3 of 9; ..."); the signal and the exit code (128 + it) are set by
    `interrupt.stop_on_sigterm`, which knows which one asked."""

    def __init__(self, message: str, *, step: int, signal_name: str = "SIGTERM", exit_code: int = 143) -> None:
        super().__init__(message)
        self.message, self.step = message, step
        self.signal_name, self.exit_code = signal_name, exit_code

    def __str__(self) -> str:
        return f"stopped by {self.signal_name} {self.message}"


class LLMReplyError(TrainerError):
    """The LLM gave no usable reply for `text` (an answer to split, a claim to rewrite) after every attempt."""

    def __init__(self, message: str, *, text: str, replies: Sequence[str] = (), errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.text = text
        self.replies = list(replies)
        self.errors = list(errors)
