"""Wire schemas of the HTTP API, and their conversion to the reward core's parameters.

Requests forbid unknown fields. Bounds that depend on the operator's settings
(max n, max_tokens, images per request) are checked in the `to_*` conversions,
which raise `BadRequest` naming the field.

Log-probs in responses are *raw* model log-probs: softmax of the logits at
temperature 1, without top-p/top-k, whatever the sampling settings were.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

from rlaifv.reward.prompt import BLANK_QUESTION, blank
from rlaifv.reward.results import ClaimCheck
from rlaifv.reward.sampling import SamplingParams
from rlaifv.reward.scoring import RewardConfig
from rlaifv.service.errors import BadRequest, ErrorDetail
from rlaifv.service.settings import Settings

PNG_1PX = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
MAX_SEED = 2**63 - 1


MIN_SEED = -(2**63)
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_MESSAGE_ITEMS = 4096
"""Most messages and content parts one conversation may hold together. Each costs validation and chat-template
time however short its text, and the character bound counts nothing of an empty one: one body under the size
limit held 480,000 empty messages and stalled every other request for 20 s."""


def _bounded_metadata(labels: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's bounds on metadata. A job's labels come back with every poll: 2 MB of them made each status
    answer 2 MB."""
    if labels is None:
        return None
    if len(labels) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} keys, got {len(labels)}")
    for key, value in labels.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"key {key[:20]!r}... is over {MAX_METADATA_KEY_CHARS} characters")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(f"the value of {key!r} is over {MAX_METADATA_VALUE_CHARS} characters")
    return labels


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN_ID = re.compile(r"[0-9]{1,18}")  # longer: no vocabulary has it, and int() refuses 4300 digits


def surrogate_path(value: Any) -> tuple[int | str, ...] | None:
    """Where text in `value` first holds a lone UTF-16 surrogate (JSON allows the escape; UTF-8 cannot carry it,
    so the tokenizer and every JSON response would fail on it): the list indices and keys down to it (to the
    object, for a bad key), or None. Iterative: a client's free-form field may nest thousands of levels."""
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _LONE_SURROGATE.search(item) is not None:
                return path
        elif isinstance(item, list | tuple):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            children: list[tuple[tuple[int | str, ...], Any]] = []
            for key, v in item.items():
                if isinstance(key, str) and not key.isascii() and _LONE_SURROGATE.search(key) is not None:
                    return path
                children.append(((*path, key), v))
            stack.extend(reversed(children))
    return None


class ValidText(BaseModel):
    """Every text field is valid Unicode: a lone surrogate is a 400 naming the field (down to the list item or
    key: the error's `path`), before any work."""

    _unchecked: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _no_lone_surrogates(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name in cls._unchecked:
            return value
        path = surrogate_path(value)
        if path is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "text must be valid Unicode, without lone UTF-16 surrogates (\\ud800-\\udfff)",
                {"path": list(path)},
            )
        return value


class Strict(ValidText):
    # JSON types as sent: "n": "3", true or 2.0 is a 400, not n=3 or n=1 (OpenAI refuses them; lax coercion hid a
    # client's bug). JSON's NaN/Infinity: "a finite number".
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


MIN_TEMPERATURE = 0.01


def _check_temperature(value: float | None) -> float | None:
    """Temperatures just above 0 overflow the logits (inf/NaN probabilities): one under 0.01 samples at 0.01, as
    vLLM does (OpenAI accepts 0.001: a 400 here refused what clients send for "almost greedy"); 0 means greedy."""
    if value is not None and 0 < value < MIN_TEMPERATURE:
        return MIN_TEMPERATURE
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

    temperature: float = Field(
        1.0, ge=0, le=5, description="0 means greedy (all samples identical); above 0 and under 0.01: 0.01 (as vLLM)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 disables top-k.")
    min_p: float = Field(
        0, ge=0, le=1, description="Drop tokens less likely than min_p x the likeliest one (after temperature); 0: off."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Most new tokens per answer, end-of-turn included (server limit applies)."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for reproducible samples.")

    _temperature = field_validator("temperature")(_check_temperature)

    def to_params(self, settings: Settings, param: str = "sampling.max_tokens") -> SamplingParams:
        max_tokens = self.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens:
            raise BadRequest(f"{param} must be <= {settings.max_tokens}, got {max_tokens}", param=param)
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_tokens=max_tokens,
            seed=self.seed,
        )


class ImageURL(Strict):
    url: str = Field(
        description="A data URL (data:image/png;base64,...), or an http(s) URL when the operator allows its host.",
        max_length=64 * 1024 * 1024,
    )
    detail: Literal["auto", "low", "high", "original"] | None = Field(
        None, description="Accepted for OpenAI compatibility; ignored."
    )


class _Part(Strict):
    prompt_cache_breakpoint: dict[str, Any] | None = Field(
        None, description="Accepted (a prompt-cache hint, like the request's prompt_cache_*); ignored."
    )


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class RefusalPart(_Part):
    """An assistant turn's refusal as a content part (OpenAI's assistant messages may hold them): its text."""

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | RefusalPart, Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="'developer' (OpenAI's newer name for system instructions) is read as 'system'; 'tool' and"
        " 'function' (tool results) are refused: no tool calling."
    )
    content: str | list[ContentPart] | None = Field(
        None,
        description="Text, or OpenAI content parts (text, image_url in user messages, refusal in assistant ones)."
        " Null only in an assistant message with a `refusal` (its text is the turn) or with `tool_calls`"
        " (refused).",
    )
    name: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    # The fields of an OpenAI reply's `message`: the official client's multi-turn pattern appends that object to
    # the next request's messages as it came, these fields included (null when they ask for nothing).
    refusal: str | None = Field(
        None,
        description="Accepted, so that a reply's message can be sent back: the turn's text where `content` is null,"
        " else ignored.",
    )
    annotations: list[Any] | None = Field(None, description="Accepted, as `refusal`; ignored.")
    tool_calls: list[Any] | None = Field(None, description="Refused unless null or empty: no tool calling.")
    function_call: Any = Field(None, description="Refused unless null: no function calling.")
    audio: Any = Field(None, description="Refused unless null: the model produces text only.")
    tool_call_id: str | None = Field(None, description="Of a 'tool' message, which is refused.")


def _bounded_conversation(messages: Any) -> Any:
    """`messages` (as sent) when it holds at most MAX_MESSAGE_ITEMS messages and content parts; checked before
    each message is validated, which is where the time went."""
    if isinstance(messages, list):
        items = len(messages) + sum(
            len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
        )
        if items > MAX_MESSAGE_ITEMS:
            raise ValueError(
                f"the conversation holds {items} messages and content parts together, over the limit of"
                f" {MAX_MESSAGE_ITEMS}"
            )
    return messages


Conversation = Annotated[list[ChatMessage], BeforeValidator(_bounded_conversation)]


MESSAGE_UNSUPPORTED = {"tool_calls": "tools", "function_call": "function_call", "audio": "audio"}
"""Message fields refused when they ask for something, each with the reason of the request field in UNSUPPORTED."""


def convert_messages(
    messages: list[ChatMessage], max_chars: int, param: str = "messages"
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages -> HF chat messages with {"type": "image"} parts, plus [(image ref, field path)] in order.

    Any role may come last: as OpenAI and vLLM do, the answer is a new assistant turn after the conversation (a
    chat template whose rules refuse the order is a 400 naming `messages`).

    `max_chars` bounds the text of all messages together, as `max_question_chars` bounds a question: checked
    before the tokenizer sees it, which would otherwise hold the model thread for seconds."""
    if not messages:
        raise BadRequest("messages must not be empty", param=param)
    out: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if message.role in ("tool", "function"):  # a replayed tool-calling conversation: say why, not "bad role"
            raise BadRequest(
                f"'{message.role}' messages are not supported: {UNSUPPORTED['tools']}",
                param=f"{param}[{i}].role",
                code="unsupported_value",
            )
        for name, reason in MESSAGE_UNSUPPORTED.items():
            if getattr(message, name) not in (None, []):
                raise BadRequest(
                    f"'{name}' is not supported: {UNSUPPORTED[reason]}",
                    param=f"{param}[{i}].{name}",
                    code="unsupported_parameter",
                )
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None:
            if message.role != "assistant" or not message.refusal:
                needs = " (an assistant message may have a refusal instead)" if message.role == "assistant" else ""
                raise BadRequest(
                    f"{'an' if message.role == 'assistant' else 'a'} {message.role} message needs content{needs}",
                    param=f"{param}[{i}].content",
                    code="missing_field",
                )
            content = message.refusal  # what the assistant said, as OpenAI's reply object holds it
        if isinstance(content, str):
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, RefusalPart):
                if message.role != "assistant":
                    raise BadRequest(
                        "only assistant messages may carry refusal parts", param=f"{param}[{i}].content[{j}]"
                    )
                parts.append({"type": "text", "text": part.refusal})  # what the assistant said, as with `refusal`
            else:
                if message.role != "user":
                    raise BadRequest("only user messages may carry images", param=f"{param}[{i}].content[{j}]")
                parts.append({"type": "image"})
                images.append((part.image_url.url, f"{param}[{i}].content[{j}].image_url.url"))
        out.append({"role": role, "content": parts})
    chars = sum(len(part["text"]) for m in out for part in m["content"] if part.get("type") == "text")
    if chars > max_chars:  # first: `blank` reads every character
        raise BadRequest(f"messages hold {chars} characters of text, over the limit of {max_chars}", param=param)
    # An image alone is a prompt (OpenAI and vLLM take it: the chat template places it); nothing at all is not.
    if not images and not any(
        part.get("type") == "text" and not blank(part["text"]) for m in out for part in m["content"]
    ):
        raise BadRequest("messages contain neither text nor an image", param=param)
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


class GeneratorInfo(BaseModel):
    """Which model wrote the candidates when they came from a generator (RLAIFV_GENERATOR_URL)."""

    model: str = Field(description="The generator's model name.")
    url: str = Field(description="The generator's host[:port] (no path, no credentials).")


_GENERATOR_FIELD = (
    "Extension: the model that wrote the candidates when a generator is configured (RLAIFV_GENERATOR_URL); "
    "null when the served pair sampled them itself."
)
_SCORER_FIELD = "Extension: the model pair (bundle) whose log-probs gave the rewards."


# -- /v1/best-of-n -----------------------------------------------------------------


class PromptFields(Strict):
    model: str | None = Field(None, description="Model name from /v1/models; the served model when omitted.")
    images: list[Annotated[str, Field(max_length=64 * 1024 * 1024)]] = Field(
        default_factory=list,
        description="Images as data URLs or bare base64 (or http(s) URLs from allowed hosts). Used with `question`.",
    )
    question: str | None = Field(None, description="The question about the images. Give this or `messages`.")
    messages: Conversation | None = Field(
        None, description="A conversation in the OpenAI format, images as image_url parts. Give this or `question`."
    )
    continue_final_message: bool = Field(
        False,
        description="With `messages` ending in an assistant turn (a prefill): the answers continue it instead of "
        "starting a new turn, as vLLM's chat API does with the same field.",
    )
    reward: RewardOptions = Field(default_factory=RewardOptions)

    def prompt(self, settings: Settings) -> tuple[str | None, list[dict[str, Any]] | None, list[tuple[str, str]]]:
        """(question, HF messages, [(image ref, field path)]) with the operator's limits applied."""
        if (self.question is None) == (self.messages is None):
            raise BadRequest("give exactly one of `question` or `messages`", param="question")
        if self.messages is not None and self.images:
            raise BadRequest("with `messages`, pass images as image_url parts, not in `images`", param="images")
        if self.continue_final_message and self.messages is None:
            raise BadRequest(
                "continue_final_message needs `messages` ending with an assistant turn", param="continue_final_message"
            )
        if self.messages is not None:
            messages, images = convert_messages(self.messages, settings.max_question_chars)
            question = None
        else:
            question, messages = self.question, None
            if question is not None and len(question) > settings.max_question_chars:  # first: `blank` reads it all
                raise BadRequest(f"question is over {settings.max_question_chars} characters", param="question")
            if question is None or blank(question):
                raise BadRequest(BLANK_QUESTION, param="question")
            images = [(ref, f"images[{i}]") for i, ref in enumerate(self.images)]
        if len(images) > settings.max_images:
            where = "messages" if self.messages is not None else "images"
            raise BadRequest(f"at most {settings.max_images} images per request, got {len(images)}", param=where)
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


_CANDIDATE_EXAMPLE: JsonDict = {
    "index": 0,
    "text": "a red circle.",
    "reward": 0.0123,
    "policy_logprob": -4.21,
    "reference_logprob": -4.83,
    "num_tokens": 5,
    "finish_reason": "stop",
}
_USAGE_EXAMPLE: JsonDict = {"prompt_tokens": 26, "completion_tokens": 5, "total_tokens": 31}
_TIMINGS_EXAMPLE: JsonDict = {"queue_s": 0.004, "generate_s": 0.05, "score_s": 0.01, "total_s": 0.07}


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
    generator: GeneratorInfo | None = Field(None, description=_GENERATOR_FIELD)
    scorer: str | None = Field(None, description=_SCORER_FIELD)


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


MAX_STOP = 4
MAX_TOP_LOGPROBS = 20

UNSUPPORTED: dict[str, str] = {
    "tool_choice": "this server has no tool calling (only 'none' is accepted)",
    "tools": "this server generates plain text; it has no tool calling (tools are accepted with tool_choice"
    " 'none' only)",
    "parallel_tool_calls": "this server has no tool calling",
    "functions": "this server has no function calling",
    "function_call": "this server has no function calling",
    "audio": "the served model produces text only",
    "prediction": "predicted outputs would bias best-of-N sampling; not supported",
    "web_search_options": "this server has no web search",
    "reasoning_effort": "the served model is not a reasoning model",
    "verbosity": "the served model has no verbosity control",
    "moderation": "this server runs no moderation model",
}
"""Fields of OpenAI's chat API this server refuses, with the reason given in the 400."""


class StreamOptions(Strict):
    include_usage: bool | None = Field(None, description="Send a last chunk with `usage` (and empty `choices`).")
    include_obfuscation: bool | None = Field(None, description="Accepted; no obfuscation field is sent.")


class ResponseFormat(ValidText):
    """Only {"type": "text"} can be honoured: sampling is not constrained to a grammar."""

    model_config = ConfigDict(extra="allow")

    type: str


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="OpenAI's rule: letters, digits, _ and -.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema object.")
    strict: bool | None = None


class FunctionTool(Strict):
    """A tool the client offers: accepted with tool_choice 'none' only, where the model must not call it."""

    type: Literal["function"]
    function: FunctionDefinition


class TextFormat(Strict):
    type: Literal["text"]


class Grammar(Strict):
    definition: str
    syntax: Literal["lark", "regex"]


class GrammarFormat(Strict):
    type: Literal["grammar"]
    grammar: Grammar


class CustomToolDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    format: Annotated[TextFormat | GrammarFormat, Field(discriminator="type")] | None = Field(
        None, description="Free text or a grammar (OpenAI's); never used here."
    )


class CustomTool(Strict):
    type: Literal["custom"]
    custom: CustomToolDefinition


Tool = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class ChatCompletionRequest(Strict):
    """OpenAI chat completions, plus `best_of`: sample best_of answers and return the n with the highest reward."""

    model: str = Field(description="Model name from /v1/models.")
    messages: Conversation = Field(min_length=1)
    n: int = Field(1, ge=1, description="Choices returned (the top n by reward); null means 1, as in OpenAI's API.")
    best_of: int | None = Field(None, ge=1, description="Extension: candidates sampled (>= n); n when omitted.")

    @field_validator("n", mode="before")
    @classmethod
    def _null_n(cls, value: Any) -> Any:
        return 1 if value is None else value

    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(
        None, ge=0, le=1, description="Nucleus sampling mass; 0 keeps only the likeliest token (as top_k=1)."
    )
    top_k: int | None = Field(
        None, ge=-1, le=1_000_000, description="Extension (vLLM's): sample among the k likeliest tokens; 0 or -1: off."
    )
    min_p: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Extension (vLLM's): drop tokens less likely than min_p x the likeliest one; 0: off.",
    )
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer OpenAI name).")
    seed: int | None = Field(
        None,
        ge=MIN_SEED,
        le=MAX_SEED,
        description="Any 64-bit integer, as OpenAI's; a negative seed is taken modulo 2^63 (so -1 samples as "
        "2^63 - 1).",
    )
    stop: str | list[str] | None = Field(
        None,
        description=f"Up to {MAX_STOP} stop strings: an answer's text is cut before the first one (finish_reason "
        "'stop'), and the reward scores the cut text as a finished turn (re-tokenized, end-of-turn appended).",
    )
    logprobs: bool | None = Field(
        None, description="Return each choice's raw policy log-probs per token (temperature 1: the reward's terms)."
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Most likely alternatives per token (needs logprobs=true)."
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Sampling only: never changes the log-probs the reward uses."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Sampling only: never changes the log-probs the reward uses."
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (a decimal string) -> bias in [-100, 100] added to its logit; sampling only."
    )
    stream: bool | None = Field(
        None,
        description="Server-sent chat.completion.chunk events, sent once best-of-N has ranked complete answers.",
    )
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true.")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'}.")
    modalities: list[str] | None = Field(None, description="Only ['text'].")
    metadata: dict[str, str] | None = Field(
        None,
        description=f"Accepted for OpenAI compatibility (at most {MAX_METADATA_KEYS} keys of up to "
        f"{MAX_METADATA_KEY_CHARS} characters, values of up to {MAX_METADATA_VALUE_CHARS}); ignored.",
    )
    store: bool | None = Field(None, description="Accepted; nothing is stored.")
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    safety_identifier: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = Field(
        None, description="Accepted (OpenAI's tiers); one tier here: the response says 'default'."
    )
    prompt_cache_key: str | None = Field(None, description="Accepted; ignored (no cross-request prompt cache).")
    prompt_cache_retention: str | None = Field(None, description="Accepted; ignored.")
    prompt_cache_options: dict[str, Any] | None = Field(None, description="Accepted; ignored.")
    tools: list[Tool] | None = Field(
        None,
        max_length=128,
        description="Accepted only with tool_choice 'none' (no tool calling); not shown to the model, as vLLM's"
        " --exclude-tools-when-tool-choice-none.",
    )
    tool_choice: Any = Field(None, description="Refused unless 'none'.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted with tools and tool_choice 'none'; no effect.")
    functions: Any = Field(None, description="Refused: no function calling.")
    function_call: Any = Field(None, description="Refused: no function calling.")
    audio: Any = Field(None, description="Refused: text only.")
    prediction: Any = Field(None, description="Refused.")
    web_search_options: Any = Field(None, description="Refused: no web search.")
    reasoning_effort: Any = Field(None, description="Refused: not a reasoning model.")
    verbosity: Any = Field(None, description="Refused.")
    moderation: Any = Field(None, description="Refused: no moderation model.")
    reward: RewardOptions | None = Field(None, description="Extension: reward options.")
    continue_final_message: bool = Field(
        False,
        description="Extension (vLLM's): the answers continue the last message, an assistant turn (a prefill), "
        "instead of starting a new one; each choice holds the continuation. Needs add_generation_prompt=false.",
    )
    add_generation_prompt: bool | None = Field(
        None,
        description="Extension (vLLM's): open a new assistant turn after the messages (the default); false only "
        "with continue_final_message.",
    )

    _temperature = field_validator("temperature")(_check_temperature)
    _metadata = field_validator("metadata")(_bounded_metadata)

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

    def check_supported(self) -> None:
        """Refuse, naming the field and why, what a best-of-N text server cannot honour."""
        for name, reason in UNSUPPORTED.items():
            value = getattr(self, name)
            if value is None or (name == "tools" and value == []) or (name == "tool_choice" and value == "none"):
                continue
            if name in ("tools", "parallel_tool_calls") and self.tool_choice == "none" and self.tools:
                continue
            raise BadRequest(f"'{name}' is not supported: {reason}", param=name, code="unsupported_parameter")
        if self.response_format is not None and self.response_format.type != "text":
            raise BadRequest(
                f"response_format '{self.response_format.type}' is not supported: sampling is not constrained to "
                "JSON, so only {'type': 'text'} can be honoured",
                param="response_format.type",
                code="unsupported_value",
            )
        if self.modalities is not None and self.modalities != ["text"]:
            raise BadRequest("only the 'text' modality is supported", param="modalities", code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed with stream=true", param="stream_options")
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:  # vLLM refuses the two alike
            raise BadRequest(
                "continue_final_message and add_generation_prompt cannot both be true", param="add_generation_prompt"
            )
        if self.add_generation_prompt is False and not self.continue_final_message:
            raise BadRequest(
                "add_generation_prompt=false is supported only with continue_final_message=true: the answer must be"
                " an assistant turn, new or continued",
                param="add_generation_prompt",
                code="unsupported_value",
            )

    def candidates(self, settings: Settings) -> int:
        best_of = self.best_of if self.best_of is not None else self.n
        if best_of < self.n:
            raise BadRequest(f"best_of ({best_of}) must be >= n ({self.n})", param="best_of")
        if self.n > settings.max_n:
            raise BadRequest(f"n must be <= {settings.max_n}, got {self.n}", param="n")
        if best_of > settings.max_n:
            raise BadRequest(f"best_of must be <= {settings.max_n}, got {best_of}", param="best_of")
        return best_of

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise BadRequest(f"at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
        for i, stop in enumerate(stops):
            if not stop:
                raise BadRequest(
                    "stop strings must not be empty", param="stop" if isinstance(self.stop, str) else f"stop[{i}]"
                )
        return tuple(stops)

    def token_bias(self) -> dict[int, float]:
        """logit_bias with integer keys; whether the ids are in the vocabulary is the engine's check."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not _TOKEN_ID.fullmatch(key.strip()):
                raise BadRequest(f"logit_bias keys must be token ids, got '{key}'", param="logit_bias")
            if not -100 <= value <= 100:
                raise BadRequest(f"logit_bias values must be in [-100, 100], got {value}", param=f"logit_bias.{key}")
            bias[int(key)] = value
        return bias

    def top_logprobs_asked(self) -> int | None:
        """None: no log-probs; else the number of alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_tokens_param(self) -> str | None:
        """The field that set the answer length; None: the server's default (which may shrink to fit)."""
        if self.max_tokens is not None:
            return "max_tokens"
        return "max_completion_tokens" if self.max_completion_tokens is not None else None

    def to_params(self, settings: Settings) -> SamplingParams:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise BadRequest("max_tokens and max_completion_tokens disagree", param="max_completion_tokens")
        options = SamplingOptions(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if not self.top_p else self.top_p,
            top_k=1 if self.top_p == 0 else max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            seed=None if self.seed is None else self.seed % (MAX_SEED + 1),
        )
        params = options.to_params(
            settings, param="max_tokens" if self.max_tokens is not None else "max_completion_tokens"
        )
        return params.model_copy(
            update={
                "stop": self.stop_strings(),
                "presence_penalty": self.presence_penalty or 0.0,
                "frequency_penalty": self.frequency_penalty or 0.0,
                "logit_bias": self.token_bias(),
            }
        )


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="UTF-8 bytes of `token`.")


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = Field(
        description="Answer tokens (end-of-turn excluded) with their raw policy log-probs: the terms of the reward's"
        " policy sum (`policy_logprob` adds the end-of-turn token's when the answer finished with one)."
    )
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None
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
    service_tier: str | None = Field(None, description="'default' when the request named a tier.")
    generator: GeneratorInfo | None = Field(None, description=_GENERATOR_FIELD)
    scorer: str | None = Field(None, description=_SCORER_FIELD)


def _is_none(value: Any) -> bool:
    return value is None


class ChunkDelta(BaseModel):
    """Only the keys a chunk carries, as OpenAI and vLLM send them (the last delta is `{}`): clients that read
    `delta.get("content", "")` would otherwise get None."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class RoleDelta(BaseModel):
    """A choice's first delta, as OpenAI sends it: the role, empty content and a null refusal."""

    role: Literal["assistant"]  # required: a chunk read back is a `RoleDelta` only when it is one
    content: str = ""
    refusal: None = None


class ChunkChoice(BaseModel):
    index: int
    delta: RoleDelta | ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None
    reward: float | None = Field(
        None, exclude_if=_is_none, description="Extension, on the choice's last chunk only: its reward."
    )


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (OpenAI's `chat.completion.chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None


# -- /v1/models, health ------------------------------------------------------------------


class ImageLimitsInfo(BaseModel):
    """The image limits of this server's requests, so that a client (the playground) refuses what would be a 400."""

    formats: list[str] = Field(description="Image formats taken, by PIL name (RLAIFV_ALLOWED_IMAGE_FORMATS).")
    max_bytes: int = Field(description="Largest encoded image, in bytes (RLAIFV_MAX_IMAGE_BYTES).")
    max_pixels: int = Field(description="Largest width x height (RLAIFV_MAX_IMAGE_PIXELS).")
    max_aspect: float = Field(description="Largest long side / short side ratio (RLAIFV_MAX_IMAGE_ASPECT).")


Modality = Literal["text", "image"]


def _text_and_images() -> list[Modality]:
    return ["text", "image"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlaifv"
    reward: RewardInfo
    max_positions: int | None = None
    input_modalities: list[Modality] = Field(
        default_factory=_text_and_images,
        description='What a prompt may hold: ["text", "image"], or ["text"] for a text-only model, whose requests '
        "take no images (400 naming `images`). Images are optional either way, except for the `claims` reward, "
        "which needs one (a text-only model cannot use it).",
    )
    image_limits: ImageLimitsInfo | None = Field(
        None, description="What an image may be, for a model that reads images (null for a text-only model)."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


# -- /v1/jobs ----------------------------------------------------------------------------


class JobItem(Strict):
    """An item with the client's own id, echoed in its result (`custom_id`), e.g. a row key of the dataset."""

    custom_id: str = Field(min_length=1, max_length=256, description="The client's id of the item (unique in the job).")
    body: dict[str, Any] = Field(description="The request body, exactly as for POST /v1/best-of-n or /v1/rewards.")


class JobRequest(Strict):
    """A durable batch job: many best-of-n or rewards requests, run by workers from a Redis stream."""

    kind: Literal["best_of_n", "rewards"] = Field(description="Which endpoint each item is a request for.")
    items: list[dict[str, Any]] = Field(
        min_length=1,
        description="Request bodies, each exactly as for POST /v1/best-of-n or /v1/rewards, or "
        '`{"custom_id": "...", "body": {...}}` to carry the client\'s id into the result.',
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description=f"Labels stored with the job and returned with it (as OpenAI's: at most {MAX_METADATA_KEYS} keys"
        f" of up to {MAX_METADATA_KEY_CHARS} characters, values of up to {MAX_METADATA_VALUE_CHARS}).",
    )

    _unchecked = frozenset({"items"})

    _metadata = field_validator("metadata")(_bounded_metadata)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "rewards",
                    "items": [
                        {"images": [PNG_1PX], "question": "What is in the image?", "answers": ["a dot.", "a cat."]},
                        {
                            "custom_id": "row-2",
                            "body": {"images": [PNG_1PX], "question": "What colour?", "answers": ["black."]},
                        },
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
    """One line of `GET /v1/jobs/{id}/results?format=jsonl` (and one element of `data` in the JSON form)."""

    index: int = Field(
        description="Position of the item in the submission (0-based; in an upload, the i-th non-blank line)."
    )
    custom_id: str | None = Field(None, description="The item's `custom_id`, when it had one.")
    status: Literal["succeeded", "failed"]
    result: Annotated[BestOfNResponse | RewardsResponse, Field(discriminator="object")] | None = Field(
        None, description="The endpoint's response body, by the job's kind."
    )
    error: ErrorDetail | None = Field(None, description="The error envelope's `error` object when the item failed.")


class JobResults(BaseModel):
    id: str
    object: Literal["list"] = "list"
    status: JobStatusName
    data: list[JobItemResult] = Field(description="Results so far, by item index (items without one are left out).")


class JobList(BaseModel):
    """`GET /v1/jobs`: a page of the caller's jobs, newest first (OpenAI's `GET /v1/batches` page)."""

    object: Literal["list"] = "list"
    data: list[Job] = Field(description="The jobs of this page, newest first.")
    first_id: str | None = Field(None, description="The id of the first job of `data` (None when it is empty).")
    last_id: str | None = Field(
        None, description="The id of the last job of `data`: pass it as `after` for the next page."
    )
    has_more: bool = Field(description="Whether older jobs follow this page.")
