"""The `vllm` engine: vLLM's OpenAI-compatible servers sample and score, this process orchestrates (httpx).

    RLAIFV_ENGINE=vllm RLAIFV_VLLM_POLICY_URL=http://policy:8000/v1 RLAIFV_VLLM_REFERENCE_URL=http://ref:8000/v1

The bundle is still read here, for its tokenizer, chat template, end-of-turn token and reward settings, but no
weights are loaded: the policy runs in one `vllm serve <bundle>/policy`, the reference in another (docs/vllm.md).

- Prompts are rendered and tokenized by the bundle's own template and tokenizer (`reward.prompt`), and sent to
  `/v1/completions` as token ids, so the server never re-tokenizes: the ids scored are the ids sampled.
- Best-of-N: one request with `n` = N (vLLM prefills the prompt once and forks it; prefix caching on). Each
  sampled token comes back with its id (`return_tokens_as_token_ids`) and its *raw* log-prob (the servers run
  with `--logprobs-mode raw_logprobs`, vLLM's default: before temperature, penalties, bias and top-k/top-p),
  which is the policy half of the reward. The end-of-turn token is sampled and scored like any other.
- Reference (and, for /v1/rewards, policy) scoring: one `/v1/completions` request per prompt with every
  prompt + answer as a token-id prompt, `max_tokens` 1 and `prompt_logprobs` 0; the answer's log-probs are the
  last T prompt positions. `RLAIFV_VLLM_REFERENCE=inprocess` scores the reference here instead, with the
  shared-prefix code (`InProcessReference`); both paths measured in docs/vllm.md.
- Failures: a server unreachable, timed out or answering 408/429/5xx -> `EngineUnavailable` (503, Retry-After),
  a 4xx about the input -> 400, anything malformed -> 502; each counted in `rlaifv_vllm_errors_total`, every
  request timed in `rlaifv_vllm_request_duration_seconds`. `probe` (each server's /health) feeds `/readyz`.

Not supported by this engine: the 'claims' reward mode (its yes/no labeler runs the policy in process; 400
naming `reward.mode`) and images (400 naming the field: /v1/completions takes token ids but no pixels; the payload a
multimodal request needs is `service.engines.vllm_payload`, its wiring is open work, docs/vllm.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from rlaifv.reward.errors import InvalidInputError
from rlaifv.service.engines.base import EngineResult, GenerateRequest, Request, ScoreRequest
from rlaifv.service.errors import BadGateway, BadRequest, EngineUnavailable, ServiceError

if TYPE_CHECKING:
    from rlaifv.reward.prompt import EncodedPrompt
    from rlaifv.reward.results import Candidate, Ranking, TokenLogprob
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service.metrics import Metrics
    from rlaifv.service.settings import Settings

log = logging.getLogger("rlaifv.service")

PROBE_TIMEOUT_S = 2.0
TOKEN_PREFIX = "token_id:"
BAN = -100.0  # logit_bias that keeps special tokens out of the samples, as the transformers sampler does


class VllmStartupError(RuntimeError):
    """RLAIFV_ENGINE=vllm but a server cannot be used: start-up stops here, not at the first request."""


def api_root(url: str) -> tuple[str, str]:
    """(server root, OpenAI API base) of a URL given with or without its /v1."""
    url = url.rstrip("/")
    root = url[: -len("/v1")] if url.endswith("/v1") else url
    return root, root + "/v1"


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


class VllmServer:
    """One vLLM OpenAI-compatible server (the policy's or the reference's): requests, errors, metrics."""

    def __init__(self, role: str, url: str, model: str | None, settings: Settings, metrics: Metrics | None) -> None:
        self.role = role
        self.root, self.api = api_root(url)
        self.model = model or ""
        self.max_model_len: int | None = None
        self.timeout_s = settings.vllm_timeout_s
        self.retry_after_s = settings.retry_after_s
        self.metrics = metrics
        self.headers = {}
        if settings.vllm_api_key is not None:
            self.headers["Authorization"] = f"Bearer {settings.vllm_api_key.get_secret_value()}"
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # made on the serving loop (start-up runs in a worker thread)
            self._client = httpx.AsyncClient(
                headers=self.headers, timeout=self.timeout_s, limits=httpx.Limits(max_connections=64)
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- start-up (sync: load_engine runs in a thread) --------------------------

    def start(self, wait_s: float) -> None:
        """Wait up to `wait_s` for /health, then check /v1/models lists the model (resolving it when unset)."""
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
                    f"RLAIFV_ENGINE=vllm: the {self.role} server {self.root} is not usable: {problem}; start it "
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
        if not self.model:
            if len(models) != 1:
                raise VllmStartupError(
                    f"the {self.role} server {self.root} serves {len(models)} models ({', '.join(models) or 'none'}); "
                    f"set RLAIFV_VLLM_{self.role.upper()}_MODEL"
                )
            self.model = next(iter(models))
        elif self.model not in models:
            raise VllmStartupError(
                f"the {self.role} server {self.root} does not serve '{self.model}' (it lists {', '.join(models)})"
            )
        length = models[self.model].get("max_model_len")
        self.max_model_len = int(length) if isinstance(length, int) else None

    # -- serving ------------------------------------------------------------------

    async def probe(self) -> str:
        """'ok', or why the server is not usable now (readiness; not counted in the metrics)."""
        try:
            response = await self.client.get(self.root + "/health", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return f"unavailable: {self.root} unreachable ({type(exc).__name__})"
        return "ok" if response.status_code == 200 else f"unavailable: {self.root}/health HTTP {response.status_code}"

    def _fail(self, reason: str, exc: ServiceError) -> ServiceError:
        if self.metrics is not None:
            self.metrics.vllm_errors.labels(server=self.role, reason=reason).inc()
        return exc

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/completions; any answer but a 2xx becomes a typed error naming this server."""
        body = {"model": self.model, **body}
        started = time.perf_counter()
        retry = {"Retry-After": str(self.retry_after_s)}
        try:
            response = await self.client.post(self.api + "/completions", json=body)
        except httpx.TimeoutException:
            message = f"the vLLM {self.role} server {self.root} did not answer within {self.timeout_s:g} s"
            raise self._fail("timeout", EngineUnavailable(message, headers=retry)) from None
        except httpx.HTTPError as exc:
            message = f"the vLLM {self.role} server {self.root} is unreachable ({type(exc).__name__})"
            raise self._fail("unreachable", EngineUnavailable(message, headers=retry)) from None
        finally:
            if self.metrics is not None:
                self.metrics.vllm_latency.labels(server=self.role).observe(time.perf_counter() - started)
        status = response.status_code
        if status >= 300:
            detail = f"HTTP {status}: {_error_message(response)}"
            if status in (408, 429) or status >= 500:
                message = f"the vLLM {self.role} server {self.root} is overloaded or failing ({detail})"
                raise self._fail("unavailable", EngineUnavailable(message, headers=retry))
            if status in (401, 403, 404):
                raise self._fail("refused", BadGateway(f"the vLLM {self.role} server refused us ({detail})"))
            raise self._fail(
                "rejected",
                BadRequest(f"the vLLM {self.role} server refused the input ({detail})", code="engine_rejected"),
            )
        try:
            data = response.json()
            if not isinstance(data.get("choices"), list):
                raise ValueError("no choices")
        except ValueError:
            raise self._fail(
                "bad_response", BadGateway(f"the vLLM {self.role} server answered with no completion")
            ) from None
        return data  # type: ignore[no-any-return]

    async def answer_logprobs(
        self, prompt: list[int], answers: Sequence[Sequence[int]], encoded: EncodedPrompt | None = None
    ) -> list[list[float]]:
        """Per-token log-probs of each answer after `prompt`: prompt_logprobs on prompt + answer, last T positions."""
        body = {
            "prompt": [[*prompt, *answer] for answer in answers],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        data = await self.complete(body)
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != len(answers):
            raise self._fail("bad_response", BadGateway(f"the vLLM {self.role} server returned {len(choices)} choices"))
        out = []
        for answer, choice in zip(answers, choices, strict=True):
            positions = choice.get("prompt_logprobs") or []
            tail = positions[len(positions) - len(answer) :] if answer else []
            values = []
            for token, entry in zip(answer, tail, strict=True):
                found = _logprob_of(entry, token)
                if found is None:
                    raise self._fail(
                        "bad_response", BadGateway(f"the vLLM {self.role} server gave no log-prob for token {token}")
                    )
                values.append(found)
            if len(values) != len(answer):
                raise self._fail("bad_response", BadGateway(f"the vLLM {self.role} server returned too few positions"))
            out.append(values)
        return out


class InProcessReference:
    """RLAIFV_VLLM_REFERENCE=inprocess: the reference in this process, scored by the shared-prefix code.

    The prompt runs once and the N answers continue from its KV cache (`reward.logprobs.answer_logprobs`), where
    vLLM's prompt_logprobs re-runs the prompt for every answer (measured in docs/vllm.md). One thread owns it.
    """

    role = "reference"
    max_model_len: int | None = None

    def __init__(self, folder: Path, settings: Settings, tokenizer: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from rlaifv.reward.models import load_model

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        self.root = f"in process ({folder})"
        self.model = load_model(folder, device=settings.device, dtype=settings.dtype)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlaifv-reference")

    def start(self, wait_s: float) -> None:
        """Nothing to reach: the model is loaded."""

    async def probe(self) -> str:
        return "ok"

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def answer_logprobs(
        self, prompt: list[int], answers: Sequence[Sequence[int]], encoded: EncodedPrompt | None = None
    ) -> list[list[float]]:
        assert encoded is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._score, encoded, answers)

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

        manifest = read_manifest(bundle)
        if manifest.policy_type == "lora":
            raise VllmStartupError("the vllm engine serves full policies; serve a LoRA policy merged (docs/vllm.md)")
        policy_path, reference_path = resolve(bundle, manifest.policy), resolve(bundle, manifest.reference)
        check_tokenizers_match(policy_path, reference_path)
        self.processor = load_processor(reference_path, trust_remote_code=settings.trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        self._name = manifest.name
        self._reward = manifest.reward
        self.eot_id = end_of_turn_id(self.tokenizer, manifest.end_of_turn)
        try:
            eos = GenerationConfig.from_pretrained(str(policy_path)).eos_token_id
        except OSError:
            eos = None
        eos_ids = [] if eos is None else [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]
        self.stop_ids = sorted({self.eot_id, *eos_ids})
        self.blocked_ids = sorted(set(self.tokenizer.all_special_ids) - set(self.stop_ids))
        config = json.loads((policy_path / "config.json").read_text())
        text_config = config.get("text_config", config)
        self._max_positions: int | None = text_config.get("max_position_embeddings")
        assert settings.vllm_policy_url  # Settings checks it for engine=vllm
        self.policy = VllmServer("policy", settings.vllm_policy_url, settings.vllm_policy_model, settings, metrics)
        self.reference: VllmServer | InProcessReference
        if settings.vllm_reference == "inprocess":
            self.reference = InProcessReference(reference_path, settings, self.tokenizer)
        else:
            assert settings.vllm_reference_url
            self.reference = VllmServer(
                "reference", settings.vllm_reference_url, settings.vllm_reference_model, settings, metrics
            )
        self.wait_s = settings.vllm_wait_s

    def start(self) -> None:
        for server in (self.policy, self.reference):
            server.start(self.wait_s)
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

    async def run(self, requests: Sequence[Request]) -> list[EngineResult | Exception]:
        """Every request concurrently: vLLM batches them itself (continuous batching)."""
        outcomes = await asyncio.gather(*(self._one(r) for r in requests), return_exceptions=True)
        out: list[EngineResult | Exception] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            out.append(outcome)
        return out

    async def warmup(self) -> float:
        from rlaifv.reward.sampling import SamplingParams

        start = time.perf_counter()
        params = SamplingParams(temperature=1.0, max_tokens=2, seed=0)
        for request in (
            GenerateRequest([], "warm up", None, 2, params, self.reward),
            ScoreRequest([], "warm up", None, ["warm up"], self.reward, 8),
        ):
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
        """Nothing runs here; the HTTP clients are closed by `aclose` (Serving calls it when present)."""

    # -- one request ------------------------------------------------------------------

    def _prompt(self, request: Request) -> EncodedPrompt:
        from rlaifv.reward.prompt import encode_prompt

        if request.reward.mode == "claims":
            raise InvalidInputError(
                "the 'claims' reward needs the in-process labeler; the vllm engine ranks by the 'dpo' reward",
                param="reward.mode",
            )
        if request.images:
            # Token ids with expanded image placeholders but no pixels would be scored as plain text: refuse.
            raise InvalidInputError(
                "the vllm engine serves text prompts only in this version (images need the chat path of "
                "service.engines.vllm_payload, docs/vllm.md); use RLAIFV_ENGINE=transformers for images",
                param="images" if request.question is not None else "messages",
            )
        return encode_prompt(
            self.processor,
            request.images,
            request.question,
            messages=request.messages,
            max_length=self._max_positions,
        )

    async def _one(self, request: Request) -> EngineResult:
        prompt = self._prompt(request)
        ids = [int(t) for t in prompt.input_ids.tolist()]
        if isinstance(request, GenerateRequest):
            ranking = await self._generate(ids, request, prompt)
        else:
            ranking = await self._score(ids, request, prompt)
        return EngineResult(ranking, len(ids), 1)

    def _check_length(self, prompt: list[int], answer_len: int, param: str) -> None:
        limit = self._max_positions
        if limit is not None and len(prompt) + answer_len + 1 > limit:
            raise InvalidInputError(
                f"prompt ({len(prompt)} tokens) + answer ({answer_len}) exceeds the model's {limit} positions",
                param=param,
            )

    async def _score(self, prompt: list[int], request: ScoreRequest, encoded: EncodedPrompt) -> Ranking:
        from rlaifv.reward.prompt import encode_answer

        if not request.answers:
            raise InvalidInputError("answers must be a non-empty list", param="answers")
        answers = [
            encode_answer(self.tokenizer, text, eot_id=self.eot_id, max_tokens=request.max_tokens)
            for text in request.answers
        ]
        self._check_length(prompt, max(len(a) for a in answers), "answers")
        start = time.perf_counter()
        policy, reference = await asyncio.gather(
            self.policy.answer_logprobs(prompt, answers), self.reference.answer_logprobs(prompt, answers, encoded)
        )
        candidates = [
            _candidate(text, ids, sum(p), sum(r), request.reward, "given")
            for text, ids, p, r in zip(request.answers, answers, policy, reference, strict=True)
        ]
        return _ranking(candidates, {"score_s": time.perf_counter() - start})

    def _sampling_body(self, prompt: list[int], request: GenerateRequest) -> dict[str, Any]:
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
            "prompt": prompt,
            "n": request.n,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "logprobs": request.top_logprobs or 0,
            "return_tokens_as_token_ids": True,
            "stop_token_ids": self.stop_ids,
            "ignore_eos": False,
            "skip_special_tokens": True,
            "logit_bias": bias,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        return body

    async def _generate(self, prompt: list[int], request: GenerateRequest, encoded: EncodedPrompt) -> Ranking:
        from rlaifv.reward.prompt import encode_answer

        if request.n < 1:
            raise InvalidInputError("n must be at least 1", param="n")
        self._check_length(prompt, request.sampling.max_tokens, "max_tokens")
        start = time.perf_counter()
        body = self._sampling_body(prompt, request)
        greedy = request.sampling.temperature == 0  # vLLM refuses n > 1 when greedy: the N answers are one answer
        if greedy:
            body["n"] = 1
        data = await self.policy.complete(body)
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if len(choices) != body["n"]:
            raise BadGateway(f"the vLLM policy server returned {len(choices)} choices for n={body['n']}")
        if greedy:
            choices = choices * request.n
        samples = [self._sampled(choice) for choice in choices]
        sampled = time.perf_counter()
        answers: list[list[int]] = []
        for s in samples:
            if s.cut:  # the text before the stop string, a finished turn: what /v1/rewards scores for it
                answers.append(
                    encode_answer(self.tokenizer, s.text, eot_id=self.eot_id) if s.text.strip() else [self.eot_id]
                )
            else:
                answers.append(s.ids)
        cut = [i for i, s in enumerate(samples) if s.cut]
        calls = [self.reference.answer_logprobs(prompt, answers, encoded)]
        if cut:
            calls.append(self.policy.answer_logprobs(prompt, [answers[i] for i in cut]))
        results = await asyncio.gather(*calls)
        reference = results[0]
        policy = [s.logprobs for s in samples]
        if cut:
            for i, values in zip(cut, results[1], strict=True):
                policy[i] = values
        candidates = []
        for s, ids, p, r in zip(samples, answers, policy, reference, strict=True):
            text = s.text.strip() if s.cut else self._decode(ids)
            reason = "stop" if s.cut or s.finish_reason == "stop" else "length"
            candidate = _candidate(text, ids, sum(p), sum(r), request.reward, reason)
            if request.top_logprobs is not None:
                candidate.token_logprobs = self._token_logprobs(s, ids, p, request.top_logprobs)
            candidates.append(candidate)
        timings = {"generate_s": sampled - start, "score_s": time.perf_counter() - sampled}
        return _ranking(candidates, timings)

    def _sampled(self, choice: dict[str, Any]) -> _Sampled:
        logprobs = choice.get("logprobs") or {}
        tokens = logprobs.get("tokens") or []
        values = logprobs.get("token_logprobs") or []
        if len(tokens) != len(values):
            raise BadGateway("the vLLM policy server returned tokens and log-probs of different lengths")
        try:
            ids = [_token_id(str(t)) for t in tokens]
        except ValueError:
            raise BadGateway(
                "the vLLM policy server did not return token ids (needs vLLM >= 0.6: return_tokens_as_token_ids)"
            ) from None
        top = [
            sorted(((_token_id(str(k)), float(v)) for k, v in (alts or {}).items()), key=lambda kv: -kv[1])
            for alts in (logprobs.get("top_logprobs") or [{}] * len(ids))
        ]
        stop_reason = choice.get("stop_reason")
        cut = isinstance(stop_reason, str)  # a stop string (an int is a stop token id)
        finish = "stop" if cut or (ids and ids[-1] in self.stop_ids) else "length"
        return _Sampled(ids, [float(v) for v in values], finish, str(choice.get("text") or ""), cut, top)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)).strip()

    def _token_logprobs(self, sample: _Sampled, ids: list[int], policy: list[float], k: int) -> list[TokenLogprob]:
        """Per-token raw policy log-probs (end-of-turn excluded) with the server's top-k alternatives."""
        from rlaifv.reward.results import TokenLogprob, TopToken

        content = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        out = []
        for j, token in enumerate(content):
            alternatives = sample.top[j][:k] if k and not sample.cut and j < len(sample.top) else []
            out.append(
                TokenLogprob(
                    token=self._token_text(content, j, token),
                    token_id=token,
                    logprob=policy[j],
                    top_logprobs=[
                        TopToken(token=self._token_text(content, j, t), token_id=t, logprob=v) for t, v in alternatives
                    ],
                )
            )
        return out

    def _token_text(self, ids: Sequence[int], j: int, token: int) -> str:
        alone = str(self.tokenizer.decode([token], skip_special_tokens=False))
        if j == 0:
            return alone
        before = str(self.tokenizer.decode([ids[j - 1]], skip_special_tokens=False))
        both = str(self.tokenizer.decode([ids[j - 1], token], skip_special_tokens=False))
        return both[len(before) :] if both.startswith(before) else alone


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


def _ranking(candidates: list[Candidate], timings: dict[str, float]) -> Ranking:
    from rlaifv.reward.results import Ranking
    from rlaifv.reward.scoring import select_best

    return Ranking(candidates=candidates, best_index=select_best([c.reward for c in candidates]), timings=timings)


def load_vllm_engine(bundle: str, settings: Settings, metrics: Metrics | None = None) -> tuple[VllmEngine, float]:
    """The engine over the bundle's tokenizer and the configured servers, checked; returns it and the load time."""
    start = time.perf_counter()
    engine = VllmEngine(bundle, settings, metrics)
    engine.start()
    return engine, time.perf_counter() - start
