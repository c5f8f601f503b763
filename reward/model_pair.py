"""A policy and its reference, held together: the object that samples and scores.

`ModelPair` is what `load_bundle` returns and what the service's engine
drives. Batch methods take several prompts at once (the service micro-batches
requests through them); `best_of_n` and `score` are the one-prompt
conveniences of the in-process Python API.

Model calls are serialised per pair (a lock): a LoRA pair toggles its adapter to get
the reference, and shared-prefix attention switches the models' attention
implementation for the length of a call, so two calls at once from two threads
failed. Threads may share a pair; they take turns.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from pydantic import ValidationError

from rlaifv.reward.claims import (
    ClaimSplitter,
    QuestionWriter,
    RuleQuestionWriter,
    SpacyClaimSplitter,
    plan_claims,
    score_plans,
)
from rlaifv.reward.errors import AnswerError, ContextLengthError, InvalidInputError, ModelLoadError, Withdrawn
from rlaifv.reward.families import family_of
from rlaifv.reward.family_check import FamilyCheck, check_unverified_family
from rlaifv.reward.images import ImageLimits, load_image
from rlaifv.reward.logprobs import answer_logprobs, continuation_logits
from rlaifv.reward.models import max_positions
from rlaifv.reward.packed_weights import PackedLinears, PackMode, pack_linears
from rlaifv.reward.prompt import (
    EncodedPrompt,
    continuation_context,
    decoded_after,
    encode_answers,
    encode_prompt,
    end_of_turn_id,
    markup_ids,
    stop_cut_ids,
    tidy_answer,
    token_text,
)
from rlaifv.reward.results import Candidate, ClaimCheck, Ranking, TokenLogprob, TopToken
from rlaifv.reward.sampling import Sample, SamplingParams, fit_to_positions, sample_answers
from rlaifv.reward.scoring import RewardConfig, implicit_reward
from rlaifv.reward.yes_no import Labeler, YesNoJudge


@dataclass
class GenerateTask:
    """Sample `n` answers for one prompt and rank them.

    `images` (decoded PIL images of the prompt) are needed only by the
    'claims' reward mode, which asks the labeler about them. `top_logprobs`
    (None: none) asks for each candidate's per-token log-probs with that many
    alternatives (`Candidate.token_logprobs`).
    """

    prompt: EncodedPrompt
    n: int
    sampling: SamplingParams
    reward: RewardConfig
    images: list[Any] = field(default_factory=list)
    top_logprobs: int | None = None
    continue_final: bool = False
    """The prompt ends inside an assistant message the answers continue: their text keeps its leading space."""
    withdrawn: threading.Event | None = None
    """Set by the task's owner (from any thread) when nobody waits for it any more: see `generate_or_withdraw`."""


@dataclass
class _Answer:
    """A sample as the client receives it: cut at a stop string, or the sampled tokens as they are."""

    sample: Sample
    text: str
    ids: list[int]
    truncated: bool
    policy: torch.Tensor | None = None  # per-token policy log-probs of `ids`


@dataclass
class ScoreTask:
    """Rank given answers (token ids, end-of-turn appended) for one prompt."""

    prompt: EncodedPrompt
    answers: list[list[int]]
    texts: list[str]
    reward: RewardConfig
    images: list[Any] = field(default_factory=list)
    withdrawn: threading.Event | None = None
    """As `GenerateTask.withdrawn`."""


TaskT = TypeVar("TaskT", GenerateTask, ScoreTask)
CallT = TypeVar("CallT", bound=Callable[..., Any])
# The N answers of one prompt attend to each other's rows through an N x N mask per step: past this, one call's
# memory grows without a useful bound (n=10,000 took 1.2 GB, n=100,000 asked for 10 GB); call again for more.
MAX_N = 1024


def _serialised(method: CallT) -> CallT:
    """`method` run under the pair's lock (see the module docstring)."""

    @functools.wraps(method)
    def locked(self: ModelPair, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


def _is_withdrawn(task: GenerateTask | ScoreTask) -> bool:
    return task.withdrawn is not None and task.withdrawn.is_set()


def _wanted(tasks: Sequence[GenerateTask | ScoreTask], among: Iterable[int]) -> list[int]:
    """The positions in `among` of tasks not withdrawn by now: checked before each pass of a batch."""
    return [i for i in among if not _is_withdrawn(tasks[i])]


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class ModelPair:
    """pi_theta and pi_ref sharing one processor; the reference may be the policy's base (LoRA)."""

    def __init__(
        self,
        policy: Any,
        processor: Any,
        *,
        reference: Any | None = None,
        reward: RewardConfig | None = None,
        end_of_turn: str | None = None,
        name: str = "rlaifv",
        image_limits: ImageLimits | None = None,
        metadata: dict[str, Any] | None = None,
        labeler: Labeler | None = None,
        splitter: ClaimSplitter | None = None,
        question_writer: QuestionWriter | None = None,
        family_check: FamilyCheck = "refuse",
    ) -> None:
        if reference is None and not is_peft_model(policy):
            raise ValueError("a reference model is required unless the policy is a LoRA adapter over it")
        self.family = family_of(policy)  # refuses a family whose positions the engine would get wrong
        self.abort = threading.Event()  # set: sampling stops at its next step (a server stopping)
        self._lock = threading.RLock()
        self.policy = policy
        self.reference = reference
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.accepts_images: bool = getattr(processor, "accepts_images", True)  # False: a text-only pair
        self.reward = reward or RewardConfig()
        self.name = name
        self.image_limits = image_limits or ImageLimits()
        self.metadata = metadata or {}
        self._labeler = labeler
        self._splitter = splitter
        self.question_writer = question_writer or RuleQuestionWriter()
        self.eot_id = end_of_turn_id(self.tokenizer, end_of_turn, processor)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stop_ids = sorted({self.eot_id, *self._generation_eos_ids()})
        self.max_positions: int | None = max_positions(policy)
        # Rows past the tokenizer (an embedding resized to a multiple of 64) are no token: never sampled, and a
        # reference without them could not score one.
        tokens, rows = len(self.tokenizer), _vocab_rows(policy)
        reference_rows = _vocab_rows(reference) if reference is not None else rows
        if reference_rows is not None and reference_rows < tokens:
            raise ModelLoadError(
                f"the reference's output layer has {reference_rows} rows for a tokenizer of {tokens} tokens"
            )
        padding = range(tokens, rows) if rows is not None else range(0)
        self.blocked_ids = sorted((markup_ids(processor) - set(self.stop_ids)) | set(padding))
        self.packed: list[PackedLinears] = []
        check_unverified_family(
            policy,
            processor,
            accepts_images=self.accepts_images,
            pad_id=self.pad_id,
            stop_ids=self.stop_ids,
            on_failure=family_check,
        )

    def pack_weights(self, mode: PackMode = "auto") -> int:
        """Serve the CPU linears from packed weights (`reward.packed_weights`); returns the layers packed.

        For a pair that only serves: the trainer's gradient steps run plain either way, but the packed copies
        cost memory it does not need.
        """
        for handle in self.packed:
            handle.remove()
        self.packed = pack_linears([self.policy, self.reference], mode)
        return sum(handle.count for handle in self.packed)

    @contextmanager
    def plain_weights(self) -> Iterator[None]:
        """Run both models on their plain weights inside (what a caller without this engine would run)."""
        with ExitStack() as stack:
            for handle in self.packed:
                stack.enter_context(handle.suspend())
            yield

    @property
    def is_lora(self) -> bool:
        return self.reference is None

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def _generation_eos_ids(self) -> list[int]:
        eos = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]

    @property
    def labeler(self) -> Labeler:
        """The yes/no labeler of the 'claims' reward: the policy itself (self-feedback) unless one was given."""
        if self._labeler is None:
            self._labeler = YesNoJudge(self.policy, self.processor, lock=self._lock)
        return self._labeler

    @property
    def splitter(self) -> ClaimSplitter:
        if self._splitter is None:
            self._splitter = SpacyClaimSplitter()
        return self._splitter

    @contextmanager
    def reference_model(self) -> Iterator[Any]:
        """The reference: a separate model, or the policy with its LoRA adapter disabled."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    # -- encoding -------------------------------------------------------------

    def encode(
        self,
        images: Sequence[Any],
        question: str | None = None,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        continue_final: bool = False,
    ) -> EncodedPrompt:
        """The model's prompt (`reward.prompt.encode_prompt`); `continue_final`: answers continue the last
        (assistant) message."""
        return self._encode_loaded(self.load_images(images), question, messages=messages, continue_final=continue_final)

    def _encode_loaded(
        self,
        images: list[Any],
        question: str | None,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        continue_final: bool = False,
    ) -> EncodedPrompt:
        """`encode` for images `load_images` already returned (decoded once, kept for the claims labeler)."""
        return encode_prompt(
            self.processor,
            images,
            question,
            messages=messages,
            max_length=self.max_positions,
            continue_final=continue_final,
        )

    def load_images(self, images: Sequence[Any]) -> list[Any]:
        """PIL images from any accepted form, limits enforced (PIL images pass through)."""
        return [load_image(image, self.image_limits, param=f"images[{i}]") for i, image in enumerate(images)]

    def encode_answers(
        self, texts: Sequence[str], max_tokens: int | None = None, context: Sequence[int] = ()
    ) -> list[list[int]]:
        """Answers to score; `context`: they continue a message ending in these prompt tokens."""
        return encode_answers(self.processor, texts, eot_id=self.eot_id, max_tokens=max_tokens, context=context)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.raw_text(token_ids).strip()

    def raw_text(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> str:
        """The answer's text before stripping: what stop strings are searched in; read after `context` when it
        continues a message (`reward.prompt.decoded_after`)."""
        return decoded_after(self.tokenizer, [t for t in token_ids if t not in self.stop_ids], context)

    def check_logit_bias(self, bias: dict[int, float], param: str = "logit_bias") -> None:
        """Biased token ids must be in the tokenizer's vocabulary."""
        size = len(self.tokenizer)
        for token in bias:
            if not 0 <= token < size:
                raise InvalidInputError(
                    f"token id {token} is not in the vocabulary (0..{size - 1})", param=f"{param}.{token}"
                )

    # -- model work -----------------------------------------------------------

    @torch.no_grad()
    @_serialised
    def sequence_logprobs(
        self, prompts: Sequence[EncodedPrompt], answers: Sequence[Sequence[Sequence[int]]], *, reference: bool
    ) -> list[list[float]]:
        """Summed answer log-probs under the policy or the reference, shared prefix per prompt."""
        if reference:
            with self.reference_model() as model:
                per_token = answer_logprobs(model, prompts, answers, self.pad_id)
        else:
            per_token = answer_logprobs(self.policy, prompts, answers, self.pad_id)
        return [[float(t.double().sum()) for t in group] for group in per_token]

    @_serialised
    def sample(
        self,
        prompts: Sequence[EncodedPrompt],
        counts: Sequence[int],
        params: Sequence[SamplingParams],
        top_logprobs: Sequence[int] | None = None,
        contexts: Sequence[Sequence[int]] | None = None,
        withdrawn: Sequence[threading.Event | None] | None = None,
    ) -> list[list[Sample]]:
        """Sample counts[b] answers for prompts[b]; `contexts[b]`: the prompt tokens prompt b's answers continue
        (stop strings are then looked for in the text as it reads after them); `withdrawn` as in
        `sample_answers`."""
        for p in params:
            self.check_logit_bias(p.logit_bias)
        readers = [functools.partial(self.raw_text, context=c) for c in contexts] if contexts else self.raw_text
        samples: list[list[Sample]] = sample_answers(
            self.policy,
            prompts,
            counts,
            params,
            stop_ids=self.stop_ids,
            blocked_ids=self.blocked_ids,
            pad_id=self.pad_id,
            top_logprobs=top_logprobs,
            decode=readers,
            abort=self.abort,
            withdrawn=withdrawn,
        )
        return samples

    def _answer(self, sample: Sample, stop: Sequence[str], context: Sequence[int] = ()) -> _Answer:
        """Cut the text before the first stop string, as OpenAI does; the reward then scores the cut text.

        The cut text is re-tokenized with end-of-turn appended (a finished turn, exactly what /v1/rewards
        scores for it): the sampled tokens may straddle the cut, so no token prefix spells the text. A
        continuation (`context`: the prompt's last tokens) keeps its leading space, as the message it joins
        needs it. A tokenizer that cannot spell the cut text (a word-level vocabulary, the cut inside a word: its
        unknown token) cuts at the last whole sampled token before the stop string instead: the reward scores
        what the client receives, never the unknown token.
        """
        raw = self.raw_text(sample.token_ids, context)
        cuts = [i for i in (raw.find(s) for s in stop) if i >= 0]
        if not cuts:
            return _Answer(sample, tidy_answer(raw, context), list(sample.token_ids), False, sample.logprobs)
        text, ids = stop_cut_ids(
            self.tokenizer, raw[: min(cuts)], sample.token_ids, eot_id=self.eot_id, context=context
        )
        return _Answer(sample, text, ids, True)

    @torch.no_grad()
    def _finish_answers(self, prompts: Sequence[EncodedPrompt], answers: list[list[_Answer]]) -> None:
        """Policy log-probs of stop-truncated answers by teacher forcing (sampled ones were recorded)."""
        cut = [[a for a in group if a.truncated] for group in answers]
        if not any(cut):
            return
        forced = answer_logprobs(self.policy, prompts, [[a.ids for a in group] for group in cut], self.pad_id)
        for group, values in zip(cut, forced, strict=True):
            for answer, value in zip(group, values, strict=True):
                answer.policy = value.float().cpu()

    @torch.no_grad()
    def _token_logprobs(
        self, prompt: EncodedPrompt, answers: list[_Answer], k: int, lead: Sequence[int] = ()
    ) -> list[list[TokenLogprob]]:
        """Per-token raw policy log-probs of each answer (end-of-turn excluded) with the top-k alternatives.

        Alternatives come from the sampler where the answer's prefix is the sampled one (the same context);
        at positions of a re-tokenized answer where it is not, from a teacher-forced pass.
        """
        content = [a.ids[:-1] if a.ids and a.ids[-1] in self.stop_ids else a.ids for a in answers]
        forced: dict[tuple[int, int], int] = {}
        continuations: list[list[int]] = []
        if k:
            for i, (answer, ids) in enumerate(zip(answers, content, strict=True)):
                sampled = answer.sample.token_ids
                for j in range(1, len(ids)):
                    if not (j < len(sampled) and ids[:j] == sampled[:j]):
                        forced[(i, j)] = len(continuations)
                        continuations.append(ids[:j])
        forced_top: tuple[torch.Tensor, torch.Tensor] | None = None
        if continuations:
            logits = continuation_logits(self.policy, [prompt], [continuations], self.pad_id)[0]
            values, top_ids = logits.float().log_softmax(-1).topk(k, dim=-1)
            forced_top = (values.cpu(), top_ids.cpu())
        out = []
        memo: dict[tuple[int, ...], str] = {}
        for i, (answer, ids) in enumerate(zip(answers, content, strict=True)):
            assert answer.policy is not None
            tokens = []
            for j, token in enumerate(ids):
                top: list[TopToken] = []
                if k:
                    if (i, j) in forced and forced_top is not None:
                        values, top_ids = forced_top[0][forced[(i, j)]], forced_top[1][forced[(i, j)]]
                    else:
                        assert answer.sample.top_ids is not None and answer.sample.top_logprobs is not None
                        values, top_ids = answer.sample.top_logprobs[j], answer.sample.top_ids[j]
                    top = [
                        TopToken(token=self._token_text(ids, j, int(t), memo, lead), token_id=int(t), logprob=float(v))
                        for t, v in zip(top_ids.tolist(), values.tolist(), strict=True)
                    ]
                tokens.append(
                    TokenLogprob(
                        token=self._token_text(ids, j, token, memo, lead),
                        token_id=token,
                        logprob=float(answer.policy[j]),
                        top_logprobs=top,
                    )
                )
            out.append(tokens)
        return out

    def _token_text(
        self, ids: Sequence[int], j: int, token: int, memo: dict[tuple[int, ...], str], lead: Sequence[int] = ()
    ) -> str:
        """The text `token` adds at position j: decoded after its predecessor (for the first token of a
        continuation, the prompt's last token, `lead`), so word-start spaces survive."""
        previous = ids[j - 1] if j else (lead[-1] if lead else None)
        return token_text(lambda t: self._decode_one(t, memo), previous, token)

    def _decode_one(self, ids: tuple[int, ...], memo: dict[tuple[int, ...], str]) -> str:
        if ids not in memo:
            memo[ids] = str(self.tokenizer.decode(list(ids), skip_special_tokens=False))
        return memo[ids]

    def generate_batch(self, tasks: Sequence[GenerateTask]) -> list[Ranking]:
        """Best-of-N for several prompts: one sampling pass and one reference pass for all."""
        return _all_ranked(self.generate_or_withdraw(tasks))

    @_serialised
    def generate_or_withdraw(self, tasks: Sequence[GenerateTask]) -> list[Ranking | Withdrawn]:
        """`generate_batch` for tasks their owners may withdraw while it runs (`GenerateTask.withdrawn`): such a
        task's rows stop at the next decoding step, it is not scored, and its place holds `Withdrawn`."""
        for task in tasks:
            if task.n < 1:
                raise InvalidInputError("n must be at least 1", param="n")
        return _unless_withdrawn(tasks, self._generate)

    def _generate(self, tasks: Sequence[GenerateTask]) -> list[Ranking | None]:
        """Rankings of the tasks still wanted once sampled (None for those withdrawn meanwhile). A task withdrawn
        later leaves the passes after it (teacher forcing, reference, claims): the claims labeller was most of a
        'claims' request's time, and it ran on for a client that had left after sampling."""
        start = time.perf_counter()
        samples = self.sample(
            [task.prompt for task in tasks],
            [task.n for task in tasks],
            [task.sampling for task in tasks],
            top_logprobs=[task.top_logprobs or 0 for task in tasks],
            contexts=[continuation_context(task.prompt.input_ids, task.continue_final) for task in tasks],
            withdrawn=[task.withdrawn for task in tasks],
        )
        sampled = time.perf_counter()
        rankings: list[Ranking | None] = [None] * len(tasks)
        contexts = [continuation_context(task.prompt.input_ids, task.continue_final) for task in tasks]
        live = _wanted(tasks, range(len(tasks)))
        answers = {i: [self._answer(s, tasks[i].sampling.stop, contexts[i]) for s in samples[i]] for i in live}
        self._finish_answers([tasks[i].prompt for i in live], [answers[i] for i in live])
        live = _wanted(tasks, live)
        if not live:
            return rankings
        ref = self.sequence_logprobs(
            [tasks[i].prompt for i in live], [[a.ids for a in answers[i]] for i in live], reference=True
        )
        groups: dict[int, list[Candidate]] = {}
        for i, ref_group in zip(live, ref, strict=True):
            task, candidates = tasks[i], []
            for a, r in zip(answers[i], ref_group, strict=True):
                assert a.policy is not None
                reason = "stop" if a.truncated else a.sample.finish_reason
                candidates.append(
                    self._candidate(a.text, a.ids, float(a.policy.double().sum()), r, task.reward, reason)
                )
            if task.top_logprobs is not None and not _is_withdrawn(task):  # a forward pass per answer: not for nobody
                for candidate, tokens in zip(
                    candidates,
                    self._token_logprobs(task.prompt, answers[i], task.top_logprobs, contexts[i]),
                    strict=True,
                ):
                    candidate.token_logprobs = tokens
            groups[i] = candidates
        scored = time.perf_counter()
        live = _wanted(tasks, live)
        self._apply_claims([tasks[i] for i in live], [groups[i] for i in live])
        timings = {"generate_s": sampled - start, "score_s": scored - sampled}
        if any(tasks[i].reward.mode == "claims" for i in live):
            timings["claims_s"] = time.perf_counter() - scored
        for i in live:
            rankings[i] = Ranking.of(groups[i], timings)
        return rankings

    def score_batch(self, tasks: Sequence[ScoreTask]) -> list[Ranking]:
        """Rank given answers for several prompts: one policy pass and one reference pass for all."""
        return _all_ranked(self.score_or_withdraw(tasks))

    @_serialised
    def score_or_withdraw(self, tasks: Sequence[ScoreTask]) -> list[Ranking | Withdrawn]:
        """`score_batch` leaving out the tasks withdrawn before their passes (`ScoreTask.withdrawn`)."""
        return _unless_withdrawn(tasks, self._score)

    def _score(self, tasks: Sequence[ScoreTask]) -> list[Ranking | None]:
        """Rankings of the given answers (None for a task withdrawn before its reference pass or its claims)."""
        start = time.perf_counter()
        pol = self.sequence_logprobs([t.prompt for t in tasks], [t.answers for t in tasks], reference=False)
        live = _wanted(tasks, range(len(tasks)))
        rankings: list[Ranking | None] = [None] * len(tasks)
        if not live:
            return rankings
        ref = self.sequence_logprobs([tasks[i].prompt for i in live], [tasks[i].answers for i in live], reference=True)
        groups = {
            i: [
                self._candidate(text, ids, p, r, tasks[i].reward, "given")
                for text, ids, p, r in zip(tasks[i].texts, tasks[i].answers, pol[i], ref_group, strict=True)
            ]
            for i, ref_group in zip(live, ref, strict=True)
        }
        scored = time.perf_counter()
        live = _wanted(tasks, live)
        self._apply_claims([tasks[i] for i in live], [groups[i] for i in live])
        timings = {"score_s": scored - start}
        if any(tasks[i].reward.mode == "claims" for i in live):
            timings["claims_s"] = time.perf_counter() - scored
        for i in live:
            rankings[i] = Ranking.of(groups[i], timings)
        return rankings

    def _apply_claims(self, tasks: Sequence[GenerateTask | ScoreTask], groups: list[list[Candidate]]) -> None:
        """Replace the ranking reward by claim verification for tasks in 'claims' mode (one labeler batch)."""
        todo = [i for i, task in enumerate(tasks) if task.reward.mode == "claims"]
        if not todo:
            return
        for i in todo:
            if not tasks[i].images:
                raise InvalidInputError("the 'claims' reward needs the request's image", param="reward.mode")
        plans, items = {}, []
        for i in todo:
            plan, questions = plan_claims([c.text for c in groups[i]], self.splitter, self.question_writer)
            plans[i] = (plan, questions)
            items.append((tasks[i].images, questions))
        judge = self.labeler
        if hasattr(judge, "p_yes_batch"):
            answers = judge.p_yes_batch(items)
        else:
            answers = [judge.p_yes(images, questions) if questions else [] for images, questions in items]
        for i, p_yes in zip(todo, answers, strict=True):
            plan, questions = plans[i]
            verdicts = score_plans(
                plan,
                dict(zip(questions, p_yes, strict=True)),
                repeat_penalty=tasks[i].reward.repeat_penalty,
                threshold=tasks[i].reward.claim_threshold,
                scoring=tasks[i].reward.claim_score,
            )
            for candidate, verdict in zip(groups[i], verdicts, strict=True):
                candidate.reward = verdict.score
                candidate.claims = [ClaimCheck(**vars(c)) for c in verdict.claims]

    @staticmethod
    def _candidate(
        text: str,
        ids: Sequence[int],
        policy: float,
        reference: float,
        config: RewardConfig,
        reason: Literal["stop", "length", "given"],
    ) -> Candidate:
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

    # -- the in-process API ---------------------------------------------------

    def best_of_n(
        self,
        image: Any,
        question: str,
        n: int = 8,
        *,
        sampling: SamplingParams | None = None,
        reward: RewardConfig | Mapping[str, Any] | None = None,
        **sampling_kwargs: Any,
    ) -> Ranking:
        """Sample n answers to (image, question) and rank them by the RLAIF-V reward.

        `image` is a PIL image, bytes, a path or a base64/data-URL string (or a
        list of those). Extra keyword arguments build `SamplingParams`
        (temperature, top_p, top_k, max_tokens, seed).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"n must be a positive integer, got {n!r}", param="n")
        if n > MAX_N:
            raise InvalidInputError(f"n must be at most {MAX_N} in one call, got {n}; call again for more", param="n")
        if sampling is not None and sampling_kwargs:
            raise InvalidInputError(
                f"give sampling settings either as `sampling` or as keywords, not both ({', '.join(sampling_kwargs)})",
                param=next(iter(sampling_kwargs)),
            )
        params = sampling or _sampling_params(sampling_kwargs)
        config = self._reward_config(reward)
        images = self.load_images(_as_list(image))
        prompt = self._encode_loaded(images, _question(question))
        given = "max_tokens" if "max_tokens" in params.model_fields_set else None
        params = fit_to_positions(params, len(prompt), self.max_positions, given=given, prompt_param="question")
        self.check_logit_bias(params.logit_bias)
        return self.generate_batch([GenerateTask(prompt, n, params, config, images)])[0]

    def score(
        self,
        image: Any,
        question: str,
        answers: Sequence[str],
        *,
        reward: RewardConfig | Mapping[str, Any] | None = None,
    ) -> Ranking:
        """Rank answers (e.g. written by another model) for (image, question) by the RLAIF-V reward."""
        if isinstance(answers, str):
            raise AnswerError("answers must be a list of strings, not one string", param="answers")
        texts = list(answers)
        config = self._reward_config(reward)
        images = self.load_images(_as_list(image))
        prompt = self._encode_loaded(images, _question(question))
        encoded = self.encode_answers(texts)
        self.check_answer_room(len(prompt), encoded)
        return self.score_batch([ScoreTask(prompt, encoded, texts, config, images)])[0]

    def check_answer_room(self, prompt_tokens: int, answers: Sequence[Sequence[int]]) -> None:
        """Each answer must fit the model's positions after its prompt: past them the model reads positions it
        never learned, and its log-probs mean nothing (a 1602-token answer was scored on a 256-position model)."""
        limit = self.max_positions
        for k, answer in enumerate(answers):
            if limit is not None and prompt_tokens + len(answer) > limit:
                raise ContextLengthError(
                    f"prompt ({prompt_tokens} tokens) + answer ({len(answer)} tokens) exceed the model's {limit}"
                    " positions",
                    param=f"answers[{k}]",
                )

    def _reward_config(self, reward: RewardConfig | Mapping[str, Any] | None) -> RewardConfig:
        if reward is None:
            return self.reward
        if isinstance(reward, RewardConfig):
            return reward
        if isinstance(reward, Mapping):
            try:
                return RewardConfig.model_validate(dict(reward))
            except ValidationError as exc:
                raise InvalidInputError(f"reward: {_first_error(exc)}", param="reward") from None
        raise InvalidInputError(
            f"reward must be a RewardConfig or a dict of its fields, not {type(reward).__name__}", param="reward"
        )


def _vocab_rows(model: Any) -> int | None:
    """Rows of the model's output layer (its logits' width), None when it has none to ask."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _unless_withdrawn(
    tasks: Sequence[TaskT], run: Callable[[list[TaskT]], Sequence[Ranking | None]]
) -> list[Ranking | Withdrawn]:
    """`run` over the tasks still wanted; the place of one withdrawn before (or, `run` giving None, during) it
    holds `Withdrawn`."""
    kept = [i for i, task in enumerate(tasks) if not _is_withdrawn(task)]
    outcomes: list[Ranking | None] = [None] * len(tasks)
    if kept:
        for i, ranking in zip(kept, run([tasks[i] for i in kept]), strict=True):
            outcomes[i] = ranking
    return [
        outcome if outcome is not None else Withdrawn(f"task {i} of the batch was withdrawn while it ran")
        for i, outcome in enumerate(outcomes)
    ]


def _all_ranked(outcomes: Sequence[Ranking | Withdrawn]) -> list[Ranking]:
    """The batch methods' rankings: a task withdrawn there fails the call (its caller set the event)."""
    for outcome in outcomes:
        if isinstance(outcome, Withdrawn):
            raise outcome
    return [outcome for outcome in outcomes if isinstance(outcome, Ranking)]


def _question(question: Any) -> str:
    if not isinstance(question, str):
        raise InvalidInputError(f"question must be a string, not {type(question).__name__}", param="question")
    return question


def _sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """`SamplingParams` from the in-process API's keywords, a bad one named."""
    try:
        return SamplingParams(**fields)
    except ValidationError as exc:
        location = exc.errors()[0]["loc"]
        raise InvalidInputError(_first_error(exc), param=str(location[0]) if location else None) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def _as_list(image: Any) -> list[Any]:
    return list(image) if isinstance(image, list | tuple) else [image]
