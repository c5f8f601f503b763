"""The `vllm` engine: vLLM's OpenAI-compatible servers sample and score, this process orchestrates (httpx).

    RLAIFV_ENGINE=vllm RLAIFV_VLLM_POLICY_URL=http://policy:8000/v1 RLAIFV_VLLM_REFERENCE_URL=http://ref:8000/v1

The bundle is still read here, for its tokenizer, processor, chat template, end-of-turn token and reward settings,
but no weights are loaded: the policy runs in one `vllm serve <bundle>/policy`, the reference in another
(docs/vllm.md); a LoRA policy is the adapter served by the reference's server (`--enable-lora --lora-modules`).

- Prompts are rendered and tokenized by the bundle's own template and tokenizer (`reward.prompt`) and sent as
  token ids, so the server never re-tokenizes: the ids scored are the ids sampled. Text prompts go to
  `/v1/completions`; prompts with images to `/inference/v1/generate` (`vllm serve --enable-scale-out`: token ids +
  data-URL images, `service.engines.vllm_payload`), with the placeholders unexpanded, and the prompt vLLM expanded
  must equal ours (`check_prompt_ids`, else 502).
- Best-of-N: one request with `n` = N (vLLM prefills the prompt once and forks it; prefix caching on). Each
  sampled token comes back with its id and its *raw* log-prob (the servers run with `--logprobs-mode
  raw_logprobs`, vLLM's default: before temperature, penalties, bias and top-k/top-p), which is the policy half of
  the reward. The end-of-turn token is sampled and scored like any other.
- Reference (and, for /v1/rewards, policy) scoring: `prompt_logprobs` of prompt + answer with `max_tokens` 1; the
  answer's log-probs are the last T prompt positions (from the end: image placeholders expand). Text prompts: one
  request with every answer as a prompt; with images one request per answer (the token-in API takes one prompt).
  `RLAIFV_VLLM_REFERENCE=inprocess` scores the reference here instead, with the shared-prefix code.
- The 'claims' reward: claims are split and turned into yes/no questions here (`reward.claims`, as in process);
  the policy server answers each question with `max_tokens` 1 and `logprob_token_ids` = the yes/no forms' first
  tokens, whose raw log-probs give p(yes) exactly as `reward.yes_no.YesNoJudge` computes it.
- Failures: a server unreachable, timed out or answering 408/429/5xx -> `EngineUnavailable` (503, Retry-After),
  a 4xx about the input -> 400, anything malformed -> 502 `engine_error`; each counted in
  `rlaifv_vllm_errors_total`, every request timed in `rlaifv_vllm_request_duration_seconds`. `probe` (each server's
  /health) feeds `/readyz`. A server that stops answering without closing its connections (a stopped process, a
  lost host) is found by /health: checked while requests are in flight, a server that answers nothing for
  `silent_s` (15 s at the default timeout) is down and its requests end with 503; refused, reset or a /health other
  than 200 is down at once. A slow /health (a busy server) is never down. Requests to a server found down fail at
  once until /health answers again. When one call of a request fails, its other calls are cancelled (`_all`): no
  vLLM work is left running for an answer no one reads.

The tokenizer and processor are not re-entrant, so every call to them (prompts, answers, decoding, claim planning)
runs on one worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import httpx

from rlaifv.reward.errors import ContextLengthError, InvalidInputError
from rlaifv.reward.prompt import continuation_context, decoded_after, markup_ids, stop_cut_ids, tidy_answer, token_text
from rlaifv.reward.results import Ranking
from rlaifv.reward.token_bytes import TokenBytes
from rlaifv.service.engines import vllm_payload
from rlaifv.service.engines.base import EngineResult, GenerateRequest, Request, ScoreRequest
from rlaifv.service.errors import BadGateway, BadRequest, EngineUnavailable, ServiceError
from rlaifv.service.urls import without_credentials

if TYPE_CHECKING:
    from rlaifv.reward.claims import AnswerVerdict
    from rlaifv.reward.prompt import EncodedPrompt
    from rlaifv.reward.results import Candidate, TokenLogprob
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service.metrics import Metrics
    from rlaifv.service.settings import Settings

log = logging.getLogger("rlaifv.service")

T = TypeVar("T")
U = TypeVar("U")
PROBE_TIMEOUT_S = 2.0  # what /readyz and a request to a server found down wait for /health (the check runs on)
# While requests are in flight each server's /health is checked this often. A check may take up to the server's
# silence bound, max(SILENT_MIN_S, SILENT_SHARE * RLAIFV_VLLM_TIMEOUT_S): a busy server answers /health late (its
# API process prepares images on the event loop), and only a server that answers nothing that long is down.
WATCH_S = 5.0
SILENT_MIN_S = 10.0
SILENT_SHARE = 0.125
MAX_CHECKS = 8  # /health checks outstanding at once (each its own connection): one never answered hides no other
RECHECK_S = 1.0  # a server found down gets one /health check at most this often, shared by the requests meanwhile
ENGINE_ERROR = "engine_error"  # the code of a 502 from a vLLM server (BadGateway's own names the generator)
# What reading a malformed answer raises (a field missing, null, or of another type): the server's fault, a 502.
MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError)
CONNECT_TIMEOUT_S = 5.0
KEEPALIVE_S = 2.0
MIN_CONNECTIONS = 64
TOKEN_PREFIX = "token_id:"
BAN = -100.0  # logit_bias that keeps special tokens out of the samples, as the transformers sampler does
# vLLM writes a log-prob of -inf as -9999.0; such an "alternative" is none (vLLM 0.32 fills a batch's alternatives
# with them when one request of the batch asks for `logprob_token_ids`).
NO_LOGPROB = -9999.0
# vLLM's default --max-logprobs, which docs/vllm.md's commands set: the most alternatives asked of a server.
MAX_LOGPROBS = 20
# Families whose several images in one prompt vLLM lays out otherwise than transformers: LLaVA-OneVision's
# multi-image mode (one base-resolution crop per image) is transformers' and the model's; vLLM tiles each image
# as if alone, so every such prompt would fail `check_prompt_ids` (a 502) instead of a clear 400.
ONE_IMAGE_FAMILIES = {
    "llava_onevision": "with RLAIFV_ENGINE=vllm this model takes one image per request: vLLM tiles each of several"
    " images as if alone, not in LLaVA-OneVision's multi-image mode (the transformers engine takes several)",
}
Served = Literal["base", "adapter"]  # what a server's model must be: a base model or a LoRA module (--lora-modules)


class VllmStartupError(RuntimeError):
    """RLAIFV_ENGINE=vllm but a server cannot be used: start-up stops here, not at the first request."""


def api_root(url: str) -> tuple[str, str]:
    """(server root, OpenAI API base) of a URL given with or without its /v1."""
    url = url.rstrip("/")
    root = url[: -len("/v1")] if url.endswith("/v1") else url
    return root, root + "/v1"


def _ranked(alternatives: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """(token id, log-prob) alternatives, most likely first, without vLLM's -inf placeholders."""
    return sorted(((t, v) for t, v in alternatives if v > NO_LOGPROB), key=lambda kv: -kv[1])


def _top_of(entries: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """A token-in step's alternatives. vLLM lists the sampled token first, then the likeliest, `logprobs` entries in
    all: a sample ranked past them takes the last place of one that belongs (its rank, past the list, shows it)."""
    return _ranked(
        (int(a["token_id"]), float(a["logprob"]))
        for a in entries
        if a.get("rank") is None or int(a["rank"]) <= len(entries)
    )


def _token_id(key: str) -> int:
    """A token as vLLM writes it with `return_tokens_as_token_ids` ("token_id:42"), or a bare id key ("42")."""
    return int(key[len(TOKEN_PREFIX) :] if key.startswith(TOKEN_PREFIX) else key)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return str(body)[:300]


@dataclass(eq=False)
class _InFlight:
    """One request to a server: its time limit, and why the health watch cut it short (None: it did not)."""

    bound: asyncio.Timeout
    cut: str | None = None


@dataclass(frozen=True)
class _Answer:
    """What the server said to one /health check: `problem` None for a 200, else why it is down."""

    problem: str | None


@dataclass
class Prompt:
    """One prompt as the servers get it, and as we score it."""

    ids: list[int]  # ours, image placeholders expanded: positions are counted on these
    sent: list[int]  # what is sent: `ids` for text; the tokenizer's ids (placeholders unexpanded) with images
    encoded: EncodedPrompt | None = None  # for the in-process reference
    parts: list[dict[str, Any]] = field(default_factory=list)  # the images as data-URL content parts

    @property
    def has_images(self) -> bool:
        return bool(self.parts)

    @classmethod
    def of(cls, prompt: Prompt | Sequence[int]) -> Prompt:
        """A prompt, or a text prompt's token ids (`rlaifv.bench.vllm_scoring` passes ids)."""
        return prompt if isinstance(prompt, Prompt) else cls(list(prompt), list(prompt))


class VllmServer:
    """One vLLM OpenAI-compatible server (the policy's or the reference's): requests, errors, metrics."""

    def __init__(self, role: str, url: str, model: str | None, settings: Settings, metrics: Metrics | None) -> None:
        self.role = role
        self.root, self.api = api_root(url)
        self.shown = without_credentials(self.root)[1]  # what messages, logs and /readyz show
        self.model = model or ""
        self.max_model_len: int | None = None
        self.timeout_s = settings.vllm_timeout_s
        self.retry_after_s = settings.retry_after_s
        self.metrics = metrics
        # Each request of each batch in progress holds a connection for its whole decode (twice that for a claims
        # judge's questions): a smaller pool queued a short request behind long ones, which the concurrent batches
        # are there to avoid, and could fail it with a PoolTimeout having never reached vLLM.
        self.max_connections = max(MIN_CONNECTIONS, 2 * settings.vllm_concurrent_batches * settings.max_batch)
        self.headers = {}
        if settings.vllm_api_key is not None:
            self.headers["Authorization"] = f"Bearer {settings.vllm_api_key.get_secret_value()}"
        self._client: httpx.AsyncClient | None = None
        self._probe_client: httpx.AsyncClient | None = None
        self._flights: set[_InFlight] = set()
        self._down: str | None = None  # why the server was last found down; None while it answers
        self._watcher: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[_Answer | None]] = set()  # the /health checks outstanding
        self._newest: asyncio.Task[_Answer | None] | None = None  # the last /health check sent
        self._sent_at = -math.inf  # when it was sent (the loop's clock)
        self._heard_at = -math.inf  # the server's last answer to anything (a /health check, a request)

    @property
    def silent_s(self) -> float:
        """How long the server may answer nothing at all (no /health, no request) before it is down."""
        return max(SILENT_MIN_S, SILENT_SHARE * self.timeout_s)

    @property
    def client(self) -> httpx.AsyncClient:
        """Made on the serving loop (start-up runs in a worker thread). Idle connections are dropped after 2 s, before
        vLLM's uvicorn closes them at 5 s (`VLLM_HTTP_TIMEOUT_KEEP_ALIVE`): a request sent as the server closes an
        idle connection fails with no answer (`_post` sends such a request once more)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self.headers,
                timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, CONNECT_TIMEOUT_S)),
                # httpx takes the pool's limits from the transport when one is given (the client's are ignored);
                # retries: connection attempts only, no request is sent twice
                transport=httpx.AsyncHTTPTransport(
                    retries=1, limits=httpx.Limits(max_connections=self.max_connections, keepalive_expiry=KEEPALIVE_S)
                ),
            )
        return self._client

    @property
    def probe_client(self) -> httpx.AsyncClient:
        """/health has a client of its own: under load the requests hold every pooled connection, and a probe
        waiting for one timed out, taking a busy replica out of the Service. No connection is kept: a check sent on
        one the server just closed while idle would fail as if the server were gone. `_health` bounds each check."""
        if self._probe_client is None:
            self._probe_client = httpx.AsyncClient(
                headers=self.headers,
                timeout=None,
                limits=httpx.Limits(max_connections=MAX_CHECKS, max_keepalive_connections=0),
            )
        return self._probe_client

    async def aclose(self) -> None:
        tasks = [task for task in (self._watcher, *self._checks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watcher = self._newest = None
        self._checks.clear()
        for client in (self._client, self._probe_client):
            if client is not None:
                await client.aclose()
        self._client = self._probe_client = None

    # -- start-up (sync: load_engine runs in a thread) --------------------------

    def _unusable(self, problem: str) -> VllmStartupError:
        return VllmStartupError(f"RLAIFV_ENGINE=vllm: the {self.role} server {self.shown} is not usable: {problem}")

    def start(self, wait_s: float, *, serves: Served | None = None, images: bool = False) -> None:
        """Wait up to `wait_s` for /health, check /v1/models lists the model (resolving it when unset), and, when
        the bundle takes images, that the token-in route they need is there.

        `serves`: 'adapter' for a LoRA policy (the model must be one of the server's --lora-modules), 'base' for the
        reference of a LoRA policy; it also picks the model when RLAIFV_VLLM_*_MODEL is unset."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                health = httpx.get(self.root + "/health", headers=self.headers, timeout=PROBE_TIMEOUT_S)
                if health.status_code == 200:
                    break
                problem = f"/health answered HTTP {health.status_code}"
            except httpx.HTTPError as exc:
                problem = f"unreachable ({type(exc).__name__})"
            if time.monotonic() >= deadline:
                raise VllmStartupError(
                    f"RLAIFV_ENGINE=vllm: the {self.role} server {self.shown} is not usable: {problem}; start it "
                    f"(`vllm serve <bundle>/{self.role}`, docs/vllm.md) or fix RLAIFV_VLLM_{self.role.upper()}_URL"
                    + (f" (waited {wait_s:g} s, RLAIFV_VLLM_WAIT_S)" if wait_s else "")
                )
            time.sleep(0.5)
        try:
            response = httpx.get(self.api + "/models", headers=self.headers, timeout=self.timeout_s)
            response.raise_for_status()
            models = {str(m["id"]): m for m in response.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise VllmStartupError(
                f"the {self.role} server {self.api}/models did not list models ({type(exc).__name__}: {exc})"
            ) from None
        self._pick(models, serves)
        entry = models[self.model]
        length = entry.get("max_model_len")
        if not isinstance(length, int) and entry.get("parent") in models:  # a LoRA module: its base's length
            length = models[str(entry["parent"])].get("max_model_len")
        self.max_model_len = int(length) if isinstance(length, int) else None
        if images:
            self._check_generate_route()

    def _pick(self, models: dict[str, dict[str, Any]], serves: Served | None) -> None:
        setting = f"RLAIFV_VLLM_{self.role.upper()}_MODEL"
        kind = {None: "", "base": "base ", "adapter": "LoRA "}[serves]
        if not self.model:
            fitting = [
                name
                for name, entry in models.items()
                if serves is None or (entry.get("parent") is not None) == (serves == "adapter")
            ]
            if serves is None and len(fitting) > 1:  # e.g. a reference server that also serves LoRA adapters
                fitting = [name for name, entry in models.items() if entry.get("parent") is None]
            if len(fitting) != 1:
                raise VllmStartupError(
                    f"the {self.role} server {self.shown} serves {len(fitting)} {kind}models "
                    f"({', '.join(fitting) or 'none'}; it lists {', '.join(models) or 'none'}); set {setting}"
                    + (
                        " and serve the adapter with --enable-lora --lora-modules NAME=<bundle>/policy"
                        if not fitting and serves == "adapter"
                        else ""
                    )
                )
            self.model = fitting[0]
        elif self.model not in models:
            raise VllmStartupError(
                f"the {self.role} server {self.shown} does not serve '{self.model}' (it lists {', '.join(models)})"
            )
        is_adapter = models[self.model].get("parent") is not None
        if serves == "adapter" and not is_adapter:
            raise VllmStartupError(
                f"the bundle's policy is a LoRA adapter but '{self.model}' on {self.shown} is a base model: serve the "
                f"adapter with `vllm serve <bundle>/reference --enable-lora --lora-modules NAME=<bundle>/policy` and "
                f"set {setting}=NAME (docs/vllm.md, LoRA policies)"
            )
        if serves == "base" and is_adapter:
            raise VllmStartupError(
                f"the reference of a LoRA policy is its base model, but '{self.model}' on {self.shown} is a LoRA "
                f"module; set {setting} to the base model's name"
            )

    def _check_generate_route(self) -> None:
        """Images go to /inference/v1/generate, which `vllm serve` registers only with --enable-scale-out."""
        try:
            response = httpx.post(
                self.root + vllm_payload.GENERATE_PATH, json={}, headers=self.headers, timeout=self.timeout_s
            )
        except httpx.HTTPError as exc:
            raise self._unusable(f"unreachable ({type(exc).__name__})") from None
        disabled = response.status_code == 403 and "scale-out" in response.text.lower()  # vLLM 0.32's answer
        if response.status_code in (404, 405) or disabled:
            raise self._unusable(
                f"it has no {vllm_payload.GENERATE_PATH}, which prompts with images need: start it with "
                "--enable-scale-out (docs/vllm.md, Images)"
            )

    # -- serving ------------------------------------------------------------------

    async def probe(self) -> str:
        """'ok', or why the server is not usable now (readiness; not counted in the metrics). A /health slower than
        PROBE_TIMEOUT_S makes the replica not ready but the server is not down for it: requests still go to it."""
        answer = await self._asked()
        if self._down is not None:
            return f"unavailable: {self.shown} {self._down}"
        if answer is None:
            return f"unavailable: {self.shown} no answer to /health within {PROBE_TIMEOUT_S:g} s"
        return "ok"

    async def _asked(self) -> _Answer | None:
        """The answer to a /health check (one shared by the callers of the last RECHECK_S), or None when it gives
        none within PROBE_TIMEOUT_S of being sent; the check runs on, and its answer still counts."""
        check = self._ask(RECHECK_S)
        wait = self._sent_at + PROBE_TIMEOUT_S - asyncio.get_running_loop().time()
        await asyncio.wait({check}, timeout=max(0.0, wait))
        return check.result() if check.done() and not check.cancelled() else None

    def _ask(self, every: float) -> asyncio.Task[_Answer | None]:
        """The last /health check, or a new one when it was sent `every` s ago or more. Checks overlap (up to
        MAX_CHECKS): one that is never answered (its connection lost) does not hide a server that answers the next."""
        loop = asyncio.get_running_loop()
        check, now = self._newest, loop.time()
        if check is None or (now - self._sent_at >= every and len(self._checks) < MAX_CHECKS):
            check = loop.create_task(self._health(), name=f"vllm-{self.role}-health")
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)
            self._newest, self._sent_at = check, now
        return check

    async def _health(self) -> _Answer | None:
        """One /health check, which may take up to `silent_s`; it sets the server's state for the requests. An
        answer other than 200, or a connection refused or reset, is down at once. No answer is down only when the
        server answered nothing else either (no other check, no request) for `silent_s`: a paused process, a lost
        host. A slow answer is a busy server, not a down one."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            async with asyncio.timeout(self.silent_s):
                response = await self.probe_client.get(self.root + "/health")
        except (httpx.TimeoutException, TimeoutError):
            if self._heard_at < sent and loop.time() - sent >= self.silent_s:
                self._found_down(f"no answer to /health for {self.silent_s:g} s")
            return None
        except httpx.HTTPError as exc:
            answer = _Answer(f"unreachable ({type(exc).__name__})")
        else:
            answer = _Answer(None if response.status_code == 200 else f"/health HTTP {response.status_code}")
        self._heard_at = loop.time()
        if answer.problem is None:
            self._down = None
        else:
            self._found_down(answer.problem)
        return answer

    def _found_down(self, problem: str) -> None:
        """The server is down: its requests in flight end now with 503, not at RLAIFV_VLLM_TIMEOUT_S."""
        was, self._down = self._down, problem
        now = asyncio.get_running_loop().time()
        cut = [flight for flight in self._flights if not flight.bound.expired()]
        for flight in cut:
            flight.cut = problem
            flight.bound.reschedule(now)
        if cut or was is None:
            log.warning("vllm server down", extra={"server": self.role, "problem": problem, "requests_cut": len(cut)})

    def _watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_health(), name=f"vllm-{self.role}-watch")

    async def _watch_health(self) -> None:
        """While requests are in flight, a /health check every WATCH_S (SIGSTOP, a lost host: the connections stay
        open and silent, and only /health tells): `_health` ends the requests when the server is found down."""
        while True:
            await asyncio.sleep(WATCH_S)
            if not self._flights:
                self._watcher = None  # no await since the check: a request added meanwhile starts a new watch
                return
            self._ask(WATCH_S)

    async def _usable(self) -> None:
        """A request to a server found down (refused, /health not 200, or silent for `silent_s`) waits for a /health
        check first (shared, see `_asked`): it is sent when the check answers 200, and fails at once while the
        server stays down. A server not found down is not checked: a slow /health is no reason to fail a request."""
        if self._down is None:
            return
        await self._asked()
        if self._down is not None:
            raise self._fail("down", self._unavailable(f"is down ({self._down})"))

    def _unavailable(self, what: str) -> EngineUnavailable:
        return EngineUnavailable(
            f"the vLLM {self.role} server {self.shown} {what}", headers={"Retry-After": str(self.retry_after_s)}
        )

    @contextmanager
    def reading(self, what: str = "completion") -> Iterator[None]:
        """Reading an answer of this server: a field missing, null or of another type is its fault (502), not a
        bug of ours (a 500 with a traceback)."""
        try:
            yield
        except InvalidInputError:
            raise
        except MALFORMED as exc:
            raise self.bad_response(f"answered with a malformed {what} ({type(exc).__name__}: {exc})"[:300]) from None

    def _fail(self, reason: str, exc: ServiceError) -> ServiceError:
        if self.metrics is not None:
            self.metrics.vllm_errors.labels(server=self.role, reason=reason).inc()
        return exc

    def bad_response(self, what: str, reason: str = "bad_response") -> ServiceError:
        return self._fail(reason, BadGateway(f"the vLLM {self.role} server {what}", code=ENGINE_ERROR))

    async def _send(self, url: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self.client.post(url, json=body)
        except httpx.RemoteProtocolError as exc:
            if "without sending a response" not in str(exc):  # dropped mid-answer: the work may be done
                raise
            return await self.client.post(url, json=body)  # an idle connection the server just closed

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a request; any answer but a 2xx with a list of choices becomes a typed error naming this server.
        RLAIFV_VLLM_TIMEOUT_S bounds it as a whole (httpx's timeout bounds each phase: a server sending a byte now
        and then held it for ever), and the health watch may end it sooner."""
        await self._usable()
        started = time.perf_counter()
        flight: _InFlight | None = None
        try:
            async with asyncio.timeout(self.timeout_s) as bound:
                flight = _InFlight(bound)
                self._flights.add(flight)
                self._watch()
                try:
                    response = await self._send(url, body)
                    self._heard_at = asyncio.get_running_loop().time()
                finally:
                    self._flights.discard(flight)
        except (TimeoutError, httpx.TimeoutException):
            if flight is not None and flight.cut is not None:
                raise self._fail("down", self._unavailable(f"stopped answering ({flight.cut})")) from None
            raise self._fail("timeout", self._unavailable(f"did not answer within {self.timeout_s:g} s")) from None
        except httpx.HTTPError as exc:
            self._down = f"unreachable ({type(exc).__name__})"  # the next request checks /health first
            raise self._fail("unreachable", self._unavailable(f"is unreachable ({type(exc).__name__})")) from None
        finally:
            if self.metrics is not None:
                self.metrics.vllm_latency.labels(server=self.role).observe(time.perf_counter() - started)
        status = response.status_code
        if status >= 300:
            detail = f"HTTP {status}: {_error_message(response)}"
            if status in (408, 429) or status >= 500:
                raise self._fail("unavailable", self._unavailable(f"is overloaded or failing ({detail})"))
            if status in (401, 403, 404):
                refused = BadGateway(f"the vLLM {self.role} server refused us ({detail})", code=ENGINE_ERROR)
                raise self._fail("refused", refused)
            raise self._fail(
                "rejected",
                BadRequest(f"the vLLM {self.role} server refused the input ({detail})", code="engine_rejected"),
            )
        try:
            data = response.json()
            if not isinstance(data.get("choices"), list):
                raise ValueError("no choices")
        except (ValueError, AttributeError):
            raise self.bad_response("answered with no completion") from None
        return data  # type: ignore[no-any-return]

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/completions (text prompts as token ids)."""
        return await self._post(self.api + "/completions", {"model": self.model, **body})

    async def generate(
        self, prompt: Prompt, sampling_params: dict[str, Any], answer: Sequence[int] = ()
    ) -> dict[str, Any]:
        """POST /inference/v1/generate: the prompt (+ an answer to score) with its images; the prompt vLLM expanded
        must be ours (`check_prompt_ids`), else 502."""
        body = vllm_payload.generate_body(self.model, [*prompt.sent, *answer], prompt.parts, sampling_params)
        data = await self._post(self.root + vllm_payload.GENERATE_PATH, body)
        try:
            vllm_payload.check_prompt_ids([*prompt.ids, *answer], data.get("prompt_token_ids"), server=self.role)
        except (TypeError, ValueError) as exc:
            log.error("vllm prompt drift", extra={"server": self.role, "detail": str(exc)})
            raise self._fail("prompt_mismatch", BadGateway(str(exc), code=ENGINE_ERROR)) from None
        return data

    async def answer_logprobs(
        self, prompt: Prompt | Sequence[int], answers: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """Per-token log-probs of each answer after `prompt`: prompt_logprobs on prompt + answer, last T positions."""
        prompt = Prompt.of(prompt)
        if prompt.has_images:  # the token-in API takes one prompt per request: N concurrent requests, batched by vLLM
            params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            datas = await _all(*(self.generate(prompt, params, answer) for answer in answers))
            positions = [data.get("prompt_logprobs") or [] for data in datas]
        else:
            body = {
                "prompt": [[*prompt.sent, *answer] for answer in answers],
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": 0,
                "return_tokens_as_token_ids": True,
            }
            data = await self.complete(body)
            with self.reading("prompt_logprobs"):
                choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
                positions = [choice.get("prompt_logprobs") or [] for choice in choices]
            if len(choices) != len(answers):
                raise self.bad_response(f"returned {len(choices)} choices")
        out = []
        with self.reading("prompt_logprobs"):
            for answer, entries in zip(answers, positions, strict=True):
                tail = list(entries[len(entries) - len(answer) :]) if answer else []
                values = []
                for token, entry in zip(answer, tail, strict=False):
                    found = _logprob_of(entry, token)
                    if found is None:
                        raise self.bad_response(f"gave no log-prob for token {token}")
                    values.append(found)
                if len(values) != len(answer):
                    raise self.bad_response("returned too few positions")
                out.append(values)
        return out

    async def label_logprobs(self, prompts: Sequence[Prompt], labels: Sequence[int]) -> list[dict[int, float]]:
        """Raw log-probs of the `labels` tokens as each prompt's first answer token (the yes/no judge), one request
        per prompt with `logprob_token_ids`: exact for every label, whatever its rank.

        vLLM 0.32 returns the sampled token plus the first `logprobs` - 1 labels when the sampled token is not a
        label, so the sample is restricted to the labels (`allowed_token_ids`): raw log-probs are taken before that
        mask, and the one token generated is discarded anyway."""
        params = {
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": len(labels),
            "logprob_token_ids": list(labels),
            "allowed_token_ids": list(labels),
        }
        datas = await _all(*(self.generate(prompt, params) for prompt in prompts))
        out = []
        for data in datas:
            try:
                step = data["choices"][0]["logprobs"]["content"][0]
                found = {int(e["token_id"]): float(e["logprob"]) for e in [step, *step.get("top_logprobs", [])]}
            except (KeyError, IndexError, TypeError, ValueError):
                raise self.bad_response("returned no label log-probs (logprob_token_ids needs vLLM >= 0.32)") from None
            if not set(labels) <= set(found):
                raise self.bad_response(f"returned log-probs for {sorted(found)}, not for every label {list(labels)}")
            out.append({t: found[t] for t in labels})
        return out


class InProcessReference:
    """RLAIFV_VLLM_REFERENCE=inprocess: the reference in this process, scored by the shared-prefix code.

    The prompt runs once and the N answers continue from its KV cache (`reward.logprobs.answer_logprobs`), where
    vLLM's prompt_logprobs re-runs the prompt for every answer (measured in docs/vllm.md). One thread owns it.
    """

    role = "reference"
    max_model_len: int | None = None

    def __init__(self, folder: Path, settings: Settings, processor: Any, stop_ids: Sequence[int]) -> None:
        from rlaifv.reward.family_check import check_unverified_family
        from rlaifv.reward.models import load_model

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        self.root = self.shown = f"in process ({folder})"
        self.model = load_model(folder, device=settings.device, dtype=settings.dtype)
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        accepts_images = bool(getattr(processor, "accepts_images", True))
        check_unverified_family(
            self.model,
            processor,
            accepts_images=accepts_images,
            pad_id=self.pad_id,
            stop_ids=stop_ids,
            on_failure=settings.family_check,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlaifv-reference")

    def start(self, wait_s: float, *, serves: Served | None = None, images: bool = False) -> None:
        """Nothing to reach: the model is loaded."""

    async def probe(self) -> str:
        return "ok"

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def answer_logprobs(self, prompt: Prompt, answers: Sequence[Sequence[int]]) -> list[list[float]]:
        assert prompt.encoded is not None  # the engine's prompts carry it
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._score, prompt.encoded, answers)

    def _score(self, encoded: EncodedPrompt, answers: Sequence[Sequence[int]]) -> list[list[float]]:
        import torch

        from rlaifv.reward.logprobs import answer_logprobs

        with torch.no_grad():
            values = answer_logprobs(self.model, [encoded], [[list(a) for a in answers]], self.pad_id)[0]
        return [[float(v) for v in t.double().tolist()] for t in values]


def _logprob_of(entry: Any, token: int) -> float | None:
    """The log-prob of `token` in one prompt_logprobs position ({"id": {"logprob": x, ...}} or {"id": x})."""
    if not isinstance(entry, dict):
        return None
    for key, value in entry.items():
        try:
            if _token_id(str(key)) != token:
                continue
        except ValueError:
            continue
        return float(value["logprob"] if isinstance(value, dict) else value)
    return None


def p_yes(logprobs: dict[int, float], yes_ids: Sequence[int], no_ids: Sequence[int]) -> float:
    """p(yes) / (p(yes) + p(no)) from the first token's raw log-probs (`reward.yes_no.YesNoJudge`'s formula)."""
    yes = sum(math.exp(logprobs[t]) for t in yes_ids)
    no = sum(math.exp(logprobs[t]) for t in no_ids)
    return yes / (yes + no) if yes + no > 0 else 0.5


@dataclass
class _Sampled:
    ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    cut: bool  # stopped by a stop string: the text is re-tokenized and teacher-forced
    top: list[list[tuple[int, float]]]


class VllmEngine:
    """Implements `service.engines.base.Engine` over a policy and a reference vLLM server."""

    def __init__(self, bundle: str | Path, settings: Settings, metrics: Metrics | None = None) -> None:
        from transformers import GenerationConfig

        from rlaifv.reward.bundle import check_tokenizers_match, read_manifest, resolve
        from rlaifv.reward.models import load_processor
        from rlaifv.reward.prompt import end_of_turn_id
        from rlaifv.reward.yes_no import NO_FORMS, YES_FORMS, first_token_ids

        manifest = read_manifest(bundle)
        self.lora = manifest.policy_type == "lora"
        policy_path, reference_path = resolve(bundle, manifest.policy), resolve(bundle, manifest.reference)
        check_tokenizers_match(policy_path, reference_path)
        self.processor = load_processor(reference_path, trust_remote_code=settings.trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        self._bytes = TokenBytes(self.tokenizer)
        self.accepts_images = bool(getattr(self.processor, "accepts_images", True))
        self._name = manifest.name
        self._reward = manifest.reward
        self.eot_id = end_of_turn_id(self.tokenizer, manifest.end_of_turn, self.processor)
        model_path = reference_path if self.lora else policy_path  # an adapter folder has no config of its own
        try:
            eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
        except OSError:
            eos = None
        eos_ids = [] if eos is None else [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]
        self.stop_ids = sorted({self.eot_id, *eos_ids})
        self.yes_ids = first_token_ids(self.tokenizer, YES_FORMS)  # the labeler's answer tokens, as in process
        self.no_ids = first_token_ids(self.tokenizer, NO_FORMS)
        config = json.loads((model_path / "config.json").read_text())
        self._model_type = str(config.get("model_type", ""))
        text_config = config.get("text_config", config)
        self._max_positions: int | None = text_config.get("max_position_embeddings")
        # As in process: rows of an embedding resized past the tokenizer (LLaVA-1.5: 32064 for 32002 tokens) are no
        # token, so vLLM must never sample them (their text is empty and no reference could score one).
        rows = text_config.get("vocab_size") or config.get("vocab_size")
        padding = range(len(self.tokenizer), int(rows)) if isinstance(rows, int) else range(0)
        self.blocked_ids = sorted((markup_ids(self.processor) - set(self.stop_ids)) | set(padding))
        assert settings.vllm_policy_url  # Settings checks it for engine=vllm
        self.policy = VllmServer("policy", settings.vllm_policy_url, settings.vllm_policy_model, settings, metrics)
        self.reference: VllmServer | InProcessReference
        if settings.vllm_reference == "inprocess":
            self.reference = InProcessReference(reference_path, settings, self.processor, self.stop_ids)
        else:
            assert settings.vllm_reference_url
            self.reference = VllmServer(
                "reference", settings.vllm_reference_url, settings.vllm_reference_model, settings, metrics
            )
        self.wait_s = settings.vllm_wait_s
        self._concurrent_batches = settings.vllm_concurrent_batches
        self._cpu_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlaifv-vllm-cpu")
        self._claim_tools: tuple[Any, Any] | None = None

    def start(self) -> None:
        """Both servers within one RLAIFV_VLLM_WAIT_S (they start together: a wait each doubled the worst case
        past the startup probe's budget)."""
        end = time.monotonic() + self.wait_s
        self.policy.start(self.wait_s, serves="adapter" if self.lora else None, images=self.accepts_images)
        left = max(0.0, end - time.monotonic())
        self.reference.start(left, serves="base" if self.lora else None, images=self.accepts_images)
        limits = [s.max_model_len for s in (self.policy, self.reference) if s.max_model_len]
        if limits:
            self._max_positions = min([*limits, *([self._max_positions] if self._max_positions else [])])
        log.info(
            "vllm engine ready",
            extra={"policy": f"{self.policy.root} ({self.policy.model})", "reference": self.reference.root},
        )

    # -- the Engine protocol ------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def reward(self) -> RewardConfig:
        return self._reward

    @property
    def max_positions(self) -> int | None:
        return self._max_positions

    @property
    def concurrent_batches(self) -> int:
        return self._concurrent_batches

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        return self._bytes.bytes_of(token_id, text)

    async def run(self, requests: Sequence[Request]) -> list[EngineResult | Exception]:
        """Every request concurrently: vLLM batches them itself (continuous batching)."""
        outcomes = await asyncio.gather(*(self._unless_withdrawn(r) for r in requests), return_exceptions=True)
        out: list[EngineResult | Exception] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            out.append(outcome)
        return out

    async def warmup(self) -> float:
        """A text request of each kind, and one with an image when the bundle takes images: the image path's
        prompt check runs before traffic (a processor that expands images differently stops start-up)."""
        from PIL import Image

        from rlaifv.reward.sampling import SamplingParams

        start = time.perf_counter()
        params = SamplingParams(temperature=1.0, max_tokens=2, seed=0)
        requests: list[Request] = [
            GenerateRequest([], "warm up", None, 2, params, self.reward),
            ScoreRequest([], "warm up", None, ["warm up"], self.reward, 8),
        ]
        if self.accepts_images:
            image = Image.new("RGB", (32, 32), (200, 30, 30))
            requests += [
                GenerateRequest([image], "warm up", None, 2, params, self.reward),
                ScoreRequest([image], "warm up", None, ["warm up"], self.reward, 8),
            ]
        for request in requests:
            result = (await self.run([request]))[0]
            if isinstance(result, Exception):
                raise result
        return time.perf_counter() - start

    async def probe(self) -> str:
        """Readiness: 'ok' when both servers answer /health, else why not."""
        states = await asyncio.gather(self.policy.probe(), self.reference.probe())
        bad = [
            f"{server.role} {state}"
            for server, state in zip((self.policy, self.reference), states, strict=True)
            if state != "ok"
        ]
        return "ok" if not bad else "; ".join(bad)

    async def aclose(self) -> None:
        await asyncio.gather(self.policy.aclose(), self.reference.aclose())

    def shutdown(self) -> None:
        """The HTTP clients are closed by `aclose` (Serving calls it when present); here the tokenizer's thread."""
        self._cpu_executor.shutdown(wait=False, cancel_futures=True)

    # -- one request ------------------------------------------------------------------

    async def _cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run tokenizer/processor work on its one thread (the fast tokenizer is not re-entrant)."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu_executor, fn, *args)

    def _prompt(self, request: Request) -> Prompt:
        if request.reward.mode == "claims" and not request.images:
            raise InvalidInputError("the 'claims' reward needs the request's image", param="reward.mode")
        return self._encode(request.images, request.question, request.messages, request.continue_final)

    def _encode(
        self,
        images: Sequence[Any],
        question: str | None,
        messages: list[dict[str, Any]] | None,
        continue_final: bool = False,
        parts: list[dict[str, Any]] | None = None,
    ) -> Prompt:
        """Our expanded prompt (validates the request: `encode_prompt` refuses images for a text-only bundle) and,
        with images, what vLLM's token-in API gets: the unexpanded ids and the images as data URLs (`parts`: the
        same images already encoded, as every claim question of a request sends them)."""
        from rlaifv.reward.prompt import encode_prompt

        if len(images) > 1 and self._model_type in ONE_IMAGE_FAMILIES:
            raise InvalidInputError(ONE_IMAGE_FAMILIES[self._model_type], param="images")
        encoded = encode_prompt(
            self.processor,
            images,
            question,
            messages=messages,
            max_length=self._max_positions,
            continue_final=continue_final,
        )
        ids = [int(t) for t in encoded.input_ids.tolist()]
        if not images:
            return Prompt(ids, ids, encoded)
        sent = vllm_payload.prompt_ids(self.processor, images, question, messages, continue_final)
        return Prompt(ids, sent, encoded, parts if parts is not None else vllm_payload.content_parts(images))

    async def _unless_withdrawn(self, request: Request) -> EngineResult:
        """The request's work as its own task, cancelled when its client withdraws it: its HTTP requests to vLLM
        close, and vLLM aborts their sequences (it cancels a request whose client disconnects)."""
        from rlaifv.reward.errors import Withdrawn

        work = asyncio.ensure_future(self._one(request))
        request.withdrawal.on_set(work.cancel)
        try:
            return await work
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if request.withdrawal.is_set() and work.cancelled() and not (this and this.cancelling()):
                raise Withdrawn("withdrawn while vLLM ran it") from None
            raise

    async def _one(self, request: Request) -> EngineResult:
        prompt = await self._cpu(self._prompt, request)
        if isinstance(request, GenerateRequest):
            ranking = await self._generate(prompt, request)
        else:
            ranking = await self._score(prompt, request)
        return EngineResult(ranking, len(prompt.ids), 1)

    def _check_length(self, prompt: Prompt, answer_len: int, param: str) -> None:
        limit = self._max_positions
        if limit is not None and len(prompt.ids) + answer_len + 1 > limit:
            raise ContextLengthError(
                f"prompt ({len(prompt.ids)} tokens) + answer ({answer_len}) exceeds the model's {limit} positions",
                param=param,
            )

    async def _score(self, prompt: Prompt, request: ScoreRequest) -> Ranking:
        from rlaifv.reward.prompt import encode_answers

        if not request.answers:
            raise InvalidInputError("answers must be a non-empty list", param="answers")

        context = continuation_context(prompt.ids, request.continue_final)

        def encode() -> list[list[int]]:
            return encode_answers(
                self.processor, request.answers, eot_id=self.eot_id, max_tokens=request.max_tokens, context=context
            )

        answers = await self._cpu(encode)
        for k, answer in enumerate(answers):
            self._check_length(prompt, len(answer), f"answers[{k}]")
        start = time.perf_counter()
        ((policy, reference), scored), (verdicts, judged) = await _all(
            _finished(
                _all(self.policy.answer_logprobs(prompt, answers), self.reference.answer_logprobs(prompt, answers))
            ),
            _finished(self._judge(request, request.answers)),
        )
        candidates = [
            _candidate(text, ids, sum(p), sum(r), request.reward, "given")
            for text, ids, p, r in zip(request.answers, answers, policy, reference, strict=True)
        ]
        timings = {"score_s": scored - start}
        _apply_verdicts(candidates, verdicts, timings, judged - scored)
        return Ranking.of(candidates, timings)

    def _sampling_params(self, request: GenerateRequest) -> dict[str, Any]:
        """vLLM `SamplingParams` fields for the request (the token-in API takes them as is)."""
        params = request.sampling
        size = len(self.tokenizer)
        for token in params.logit_bias:
            if not 0 <= token < size:
                raise InvalidInputError(
                    f"token id {token} is not in the vocabulary (0..{size - 1})", param="logit_bias"
                )
        bias = {str(t): BAN for t in self.blocked_ids}
        bias.update({str(t): float(v) for t, v in params.logit_bias.items() if t not in self.blocked_ids})
        body: dict[str, Any] = {
            "n": request.n,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "min_p": params.min_p,
            "logprobs": request.top_logprobs or 0,
            "stop_token_ids": self.stop_ids,
            "ignore_eos": False,
            "skip_special_tokens": True,
            "logit_bias": bias,
            # Every sampling field is sent: vLLM fills a missing one from the model folder's generation_config.json
            # (unless served with --generation-config vllm), e.g. a repetition_penalty of 1.05, or top_k 1 that
            # makes the N samples one; the token-in route (images) applies none, so text and images would differ.
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": 1.0,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if request.sampling.temperature == 0:  # vLLM refuses n > 1 when greedy: the N answers are one answer
            body["n"] = 1
        return body

    def _sampling_body(self, prompt: list[int], request: GenerateRequest) -> dict[str, Any]:
        """A /v1/completions body: the sampling parameters, the prompt ids, ids for tokens."""
        return {"prompt": prompt, **self._sampling_params(request), "return_tokens_as_token_ids": True}

    async def _generate(self, prompt: Prompt, request: GenerateRequest) -> Ranking:
        if request.n < 1:
            raise InvalidInputError("n must be at least 1", param="n")
        request = dataclasses.replace(request, sampling=request.fitted(len(prompt.ids), self._max_positions, reserve=1))
        start = time.perf_counter()
        if prompt.has_images:
            params = self._sampling_params(request)
            if params["logprobs"]:
                # The token-in route sends each step's first k entries with the sampled token first: a sample
                # outside the top k leaves only k - 1 of them. One more has them all (`_token_logprobs` keeps k).
                params["logprobs"] = min(params["logprobs"] + 1, MAX_LOGPROBS)
            data = await self.policy.generate(prompt, params)
            wanted, parse = params["n"], self._sampled_tokens
        else:
            body = self._sampling_body(prompt.sent, request)
            data = await self.policy.complete(body)
            wanted, parse = body["n"], self._sampled
        with self.policy.reading():
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != wanted:
            raise self.policy.bad_response(f"returned {len(choices)} choices for n={wanted}")
        if wanted != request.n:  # greedy: one answer, N times
            choices = choices * request.n
        context = continuation_context(prompt.ids, request.continue_final)
        with self.policy.reading():
            samples = await self._cpu(lambda: [parse(choice, context) for choice in choices])
        sampled = time.perf_counter()

        def answers_of() -> tuple[list[list[int]], list[str]]:
            """The ids scored and the text returned; a stop-cut text is a finished turn, scored as /v1/rewards
            would score it (re-tokenized, end-of-turn appended)."""
            ids, texts = [], []
            for s in samples:
                if s.cut:  # trimmed before it is tokenized, as in process: the text the client gets is what is scored
                    text, cut_ids = stop_cut_ids(self.tokenizer, s.text, s.ids, eot_id=self.eot_id, context=context)
                    ids.append(cut_ids)
                    texts.append(text)
                else:
                    ids.append(s.ids)
                    texts.append(tidy_answer(self._decode(s.ids, context), context))
            return ids, texts

        answers, texts = await self._cpu(answers_of)
        cut = [i for i, s in enumerate(samples) if s.cut]
        scoring: list[Coroutine[Any, Any, list[list[float]]]] = [self.reference.answer_logprobs(prompt, answers)]
        if cut:
            scoring.append(self.policy.answer_logprobs(prompt, [answers[i] for i in cut]))
        (results, scored), (verdicts, judged) = await _all(
            _finished(_all(*scoring)), _finished(self._judge(request, texts))
        )
        reference = results[0]
        policy = [s.logprobs for s in samples]
        if cut:
            for i, values in zip(cut, results[1], strict=True):
                policy[i] = values

        def candidates_of() -> list[Candidate]:
            out = []
            for s, text, ids, p, r in zip(samples, texts, answers, policy, reference, strict=True):
                reason = "stop" if s.cut or s.finish_reason == "stop" else "length"
                candidate = _candidate(text, ids, sum(p), sum(r), request.reward, reason)
                if request.top_logprobs is not None:
                    candidate.token_logprobs = self._token_logprobs(s, ids, p, request.top_logprobs, context)
                out.append(candidate)
            return out

        candidates = await self._cpu(candidates_of)
        timings = {"generate_s": sampled - start, "score_s": scored - sampled}
        _apply_verdicts(candidates, verdicts, timings, judged - scored)
        return Ranking.of(candidates, timings)

    # -- the 'claims' reward ----------------------------------------------------------

    def _plan(self, texts: Sequence[str]) -> tuple[list[list[tuple[str, str, bool]]], list[str]]:
        from rlaifv.reward.claims import RuleQuestionWriter, SpacyClaimSplitter, plan_claims

        if self._claim_tools is None:
            self._claim_tools = (SpacyClaimSplitter(), RuleQuestionWriter())
        return plan_claims(texts, *self._claim_tools)

    async def _judge(self, request: Request, texts: Sequence[str]) -> list[AnswerVerdict] | None:
        """Claims mode: split each answer into claims, ask the policy server each distinct yes/no question about the
        request's images (first-token p(yes), as `reward.yes_no.YesNoJudge`), score as `reward.claims` does.

        It runs beside the scoring (its requests go to the policy server, the reference's to its own); `claims_s`
        is the time it adds after the scoring finished, so that score_s + claims_s is the wall time, as in process."""
        from rlaifv.reward.claims import score_plans

        config = request.reward
        if config.mode != "claims":
            return None
        if not self.yes_ids or not self.no_ids:
            raise InvalidInputError("this model's tokenizer has no token for 'yes' or 'no'", param="reward.mode")
        plans, questions = await self._cpu(self._plan, texts)
        judged: dict[str, float] = {}
        if questions:
            from rlaifv.reward.prompt import without_markup

            def encode() -> list[Prompt]:
                """Questions made from sampled answers: markup in them is the model's, not the request's."""
                parts = vllm_payload.content_parts(request.images)
                return [
                    self._encode(request.images, without_markup(self.processor, q), None, parts=parts)
                    for q in questions
                ]

            prompts = await self._cpu(encode)
            labels = await self.policy.label_logprobs(prompts, [*self.yes_ids, *self.no_ids])
            judged = {q: p_yes(lp, self.yes_ids, self.no_ids) for q, lp in zip(questions, labels, strict=True)}
        return score_plans(
            plans,
            judged,
            repeat_penalty=config.repeat_penalty,
            threshold=config.claim_threshold,
            scoring=config.claim_score,
        )

    # -- reading vLLM's samples ---------------------------------------------------------

    def _sampled(self, choice: dict[str, Any], context: Sequence[int] = ()) -> _Sampled:
        """A /v1/completions choice (`return_tokens_as_token_ids`); its text is vLLM's, read after the prompt."""
        logprobs = choice.get("logprobs") or {}
        tokens = logprobs.get("tokens") or []
        values = logprobs.get("token_logprobs") or []
        if len(tokens) != len(values):
            raise self.policy.bad_response("returned tokens and log-probs of different lengths")
        try:
            ids = [_token_id(str(t)) for t in tokens]
        except ValueError:
            raise self.policy.bad_response(
                "did not return token ids (needs vLLM >= 0.6: return_tokens_as_token_ids)"
            ) from None
        top = [
            _ranked((_token_id(str(k)), float(v)) for k, v in (alts or {}).items())
            for alts in (logprobs.get("top_logprobs") or [{}] * len(ids))
        ]
        stop_reason = choice.get("stop_reason")
        cut = isinstance(stop_reason, str)  # a stop string (an int is a stop token id)
        finish = "stop" if cut or (ids and ids[-1] in self.stop_ids) else "length"
        return _Sampled(ids, [float(v) for v in values], finish, str(choice.get("text") or ""), cut, top)

    def _sampled_tokens(self, choice: dict[str, Any], context: Sequence[int] = ()) -> _Sampled:
        """A /inference/v1/generate choice (tokens only: a stop-cut text is decoded here, after `context` for a
        continuation, and cut at the stop string, as vLLM cuts it)."""
        ids = [int(t) for t in choice.get("token_ids") or []]
        content = (choice.get("logprobs") or {}).get("content") or []
        try:
            if [int(c["token_id"]) for c in content] != ids:
                raise ValueError("ids")
            values = [float(c["logprob"]) for c in content]
            top = [_top_of(c.get("top_logprobs") or []) for c in content]
        except (KeyError, TypeError, ValueError):
            raise self.policy.bad_response("returned log-probs that do not match its tokens") from None
        stop_reason = choice.get("stop_reason")
        cut = isinstance(stop_reason, str)
        text = ""
        if cut:
            raw = self._decode(ids, context)
            at = raw.find(str(stop_reason))
            text = raw[:at] if at >= 0 else raw
        finish = "stop" if cut or (ids and ids[-1] in self.stop_ids) else "length"
        return _Sampled(ids, values, finish, text, cut, top)

    def _decode(self, ids: Sequence[int], context: Sequence[int] = ()) -> str:
        """The untrimmed text of sampled ids (read after `context`: `reward.prompt.decoded_after`)."""
        return decoded_after(self.tokenizer, [t for t in ids if t not in self.stop_ids], context)

    def _token_logprobs(
        self, sample: _Sampled, ids: list[int], policy: list[float], k: int, lead: Sequence[int] = ()
    ) -> list[TokenLogprob]:
        """Per-token raw policy log-probs (end-of-turn excluded) with the server's top-k alternatives; `lead`: the
        prompt tokens a continuation follows (its first token's text is read after them)."""
        from rlaifv.reward.results import TokenLogprob, TopToken

        content = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        out = []
        for j, token in enumerate(content):
            alternatives = sample.top[j][:k] if k and not sample.cut and j < len(sample.top) else []
            out.append(
                TokenLogprob(
                    token=self._token_text(content, j, token, lead),
                    token_id=token,
                    logprob=policy[j],
                    top_logprobs=[
                        TopToken(token=self._token_text(content, j, t, lead), token_id=t, logprob=v)
                        for t, v in alternatives
                    ],
                )
            )
        return out

    def _token_text(self, ids: Sequence[int], j: int, token: int, lead: Sequence[int] = ()) -> str:
        previous = ids[j - 1] if j else (lead[-1] if lead else None)
        return token_text(lambda t: str(self.tokenizer.decode(list(t), skip_special_tokens=False)), previous, token)


@overload
async def _all(first: Coroutine[Any, Any, T], second: Coroutine[Any, Any, U], /) -> tuple[T, U]: ...
@overload
async def _all(*calls: Coroutine[Any, Any, T]) -> tuple[T, ...]: ...
async def _all(*calls: Coroutine[Any, Any, Any]) -> tuple[Any, ...]:
    """Every call's result, run concurrently. The first failure cancels the others (their HTTP requests close, and
    vLLM drops their work) and is raised: with `asyncio.gather` they ran on, up to RLAIFV_VLLM_TIMEOUT_S, for an
    answer no one would read."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return tuple(task.result() for task in tasks)


async def _finished(call: Awaitable[T]) -> tuple[T, float]:
    """The result and when it came (the timings of concurrent steps)."""
    return await call, time.perf_counter()


def _apply_verdicts(
    candidates: list[Candidate], verdicts: list[AnswerVerdict] | None, timings: dict[str, float], claims_s: float
) -> None:
    """Claims mode: each candidate is ranked by its claims' score (the implicit reward stays reported)."""
    from rlaifv.reward.results import ClaimCheck

    if verdicts is None:
        return
    for candidate, verdict in zip(candidates, verdicts, strict=True):
        candidate.reward = verdict.score
        candidate.claims = [ClaimCheck(**vars(c)) for c in verdict.claims]
    timings["claims_s"] = max(0.0, claims_s)


def _candidate(
    text: str, ids: Sequence[int], policy: float, reference: float, config: RewardConfig, reason: Any
) -> Candidate:
    from rlaifv.reward.results import Candidate
    from rlaifv.reward.scoring import implicit_reward

    value = implicit_reward(policy, reference, len(ids), config)
    return Candidate(
        text=text,
        reward=value,
        implicit_reward=value,
        policy_logprob=policy,
        reference_logprob=reference,
        num_tokens=len(ids),
        finish_reason=reason,
        token_ids=list(ids),
    )


def load_vllm_engine(bundle: str, settings: Settings, metrics: Metrics | None = None) -> tuple[VllmEngine, float]:
    """The engine over the bundle's tokenizer and the configured servers, checked; returns it and the load time."""
    start = time.perf_counter()
    engine = VllmEngine(bundle, settings, metrics)
    engine.start()
    return engine, time.perf_counter() - start
