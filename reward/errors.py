"""Exceptions raised by the reward core.

One root so callers can catch everything from this package at once::

    RewardError
    ├── ModelLoadError          a model/processor folder cannot be loaded
    ├── BundleError             rlaifv.json missing, malformed or inconsistent
    ├── Aborted                 the work was stopped (the server shutting down)
    ├── Withdrawn               one task of a batch was given up by its owner (its client left)
    └── InvalidInputError       the caller's input is wrong (maps to HTTP 4xx)
        ├── ImageError          not an image, truncated, too large, bad format
        ├── AnswerError         empty answer list, empty answer, too long
        └── ContextLengthError  prompt (+ the answer length asked for) over the model's positions

The service maps these to HTTP responses in exactly one place.
"""

from __future__ import annotations


class RewardError(Exception):
    """Root of every error raised by `reward`."""


class Aborted(RewardError):
    """Sampling stopped at a decoding step because its owner asked (`ModelPair.abort`): a server stopping after
    its grace must not wait for a long batch whose answers nobody will receive."""


class Withdrawn(RewardError):
    """A task's owner withdrew it while its batch ran (`GenerateTask.withdrawn` set: the client left, or its
    deadline passed): its rows stopped taking decoding steps and it was not scored."""


class ModelLoadError(RewardError):
    """A model or processor could not be loaded from its folder."""


class PackingUnavailableError(ModelLoadError):
    """Packed weights were asked for (`pack_weights=on`) where this CPU, torch build or model cannot have them."""


class BundleError(RewardError):
    """A bundle folder or its `rlaifv.json` is invalid."""


class InvalidInputError(RewardError, ValueError):
    """The caller passed an input the reward core refuses.

    `param` names the offending argument so the HTTP layer can report it.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ImageError(InvalidInputError):
    """An image could not be decoded or breaks a configured limit."""


class AnswerError(InvalidInputError):
    """An answer list or answer text is unusable."""


class ContextLengthError(InvalidInputError):
    """The prompt, or the prompt and the answer length asked for, does not fit the model's positions: its own
    type so that the HTTP layer can give OpenAI's `context_length_exceeded`, which clients act on (trim, retry)."""
