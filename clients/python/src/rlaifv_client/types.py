"""Typed results: pydantic models mirroring the server's response schemas (service/protocol.py).

`tests/clients/test_schema_drift.py` compares every model here with the running server's
/openapi.json, so a field added, removed, renamed or retyped on either side fails CI.
Unknown fields are kept (`extra="allow"`), so an older SDK still parses a newer server.
Log-probs are raw model log-probs (temperature 1, no top-p/top-k), whatever the sampling settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, WithJsonSchema

__all__ = [
    "BestOfN",
    "Candidate",
    "ErrorDetail",
    "FieldProblem",
    "GeneratorInfo",
    "Health",
    "Job",
    "JobList",
    "JobResult",
    "JobResultList",
    "Model",
    "ModelList",
    "RewardInfo",
    "Rewards",
    "Timings",
    "Usage",
]


def _known(*values: str) -> WithJsonSchema:
    """An open enum: a string the server draws from `values` today. A value added by a newer server parses too (as
    a plain str) instead of failing the whole response; the schema lists `values`, so the drift test compares them.
    Every `object` field is one, today's name its default (a job result named otherwise is then a `BaseType`)."""
    return WithJsonSchema({"enum": list(values), "type": "string"})


JobStatus: TypeAlias = Annotated[str, _known("queued", "running", "succeeded", "failed", "cancelled")]
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
FinishReason: TypeAlias = Annotated[str, _known("stop", "length", "given")]
Normalize: TypeAlias = Annotated[str, _known("mean", "sum")]
ClaimScore: TypeAlias = Annotated[str, _known("count", "expected")]
HealthStatus: TypeAlias = Annotated[str, _known("ok", "loading", "unavailable")]
JobKind: TypeAlias = Annotated[str, _known("best_of_n", "rewards")]
ItemStatus: TypeAlias = Annotated[str, _known("succeeded", "failed")]


class BaseType(BaseModel):
    """Base of every result: keeps unknown fields; `request_id` is the X-Request-ID of the response."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    _request_id: str | None = PrivateAttr(default=None)

    @property
    def request_id(self) -> str | None:
        """The server's request id (X-Request-ID) for this result, to quote in bug reports and logs."""
        return self._request_id


class Usage(BaseType):
    prompt_tokens: int = Field(description="Prompt tokens (image tokens included) of the request.")
    completion_tokens: int = Field(description="Answer tokens generated (best-of-N: all samples) or scored.")
    total_tokens: int


class RewardInfo(BaseType):
    mode: str = Field(description="Reward mode used.")
    beta: float
    normalize: Normalize
    claim_score: ClaimScore | None = Field(
        None, description="'claims' mode: how verdicts became the reward (see RewardOptions.claim_score)."
    )


class Timings(BaseType):
    queue_s: float = Field(description="Time spent waiting for the model.")
    generate_s: float = Field(0.0, description="Sampling time of the batch the request ran in.")
    score_s: float = Field(description="Reward scoring time of the batch the request ran in.")
    total_s: float = Field(description="Server time from arrival to response.")


class ClaimCheck(BaseType):
    """One claim of a candidate as the yes/no labeler judged it ('claims' reward mode)."""

    claim: str
    question: str
    p_yes: float
    accepted: bool
    repeated: bool


class Candidate(BaseType):
    index: int = Field(description="Position of the candidate (sampling order, or the order answers were given).")
    text: str
    reward: float = Field(description="The ranking reward: the RLAIF-V implicit reward ('dpo') or the claims score.")
    implicit_reward: float = Field(description="r = beta/T * sum_t[log pi_theta - log pi_ref], in every mode.")
    claims: list[ClaimCheck] | None = Field(None, description="Per-claim verdicts ('claims' mode only).")
    policy_logprob: float = Field(description="sum_t log pi_theta(y_t | x, y_<t).")
    reference_logprob: float = Field(description="sum_t log pi_ref(y_t | x, y_<t).")
    num_tokens: int = Field(description="T: answer tokens scored, end-of-turn included.")
    finish_reason: FinishReason = Field(description="'given' for answers sent to score().")


class GeneratorInfo(BaseType):
    """Which model wrote the candidates, when the server has a generator (RLAIFV_GENERATOR_URL)."""

    model: str = Field(description="The generator's model name.")
    url: str = Field(description="The generator's host[:port].")


class BestOfN(BaseType):
    """Result of `best_of_n`: the best candidate and every candidate's reward terms."""

    id: str
    object: Annotated[str, _known("best_of_n")] = "best_of_n"
    created: int
    model: str
    best_index: int = Field(description="argmax of the rewards; ties go to the lower index.")
    best: Candidate
    candidates: list[Candidate]
    reward: RewardInfo
    usage: Usage
    timings: Timings
    generator: GeneratorInfo | None = Field(
        None, description="The model that wrote the candidates when not the served pair (None: the pair sampled)."
    )
    scorer: str | None = Field(None, description="The model pair whose log-probs gave the rewards.")

    @property
    def text(self) -> str:
        """The best answer's text."""
        return self.best.text

    @property
    def rewards(self) -> list[float]:
        """Every candidate's reward, in sampling order."""
        return [c.reward for c in self.candidates]


class Rewards(BaseType):
    """Result of `score`: the reward of each given answer, in order, and the best index."""

    id: str
    object: Annotated[str, _known("rewards")] = "rewards"
    created: int
    model: str
    rewards: list[float] = Field(description="Reward of each answer, in the order given.")
    best_index: int
    candidates: list[Candidate]
    reward: RewardInfo
    usage: Usage
    timings: Timings
    cached: bool = Field(False, description="True when the result came from the reward cache.")

    @property
    def best(self) -> Candidate:
        """The highest-reward answer."""
        return self.candidates[self.best_index]


class ImageLimits(BaseType):
    """What an image sent to the served model may be: larger or other images are refused with a 400."""

    formats: list[str]  # PIL names, e.g. "PNG", "JPEG"
    max_bytes: int
    max_pixels: int
    max_aspect: float


class Model(BaseType):
    id: str
    object: Annotated[str, _known("model")] = "model"
    created: int
    owned_by: str = "rlaifv"
    reward: RewardInfo
    max_positions: int | None = None
    # ["text", "image"], or ["text"] for a text-only model (send no images). Servers older than the field omit it.
    input_modalities: list[Annotated[str, _known("text", "image")]] = Field(default_factory=lambda: ["text", "image"])
    # None for a text-only model, and from servers older than the field.
    image_limits: ImageLimits | None = None


class ModelList(BaseType):
    object: Annotated[str, _known("list")] = "list"
    data: list[Model]

    def __iter__(self) -> Iterator[Model]:  # type: ignore[override]  # iterate the models, like a list
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Health(BaseType):
    status: HealthStatus
    checks: dict[str, str] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class FieldProblem(BaseType):
    """One of several problems of a rejected request (`ErrorDetail.errors`, e.g. in a failed job item's result).

    A raised `InvalidRequestError` carries the same list as `field_errors` (`FieldError`, a frozen dataclass that
    predates this model and is kept as it is for code that builds or unpacks it)."""

    message: str
    param: str | None = None
    code: str | None = None


class ErrorDetail(BaseType):
    """The `error` object of the server's error envelope."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None
    errors: list[FieldProblem] | None = None


# -- batch jobs ------------------------------------------------------------------------


class Job(BaseType):
    """A batch job: `status` moves queued -> running -> succeeded | failed | cancelled.

    `succeeded` means every item has a result, though some items may have failed (see `failed`);
    `failed` means every item failed."""

    id: str
    object: Annotated[str, _known("job")] = "job"
    kind: JobKind = Field(description="Which endpoint each item is a request for.")
    status: JobStatus
    created: int
    updated: int
    total: int = Field(description="Items in the job.")
    completed: int = Field(description="Items answered successfully.")
    failed: int = Field(description="Items answered with an error.")
    metadata: dict[str, str] = Field(default_factory=dict)

    @property
    def done(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.status in TERMINAL_JOB_STATUSES

    @property
    def progress(self) -> float:
        """Fraction of items answered (successfully or not), 0..1."""
        return (self.completed + self.failed) / self.total if self.total else (1.0 if self.done else 0.0)

    def raise_for_status(self) -> Job:
        """Raise `JobError` when the job failed or was cancelled; return the job otherwise (for chaining)."""
        if self.status in ("failed", "cancelled"):
            from ._exceptions import JobError

            raise JobError(f"job {self.id} {self.status} ({self.failed} of {self.total} items failed)", job=self)
        return self


class JobList(BaseType):
    """GET /v1/jobs: one page of your jobs, newest first (``jobs.list()``); iterate it for ``Job`` objects.

    While ``has_more``, the next page is ``jobs.list(after=page.last_id)``."""

    object: Annotated[str, _known("list")] = "list"
    data: list[Job] = Field(description="The jobs of this page, newest first.")
    first_id: str | None = Field(None, description="The id of the first job of `data` (None when it is empty).")
    last_id: str | None = Field(None, description="The id of the last job of `data`: the next page's `after`.")
    has_more: bool = Field(description="Whether older jobs follow this page.")

    def __iter__(self) -> Iterator[Job]:  # type: ignore[override]  # iterate the jobs, like a list
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def _result_kind(value: Any) -> str:
    kind = value.get("object") if isinstance(value, dict) else getattr(value, "object", None)
    return kind if kind in ("best_of_n", "rewards") else "other"


JobItemBody = Annotated[
    Annotated[BestOfN, Tag("best_of_n")] | Annotated[Rewards, Tag("rewards")] | Annotated[BaseType, Tag("other")],
    Discriminator(_result_kind),
]


class JobResult(BaseType):
    """One item of a job: its `result` (a `BestOfN` or `Rewards`, by the job's kind) or its `error`."""

    index: int = Field(description="Position of the item in the submission (0-based).")
    custom_id: str | None = Field(None, description="The item's `custom_id`, when it was submitted with one.")
    status: ItemStatus
    result: JobItemBody | None = Field(
        None, description="The endpoint's response body (a `BaseType` for a job kind newer than this SDK)."
    )
    error: ErrorDetail | None = Field(None, description="The error envelope's `error` object when the item failed.")


class JobResultList(BaseType):
    """GET /v1/jobs/{id}/results: the results so far, by item index; `jobs.results()` iterates them."""

    id: str
    object: Annotated[str, _known("list")] = "list"
    status: JobStatus
    data: list[JobResult] = Field(description="Results so far, by item index.")
