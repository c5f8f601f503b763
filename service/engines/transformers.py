"""The in-process `transformers` engine: a `ModelPair` driven from one dedicated worker thread.

Model calls are not thread-safe, so every call (encoding included: the fast
tokenizer is not re-entrant either) runs on the engine's single-thread
executor, never on the event loop. `run_batch` takes several requests of one
kind and runs them as one `generate_batch`/`score_batch` (one left-padded
prefill, one decode/score pass); a request whose input the core refuses fails
alone, the others still run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from rlaifv.reward.errors import InvalidInputError
from rlaifv.reward.prompt import continuation_context
from rlaifv.reward.token_bytes import TokenBytes
from rlaifv.service.engines.base import EngineResult, GenerateRequest, Request, ScoreRequest

if TYPE_CHECKING:
    from rlaifv.reward.family_check import FamilyCheck
    from rlaifv.reward.images import ImageLimits
    from rlaifv.reward.model_pair import ModelPair
    from rlaifv.reward.packed_weights import PackMode
    from rlaifv.reward.results import Ranking
    from rlaifv.reward.scoring import RewardConfig

T = TypeVar("T")
log = logging.getLogger("rlaifv.service")


def _every_answered(results: list[Ranking | Exception | None]) -> list[Ranking | Exception]:
    """Each request ends with a ranking or its own error; a gap is a bug in `run_batch`, not a result."""
    answered = [r for r in results if r is not None]
    if len(answered) != len(results):
        raise RuntimeError(f"{len(results) - len(answered)} of {len(results)} requests got no outcome")
    return answered


class TransformersEngine:
    """Owns the model pair and the one thread allowed to touch it (implements `service.engines.base.Engine`)."""

    def __init__(self, pair: ModelPair) -> None:
        self.pair = pair
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlaifv-model")
        self._bytes = TokenBytes(pair.tokenizer)

    @property
    def name(self) -> str:
        return self.pair.name

    @property
    def reward(self) -> RewardConfig:
        return self.pair.reward

    @property
    def max_positions(self) -> int | None:
        return self.pair.max_positions

    @property
    def accepts_images(self) -> bool:
        """False for a text-only pair (its requests take no images), as `VllmEngine.accepts_images`."""
        return self.pair.accepts_images

    @property
    def concurrent_batches(self) -> int:
        return 1  # one model thread: a batch is one forward pass; the next waits in the queue and batches there

    async def run(self, requests: Sequence[Request]) -> list[EngineResult | Exception]:
        return await self.call(self.run_batch, requests)

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        return self._bytes.bytes_of(token_id, text)

    async def warmup(self) -> float:
        return await self.call(self.warmup_sync)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        """Stops a batch still sampling at its next step (its requests were answered 503 already) and waits
        for the model thread: a long batch held the process past its grace, into the pod's SIGKILL."""
        self.pair.abort.set()
        try:
            self._executor.shutdown(wait=True, cancel_futures=True)
        finally:
            self.pair.abort.clear()  # the pair itself stays usable (another engine over it, in tests)

    # -- runs on the model thread ------------------------------------------------

    def run_batch(self, requests: Sequence[Request]) -> list[EngineResult | Exception]:
        """Encode each request, then run all valid ones in one batched pass."""
        from rlaifv.reward.model_pair import GenerateTask, ScoreTask

        results: list[Ranking | Exception | None] = [None] * len(requests)
        tasks: list[Any] = []
        index: list[int] = []
        lengths: list[int] = []
        for i, request in enumerate(requests):
            try:
                prompt = self.pair.encode(
                    request.images, request.question, messages=request.messages, continue_final=request.continue_final
                )
                if isinstance(request, GenerateRequest):
                    sampling = request.fitted(len(prompt), self.pair.max_positions)
                    self.pair.check_logit_bias(sampling.logit_bias)
                    tasks.append(
                        GenerateTask(
                            prompt,
                            request.n,
                            sampling,
                            request.reward,
                            images=request.images,
                            top_logprobs=request.top_logprobs,
                            continue_final=request.continue_final,
                            withdrawn=request.withdrawal.event,
                        )
                    )
                else:
                    context = continuation_context(prompt.input_ids, request.continue_final)
                    answers = self.pair.encode_answers(request.answers, max_tokens=request.max_tokens, context=context)
                    self.pair.check_answer_room(len(prompt), answers)
                    tasks.append(
                        ScoreTask(
                            prompt,
                            answers,
                            list(request.answers),
                            request.reward,
                            images=request.images,
                            withdrawn=request.withdrawal.event,
                        )
                    )
            except InvalidInputError as exc:
                results[i] = exc
                continue
            except Exception as exc:  # a bug this input found: it fails this request only, the batch runs on
                log.exception("encoding a request failed", exc_info=exc)
                results[i] = exc
                continue
            index.append(i)
            lengths.append(len(prompt))
        if tasks:
            for i, outcome in zip(index, self._run_tasks(tasks), strict=True):
                results[i] = outcome
        prompt_len = dict(zip(index, lengths, strict=True))
        return [
            EngineResult(r, prompt_len[i], len(tasks)) if not isinstance(r, Exception) else r
            for i, r in enumerate(_every_answered(results))
        ]

    def _run_tasks(self, tasks: list[Any]) -> list[Ranking | Exception]:
        from rlaifv.reward.errors import Aborted
        from rlaifv.reward.model_pair import GenerateTask

        run = self.pair.generate_or_withdraw if isinstance(tasks[0], GenerateTask) else self.pair.score_or_withdraw
        try:
            return list(run(tasks))
        except Aborted as exc:  # stopping: no culprit to isolate (each alone would be prefilled, then aborted)
            return [exc] * len(tasks)
        except Exception as exc:
            if len(tasks) == 1:
                return [exc]
            return [self._run_tasks([task])[0] for task in tasks]  # isolate the culprit; the others still run

    def warmup_sync(self) -> float:
        """One tiny best-of-2 and one scoring pass, so the first request pays no first-call costs."""
        from PIL import Image

        from rlaifv.reward.sampling import SamplingParams

        start = time.perf_counter()
        images = [Image.new("RGB", (32, 32), (200, 30, 30))] if self.pair.accepts_images else []
        params = SamplingParams(temperature=1.0, max_tokens=2, seed=0)
        batches = (
            [GenerateRequest(images, "warm up", None, 2, params, self.pair.reward)],
            [ScoreRequest(images, "warm up", None, ["warm up"], self.pair.reward, 8)],
        )
        for batch in batches:
            for outcome in self.run_batch(batch):
                if isinstance(outcome, Exception):
                    raise outcome
        return time.perf_counter() - start


def load_transformers_engine(
    bundle: str,
    *,
    device: str | None,
    dtype: str,
    trust_remote_code: bool,
    torch_threads: int | None = None,
    pack_weights: PackMode = "auto",
    family_check: FamilyCheck = "refuse",
    image_limits: ImageLimits | None = None,
) -> tuple[TransformersEngine, float]:
    """Load the bundle's pair (its CPU linears packed as `pack_weights` says); returns the engine and the
    load time in seconds."""
    from rlaifv.reward.bundle import load_bundle

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)

    start = time.perf_counter()
    pair = load_bundle(
        bundle, device=device, dtype=dtype, trust_remote_code=trust_remote_code, family_check=family_check
    )
    if image_limits is not None:  # the service's own, which its images were decoded with
        pair.image_limits = image_limits
    if layers := pair.pack_weights(pack_weights):
        extra_mb = sum(handle.extra_bytes for handle in pair.packed) / 2**20
        log.info("packed weights", extra={"layers": layers, "extra_mb": round(extra_mb, 1)})
    return TransformersEngine(pair), time.perf_counter() - start
