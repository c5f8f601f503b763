"""`Client` (blocking) and `AsyncClient` (asyncio): the I/O halves over `BaseClient`.

Each public method builds an `APICall` with the shared helpers of `_base_client` and hands it to
`_request`, the only place that sends, retries and sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import httpx

from . import _constants as C
from ._base_client import (
    NOT_GIVEN,
    APICall,
    Backoff,
    BaseClient,
    BodyCut,
    JobKind,
    NotGiven,
    Readiness,
    ResultsReading,
    Retrying,
    T,
    TimeoutTypes,
    Waiting,
    _job_path,
    asplit_lines,
    best_of_n_body,
    job_body,
    list_call,
    liveness_call,
    progress_line,
    readiness_call,
    score_body,
    split_lines,
    submission_headers,
    upload_call,
)
from ._exceptions import APIError
from ._images import ImageInput, MessageInput
from .types import BestOfN, Health, Job, JobList, JobResult, ModelList, Rewards

__all__ = ["AsyncClient", "Client"]

ProgressCallback = Callable[[Job], Any]
Normalize = Literal["mean", "sum"]
RewardMode = Literal["dpo", "claims"]
ClaimScore = Literal["count", "expected"]


class _ProgressBar:
    """`progress=True` of `jobs.wait`: one line on stderr, redrawn in place."""

    def __init__(self) -> None:
        self.stream = sys.stderr

    def __call__(self, job: Job) -> None:
        end = "\n" if job.done else ""
        self.stream.write("\r" + progress_line(job) + end)
        self.stream.flush()


def _progress_callbacks(on_progress: ProgressCallback | None, progress: bool) -> list[ProgressCallback]:
    return [cb for cb in (on_progress, _ProgressBar() if progress else None) if cb is not None]


class Client(BaseClient):
    """Blocking client of the RLAIF-V reward service.

    Args:
        base_url: Server root, e.g. ``http://localhost:8000`` (a final ``/v1``, as the ``openai`` client takes it, is
            dropped: the SDK's paths carry it). Default: env ``RLAIFV_BASE_URL``, else ``http://127.0.0.1:8000``.
        api_key: Sent as ``Authorization: Bearer <key>``. Default: env ``RLAIFV_API_KEY``; none when unset.
        timeout: Seconds (or an ``httpx.Timeout``: its ``read``) for a whole call, retries and their waits included;
            ``None`` waits forever. Default 180 s, 5 s to connect. A retry that would start past it is not made.
        max_retries: Retries after connection errors, 408, 429, 502, 503 and 504 (never other 4xx). Default 2. A
            server still loading (503 ``not_ready``) is waited out within ``timeout`` without counting.
        backoff: The retry schedule (exponential with jitter; the server's Retry-After wins, capped).
        default_headers: Extra headers sent with every request.
        http_client: Your own ``httpx.Client`` (proxies, transports, event hooks); you close it.

    Use it as a context manager, or call ``close()``::

        with Client() as client:
            result = client.best_of_n(image="cat.png", question="What is in the image?", n=8)
            print(result.best.text, result.rewards)
    """

    def __init__(
        self,
        *,
        base_url: str | httpx.URL | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = C.DEFAULT_TIMEOUT,
        max_retries: int = C.DEFAULT_MAX_RETRIES,
        backoff: Backoff | None = None,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=timeout)
        self.jobs = Jobs(self)

    def with_options(self, **options: Any) -> Client:
        """A copy with some constructor options changed (e.g. ``timeout=10, max_retries=0``), sharing the connection
        pool; closing the copy leaves the pool open."""
        http_client = options.pop("http_client", self._http)
        return Client(**(self._options() | options), http_client=http_client)

    def __copy__(self) -> Client:
        """`copy.copy(client)` is `with_options()`: a client sharing the pool without owning it, with its own
        `jobs` (a plain copy would close the original's pool on `close()` and send `jobs` calls through it)."""
        return self.with_options()

    def close(self) -> None:
        """Close the connection pool (unless you passed your own ``http_client``); later calls raise
        ``ClientClosedError``."""
        self._closed = True
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(self, call: APICall[T]) -> T:
        retrying = self._retrying(call)
        while True:
            request = self._build_request(self._http, call, retrying)
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                delay = retrying.delay(None, exc)
                if delay is None:
                    raise self._connection_error(exc, request, retrying.note) from exc
            else:
                if self._is_final(call, response):
                    return self._parse(call, response)
                response.read()
                delay = retrying.delay(response)
                if delay is None:
                    raise self._status_error(response, retrying.note)
                response.close()
            time.sleep(delay)

    def _stream_lines(self, call: APICall[Any], retrying: Retrying) -> Generator[str, None, None]:
        """The response body's lines as they arrive; retried like `_request` until the response starts, then
        `BodyCut` if the body breaks off."""
        while True:
            request = self._build_request(self._http, call, retrying)
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                delay = retrying.delay(None, exc)
                if delay is None:
                    raise self._connection_error(exc, request, retrying.note) from exc
            else:
                if response.is_success:
                    try:
                        yield from split_lines(response.iter_text())
                    except httpx.TransportError as exc:
                        raise BodyCut(exc, request) from exc
                    finally:
                        response.close()
                    return
                response.read()
                response.close()
                delay = retrying.delay(response)
                if delay is None:
                    raise self._status_error(response, retrying.note)
            time.sleep(delay)

    # -- the API ----------------------------------------------------------------------

    def best_of_n(
        self,
        *,
        image: ImageInput | None = None,
        images: Iterable[ImageInput] | None = None,
        question: str | None = None,
        messages: Sequence[MessageInput] | None = None,
        continue_final_message: bool | None = None,
        n: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        beta: float | None = None,
        normalize: Normalize | None = None,
        mode: RewardMode | None = None,
        claim_score: ClaimScore | None = None,
        repeat_penalty: float | None = None,
        model: str | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> BestOfN:
        """Sample ``n`` answers and return them all, scored by the RLAIF-V reward, the best one first in ``.best``.

        Give ``image`` (or ``images``) with ``question``, or OpenAI-style ``messages`` with ``image_url`` parts
        (``continue_final_message=True``: the answers continue their last, assistant, message). An image is a
        path, bytes, a binary file, a PIL image, a ``data:`` URL, or an ``http(s)://`` URL (fetched by the server
        when its operator allows the host). Arguments left ``None`` take the server's defaults (n=4,
        temperature=1, the bundle's beta, normalize='mean'). ``mode='claims'`` ranks by claim verification (each
        candidate then carries ``claims``), scored by ``claim_score`` ('count' of rejected claims, the server's
        default, or 'expected' hallucinated claims); ``implicit_reward`` is reported in both modes.

        Raises:
            InvalidRequestError: bad input (``.param`` names the field). RateLimitError / ServerError after
            retries. AuthenticationError / PermissionDeniedError. APIConnectionError / APITimeoutError.
        """
        body = best_of_n_body(
            model=model,
            image=image,
            images=images,
            question=question,
            messages=messages,
            continue_final_message=continue_final_message,
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            max_tokens=max_tokens,
            seed=seed,
            beta=beta,
            normalize=normalize,
            mode=mode,
            claim_score=claim_score,
            repeat_penalty=repeat_penalty,
        )
        return self._request(APICall("POST", "/v1/best-of-n", BestOfN, body, timeout=timeout, headers=extra_headers))

    def score(
        self,
        *,
        answers: Iterable[str],
        image: ImageInput | None = None,
        images: Iterable[ImageInput] | None = None,
        question: str | None = None,
        messages: Sequence[MessageInput] | None = None,
        continue_final_message: bool | None = None,
        beta: float | None = None,
        normalize: Normalize | None = None,
        mode: RewardMode | None = None,
        claim_score: ClaimScore | None = None,
        repeat_penalty: float | None = None,
        model: str | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Rewards:
        """Score given ``answers`` (e.g. from another model) for the image(s) and question; rerank by ``.rewards``.

        Images and prompt as in ``best_of_n``. Deterministic: the server may answer from its cache (``.cached``).
        """
        body = score_body(
            answers=answers,
            model=model,
            image=image,
            images=images,
            question=question,
            messages=messages,
            continue_final_message=continue_final_message,
            beta=beta,
            normalize=normalize,
            mode=mode,
            claim_score=claim_score,
            repeat_penalty=repeat_penalty,
        )
        return self._request(APICall("POST", "/v1/rewards", Rewards, body, timeout=timeout, headers=extra_headers))

    def models(self, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> ModelList:
        """The served model(s) with their reward settings (``GET /v1/models``); iterate it for ``Model`` objects."""
        return self._request(APICall("GET", "/v1/models", ModelList, timeout=timeout))

    def health(self, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> Health:
        """Liveness (``GET /healthz``): ``status='ok'``, or ``'unavailable'`` with the failed ``checks`` when the
        server answers 503 (returned, not raised)."""
        return self._request(liveness_call(timeout))

    def ready(self, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> Health:
        """Readiness (``GET /readyz``): model loaded and warm. Returns ``status='unavailable'`` instead of raising
        when the server says 503, and does not retry (``wait_until_ready`` polls until ready)."""
        return self._request(readiness_call(timeout))

    def wait_until_ready(
        self, *, timeout: float | None = C.DEFAULT_READY_TIMEOUT, poll_interval: float = C.DEFAULT_POLL_INTERVAL
    ) -> Health:
        """Poll ``GET /readyz`` until the server is ready (its model loaded), and return its ``Health``.

        Meanwhile the server answers 503 ``not_ready`` to API calls (``rlaifv serve`` answers while it loads, which
        takes minutes for a 7B pair or vLLM servers). A poll that finds it loading or shutting down, gets no answer
        (not listening yet, restarting) or a 502/504 (an ingress with no ready pod) is polled again; another error
        (a 404: no such route at ``base_url``) is raised.

        Args:
            timeout: Give up after this many seconds with ``WaitTimeoutError`` naming what the server was waiting
                for (``model: loading``) or why the last poll failed. None: no limit. Default 600.
            poll_interval: Seconds between polls (> 0).
        """
        readiness = Readiness(self.base_url, poll_interval, timeout, self.timeout)
        while True:
            try:
                health = self._request(readiness.call())
            except APIError as exc:
                readiness.failed(exc)
            else:
                if readiness.answered(health):
                    return health
            time.sleep(readiness.pause())


class Jobs:
    """Durable batch jobs (``client.jobs``): submit many best-of-N or scoring requests, poll, read results."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        kind: JobKind = "best_of_n",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit a durable batch job and return it (status ``queued``). Each item holds the keyword arguments of
        ``best_of_n`` (``kind='best_of_n'``, e.g. ``{"image": "cat.png", "question": "...", "n": 8}``) or of ``score``
        (``kind='rewards'``); images are encoded here. ``metadata`` is stored with the job (string values)."""
        body = job_body(kind, items, metadata)
        headers = submission_headers(idempotency_key, extra_headers)
        call = APICall("POST", "/v1/jobs", Job, body, timeout=timeout, headers=headers)
        return self._client._request(call)

    def get(self, job_id: str | Job, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> Job:
        """The job's current status and counts."""
        return self._client._request(APICall("GET", _job_path(job_id), Job, timeout=timeout))

    def cancel(self, job_id: str | Job, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> Job:
        """Cancel the job (``DELETE /v1/jobs/{id}``); items already finished keep their results."""
        return self._client._request(APICall("DELETE", _job_path(job_id), Job, timeout=timeout))

    def list(
        self,
        *,
        limit: int | None = None,
        after: str | Job | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
    ) -> JobList:
        """One page of your jobs (those of this API key), newest first: ``GET /v1/jobs``.

        Args:
            limit: Jobs per page, 1 to 100 (the server's default: 20).
            after: A job (or its id) of the previous page, usually its ``last_id``: the page starts after it. One
                that is not yours or has expired raises ``InvalidRequestError`` (``param='after'``).

        While ``page.has_more``, ``jobs.list(after=page.last_id)`` is the next page."""
        return self._client._request(list_call(limit, after, timeout))

    def wait(
        self,
        job_id: str | Job,
        *,
        poll_interval: float = C.DEFAULT_POLL_INTERVAL,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        progress: bool = False,
    ) -> Job:
        """Poll until the job is succeeded, failed or cancelled, and return it (check ``.status``).

        Args:
            poll_interval: Seconds between polls (> 0, at most 10); longer after a refused poll whose
                ``Retry-After`` asks for longer (every poll counts against the key's rate limit).
            timeout: Give up after this many seconds with ``WaitTimeoutError`` (the job goes on; the poll at the
                deadline may take up to 1 s more); a poll that fails meanwhile (no answer, 429, 5xx but 500) is
                polled again. None: no limit (polls retried as any call, then their error raised; a 429 is waited
                out and polled again, as a rate limit always lifts).
            on_progress: Called with the ``Job`` after every poll.
            progress: Draw a progress bar on stderr.
        """
        waiting = Waiting(job_id, poll_interval, timeout, self._client.timeout)
        callbacks = _progress_callbacks(on_progress, progress)
        while True:
            try:
                job = self._client._request(waiting.call())
            except APIError as exc:
                waiting.failed(exc)
            else:
                for callback in callbacks:
                    callback(job)
                if waiting.answered(job):
                    return job
            time.sleep(waiting.pause())

    def submit_file(
        self,
        path: str | os.PathLike[str] | bytes,
        *,
        kind: JobKind = "best_of_n",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit a JSONL file (a path, or its bytes) as a job: one request body per line, exactly as the server
        takes it, or ``{"custom_id": "...", "body": {...}}``. Safe to retry, like ``submit``. A path must name a
        regular file of at most 16 MiB, the server's default upload limit (``InvalidArgumentError`` otherwise)."""
        return self._client._request(
            upload_call(path, kind, metadata, timeout, submission_headers(idempotency_key, extra_headers))
        )

    def results(
        self, job_id: str | Job, *, after: int | None = None, timeout: TimeoutTypes | NotGiven = NOT_GIVEN
    ) -> Generator[JobResult, None, None]:
        """Iterate over the job's results so far, in item order (each a ``BestOfN``/``Rewards`` or an error, with
        the item's ``custom_id``). Streamed as JSONL and parsed line by line, so a job of any size costs the memory
        of one result; items without a result yet are left out, so call after ``wait`` for all of them. A
        generator: ``close()`` it (``contextlib.closing``) to release the stream when stopping early.

        ``after``: only the results of items after this index. A stream cut part-way is read on from the last
        result yielded, within the retries and the timeout; ``APIConnectionError`` says how many were read."""
        reading = ResultsReading(self._client, job_id, after, timeout)
        while True:
            call = reading.call()
            try:
                with contextlib.closing(self._client._stream_lines(call, reading.retrying)) as lines:
                    for line in lines:
                        result = reading.take(call, line)
                        if result is not None:
                            yield result
                return
            except BodyCut as cut:
                delay = reading.cut(cut)
                if delay is None:
                    raise reading.gave_up(cut) from cut.error
            time.sleep(delay)


class AsyncClient(BaseClient):
    """Asyncio client of the RLAIF-V reward service; the same API as ``Client`` with ``await``.

    Args: as ``Client`` (``http_client`` is an ``httpx.AsyncClient``). Env fallbacks ``RLAIFV_BASE_URL``,
    ``RLAIFV_API_KEY``. Use ``async with AsyncClient() as client:`` or ``await client.aclose()``.
    """

    def __init__(
        self,
        *,
        base_url: str | httpx.URL | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = C.DEFAULT_TIMEOUT,
        max_retries: int = C.DEFAULT_MAX_RETRIES,
        backoff: Backoff | None = None,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(timeout=timeout)
        self.jobs = AsyncJobs(self)

    def with_options(self, **options: Any) -> AsyncClient:
        """A copy with some constructor options changed, sharing the connection pool."""
        http_client = options.pop("http_client", self._http)
        return AsyncClient(**(self._options() | options), http_client=http_client)

    def __copy__(self) -> AsyncClient:
        """`copy.copy(client)` is `with_options()`: a client sharing the pool without owning it. See
        ``Client.__copy__``."""
        return self.with_options()

    async def aclose(self) -> None:
        """Close the connection pool (unless you passed your own ``http_client``); later calls raise
        ``ClientClosedError``."""
        self._closed = True
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _request(self, call: APICall[T]) -> T:
        retrying = self._retrying(call)
        while True:
            request = self._build_request(self._http, call, retrying)
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                delay = retrying.delay(None, exc)
                if delay is None:
                    raise self._connection_error(exc, request, retrying.note) from exc
            else:
                if self._is_final(call, response):
                    return self._parse(call, response)
                await response.aread()
                delay = retrying.delay(response)
                if delay is None:
                    raise self._status_error(response, retrying.note)
                await response.aclose()
            await asyncio.sleep(delay)

    async def _stream_lines(self, call: APICall[Any], retrying: Retrying) -> AsyncGenerator[str, None]:
        """The response body's lines as they arrive; retried like `_request` until the response starts, then
        `BodyCut` if the body breaks off."""
        while True:
            request = self._build_request(self._http, call, retrying)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                delay = retrying.delay(None, exc)
                if delay is None:
                    raise self._connection_error(exc, request, retrying.note) from exc
            else:
                if response.is_success:
                    try:
                        async for line in asplit_lines(response.aiter_text()):
                            yield line
                    except httpx.TransportError as exc:
                        raise BodyCut(exc, request) from exc
                    finally:
                        await response.aclose()
                    return
                await response.aread()
                await response.aclose()
                delay = retrying.delay(response)
                if delay is None:
                    raise self._status_error(response, retrying.note)
            await asyncio.sleep(delay)

    # -- the API ----------------------------------------------------------------------

    async def best_of_n(
        self,
        *,
        image: ImageInput | None = None,
        images: Iterable[ImageInput] | None = None,
        question: str | None = None,
        messages: Sequence[MessageInput] | None = None,
        continue_final_message: bool | None = None,
        n: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        beta: float | None = None,
        normalize: Normalize | None = None,
        mode: RewardMode | None = None,
        claim_score: ClaimScore | None = None,
        repeat_penalty: float | None = None,
        model: str | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> BestOfN:
        """Sample ``n`` answers, score them by the RLAIF-V reward, return all with the best in ``.best``.
        See ``Client.best_of_n``."""
        body = best_of_n_body(
            model=model,
            image=image,
            images=images,
            question=question,
            messages=messages,
            continue_final_message=continue_final_message,
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            max_tokens=max_tokens,
            seed=seed,
            beta=beta,
            normalize=normalize,
            mode=mode,
            claim_score=claim_score,
            repeat_penalty=repeat_penalty,
        )
        return await self._request(
            APICall("POST", "/v1/best-of-n", BestOfN, body, timeout=timeout, headers=extra_headers)
        )

    async def score(
        self,
        *,
        answers: Iterable[str],
        image: ImageInput | None = None,
        images: Iterable[ImageInput] | None = None,
        question: str | None = None,
        messages: Sequence[MessageInput] | None = None,
        continue_final_message: bool | None = None,
        beta: float | None = None,
        normalize: Normalize | None = None,
        mode: RewardMode | None = None,
        claim_score: ClaimScore | None = None,
        repeat_penalty: float | None = None,
        model: str | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Rewards:
        """Score given ``answers`` for the image(s) and question. See ``Client.score``."""
        body = score_body(
            answers=answers,
            model=model,
            image=image,
            images=images,
            question=question,
            messages=messages,
            continue_final_message=continue_final_message,
            beta=beta,
            normalize=normalize,
            mode=mode,
            claim_score=claim_score,
            repeat_penalty=repeat_penalty,
        )
        return await self._request(
            APICall("POST", "/v1/rewards", Rewards, body, timeout=timeout, headers=extra_headers)
        )

    async def models(self, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> ModelList:
        """The served model(s) with their reward settings (``GET /v1/models``)."""
        return await self._request(APICall("GET", "/v1/models", ModelList, timeout=timeout))

    async def health(self, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> Health:
        """Liveness (``GET /healthz``); ``status='unavailable'`` with the failed checks on 503."""
        return await self._request(liveness_call(timeout))

    async def ready(self, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> Health:
        """Readiness (``GET /readyz``); ``status='unavailable'`` on 503, no retries."""
        return await self._request(readiness_call(timeout))

    async def wait_until_ready(
        self, *, timeout: float | None = C.DEFAULT_READY_TIMEOUT, poll_interval: float = C.DEFAULT_POLL_INTERVAL
    ) -> Health:
        """Poll ``GET /readyz`` until the server is ready, and return its ``Health``. See
        ``Client.wait_until_ready``."""
        readiness = Readiness(self.base_url, poll_interval, timeout, self.timeout)
        while True:
            try:
                health = await self._request(readiness.call())
            except APIError as exc:
                readiness.failed(exc)
            else:
                if readiness.answered(health):
                    return health
            await asyncio.sleep(readiness.pause())


class AsyncJobs:
    """Durable batch jobs (``client.jobs``) for ``AsyncClient``. See ``Jobs``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def submit(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        kind: JobKind = "best_of_n",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit a durable batch job; each item holds the keyword arguments of ``best_of_n`` or ``score``
        (``kind='best_of_n'`` or ``'rewards'``). See ``Jobs.submit``."""
        body = job_body(kind, items, metadata)
        headers = submission_headers(idempotency_key, extra_headers)
        call = APICall("POST", "/v1/jobs", Job, body, timeout=timeout, headers=headers)
        return await self._client._request(call)

    async def submit_file(
        self,
        path: str | os.PathLike[str] | bytes,
        *,
        kind: JobKind = "best_of_n",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit a JSONL file (a path, or its bytes) as a job. See ``Jobs.submit_file``."""
        return await self._client._request(
            upload_call(path, kind, metadata, timeout, submission_headers(idempotency_key, extra_headers))
        )

    async def get(self, job_id: str | Job, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> Job:
        """The job's current status and counts."""
        return await self._client._request(APICall("GET", _job_path(job_id), Job, timeout=timeout))

    async def cancel(self, job_id: str | Job, *, timeout: TimeoutTypes | NotGiven = NOT_GIVEN) -> Job:
        """Cancel the job; items already finished keep their results."""
        return await self._client._request(APICall("DELETE", _job_path(job_id), Job, timeout=timeout))

    async def list(
        self,
        *,
        limit: int | None = None,
        after: str | Job | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
    ) -> JobList:
        """One page of your jobs, newest first (``GET /v1/jobs``). See ``Jobs.list``."""
        return await self._client._request(list_call(limit, after, timeout))

    async def wait(
        self,
        job_id: str | Job,
        *,
        poll_interval: float = C.DEFAULT_POLL_INTERVAL,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        progress: bool = False,
    ) -> Job:
        """Poll until the job is done and return it. See ``Jobs.wait``; ``on_progress`` may be a coroutine function."""
        waiting = Waiting(job_id, poll_interval, timeout, self._client.timeout)
        callbacks = _progress_callbacks(on_progress, progress)
        while True:
            try:
                job = await self._client._request(waiting.call())
            except APIError as exc:
                waiting.failed(exc)
            else:
                for callback in callbacks:
                    outcome = callback(job)
                    if asyncio.iscoroutine(outcome):
                        await outcome
                if waiting.answered(job):
                    return job
            await asyncio.sleep(waiting.pause())

    async def results(
        self, job_id: str | Job, *, after: int | None = None, timeout: TimeoutTypes | NotGiven = NOT_GIVEN
    ) -> AsyncGenerator[JobResult, None]:
        """Iterate (``async for``) over the job's results so far, in item order, streamed, read on across a cut
        stream. See ``Jobs.results``.

        To stop early, close it (``async with contextlib.aclosing(client.jobs.results(job)) as results:``): the
        stream's connection is released at once, not when the event loop finalizes the abandoned generator."""
        reading = ResultsReading(self._client, job_id, after, timeout)
        while True:
            call = reading.call()
            try:
                async with contextlib.aclosing(self._client._stream_lines(call, reading.retrying)) as lines:
                    async for line in lines:
                        result = reading.take(call, line)
                        if result is not None:
                            yield result
                return
            except BodyCut as cut:
                delay = reading.cut(cut)
                if delay is None:
                    raise reading.gave_up(cut) from cut.error
            await asyncio.sleep(delay)
