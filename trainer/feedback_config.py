"""Settings of candidate sampling and divide-and-conquer feedback (`rlaifv feedback`, each iterate round)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from rlaifv.trainer.credentials import authorization_clash, key_problem, shown_url, url_problem
from rlaifv.trainer.errors import ConfigError

LLM_URL_ONLY = ("llm_name", "llm_timeout_s", "llm_retries", "llm_concurrency")
"""Settings of the OpenAI-compatible client, which a local `llm_model` would ignore."""
API_KEY_VARIABLE = "RLAIFV_LLM_API_KEY"


def check_llm_url(url: str, setting: str = "llm_url") -> None:
    """Refuse a URL the client could never reach, before any model is loaded or sampled. Messages show it without
    its credentials (user, password, query)."""
    shown = repr(shown_url(url.strip()))
    if problem := url_problem(url):
        raise ConfigError(f"{setting} {shown} {problem}")
    if urlsplit(url).path.rstrip("/").endswith("/chat/completions"):
        raise ConfigError(
            f"{setting} {shown} is the chat route itself: give its base URL (…/v1); /chat/completions is added"
        )


def check_api_key(key: str | None, name: str = API_KEY_VARIABLE, url: str | None = None) -> None:
    """Refuse a key no HTTP header can carry, naming where it came from and never showing it: the request failed
    only once the models had loaded, with the whole header (key included) in the error, and was retried. With the
    `url` it is sent to: refuse a key beside a user and password in the URL (sent as Basic authorization, which
    replaced the key's header: the key never went, and the 401 blamed it)."""
    problem = key_problem(key) if key else None
    if problem:
        raise ConfigError(f"{name} {problem}: set it to the key alone")
    if clash := authorization_clash(url, key, "llm_url", name):
        raise ConfigError(clash)


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
            "help": "OpenAI-compatible base URL (…/v1, a query such as ?api-version=… kept) for the LLM"
            " splitter/writer; its API key from the environment variable RLAIFV_LLM_API_KEY, if it needs one. The same"
            " server at another address resumes a run; reports and run files show it without credentials."
        },
    )
    llm_name: str = field(
        default="default",
        metadata={
            "help": "Model name sent to the OpenAI-compatible URL; another name is another feedback model (a run"
            " does not resume with it)."
        },
    )
    llm_timeout_s: float = field(
        default=60.0, metadata={"help": "Deadline of one request to the LLM URL, in seconds (then retried)."}
    )
    llm_retries: int = field(
        default=3,
        metadata={
            "help": "Attempts after the first at the LLM URL, on a timeout, a connection error, HTTP 408/409/425/429"
            " or 5xx (not 501/505), or a reply not in the asked format (empty, a refusal, no JSON array); each after a"
            " backoff (1 s, doubling, with jitter) or the server's Retry-After if longer (at most 120 s: one longer"
            " ends the call); then the run stops with an error naming the answer or claim."
        },
    )
    llm_max_tokens: int = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of one LLM reply (URL or local model); a reply cut at this limit stops the run"
            " (its last claims would be lost), so raise it for long answers: the run goes on from its saved batches."
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
            # "" failed in the client after the models had loaded, in a pydantic traceback
            (
                bool(self.llm_name) and self.llm_name == self.llm_name.strip(),
                "llm_name must name the server's model (it is empty, or has spaces around it)",
            ),
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
            check_api_key(os.environ.get(API_KEY_VARIABLE), url=self.llm_url)
        elif ignored := [name for name in changed if name in LLM_URL_ONLY]:
            raise ConfigError(f"{', '.join(ignored)} would be ignored: they configure llm_url's client, not llm_model")

    def _changed_llm_settings(self) -> list[str]:
        return [f.name for f in fields(self) if f.name.startswith("llm_") and getattr(self, f.name) != f.default]

    def __repr__(self) -> str:
        """As `to_dict` shows them: a config printed in a log line or a traceback keeps llm_url's credentials out."""
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def model_folders(self) -> dict[str, Path]:
        """The local model folders these settings name (a labeler, a claims LLM), by setting: each is known by its
        content, as the models sampled from are, not by the path's text (a copy elsewhere is the same model; one
        replaced in place another)."""
        named = {"labeler": self.labeler, "llm_model": self.llm_model}
        return {
            name: Path(value) for name, value in named.items() if value and value != "self" and Path(value).is_dir()
        }

    def to_dict(self) -> dict[str, Any]:
        """The settings as reports, run files and bundles keep them: llm_url without its credentials."""
        data = asdict(self)
        if self.llm_url is not None:
            data["llm_url"] = shown_url(self.llm_url)
        return data

    # Where the LLM server is reached and how it is waited on and retried decide no answer's score, nor does the
    # reply limit (a reply that fitted is the same reply; one cut off stops the run): a run may resume with other
    # values (a run stopped by "LLM reply failed" or "cut off" is rerun with more retries or tokens, or the server
    # moved, keeping what it sampled). llm_name is not among them: another name is another model.
    BOOKKEEPING: ClassVar[tuple[str, ...]] = (
        "llm_url",
        "llm_timeout_s",
        "llm_retries",
        "llm_max_tokens",
        "llm_concurrency",
    )
    EARLIER_BOOKKEEPING: ClassVar[tuple[str, ...]] = ("llm_timeout_s", "llm_retries", "llm_concurrency")
    """BOOKKEEPING before llm_url and llm_max_tokens joined it: the run keys saved batches of that version have."""

    def result_settings(self, bookkeeping: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The settings with the bookkeeping ones at their defaults: what decides the feedback (its run key)."""
        names = self.BOOKKEEPING if bookkeeping is None else bookkeeping
        defaults = {f.name: f.default for f in fields(self) if f.name in names}
        return asdict(self) | defaults
