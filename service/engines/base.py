"""The engine seam: what the scheduler and the serving layer need from whatever runs the model pair.

An engine takes a batch of requests of one kind and answers each with a
ranking or an exception of its own (one bad request never fails the others).
The in-process `transformers` engine implements it today; a vLLM engine, or a
fake one in tests, plugs in the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from rlaifv.reward.results import Ranking
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.reward.scoring import RewardConfig

Kind = Literal["generate", "score"]


class Withdrawal:
    """Set once nobody waits for a request any more (its client left, or its deadline passed) while an engine
    runs it: a model thread reads `event` between decoding steps, an async engine cancels the request's own work
    from an `on_set` callback (run on the thread that sets it: the event loop's)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._callbacks: list[Callable[[], object]] = []

    def set(self) -> None:
        if self.event.is_set():
            return
        self.event.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        return self.event.is_set()

    def on_set(self, callback: Callable[[], object]) -> None:
        if self.event.is_set():
            callback()
        else:
            self._callbacks.append(callback)


@dataclass
class GenerateRequest:
    """Sample `n` answers to an image+question (or chat messages) and rank them.

    `top_logprobs` (None: none) asks for each candidate's per-token log-probs with that many alternatives.
    `max_tokens_param` names the request field that set `sampling.max_tokens`; None means the server's default,
    which shrinks to fit a long prompt (as OpenAI and vLLM do) instead of failing the request. `continue_final`:
    the answers continue the last message, an assistant turn (vLLM's `continue_final_message`).
    """

    images: list[Any]
    question: str | None
    messages: list[dict[str, Any]] | None
    n: int
    sampling: SamplingParams
    reward: RewardConfig
    top_logprobs: int | None = None
    max_tokens_param: str | None = None
    continue_final: bool = False
    withdrawal: Withdrawal = field(default_factory=Withdrawal, repr=False, compare=False)
    kind: Kind = field(default="generate", init=False)

    @property
    def prompt_param(self) -> str:
        return "question" if self.question is not None else "messages"

    def fitted(self, prompt_tokens: int, limit: int | None, reserve: int = 0) -> SamplingParams:
        """`sampling` with room for its answers in the model's `limit` positions (`reserve` more kept free)."""
        from rlaifv.reward.sampling import fit_to_positions  # torch: not at this module's import

        return fit_to_positions(
            self.sampling,
            prompt_tokens,
            limit,
            given=self.max_tokens_param,
            prompt_param=self.prompt_param,
            reserve=reserve,
        )


@dataclass
class ScoreRequest:
    """Rank given answers (e.g. another model's) to an image+question; `continue_final` as in GenerateRequest."""

    images: list[Any]
    question: str | None
    messages: list[dict[str, Any]] | None
    answers: list[str]
    reward: RewardConfig
    max_tokens: int
    continue_final: bool = False
    withdrawal: Withdrawal = field(default_factory=Withdrawal, repr=False, compare=False)
    kind: Kind = field(default="score", init=False)


Request = GenerateRequest | ScoreRequest


@dataclass
class EngineResult:
    ranking: Ranking
    prompt_tokens: int
    batch_size: int


@runtime_checkable
class Engine(Protocol):
    """Runs batches of requests against one policy/reference pair."""

    @property
    def name(self) -> str:
        """The served model's name (the bundle's)."""
        ...

    @property
    def reward(self) -> RewardConfig:
        """The pair's default reward settings; requests override them field by field."""
        ...

    @property
    def max_positions(self) -> int | None:
        """Longest prompt + answer the model takes, if it has a limit."""
        ...

    @property
    def concurrent_batches(self) -> int:
        """How many `run` calls may be in progress at once: 1 for an engine whose batch is one forward pass; more
        for one that batches across calls itself (vLLM), so a short request is not held behind a long batch."""
        ...

    async def run(self, requests: Sequence[Request]) -> list[EngineResult | Exception]:
        """Run requests of one kind as one batch; one result or exception per request, in order."""
        ...

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """An answer token's bytes for OpenAI's log-probs (`text`: its text in context; a token ending inside a
        character decodes to U+FFFD, its bytes come from the tokenizer)."""
        ...

    async def warmup(self) -> float:
        """Pay first-call costs before traffic; returns seconds spent."""
        ...

    def shutdown(self) -> None:
        """Release the model and its threads (after the last `run`)."""
        ...
