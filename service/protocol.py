"""Wire schemas of the HTTP API, and their conversion to the reward core's parameters.

Requests forbid unknown fields. Bounds that depend on the operator's settings
(max n, max_tokens, images per request) are checked in the `to_*` conversions,
which raise `BadRequest` naming the field.

Log-probs in responses are *raw* model log-probs: softmax of the logits at
temperature 1, without top-p/top-k, whatever the sampling settings were.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlaifv.reward.results import ClaimCheck
from rlaifv.reward.sampling import SamplingParams
from rlaifv.reward.scoring import RewardConfig
from rlaifv.service.errors import BadRequest, ErrorDetail
from rlaifv.service.settings import Settings

PNG_1PX = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
MAX_SEED = 2**63 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


MIN_TEMPERATURE = 0.01


def _check_temperature(value: float | None) -> float | None:
    """Temperatures just above 0 overflow the logits (inf/NaN probabilities): 0 means greedy, else >= 0.01."""
    if value is not None and 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return value


# -- shared pieces ---------------------------------------------------------------


class RewardOptions(Strict):
    """How candidates are scored. Unset fields take the bundle's values."""

    mode: Literal["dpo", "claims"] = Field(
        "dpo",
        description="'dpo' (default): the RLAIF-V self-reward beta/T * sum_t log(pi_theta/pi_ref). 'claims': "
        "divide-and-conquer verification: each answer is split into claims, the yes/no labeler (the policy) "
        "judges each against the image; reward per claim_score, minus repeat_penalty * (repeated claims). "
        "More forward passes. policy_logprob/reference_logprob are reported in both modes.",
    )
    beta: float | None = Field(
        None, gt=0, le=1000, description="DPO temperature; the bundle's beta (usually 0.1) when unset."
    )
    normalize: Literal["mean", "sum"] | None = Field(
        None, description="'mean' divides by the answer's token count T (default), 'sum' does not."
    )
    repeat_penalty: float | None = Field(
        None, ge=0, le=100, description="'claims' mode: penalty per repeated claim; the bundle's (1.0) when unset."
    )

    claim_score: Literal["count", "expected"] | None = Field(
        None,
        description="'claims' mode: 'count' (default) = -(claims judged no), RLAIF-V's feedback score; 'expected' = "
        "-(sum of the labeler's p(no) over claims), the expected number of hallucinated claims (breaks ties, "
        "favours fewer claims).",
    )

    def to_config(self, default: RewardConfig) -> RewardConfig:
        return RewardConfig(
            mode=self.mode,
            beta=self.beta or default.beta,
            normalize=self.normalize or default.normalize,
            repeat_penalty=default.repeat_penalty if self.repeat_penalty is None else self.repeat_penalty,
            claim_score=self.claim_score or default.claim_score,
            claim_threshold=default.claim_threshold,
        )


class SamplingOptions(Strict):
    """Decoding settings, the same for all n samples of a request."""

    temperature: float = Field(1.0, ge=0, le=5, description="0 means greedy (all samples identical); else >= 0.01.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 disables top-k.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most new tokens per answer, end-of-turn included (server limit applies)."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for reproducible samples.")

    _temperature = field_validator("temperature")(_check_temperature)

    def to_params(self, settings: Settings, param: str = "sampling.max_tokens") -> SamplingParams:
        max_tokens = self.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens:
            raise BadRequest(f"max_tokens must be <= {settings.max_tokens}, got {max_tokens}", param=param)
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_tokens=max_tokens, seed=self.seed
        )


class ImageURL(Strict):
    url: str = Field(
        description="A data URL (data:image/png;base64,...), or an http(s) URL when the operator allows its host.",
        max_length=64 * 1024 * 1024,
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted for OpenAI compatibility; ignored."
    )


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] = Field(description="Text, or OpenAI content parts (text and image_url).")
    name: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")


def convert_messages(
    messages: list[ChatMessage], param: str = "messages"
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages -> HF chat messages with {"type": "image"} parts, plus [(image ref, field path)] in order."""
    if not messages:
        raise BadRequest("messages must not be empty", param=param)
    if messages[-1].role != "user":
        raise BadRequest("the last message must come from the user", param=f"{param}[{len(messages) - 1}].role")
    out: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": [{"type": "text", "text": message.content}]})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                if message.role != "user":
                    raise BadRequest("only user messages may carry images", param=f"{param}[{i}].content[{j}]")
                parts.append({"type": "image"})
                images.append((part.image_url.url, f"{param}[{i}].content[{j}].image_url.url"))
        out.append({"role": message.role, "content": parts})
    if not any(part.get("type") == "text" and part["text"].strip() for m in out for part in m["content"]):
        raise BadRequest("messages contain no text", param=param)
    return out, images


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens (image tokens included) of the request.")
    completion_tokens: int = Field(description="Answer tokens generated (best-of-N: all samples) or scored.")
    total_tokens: int


class RewardInfo(BaseModel):
    mode: str = Field(description="Reward mode used.")
    beta: float
    normalize: Literal["mean", "sum"]
    claim_score: Literal["count", "expected"] | None = Field(
        None, description="'claims' mode: how verdicts became the reward (see RewardOptions.claim_score)."
    )


class Timings(BaseModel):
    queue_s: float = Field(description="Time spent waiting for the model.")
    generate_s: float = Field(0.0, description="Sampling time of the batch the request ran in.")
    score_s: float = Field(
        description="Reward scoring time of the batch the request ran in (claim verification included)."
    )
    total_s: float = Field(description="Server time from arrival to response.")


class CandidateOut(BaseModel):
    index: int = Field(description="Position of the candidate (sampling order, or the order answers were given).")
    text: str
    reward: float = Field(
        description="The reward candidates are ranked by. 'dpo' mode: r = beta/T * sum_t[log pi_theta - log pi_ref]"
        " (no 1/T with normalize='sum'). 'claims' mode: -(sum of p(no) over claims) or -(rejected claims) (per"
        " claim_score), minus repeat_penalty * (repeated claims)."
    )
    implicit_reward: float = Field(
        description="The RLAIF-V implicit reward (the 'dpo' formula) in every mode, for comparison."
    )
    claims: list[ClaimCheck] | None = Field(None, description="Per-claim verdicts ('claims' mode only).")
    policy_logprob: float = Field(description="sum_t log pi_theta(y_t | x, y_<t), raw logits at temperature 1.")
    reference_logprob: float = Field(description="sum_t log pi_ref(y_t | x, y_<t), raw logits at temperature 1.")
    num_tokens: int = Field(description="T: answer tokens scored, end-of-turn included.")
    finish_reason: Literal["stop", "length", "given"] = Field(description="'given' for answers sent to /v1/rewards.")


# -- /v1/best-of-n -----------------------------------------------------------------


class PromptFields(Strict):
    model: str | None = Field(None, description="Model name from /v1/models; the served model when omitted.")
    images: list[Annotated[str, Field(max_length=64 * 1024 * 1024)]] = Field(
        default_factory=list,
        description="Images as data URLs or bare base64 (or http(s) URLs from allowed hosts). Used with `question`.",
    )
    question: str | None = Field(None, description="The question about the images. Give this or `messages`.")
    messages: list[ChatMessage] | None = Field(
        None, description="A conversation in the OpenAI format, images as image_url parts. Give this or `question`."
    )
    reward: RewardOptions = Field(default_factory=RewardOptions)

    def prompt(self, settings: Settings) -> tuple[str | None, list[dict[str, Any]] | None, list[tuple[str, str]]]:
        """(question, HF messages, [(image ref, field path)]) with the operator's limits applied."""
        if (self.question is None) == (self.messages is None):
            raise BadRequest("give exactly one of `question` or `messages`", param="question")
        if self.messages is not None and self.images:
            raise BadRequest("with `messages`, pass images as image_url parts, not in `images`", param="images")
        if self.messages is not None:
            messages, images = convert_messages(self.messages)
            question = None
        else:
            question, messages = self.question, None
            if question is None or not question.strip():
                raise BadRequest("question must not be empty", param="question")
            if len(question) > settings.max_question_chars:
                raise BadRequest(f"question is over {settings.max_question_chars} characters", param="question")
            images = [(ref, f"images[{i}]") for i, ref in enumerate(self.images)]
        if len(images) > settings.max_images:
            raise BadRequest(f"at most {settings.max_images} images per request, got {len(images)}", param="images")
        return question, messages, images


class BestOfNRequest(PromptFields):
    """Sample n answers, score each with the RLAIF-V reward, return the best and all scores."""

    n: int = Field(4, ge=1, description="Candidates to sample (server limit RLAIFV_MAX_N applies).")
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "images": [PNG_1PX],
                    "question": "What is in the image?",
                    "n": 4,
                    "sampling": {"temperature": 1.0, "max_tokens": 16, "seed": 0},
                    "reward": {"mode": "dpo", "beta": 0.1, "normalize": "mean"},
                }
            ]
        },
    )


_CANDIDATE_EXAMPLE = {
    "index": 0,
    "text": "a red circle.",
    "reward": 0.0123,
    "policy_logprob": -4.21,
    "reference_logprob": -4.83,
    "num_tokens": 5,
    "finish_reason": "stop",
}
_USAGE_EXAMPLE = {"prompt_tokens": 26, "completion_tokens": 5, "total_tokens": 31}
_TIMINGS_EXAMPLE = {"queue_s": 0.004, "generate_s": 0.05, "score_s": 0.01, "total_s": 0.07}


class BestOfNResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "bon-3f1c...",
                    "object": "best_of_n",
                    "created": 1795377839,
                    "model": "tiny-llava",
                    "best_index": 0,
                    "best": _CANDIDATE_EXAMPLE,
                    "candidates": [_CANDIDATE_EXAMPLE],
                    "reward": {"mode": "dpo", "beta": 0.1, "normalize": "mean"},
                    "usage": _USAGE_EXAMPLE,
                    "timings": _TIMINGS_EXAMPLE,
                }
            ]
        }
    )

    id: str
    object: Literal["best_of_n"] = "best_of_n"
    created: int
    model: str
    best_index: int = Field(description="argmax of the rewards; ties go to the lower index.")
    best: CandidateOut
    candidates: list[CandidateOut]
    reward: RewardInfo
    usage: Usage
    timings: Timings


# -- /v1/rewards ---------------------------------------------------------------------


class RewardsRequest(PromptFields):
    """Score given answers (e.g. written by another model) for an image+question."""

    answers: list[str] = Field(min_length=1, description="Answers to score; the end-of-turn token is appended to each.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "images": [PNG_1PX],
                    "question": "What is in the image?",
                    "answers": ["a red circle.", "a blue square and a dog."],
                }
            ]
        },
    )


class RewardsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "rwd-9a0e...",
                    "object": "rewards",
                    "created": 1795377839,
                    "model": "tiny-llava",
                    "rewards": [0.0123],
                    "best_index": 0,
                    "candidates": [_CANDIDATE_EXAMPLE | {"finish_reason": "given"}],
                    "reward": {"mode": "dpo", "beta": 0.1, "normalize": "mean"},
                    "usage": _USAGE_EXAMPLE,
                    "timings": _TIMINGS_EXAMPLE | {"generate_s": 0.0},
                    "cached": False,
                }
            ]
        }
    )

    id: str
    object: Literal["rewards"] = "rewards"
    created: int
    model: str
    rewards: list[float] = Field(description="Reward of each answer, in the order given.")
    best_index: int
    candidates: list[CandidateOut]
    reward: RewardInfo
    usage: Usage
    timings: Timings
    cached: bool = Field(False, description="True when the result came from the reward cache.")


# -- /v1/chat/completions --------------------------------------------------------------


class ChatCompletionRequest(Strict):
    """OpenAI chat completions, plus `best_of`: sample best_of answers and return the n with the highest reward."""

    model: str = Field(description="Model name from /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, description="Choices returned (the top n by reward).")
    best_of: int | None = Field(None, ge=1, description="Extension: candidates sampled (>= n); n when omitted.")
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer OpenAI name).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = Field(None, description="Streaming is not supported; must be false or omitted.")
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    reward: RewardOptions | None = Field(None, description="Extension: reward options.")

    _temperature = field_validator("temperature")(_check_temperature)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-llava",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is in the image?"},
                                {"type": "image_url", "image_url": {"url": PNG_1PX}},
                            ],
                        }
                    ],
                    "n": 2,
                    "best_of": 4,
                    "max_tokens": 16,
                }
            ]
        },
    )

    def candidates(self, settings: Settings) -> int:
        best_of = self.best_of if self.best_of is not None else self.n
        if best_of < self.n:
            raise BadRequest(f"best_of ({best_of}) must be >= n ({self.n})", param="best_of")
        if self.n > settings.max_n:
            raise BadRequest(f"n must be <= {settings.max_n}, got {self.n}", param="n")
        if best_of > settings.max_n:
            raise BadRequest(f"best_of must be <= {settings.max_n}, got {best_of}", param="best_of")
        if self.stream:
            raise BadRequest("streaming is not supported", param="stream")
        return best_of

    def to_params(self, settings: Settings) -> SamplingParams:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise BadRequest("max_tokens and max_completion_tokens disagree", param="max_completion_tokens")
        options = SamplingOptions(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            seed=self.seed,
        )
        return options.to_params(
            settings, param="max_tokens" if self.max_tokens is not None else "max_completion_tokens"
        )


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    reward: float = Field(description="Extension: the RLAIF-V reward of this answer.")
    policy_logprob: float
    reference_logprob: float
    num_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice] = Field(description="The top n candidates by reward, best first.")
    usage: Usage
    best_of: int = Field(description="Candidates sampled.")
    rewards: list[float] = Field(description="Rewards of all best_of candidates in sampling order.")
    system_fingerprint: str | None = None


# -- /v1/models, health ------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlaifv"
    reward: RewardInfo
    max_positions: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


# -- /v1/jobs ----------------------------------------------------------------------------


class JobRequest(Strict):
    """A durable batch job: many best-of-n or rewards requests, run by workers from a Redis stream."""

    kind: Literal["best_of_n", "rewards"] = Field(description="Which endpoint each item is a request for.")
    items: list[dict[str, Any]] = Field(
        min_length=1, description="Request bodies, each exactly as for POST /v1/best-of-n or /v1/rewards."
    )
    metadata: dict[str, str] = Field(default_factory=dict, description="Free-form labels stored with the job.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "rewards",
                    "items": [
                        {"images": [PNG_1PX], "question": "What is in the image?", "answers": ["a dot.", "a cat."]}
                    ],
                    "metadata": {"run": "eval-7"},
                }
            ]
        },
    )


JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    kind: Literal["best_of_n", "rewards"]
    status: JobStatusName = Field(description="succeeded when every item has a result (some items may have failed).")
    created: int
    updated: int
    total: int = Field(description="Items in the job.")
    completed: int = Field(description="Items answered successfully.")
    failed: int = Field(description="Items answered with an error.")
    metadata: dict[str, str] = Field(default_factory=dict)


class JobItemResult(BaseModel):
    index: int
    status: Literal["succeeded", "failed"]
    result: Annotated[BestOfNResponse | RewardsResponse, Field(discriminator="object")] | None = Field(
        None, description="The endpoint's response body, by the job's kind."
    )
    error: ErrorDetail | None = Field(None, description="The error envelope's `error` object when the item failed.")


class JobResults(BaseModel):
    id: str
    object: Literal["list"] = "list"
    status: JobStatusName
    data: list[JobItemResult] = Field(description="Results so far, by item index.")
