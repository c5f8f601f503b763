"""The generator: best-of-N candidates from any OpenAI-compatible chat endpoint (a vLLM server of another model, a
provider), for the reward pair to score.

The RLAIF-V reward also ranks other models' answers (the model card's best-of-N over other MLLMs). With
RLAIFV_GENERATOR_URL set, `Serving` asks this client for the N answers instead of sampling them with the policy,
then scores them as /v1/rewards does; the generator's own log-probs are never used, the reward needs the pair's.

Failures become typed errors here and are mapped to HTTP once (service/errors.py): unreachable, timed out or
overloaded -> 503 `generator_unavailable`; a 5xx, our key refused or a malformed body -> 502; a 4xx about the
request -> 400 `generator_rejected` with the generator's message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel, ValidationError

from rlaifv.reward.prompt import user_message
from rlaifv.service.errors import BadGateway, BadRequest, GeneratorUnavailable, ServiceError
from rlaifv.service.urls import without_credentials

if TYPE_CHECKING:
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.metrics import Metrics
    from rlaifv.service.settings import Settings

log = logging.getLogger("rlaifv.service")

MAX_SEED = 2**63
PROBE_TIMEOUT_S = 2.0


class GeneratorStartupError(RuntimeError):
    """The configured generator cannot be used: start-up stops here, not at the first request."""


@dataclass(frozen=True)
class Generated:
    """One answer as the generator wrote it."""

    text: str
    finish_reason: Literal["stop", "length"]


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    index: int = 0
    message: _Message
    finish_reason: str | None = None


class _Completion(BaseModel):
    choices: list[_Choice]


class _ModelEntry(BaseModel):
    id: str


class _ModelList(BaseModel):
    data: list[_ModelEntry]


class _Refused(Exception):
    """A 4xx about the request; `Generator.generate` decides whether it was about n."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def image_data_url(data: bytes) -> str:
    """An encoded image as a data URL, its MIME type from PIL's reading of the header (no pixel is decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        mime = Image.MIME.get(image.format or "", "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def openai_messages(
    question: str | None, messages: list[dict[str, Any]] | None, images: list[bytes]
) -> list[dict[str, Any]]:
    """The prompt the pair scores against, as OpenAI chat messages, each image a data URL in its place.

    Images are re-sent from the bytes the server read, so a generator sees exactly what the scorer saw,
    whichever way they came (data URL, bare base64, an allowed remote host the generator may not reach).
    """
    turns = messages if messages is not None else user_message(question or "", len(images))
    urls = iter([image_data_url(data) for data in images])
    out: list[dict[str, Any]] = []
    for turn in turns:
        parts: list[dict[str, Any]] = []
        for part in turn["content"]:
            if part.get("type") == "image":
                parts.append({"type": "image_url", "image_url": {"url": next(urls)}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": turn["role"], "content": parts})
    return out


def _error_message(response: httpx.Response) -> str:
    """The message of an error body in the shapes OpenAI, vLLM and FastAPI use; else the start of the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])
    return str(body)[:300]


class Generator:
    """An OpenAI-compatible chat endpoint that writes best-of-N candidates. Owns its HTTP client (`aclose`)."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        if settings.generator_url is None:
            raise ValueError("no generator_url configured")
        self.url = settings.generator_url
        self.host, self.display_url = without_credentials(self.url)
        self.model = settings.generator_model or ""
        self.max_n = settings.generator_max_n
        self.timeout_s = settings.generator_timeout_s
        self.retry_after_s = settings.retry_after_s
        self.metrics = metrics
        headers = {}
        if settings.generator_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.generator_api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(headers=headers, timeout=self.timeout_s, transport=transport)
        self._one_per_request = False

    async def aclose(self) -> None:
        await self._client.aclose()

    async def start(self) -> None:
        """Check that the generator answers and lists the model (resolving it when unset), so that a wrong URL,
        key or model name stops start-up with a message instead of failing every request later."""
        try:
            models = await self.list_models(observe=False)
        except (ServiceError, _Refused) as exc:
            raise GeneratorStartupError(f"generator {self.display_url} is not usable: {exc}") from None
        if not self.model:
            if len(models) != 1:
                raise GeneratorStartupError(
                    f"generator {self.display_url} serves {len(models)} models ({', '.join(models) or 'none'}); "
                    "set RLAIFV_GENERATOR_MODEL to one of them"
                )
            self.model = models[0]
        elif self.model not in models:
            raise GeneratorStartupError(
                f"generator {self.display_url} does not serve model '{self.model}' "
                f"(its /models lists: {', '.join(models) or 'none'})"
            )

    async def list_models(self, *, observe: bool = True) -> list[str]:
        response = await self._send("GET", "/models", observe=observe)
        try:
            return [entry.id for entry in _ModelList.model_validate_json(response.content).data]
        except ValidationError:
            error = BadGateway(f"generator {self.host}: /models is not a model list")
            raise self._fail("bad_response", error, observe) from None

    async def probe(self) -> str:
        """Readiness detail: 'ok', or why the generator is not usable now (not counted in the metrics)."""
        try:
            models = await asyncio.wait_for(self.list_models(observe=False), min(self.timeout_s, PROBE_TIMEOUT_S))
        except TimeoutError:
            return f"unavailable: no answer within {min(self.timeout_s, PROBE_TIMEOUT_S):g} s"
        except (ServiceError, _Refused) as exc:
            return f"unavailable: {exc}"
        return "ok" if self.model in models else f"model '{self.model}' no longer listed"

    async def generate(
        self, messages: list[dict[str, Any]], n: int, params: SamplingParams, continue_final: bool = False
    ) -> list[Generated]:
        """`n` answers to `messages`, in the generator's order; `continue_final`: answers that continue the last
        (assistant) message, asked with vLLM's `continue_final_message` (a generator without it says so in a 400).

        One request with `n` (split by RLAIFV_GENERATOR_MAX_N). A generator that answers 400 to n > 1 while
        n = 1 works gets one request per answer, concurrently, from then on; with a seed, the i-th gets seed + i
        so that the answers differ.
        """
        size = 1 if self._one_per_request else min(n, self.max_n or n)
        try:
            return await self._gather(messages, n, size, params, continue_final)
        except _Refused as exc:
            if size == 1 or exc.status != 400:
                raise self._rejected(exc) from None
        try:
            answers = await self._gather(messages, n, 1, params, continue_final)
        except _Refused as exc:
            raise self._rejected(exc) from None
        self._one_per_request = True
        log.warning("the generator refuses n > 1: one request per candidate from now on", extra={"host": self.host})
        return answers

    def _rejected(self, exc: _Refused) -> BadRequest:
        return BadRequest(f"generator {self.host} refused the request: {exc.message}", code="generator_rejected")

    async def _gather(
        self, messages: list[dict[str, Any]], n: int, size: int, params: SamplingParams, continue_final: bool
    ) -> list[Generated]:
        calls = [
            self._complete(messages, min(size, n - offset), offset, params, continue_final)
            for offset in range(0, n, size)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        answers: list[Generated] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            answers += result
        return answers

    async def _complete(
        self,
        messages: list[dict[str, Any]],
        count: int,
        offset: int,
        params: SamplingParams,
        continue_final: bool = False,
    ) -> list[Generated]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "n": count,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.seed is not None:
            body["seed"] = (params.seed + offset) % MAX_SEED
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM's extension; a generator without it says so in a 400
        if params.min_p:
            body["min_p"] = params.min_p  # vLLM's extension, as top_k
        if continue_final:
            body |= {"continue_final_message": True, "add_generation_prompt": False}  # vLLM's extension
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
        response = await self._send("POST", "/chat/completions", body)
        try:
            choices = sorted(_Completion.model_validate_json(response.content).choices, key=lambda c: c.index)
        except ValidationError:
            raise self._fail(
                "bad_response", BadGateway(f"generator {self.host} answered with no chat completion")
            ) from None
        if len(choices) != count:
            raise self._fail(
                "bad_response", BadGateway(f"generator {self.host} returned {len(choices)} choices for n={count}")
            )
        return [Generated(c.message.content or "", "stop" if c.finish_reason == "stop" else "length") for c in choices]

    def _fail(self, reason: str, exc: Exception, observe: bool = True) -> Exception:
        if observe:
            self.metrics.generator_errors.labels(reason=reason).inc()
        return exc

    def _retry_after(self, response: httpx.Response | None = None) -> dict[str, str]:
        given = response.headers.get("retry-after", "") if response is not None else ""
        return {"Retry-After": given if given.isdigit() else str(self.retry_after_s)}

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, observe: bool = True
    ) -> httpx.Response:
        """One request; any answer but a 2xx becomes a typed error (a 4xx about the request: `_Refused`)."""
        started = time.perf_counter()
        try:
            response = await self._client.request(method, self.url + path, json=body)
        except httpx.TimeoutException:
            message = f"generator {self.host} did not answer within {self.timeout_s:g} s"
            raise self._fail("timeout", GeneratorUnavailable(message, headers=self._retry_after()), observe) from None
        except httpx.HTTPError as exc:
            message = f"generator {self.host} is unreachable ({type(exc).__name__})"
            raise self._fail(
                "unreachable", GeneratorUnavailable(message, headers=self._retry_after()), observe
            ) from None
        finally:
            if observe:
                self.metrics.generator_latency.observe(time.perf_counter() - started)
        status = response.status_code
        if status < 300:
            return response
        detail = f"HTTP {status}: {_error_message(response)}"
        if status in (408, 429, 502, 503, 504):
            message = f"generator {self.host} is overloaded or unavailable ({detail})"
            raise self._fail("overloaded", GeneratorUnavailable(message, headers=self._retry_after(response)), observe)
        if status in (401, 403):
            message = f"generator {self.host} refused our credentials ({detail}); check RLAIFV_GENERATOR_API_KEY"
            raise self._fail("refused", BadGateway(message, code="generator_auth"), observe)
        if status == 404:
            raise self._fail("refused", BadGateway(f"generator {self.host}: {path} not found ({detail})"), observe)
        if status >= 500:
            raise self._fail("server_error", BadGateway(f"generator {self.host} failed ({detail})"), observe)
        raise self._fail("rejected", _Refused(status, detail), observe)


async def open_generator(settings: Settings, metrics: Metrics) -> Generator | None:
    """The configured generator, checked (raises `GeneratorStartupError`); None when the pair samples itself."""
    if settings.generator_url is None:
        return None
    generator = Generator(settings, metrics)
    try:
        await generator.start()
    except BaseException as exc:
        await generator.aclose()
        if isinstance(exc, GeneratorStartupError):
            log.error(str(exc))  # one plain line above uvicorn's traceback
        raise
    log.info("generator ready", extra={"generator": generator.display_url, "generator_model": generator.model})
    return generator
