"""Claim splitting and question writing by an instruction-following LLM (RLAIF-V uses fine-tuned Llama-3-8B).

Both classes implement the protocols of `reward.claims` (`ClaimSplitter`,
`QuestionWriter`), so they drop into `verify_answers` in place of the spaCy
rules. The text generator behind them is pluggable:

- `LocalChatBackend(model_folder)`: any causal LM with a chat template we can
  load from a local folder (greedy decoding);
- `OpenAIChatBackend(base_url, model)`: any OpenAI-compatible server (vLLM,
  llama.cpp, ...) through the evaluation's retrying client
  (`trainer.evaluation.llm.ChatClient`: deadline per attempt, backoff, bounded
  concurrency).

Replies are read strictly: the splitter asks for a JSON array of claims and
takes that array only, the writer one line ending in "?". An empty, null,
refused, cut-off or unparseable reply is retried (URL) and then raises
`LLMReplyError`, naming the answer or claim: read as claims it would score the
answer as if it had none (a perfect score), or count chat filler as claims.
Each distinct answer and claim is sent once per run (memoised), and the
questions of an answer's new claims go out together. A stop asked for while
calls are in flight or waiting to be retried (SIGTERM in a feedback run)
cancels them at once: `TrainingInterrupted`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from rlaifv.reward.claims import YES_NO_SUFFIX
from rlaifv.trainer.credentials import shown_url
from rlaifv.trainer.errors import ConfigError, LLMReplyError, TrainingInterrupted
from rlaifv.trainer.evaluation.llm import ChatClient, ChatResult, ChatSettings, Sleep, chat_url
from rlaifv.trainer.feedback_config import API_KEY_VARIABLE, check_api_key, check_llm_url
from rlaifv.trainer.interrupt import StopFlag, active_stop

if TYPE_CHECKING:
    from rlaifv.trainer.feedback_config import FeedbackConfig

SPLIT_INSTRUCTION = (
    "Split the answer below into short, self-contained factual claims about the image. Resolve pronouns, keep"
    " negations, leave out opinions and filler. Reply with a JSON array of strings, one claim each, and nothing"
    ' else, e.g. ["There is a red car.", "The car is next to a tree."]; reply [] if the answer states nothing'
    " about the image.\n\nAnswer: {answer}"
)
QUESTION_INSTRUCTION = (
    "Rewrite the claim below as a general yes/no question whose answer is 'yes' exactly when the claim is true."
    " Keep negations. Reply with the question alone, on one line.\n\nClaim: {claim}"
)
CACHE_SIZE = 65536
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
_FENCED = re.compile(r"```(?:json)?\s*(\[.*?\])\s*```", re.DOTALL | re.IGNORECASE)
_REFUSAL = re.compile(
    r"^\W*(?:(?:I\s*(?:'|’)?\s*m|I am)\s+(?:sorry|unable|not able)|sorry\b|I\s+(?:can\s*(?:'|’)?\s*t|cannot|"
    r"won\s*(?:'|’)?\s*t|will not)\b|as an AI\b|unfortunately\b)",
    re.IGNORECASE,
)
_QUESTION_LABEL = re.compile(r"^(?:question|q)\s*:\s*", re.IGNORECASE)
T = TypeVar("T")


class ChatBackend(Protocol):
    where: str
    """The URL or folder, for error messages."""

    def ask(self, prompts: Sequence[str], accept: Callable[[str], bool]) -> list[ChatResult]:
        """One outcome per prompt (one user message each), in order: ok with the first reply `accept` takes, or
        ok=False with every reply and error seen."""
        ...


class _Unusable(ValueError):
    """A reply not in the asked format; the message says how."""


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, in a worker thread when this thread already runs a loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class OpenAIChatBackend:
    """An OpenAI-compatible chat completions endpoint (temperature 0), with retries, deadlines and concurrency."""

    def __init__(
        self,
        base_url: str,
        model: str = "default",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_tokens: int = 1024,
        retries: int = 3,
        concurrency: int = 8,
        backoff_s: float = 1.0,
        sleep: Sleep = asyncio.sleep,
    ):
        check_llm_url(base_url)
        if not model or model != model.strip():
            raise ConfigError(f"llm_name {model!r} must name the server's model")
        key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE)
        check_api_key(key, API_KEY_VARIABLE if api_key is None else "api_key", url=base_url)
        self.settings = ChatSettings(
            url=base_url,
            model=model,
            api_key=key or None,
            timeout_s=timeout,
            retries=retries,
            backoff_s=backoff_s,
            concurrency=concurrency,
            max_tokens=max_tokens,
            refuse_cut_off=True,
        )
        self.where = shown_url(chat_url(base_url))  # messages show no user, password or query
        self._sleep = sleep

    def ask(self, prompts: Sequence[str], accept: Callable[[str], bool]) -> list[ChatResult]:
        return _run(self._ask(list(prompts), accept))

    async def _ask(self, prompts: list[str], accept: Callable[[str], bool]) -> list[ChatResult]:
        """Every prompt's outcome; a SIGTERM (`interrupt.active_stop`, urgent) cancels the calls in flight and their
        retries' waits: SIGTERM waited for them, up to (retries + 1) x timeout and the backoffs."""
        loop, stop = asyncio.get_running_loop(), active_stop()
        async with ChatClient(self.settings, sleep=self._sleep) as chat:
            calls = asyncio.gather(*(chat.complete([{"role": "user", "content": p}], accept=accept) for p in prompts))
            if stop is None:
                results = await calls
            else:
                results = await _unless_stopped(calls, stop, loop, f"while the LLM at {self.where} was asked")
        for result in results:
            hint = None if result.ok else self._hint(result)
            if hint and result.errors:
                result.errors[-1] += f": {hint}"
        return list(results)

    def _hint(self, result: ChatResult) -> str | None:
        """Which setting a failure points at (the messages named no setting)."""
        last = result.errors[-1] if result.errors else ""
        if "cut off at max_tokens" in last:
            return "raise feedback.llm_max_tokens"
        if result.status == 404:
            return f"check feedback.llm_name ({self.settings.model!r}: a model the server serves) and feedback.llm_url"
        if result.status in (401, 403):
            return f"check the key in {API_KEY_VARIABLE}" + ("" if self.settings.api_key else " (it is not set)")
        if result.status in (400, 422) and "max_tokens" in last.lower():
            return f"check feedback.llm_max_tokens ({self.settings.max_tokens}: more than the server allows?)"
        if result.exception == "ConnectError":  # (a connect timeout is a timeout: it has its own line)
            return "check feedback.llm_url (is the server up, and reachable from here?)"
        return None


class LocalChatBackend:
    """A local causal LM with a chat template, greedy decoding (deterministic: a failed reply is not retried)."""

    def __init__(self, folder: str | Path, *, max_new_tokens: int = 1024, device: str | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from rlaifv.reward.errors import ModelLoadError
        from rlaifv.reward.models import check_model_folder, pick_device

        path = Path(folder)
        try:
            check_model_folder(path, what="LLM")
        except ModelLoadError as exc:
            raise ConfigError(f"llm_model: {exc}") from None
        self.where = str(path)
        need = "llm_model needs a text causal LM with a chat template (an instruction-tuned model)"
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"LLM folder {path}: its config cannot be read ({_one_line(exc)}); {need}") from None
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            kind = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
            raise ConfigError(f"LLM folder {path} holds a {kind} model, which is no causal LM: {need}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"LLM folder {path}: its tokenizer cannot be loaded ({_one_line(exc)})") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"LLM folder {path} has no chat template (a base model?): {need}")
        self.device = pick_device(device)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"LLM folder {path} cannot be loaded: {_one_line(exc)}") from None
        self.model = model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def generate(self, prompt: str) -> tuple[str, bool]:
        """The greedy reply to one user message, and whether it stopped at max_new_tokens."""
        import torch

        messages = [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {k: v.to(self.device) for k, v in ids.items()}
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        stop = self.model.generation_config.eos_token_id
        stops = set(stop if isinstance(stop, list) else [stop]) | {self.tokenizer.eos_token_id}
        cut_off = len(new) >= self.max_new_tokens and new[-1] not in stops
        return str(self.tokenizer.decode(new, skip_special_tokens=True)), cut_off

    def ask(self, prompts: Sequence[str], accept: Callable[[str], bool]) -> list[ChatResult]:
        results = []
        for prompt in prompts:
            text, cut_off = self.generate(prompt)
            result = ChatResult(attempts=1, replies=[text])
            if cut_off:
                result.errors.append(
                    f"reply cut off at max_new_tokens={self.max_new_tokens}: raise feedback.llm_max_tokens"
                )
            elif accept(text):
                result.ok, result.content = True, text
            else:
                result.errors.append("reply rejected as malformed")
            results.append(result)
        return results


def make_backend(
    *,
    model: str | None = None,
    url: str | None = None,
    name: str = "default",
    timeout_s: float = 60.0,
    retries: int = 3,
    max_tokens: int = 1024,
    concurrency: int = 8,
) -> ChatBackend:
    """The backend for a local model folder or an OpenAI-compatible URL (defaults: `FeedbackConfig`'s)."""
    if url is not None and model is None:
        return OpenAIChatBackend(
            url, name, timeout=timeout_s, max_tokens=max_tokens, retries=retries, concurrency=concurrency
        )
    if model is not None and url is None:
        return LocalChatBackend(model, max_new_tokens=max_tokens)
    raise ConfigError("give exactly one of an LLM model folder or an OpenAI-compatible URL")


def make_llm_rewriters(config: FeedbackConfig) -> tuple[LLMClaimSplitter | None, LLMQuestionWriter | None]:
    """The LLM splitter and writer `config` asks for (None where it asks for the rules), on one backend with its
    llm_* settings; the splitter has the writer's questions written as soon as it finds new claims."""
    if "llm" not in (config.splitter, config.question_writer):
        return None, None
    backend = make_backend(
        model=config.llm_model,
        url=config.llm_url,
        name=config.llm_name,
        timeout_s=config.llm_timeout_s,
        retries=config.llm_retries,
        max_tokens=config.llm_max_tokens,
        concurrency=config.llm_concurrency,
    )
    writer = LLMQuestionWriter(backend) if config.question_writer == "llm" else None
    splitter = LLMClaimSplitter(backend, writer=writer) if config.splitter == "llm" else None
    return splitter, writer


def parse_claims(reply: str) -> list[str]:
    """The claims in the reply's JSON array of strings (text around it is ignored); `_Unusable` without one."""
    text = reply.strip()
    if not text:
        raise _Unusable("empty reply")
    found = _json_array(text)
    if found is None:
        problem = "a refusal" if _refuses(text) else "no JSON array of claims"
        raise _Unusable(f"{problem}: {_clip(text)}")
    items, outside = found
    if not all(isinstance(item, str) for item in items):
        raise _Unusable(f"the JSON array holds items that are no text: {_clip(text)}")
    claims = [" ".join(item.split()) for item in items if item.strip()]
    if not claims and _refuses(outside):
        raise _Unusable(f"a refusal: {_clip(text)}")
    return [claim if claim.endswith((".", "!", "?")) else claim + "." for claim in claims]


def parse_question(reply: str, suffix: str = YES_NO_SUFFIX) -> str:
    """The one line of the reply that ends in "?" (a trailing `suffix` set aside); `_Unusable` otherwise."""
    lines = []
    for line in reply.splitlines():
        line = _QUESTION_LABEL.sub("", _BULLET.sub("", line).strip().strip("\"'`*“”").strip())
        if suffix and line.lower().endswith(suffix.lower()):
            line = line[: -len(suffix)].rstrip()
        if line:
            lines.append(line)
    if not lines:
        raise _Unusable("empty reply")
    if any(_REFUSAL.match(line) for line in lines):
        raise _Unusable(f"a refusal: {_clip(reply)}")
    questions = [line for line in lines if line.endswith("?")]
    if len(questions) != 1:
        problem = "no line ending in '?'" if not questions else f"{len(questions)} questions"
        raise _Unusable(f"{problem}: {_clip(reply)}")
    return questions[0]


class LLMClaimSplitter:
    """Claims = the strings of the JSON array the LLM replies with; each distinct answer is split once."""

    def __init__(
        self,
        backend: ChatBackend,
        instruction: str = SPLIT_INSTRUCTION,
        *,
        writer: LLMQuestionWriter | None = None,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.backend = backend
        self.instruction = instruction
        self.writer = writer
        self._cache = _Memo[list[str]](cache_size)

    def split(self, answer: str) -> list[str]:
        return self.split_many([answer])[0]

    def split_many(self, answers: Sequence[str]) -> list[list[str]]:
        """Claims per answer; the distinct answers not split before go to the LLM together."""
        keys = [answer.strip() for answer in answers]
        known = {key: self._cache[key] for key in dict.fromkeys(keys) if key in self._cache}
        todo = [key for key in dict.fromkeys(keys) if key and key not in known]
        if todo:
            prompts = [self.instruction.format(answer=key) for key in todo]
            new = dict(zip(todo, _ask(self.backend, prompts, parse_claims, todo, "split answer"), strict=True))
            for key, claims in new.items():
                self._cache[key] = known[key] = claims
            if self.writer is not None:
                self.writer.questions([claim for claims in new.values() for claim in claims])
        return [list(known[key]) if key else [] for key in keys]


class LLMQuestionWriter:
    """Question = the one line of the LLM's reply ending in '?', suffixed with "Please answer yes or no."; each
    distinct claim is rewritten once."""

    def __init__(
        self,
        backend: ChatBackend,
        instruction: str = QUESTION_INSTRUCTION,
        suffix: str = YES_NO_SUFFIX,
        *,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.backend = backend
        self.instruction = instruction
        self.suffix = suffix
        self._cache = _Memo[str](cache_size)

    def question(self, claim: str) -> str:
        return self.questions([claim])[0]

    def questions(self, claims: Sequence[str]) -> list[str]:
        """A question per claim; the distinct claims not rewritten before go to the LLM together."""
        keys = [claim.strip() for claim in claims]
        known = {key: self._cache[key] for key in dict.fromkeys(keys) if key in self._cache}
        todo = [key for key in dict.fromkeys(keys) if key not in known]
        if todo:
            prompts = [self.instruction.format(claim=key) for key in todo]

            def parse(reply: str) -> str:
                return parse_question(reply, self.suffix)

            for key, question in zip(todo, _ask(self.backend, prompts, parse, todo, "rewrite claim"), strict=True):
                self._cache[key] = known[key] = f"{question} {self.suffix}" if self.suffix else question
        return [known[key] for key in keys]


class _Memo(OrderedDict[str, T]):
    """A dict that forgets its least recently used entries past `size` (a run sees each answer once or twice)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __getitem__(self, key: str) -> T:
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: T) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


STOP_POLL_S = 1.0
"""How often calls in flight look at the stop flag themselves: a signal that lands on another thread runs its
handler only once the main thread runs Python again, and the event loop may wait in its selector until then."""


async def _unless_stopped(
    calls: asyncio.Future[list[ChatResult]], stop: StopFlag, loop: asyncio.AbstractEventLoop, where: str
) -> list[ChatResult]:
    """The calls' results; `TrainingInterrupted` (the calls cancelled) as soon as an urgent stop (SIGTERM) is
    asked. A Ctrl-C lets them finish: the batch is saved, and the run stops before the next one."""

    async def watch() -> None:  # also where the signal came on another thread than the loop's
        while not stop.urgent:
            await asyncio.sleep(STOP_POLL_S)
        calls.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        with stop.notify(lambda: loop.call_soon_threadsafe(calls.cancel)):
            return await calls
    except asyncio.CancelledError:
        if not stop.urgent:
            raise
        raise TrainingInterrupted(f"{where}: its calls were cancelled", step=0) from None
    finally:
        watcher.cancel()


def _ask(backend: ChatBackend, prompts: list[str], parse: Callable[[str], T], texts: list[str], what: str) -> list[T]:
    """Each prompt's parsed reply; `LLMReplyError` naming the text whose replies were all unusable."""
    reasons: dict[str, str] = {}

    def accept(reply: str) -> bool:
        try:
            parse(reply)
        except _Unusable as exc:
            reasons[reply] = str(exc)
            return False
        return True

    results = backend.ask(prompts, accept)
    for text, result in zip(texts, results, strict=True):
        if not result.ok or result.content is None:
            last = result.errors[-1] if result.errors else "no reply"
            if result.replies and last == "reply rejected as malformed":
                last = reasons.get(result.replies[-1], last)
            tries = f" after {result.attempts} attempts" if result.attempts > 1 else ""
            raise LLMReplyError(
                f"the LLM at {backend.where} could not {what} {_clip(text)}{tries}: {_one_line(last)}",
                text=text,
                replies=result.replies,
                errors=result.errors,
            )
    return [parse(result.content) for result in results if result.content is not None]


def _json_array(text: str) -> tuple[list[Any], str] | None:
    """The JSON array the text is, or holds (in a code fence, or from its first '[' to its last ']'), and the
    text around it."""
    fenced = _FENCED.search(text)
    spans = [(0, len(text))]
    if fenced:
        spans.append(fenced.span(1))
    if "[" in text and "]" in text:
        spans.append((text.index("["), text.rindex("]") + 1))
    for start, end in spans:
        try:
            value = json.loads(text[start:end])
        except ValueError:
            continue
        if isinstance(value, list):
            return value, text[:start] + text[end:]
    return None


def _refuses(text: str) -> bool:
    return any(_REFUSAL.match(line.strip()) for line in text.splitlines())


def _clip(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def _one_line(error: object, limit: int = 300) -> str:
    flat = " ".join(str(error).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
