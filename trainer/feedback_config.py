"""Settings of candidate sampling and divide-and-conquer feedback (`rlaifv feedback`, each iterate round)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from rlaifv.trainer.errors import ConfigError

LLM_URL_ONLY = ("llm_name", "llm_timeout_s", "llm_retries", "llm_concurrency")
"""Settings of the OpenAI-compatible client, which a local `llm_model` would ignore."""


def check_llm_url(url: str, setting: str = "llm_url") -> None:
    """Refuse a URL the client could never reach, before any model is loaded or sampled."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is no number, or out of range, raises ValueError here
    except ValueError as exc:
        raise ConfigError(f"{setting} {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{setting} {url!r} is not an http(s) URL: give the server's OpenAI-compatible base URL,"
            " e.g. http://127.0.0.1:8000/v1"
        )
    if parts.path.rstrip("/").endswith("/chat/completions"):
        raise ConfigError(
            f"{setting} {url!r} is the chat route itself: give its base URL (…/v1); /chat/completions is added"
        )


@dataclass
class FeedbackConfig:
    """Sample N answers per prompt with one decoding setting for all ("deconfounded"), then verify claims."""

    num_samples: int = field(default=10, metadata={"help": "Candidates per prompt (RLAIF-V: 10)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature, the same for every candidate."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; 1 disables it."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 disables it."})
    max_tokens: int = field(
        default=512,
        metadata={
            "help": "Maximum new tokens per candidate (RLAIF-V: 512); lower it only for models whose answers are"
            " short, since truncated candidates are dropped (a bias towards short answers)."
        },
    )
    drop_truncated: bool = field(
        default=True, metadata={"help": "Discard candidates that hit max_tokens without ending."}
    )
    labeler: str = field(default="self", metadata={"help": "'self' (the policy judges itself) or a model folder."})
    splitter: Literal["spacy", "llm"] = field(
        default="spacy", metadata={"help": "Claim splitter: spaCy rules or an instruction LLM."}
    )
    question_writer: Literal["rules", "llm"] = field(
        default="rules", metadata={"help": "Claim -> yes/no question: rules or an LLM."}
    )
    llm_model: str | None = field(
        default=None, metadata={"help": "Instruction model folder for the LLM splitter/writer."}
    )
    llm_url: str | None = field(
        default=None,
        metadata={
            "help": "OpenAI-compatible base URL (…/v1) for the LLM splitter/writer; its API key from the environment"
            " variable RLAIFV_LLM_API_KEY, if it needs one."
        },
    )
    llm_name: str = field(default="default", metadata={"help": "Model name sent to the OpenAI-compatible URL."})
    llm_timeout_s: float = field(
        default=60.0, metadata={"help": "Deadline of one request to the LLM URL, in seconds (then retried)."}
    )
    llm_retries: int = field(
        default=3,
        metadata={
            "help": "Attempts after the first at the LLM URL, with backoff, on a timeout, a connection error, HTTP"
            " 408/409/429/5xx or a reply not in the asked format (empty, a refusal, no JSON array); then the run"
            " stops with an error naming the answer or claim."
        },
    )
    llm_max_tokens: int = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of one LLM reply (URL or local model); a reply cut at this limit stops the run"
            " (its last claims would be lost), so raise it for long answers."
        },
    )
    llm_concurrency: int = field(
        default=8, metadata={"help": "Requests to the LLM URL in flight at most (distinct answers/claims)."}
    )
    repeat_penalty: float = field(default=1.0, metadata={"help": "Score penalty per repeated claim."})
    threshold: float = field(default=0.5, metadata={"help": "A claim is accepted when p(yes) > threshold."})
    claim_score: Literal["count", "expected"] = field(
        default="count",
        metadata={"help": "'count': -(rejected claims), as RLAIF-V; 'expected': -(sum of p(no)) over claims."},
    )
    prompt_batch: int = field(default=4, metadata={"help": "Prompts sampled together in one batch."})
    seed: int = field(default=0, metadata={"help": "Base seed; each prompt gets its own derived seed."})

    def __post_init__(self) -> None:
        checks = [
            (self.num_samples >= 2, "num_samples must be >= 2 (pairs need two answers)"),
            (0.0 <= self.temperature <= 5.0, "temperature must be in [0, 5]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.repeat_penalty >= 0, "repeat_penalty must be >= 0"),
            (0.0 < self.threshold < 1.0, "threshold must be in (0, 1)"),
            (self.prompt_batch >= 1, "prompt_batch must be >= 1"),
            (self.splitter in ("spacy", "llm"), "splitter must be 'spacy' or 'llm'"),
            (self.question_writer in ("rules", "llm"), "question_writer must be 'rules' or 'llm'"),
            (self.claim_score in ("count", "expected"), "claim_score must be 'count' or 'expected'"),
            (bool(self.labeler), "labeler must be 'self' or a model folder"),
            (self.llm_timeout_s > 0, "llm_timeout_s must be > 0"),
            (self.llm_retries >= 0, "llm_retries must be >= 0"),
            (self.llm_max_tokens >= 1, "llm_max_tokens must be >= 1"),
            (self.llm_concurrency >= 1, "llm_concurrency must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        changed = self._changed_llm_settings()
        if "llm" not in (self.splitter, self.question_writer):
            if changed:
                raise ConfigError(
                    f"{', '.join(changed)} would be ignored: they configure the LLM claim splitter/question writer,"
                    " which runs only with splitter=llm or question_writer=llm"
                )
            return
        if (self.llm_model is None) == (self.llm_url is None):
            raise ConfigError("the 'llm' splitter/question writer needs exactly one of llm_model or llm_url")
        if self.llm_url is not None:
            check_llm_url(self.llm_url)
        elif ignored := [name for name in changed if name in LLM_URL_ONLY]:
            raise ConfigError(f"{', '.join(ignored)} would be ignored: they configure llm_url's client, not llm_model")

    def _changed_llm_settings(self) -> list[str]:
        return [f.name for f in fields(self) if f.name.startswith("llm_") and getattr(self, f.name) != f.default]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # How the LLM URL is waited on and retried decides no answer's score: a run may resume with other values (a
    # run stopped by "LLM reply failed" is rerun with more retries, keeping what it sampled).
    BOOKKEEPING: ClassVar[tuple[str, ...]] = ("llm_timeout_s", "llm_retries", "llm_concurrency")

    def result_settings(self) -> dict[str, Any]:
        """The settings with the bookkeeping ones at their defaults: what decides the feedback (its run key)."""
        defaults = {f.name: f.default for f in fields(self) if f.name in self.BOOKKEEPING}
        return asdict(self) | defaults
