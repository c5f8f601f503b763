"""Serving classes: turn validated wire requests into engine requests, and rankings into wire responses.

Routers stay thin: they fetch the `Serving` from `app.state` and call one method.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from pydantic import ValidationError

from rlaifv.reward.errors import InvalidInputError
from rlaifv.reward.prompt import BLANK_ANSWER, blank
from rlaifv.reward.scoring import top_k
from rlaifv.service.engines import GenerateRequest, ScoreRequest
from rlaifv.service.errors import (
    BadGateway,
    BadRequest,
    Checks,
    DeadlineExceeded,
    NotFound,
    QueuedTooLong,
    ServiceError,
)
from rlaifv.service.generator import Generated, openai_messages
from rlaifv.service.log_format import request_id_var
from rlaifv.service.protocol import (
    BestOfNRequest,
    BestOfNResponse,
    CandidateOut,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    GeneratorInfo,
    ImageLimitsInfo,
    ModelCard,
    RewardInfo,
    RewardOptions,
    RewardsRequest,
    RewardsResponse,
    RoleDelta,
    Timings,
    TokenLogprobOut,
    TopLogprobOut,
    Usage,
    convert_messages,
)
from rlaifv.service.redis_conn import Breaker
from rlaifv.service.scheduler import Outcome, wait_for_result
from rlaifv.service.shared_work import SharedWork

if TYPE_CHECKING:
    from rlaifv.reward.results import Candidate, Ranking, TopToken
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.reward.scoring import RewardConfig
    from rlaifv.service.cache import RewardCache
    from rlaifv.service.engines import Engine
    from rlaifv.service.generator import Generator
    from rlaifv.service.images import ImageLoader
    from rlaifv.service.metrics import Metrics
    from rlaifv.service.scheduler import Scheduler
    from rlaifv.service.settings import Settings


GENERATED_TOKEN_SLACK = 4
"""A generator's answers are scored up to this many times RLAIFV_MAX_TOKENS of the pair's tokens: the generator
stopped at max_tokens of its own tokenizer, which may split the same text into more tokens."""


log = logging.getLogger("rlaifv.service")


def _cached_response(hit: str | None) -> RewardsResponse | None:
    """A cached response, or None when there is none or it no longer parses: the cache in Redis outlives a
    rolling upgrade, and an entry an older version wrote is a miss, not a 500 for every such request."""
    if hit is None:
        return None
    try:
        return RewardsResponse.model_validate_json(hit)
    except ValidationError:
        log.warning("reward cache entry does not parse as this version's RewardsResponse; treated as a miss")
        return None


def _candidates(ranking: Ranking, finish_reasons: Sequence[str] | None = None) -> list[CandidateOut]:
    return [
        CandidateOut(
            index=i,
            text=c.text,
            reward=c.reward,
            implicit_reward=c.implicit_reward,
            claims=c.claims,
            policy_logprob=c.policy_logprob,
            reference_logprob=c.reference_logprob,
            num_tokens=c.num_tokens,
            finish_reason=finish_reasons[i] if finish_reasons else c.finish_reason,
        )
        for i, c in enumerate(ranking.candidates)
    ]


def _reward_info(options: RewardOptions, config: RewardConfig) -> RewardInfo:
    claim_score = config.claim_score if config.mode == "claims" else None
    return RewardInfo(mode=options.mode, beta=config.beta, normalize=config.normalize, claim_score=claim_score)


def _choice_logprobs(candidate: Candidate, token_bytes: Callable[[int, str], list[int]]) -> ChoiceLogprobs:
    def out(token: TopToken) -> TopLogprobOut:
        return TopLogprobOut(token=token.token, logprob=token.logprob, bytes=token_bytes(token.token_id, token.token))

    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(**out(t).model_dump(), top_logprobs=[out(top) for top in t.top_logprobs])
            for t in candidate.token_logprobs or []
        ]
    )


def chat_chunks(completion: ChatCompletionResponse, *, include_usage: bool) -> Iterator[ChatCompletionChunk]:
    """A finished completion as OpenAI's stream: per choice a role, a content and a finish_reason chunk.

    Best-of-N ranks complete answers, so nothing can be sent before the ranking; the stream exists for
    clients that only speak streaming. With `include_usage`, a last chunk carries usage and no choices.
    """
    usage = {"usage": None} if include_usage else {}
    base = {"id": completion.id, "created": completion.created, "model": completion.model}
    base |= {"service_tier": completion.service_tier}
    for choice in completion.choices:
        deltas = (
            ChunkChoice(index=choice.index, delta=RoleDelta(role="assistant")),
            ChunkChoice(index=choice.index, delta=ChunkDelta(content=choice.message.content), logprobs=choice.logprobs),
            ChunkChoice(
                index=choice.index, delta=ChunkDelta(), finish_reason=choice.finish_reason, reward=choice.reward
            ),
        )
        for delta in deltas:
            yield ChatCompletionChunk(**base, choices=[delta], **usage)
    if include_usage:
        yield ChatCompletionChunk(**base, choices=[], usage=completion.usage)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the request body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _same_for_identical(error: BaseException, *, job_item: bool = False) -> bool:
    """A scoring's failure that an identical request would meet too (an answer over the token limit: its 400), so
    the requests waiting for it get it at once instead of scoring again one after another; a full queue, a
    deadline or an engine fault may pass, and they try again. A batch job's item also meets a scoring that ran past
    its deadline: it would run past it again (identical items of one job start together)."""
    if isinstance(error, InvalidInputError):
        return True
    if job_item and isinstance(error, DeadlineExceeded) and not isinstance(error, QueuedTooLong):
        return True
    return isinstance(error, ServiceError) and 400 <= error.status < 500 and error.status not in (408, 429)


def _departure(request: Request | None) -> Callable[[], Awaitable[None]] | None:
    """What a wait watches for the client leaving (batch-job items have no client)."""
    return (lambda: _wait_for_disconnect(request)) if request is not None else None


T = TypeVar("T")


def _holding_images(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The request's decoded images count against the pixel budget until it ends (`ImageLoader.holding`)."""

    @functools.wraps(method)
    async def held(self: Serving, *args: Any, **kwargs: Any) -> T:
        with self.images.holding():
            return await method(self, *args, **kwargs)

    return held


class Serving:
    """The request handlers' logic, shared by the native and OpenAI-compatible routes."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        scheduler: Scheduler,
        images: ImageLoader,
        metrics: Metrics,
        cache: RewardCache | None = None,
        generator: Generator | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.scheduler = scheduler
        self.images = images
        self.metrics = metrics
        self.cache = cache
        self.generator = generator
        self.model_name = settings.model_name or engine.name
        self._scoring: dict[str, SharedWork[RewardsResponse]] = {}  # cache key -> its scoring now

    @classmethod
    def open(
        cls,
        settings: Settings,
        engine: Engine,
        metrics: Metrics,
        *,
        redis: Any = None,
        generator: Generator | None = None,
        breaker: Breaker | None = None,
    ) -> Serving:
        """The request path over a loaded engine: a started scheduler, the image loader and the reward cache
        (`breaker`: the one the rate limits use too, as they share the Redis).

        The service's lifespan and `rlaifv worker` both run requests through it; `aclose` undoes it.
        """
        from rlaifv.service.cache import RewardCache
        from rlaifv.service.images import ImageLoader
        from rlaifv.service.scheduler import Scheduler

        scheduler = Scheduler(
            engine,
            max_queue=settings.max_queue,
            max_queued_pixels=settings.max_queued_image_pixels,
            concurrency=engine.concurrent_batches,
            max_batch=settings.max_batch,
            batch_window_s=settings.batch_window_ms / 1000.0,
            batch_max_wait_s=settings.batch_max_wait_ms / 1000.0,
            retry_after_s=settings.retry_after_s,
            metrics=metrics,
        )
        scheduler.start()
        cache = (
            RewardCache(
                size=settings.cache_size,
                ttl_s=settings.cache_ttl_s,
                redis=redis,
                breaker=breaker or Breaker(settings.redis_retry_after_s, settings.redis_optional_timeout_s),
            )
            if settings.cache_size > 0
            else None
        )
        images = ImageLoader(settings, rejected=metrics.rejected.labels(reason="queue_full").inc)
        metrics.image_pixels.set_function(lambda: images.in_hand)
        return cls(settings, engine, scheduler, images, metrics, cache, generator)

    def liveness(self) -> str | None:
        """What keeps this process from serving until it restarts (see `Scheduler.stalled`), or None."""
        return self.scheduler.stalled(self.settings.engine_stall_s)

    async def aclose(self, grace_s: float | None = None) -> None:
        """Drain the queue (up to `grace_s`, the shutdown grace by default), then release images, the generator
        and the engine."""
        await self.scheduler.close(self.settings.shutdown_grace_s if grace_s is None else grace_s)
        scoring = [shared.task for shared in self._scoring.values() if not shared.task.done()]
        if scoring:  # ended by the scheduler's close, writing their cache entries: before the Redis client closes
            await asyncio.wait(scoring)
        await self.images.aclose()
        if self.generator is not None:
            await self.generator.aclose()
        aclose = getattr(self.engine, "aclose", None)  # an engine holding HTTP clients (vllm)
        if aclose is not None:
            await aclose()
        await asyncio.to_thread(self.engine.shutdown)

    @property
    def generator_info(self) -> GeneratorInfo | None:
        if self.generator is None:
            return None
        return GeneratorInfo(model=self.generator.model, url=self.generator.host)

    def check_model(self, model: str | None, *, generating: bool = False) -> None:
        """`generating`: the generator's model name is accepted too, for clients that name the model writing."""
        if generating and self.generator is not None and model == self.generator.model:
            return
        if model is not None and model != self.model_name:
            raise NotFound(
                f"model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def _check_n(self, n: int, param: str = "n") -> None:
        if n > self.settings.max_n:
            raise BadRequest(f"{param} must be <= {self.settings.max_n}, got {n}", param=param)

    async def _run(
        self,
        engine_request: GenerateRequest | ScoreRequest,
        request: Request | None,
        timeout_s: float | None = None,
        count_deadline: bool = True,
    ) -> Outcome:
        """Through the scheduler; `request` (absent for batch-job items) lets a client's departure cancel the work.
        `timeout_s`: what is left of the request's deadline (all of RLAIFV_REQUEST_TIMEOUT_S by default)."""
        timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
        return await self.scheduler.submit(
            engine_request, timeout_s=timeout, disconnected=_departure(request), count_deadline=count_deadline
        )

    async def _generate_elsewhere(
        self,
        images: list[Any],
        raw: list[bytes],
        question: str | None,
        messages: list[dict[str, Any]] | None,
        n: int,
        sampling: SamplingParams,
        config: RewardConfig,
        request: Request | None,
        need: int = 1,
        continue_final: bool = False,
    ) -> tuple[Outcome, list[Generated], float]:
        """The generator writes n answers; the pair scores them as /v1/rewards would (the same ScoreRequest).

        Empty answers cannot be scored (T would count only the end-of-turn token) and are left out; the
        outcome's candidates are the non-empty answers in the generator's order. With fewer than `need` left (a
        chat asking n choices), the generator is asked once more for the missing ones (with a seed, seeds it has
        not used yet), so a response never has fewer choices than asked. Returns the generator's time too.
        """
        assert self.generator is not None
        started = time.perf_counter()
        prompt = openai_messages(question, messages, raw)
        generate = self.generator.generate
        answers = await self._while_client_stays(generate(prompt, n, sampling, continue_final), request)
        answers = [a for a in answers if not blank(a.text)]
        if len(answers) < need:
            missing = n - len(answers)
            again = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + n})
            more = await self._while_client_stays(generate(prompt, missing, again, continue_final), request)
            answers += [a for a in more if not blank(a.text)][:missing]
        generate_s = time.perf_counter() - started
        if len(answers) < need:
            raise BadGateway(
                f"generator {self.generator.host} returned {len(answers)} non-empty answers, {need} needed",
                code="generator_empty",
            )
        max_tokens = self.settings.max_tokens * GENERATED_TOKEN_SLACK
        score = ScoreRequest(images, question, messages, [a.text for a in answers], config, max_tokens, continue_final)
        return await self._run(score, request), answers, generate_s

    async def _while_client_stays(self, work: Awaitable[T], request: Request | None) -> T:
        """`work`, cancelled if the client leaves first: a generator's answers were waited for (up to
        RLAIFV_GENERATOR_TIMEOUT_S, twice with the top-up) for a client long gone, its tokens paid for by nobody
        and the request's images held against the pixel budget. Cancelling closes the generator's connection,
        which vLLM and our own server take as an abort."""
        if request is None:
            return await work
        task = asyncio.ensure_future(work)
        try:
            return await wait_for_result(
                task, left_s=float("inf"), limit_s=0.0, disconnected=_departure(request), metrics=self.metrics
            )
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # its connection closed before the 499 is logged

    def _timings(self, outcome: Outcome, arrived: float, generate_s: float | None = None) -> Timings:
        t = outcome.result.ranking.timings
        return Timings(
            queue_s=outcome.queue_s,
            generate_s=t.get("generate_s", 0.0) if generate_s is None else generate_s,
            score_s=t.get("score_s", 0.0) + t.get("claims_s", 0.0),
            total_s=time.perf_counter() - arrived,
        )

    # -- POST /v1/best-of-n ------------------------------------------------------------

    @_holding_images
    async def best_of_n(self, body: BestOfNRequest, request: Request | None) -> BestOfNResponse:
        arrived = time.perf_counter()
        self.check_model(body.model, generating=True)
        checks = Checks()
        with checks.one():
            self._check_n(body.n)
        with checks.one():
            sampling = body.sampling.to_params(self.settings)
        with checks.one():
            config = body.reward.to_config(self.engine.reward)
        with checks.one():
            question, messages, refs = body.prompt(self.settings)
        checks.done()
        images, raw = await self.images.load(refs)
        generate_s: float | None = None
        finish_reasons: list[str] | None = None
        if self.generator is None:
            given = "sampling.max_tokens" if body.sampling.max_tokens is not None else None
            generate = GenerateRequest(
                images,
                question,
                messages,
                body.n,
                sampling,
                config,
                max_tokens_param=given,
                continue_final=body.continue_final_message,
            )
            outcome = await self._run(generate, request)
        else:
            outcome, answers, generate_s = await self._generate_elsewhere(
                images, raw, question, messages, body.n, sampling, config, request, 1, body.continue_final_message
            )
            finish_reasons = [a.finish_reason for a in answers]
        ranking = outcome.result.ranking
        candidates = _candidates(ranking, finish_reasons)
        generated = sum(c.num_tokens for c in candidates)
        self._account("best_of_n", outcome, generated=generated if self.generator is None else 0)
        return BestOfNResponse(
            id=f"bon-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            best_index=ranking.best_index,
            best=candidates[ranking.best_index],
            candidates=candidates,
            reward=_reward_info(body.reward, config),
            usage=Usage(
                prompt_tokens=outcome.result.prompt_tokens,
                completion_tokens=generated,
                total_tokens=outcome.result.prompt_tokens + generated,
            ),
            timings=self._timings(outcome, arrived, generate_s),
            generator=self.generator_info,
            scorer=self.model_name,
        )

    # -- POST /v1/rewards ------------------------------------------------------------------

    @_holding_images
    async def rewards(self, body: RewardsRequest, request: Request | None) -> RewardsResponse:
        arrived = time.perf_counter()
        self.check_model(body.model)
        checks = Checks()
        if len(body.answers) > self.settings.max_answers:
            checks.add(BadRequest(f"at most {self.settings.max_answers} answers per request", param="answers"))
        for i, answer in enumerate(body.answers[: self.settings.max_answers]):  # past it: one problem, not 5M
            with checks.one():
                if len(answer) > self.settings.max_answer_chars:
                    raise BadRequest(
                        f"answer is over {self.settings.max_answer_chars} characters", param=f"answers[{i}]"
                    )
                if blank(answer):
                    raise BadRequest(BLANK_ANSWER, param=f"answers[{i}]")
        with checks.one():
            config = body.reward.to_config(self.engine.reward)
        with checks.one():
            question, messages, refs = body.prompt(self.settings)
        checks.done()
        images, raw = await self.images.load(refs)
        started = time.perf_counter()  # RLAIFV_REQUEST_TIMEOUT_S runs from here, after the images (docs/service.md)
        scoring = functools.partial(self._score_rewards, body, arrived, started, images, question, messages, config)
        if self.cache is None:
            return await scoring(request)
        key = self.cache.key(
            self.model_name, config, raw, question, messages, body.answers, body.continue_final_message
        )
        cached = _cached_response(await self.cache.get(key))
        try:
            if cached is None:
                cached = await self._scored_meanwhile(key, started, request)
        finally:  # a refusal shared (or a departure while waiting) is a miss: scored, not from the cache
            self.metrics.cache.labels(result="hit" if cached else "miss").inc()
        if cached is not None:
            return cached.model_copy(
                update={"id": f"rwd-{uuid.uuid4().hex}", "cached": True, "created": int(time.time())}
            )
        # Tied to no client (`SharedWork` cancels it when no one waits); its deadline is counted by this request.
        work = self._score_and_keep(self.cache, key, scoring)
        shared = self._scoring[key] = SharedWork(work, self.metrics, owner=request_id_var.get())
        shared.task.add_done_callback(lambda _: self._done_scoring(key, shared))
        self.images.hand_over(shared.task)  # its images, scored for those still waiting after this client left
        # Its deadline is its scoring's (the scheduler's: QueuedTooLong when nothing ran, which batch jobs wait out).
        return await shared.result(disconnected=_departure(request))

    @staticmethod
    async def _score_and_keep(
        cache: RewardCache, key: str, scoring: Callable[..., Awaitable[RewardsResponse]]
    ) -> RewardsResponse:
        """The scoring identical requests share and its cache entry, written before any of them has the response:
        a client's next request, to any replica, finds it (written after the response, a replica asked at once
        missed and scored again). Waiting for the write is bounded by RLAIFV_REDIS_OPTIONAL_TIMEOUT_S. The scoring
        leaves `_scoring` only then: a request arriving in between found neither and scored it again."""
        response = await scoring(None, count_deadline=False)
        await cache.set(key, response.model_dump_json())
        return response

    def _done_scoring(self, key: str, shared: SharedWork[RewardsResponse]) -> None:
        if self._scoring.get(key) is shared:
            del self._scoring[key]

    async def _scored_meanwhile(self, key: str, started: float, request: Request | None) -> RewardsResponse | None:
        """The response of an identical request being scored now, once it is done (None: none is, or it failed):
        16 identical concurrent requests were 16 scorings, all cache misses. The wait is the request's own: within
        its deadline and only while its client stays (a chain of identical requests each waited for the one before
        with no deadline, then scored afresh with a whole one: the last of six answered a 2 s deadline at 12 s).
        Its departure leaves the scoring to those still waiting (`SharedWork`).

        A batch job's item (no client) waits for the scoring as long as it runs (its deadline bounds the wait) and
        fails as it does when it ran past its deadline: identical items of one job start together, and each one
        whose own deadline passed first scored again, ran past it again, one after another."""
        timeout = self.settings.request_timeout_s
        shares = functools.partial(_same_for_identical, job_item=request is None)
        while (shared := self._scoring.get(key)) is not None:
            owner = f"request {shared.owner}" if shared.owner else "batch-job item"  # (a job item has no request id)
            log.info("waiting on the scoring of an identical %s", owner, extra={"shared_with": shared.owner})
            left = float("inf") if request is None else started + timeout - time.perf_counter()
            response = await shared.result_if_any(
                left_s=left, limit_s=timeout, disconnected=_departure(request), shares=shares
            )
            if response is not None:
                return response
        return None

    async def _score_rewards(
        self,
        body: RewardsRequest,
        arrived: float,
        started: float,
        images: list[Any],
        question: str | None,
        messages: list[dict[str, Any]] | None,
        config: RewardConfig,
        request: Request | None,
        count_deadline: bool = True,
    ) -> RewardsResponse:
        score = ScoreRequest(
            images,
            question,
            messages,
            list(body.answers),
            config,
            self.settings.max_tokens,
            continue_final=body.continue_final_message,
        )
        left = started + self.settings.request_timeout_s - time.perf_counter()  # a wait for an identical one counts
        outcome = await self._run(score, request, max(0.0, left), count_deadline)
        ranking = outcome.result.ranking
        candidates = _candidates(ranking)
        scored = sum(c.num_tokens for c in candidates)
        self._account("rewards", outcome, generated=0)
        response = RewardsResponse(
            id=f"rwd-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            rewards=[c.reward for c in candidates],
            best_index=ranking.best_index,
            candidates=candidates,
            reward=_reward_info(body.reward, config),
            usage=Usage(
                prompt_tokens=outcome.result.prompt_tokens,
                completion_tokens=scored,
                total_tokens=outcome.result.prompt_tokens + scored,
            ),
            timings=self._timings(outcome, arrived),
        )
        return response

    # -- POST /v1/chat/completions -------------------------------------------------------------

    @_holding_images
    async def chat(self, body: ChatCompletionRequest, request: Request | None) -> ChatCompletionResponse:
        self.check_model(body.model, generating=True)
        checks = Checks()
        with checks.one():
            body.check_supported()
        if self.generator is not None and body.logprobs:
            checks.add(
                BadRequest(
                    "logprobs are not available when a generator writes the answers (RLAIFV_GENERATOR_URL): the "
                    "pair only scores them; each choice's policy_logprob is the pair's sum",
                    param="logprobs",
                    code="unsupported_parameter",
                )
            )
        with checks.one():
            best_of = body.candidates(self.settings)
        with checks.one():
            sampling = body.to_params(self.settings)
        with checks.one():
            config = (body.reward or RewardOptions()).to_config(self.engine.reward)
        with checks.one():
            messages, refs = convert_messages(body.messages, self.settings.max_question_chars)
            if len(refs) > self.settings.max_images:
                raise BadRequest(
                    f"at most {self.settings.max_images} images per request, got {len(refs)}", param="messages"
                )
        checks.done()
        images, raw = await self.images.load(refs)
        finish_reasons: list[str] | None = None
        if self.generator is None:
            generate = GenerateRequest(
                images,
                None,
                messages,
                best_of,
                sampling,
                config,
                top_logprobs=body.top_logprobs_asked(),
                max_tokens_param=body.max_tokens_param(),
                continue_final=body.continue_final_message,
            )
            outcome = await self._run(generate, request)
        else:
            outcome, answers, _ = await self._generate_elsewhere(
                images, raw, None, messages, best_of, sampling, config, request, body.n, body.continue_final_message
            )
            finish_reasons = [a.finish_reason for a in answers]
        ranking = outcome.result.ranking
        rewards = ranking.rewards
        generated = sum(c.num_tokens for c in ranking.candidates)
        self._account("chat", outcome, generated=generated if self.generator is None else 0)
        choices = []
        for rank, i in enumerate(top_k(rewards, body.n)):
            c = ranking.candidates[i]
            finish = finish_reasons[i] if finish_reasons else c.finish_reason
            choices.append(
                ChatChoice(
                    index=rank,
                    message=ChatMessageOut(content=c.text),
                    finish_reason="stop" if finish == "stop" else "length",
                    logprobs=_choice_logprobs(c, self.engine.token_bytes) if body.logprobs else None,
                    reward=c.reward,
                    policy_logprob=c.policy_logprob,
                    reference_logprob=c.reference_logprob,
                    num_tokens=c.num_tokens,
                )
            )
        prompt_tokens = outcome.result.prompt_tokens
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.model_name,
            choices=choices,
            usage=Usage(
                prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated
            ),
            best_of=best_of,
            rewards=rewards,
            service_tier="default" if body.service_tier is not None else None,
            generator=self.generator_info,
            scorer=self.model_name,
        )

    def _account(self, endpoint: str, outcome: Outcome, *, generated: int) -> None:
        ranking = outcome.result.ranking
        self.metrics.prompt_tokens.inc(outcome.result.prompt_tokens)
        self.metrics.generated_tokens.inc(generated)
        self.metrics.scored_tokens.inc(sum(c.num_tokens for c in ranking.candidates))
        self.metrics.observe_ranking(endpoint, ranking.rewards)

    def model_card(self, created: int) -> ModelCard:
        """The served model; `input_modalities` from the engine's `accepts_images` (both engines answer it from
        the bundle's processor; an engine without the attribute is taken to read images, as most bundles do), and
        the image limits, which the playground checks a file against before sending it."""
        default = self.engine.reward
        reward = RewardInfo(mode=default.mode, beta=default.beta, normalize=default.normalize)
        images = bool(getattr(self.engine, "accepts_images", True))
        limits = self.images.limits
        return ModelCard(
            id=self.model_name,
            created=created,
            reward=reward,
            max_positions=self.engine.max_positions,
            input_modalities=["text", "image"] if images else ["text"],
            image_limits=ImageLimitsInfo(
                formats=sorted(limits.allowed_formats),
                max_bytes=limits.max_bytes,
                max_pixels=limits.max_pixels,
                max_aspect=limits.max_aspect,
            )
            if images
            else None,
        )
