"""Divide-and-conquer AI feedback: sample candidates, verify their claims, score them.

    prompt --policy, same SamplingParams for all N--> N candidates
    candidate --splitter--> claims --writer--> yes/no questions --labeler--> p(yes)
    score = -(rejected claims) - repeat_penalty * (repeated claims)

Scoring is `reward.claims.verify_answers`, the function behind the service's
`claims` reward mode, so feedback and serving score an answer identically.
The labeler is the policy itself (self-feedback) or a separate model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaifv.reward.prompt import blank
from rlaifv.trainer.data import PromptItem, image_bytes, prompt_text, write_json
from rlaifv.trainer.errors import DataError, TrainingInterrupted
from rlaifv.trainer.feedback_config import FeedbackConfig
from rlaifv.trainer.image_spill import ImageSpill
from rlaifv.trainer.interrupt import stop_on_sigterm

TRUNCATED_WARNING = 0.2  # share of candidates dropped as truncated above which a run is warned
NO_CLAIMS_WARNING = 0.5  # share of answers the LLM splitter finds no claim in above which a run is warned...
NO_CLAIMS_MIN_ANSWERS = 8  # ...once it has split this many

if TYPE_CHECKING:
    from rlaifv.reward.claims import ClaimSplitter, QuestionWriter
    from rlaifv.reward.yes_no import Labeler

FEEDBACK_FILE = "feedback.parquet"
FEEDBACK_PARTIAL = "feedback.partial"


@dataclass
class ScoredAnswer:
    text: str
    score: float
    rejected: int
    repeated: int
    claims: list[dict[str, Any]] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str = "given"

    @property
    def num_claims(self) -> int:
        return len(self.claims)


@dataclass
class PromptFeedback:
    """Scored candidates for one prompt; `dropped` counts empty/truncated samples left out."""

    id: str
    image: bytes | memoryview
    question: str
    answers: list[ScoredAnswer]
    dropped: int = 0


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed derived from the run seed and the prompt id (stable across resumes)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "little")


def make_splitter_and_writer(config: FeedbackConfig) -> tuple[ClaimSplitter, QuestionWriter]:
    """The configured claim splitter and question writer (spaCy rules by default)."""
    from rlaifv.reward.claims import RuleQuestionWriter, SpacyClaimSplitter
    from rlaifv.trainer.llm_rewriter import make_llm_rewriters

    llm_splitter, llm_writer = make_llm_rewriters(config)
    return llm_splitter or SpacyClaimSplitter(), llm_writer or RuleQuestionWriter()


def make_labeler(config: FeedbackConfig, policy: Any, processor: Any, device: str | None = None) -> Labeler:
    """Self-feedback (the policy judges) or a separate labeler model loaded from `config.labeler`."""
    from rlaifv.reward.yes_no import YesNoJudge

    if config.labeler == "self":
        return YesNoJudge(policy, processor)
    from rlaifv.reward.models import load_model, load_processor

    return YesNoJudge(load_model(config.labeler, device=device), load_processor(config.labeler))


def score_answers(
    image: Any,
    answers: Sequence[str],
    labeler: Labeler,
    splitter: ClaimSplitter,
    writer: QuestionWriter,
    config: FeedbackConfig,
) -> list[ScoredAnswer]:
    """Verify the answers to one image (a PIL image) and return their scores."""
    from rlaifv.reward.claims import verify_answers

    verdicts = verify_answers(
        image,
        list(answers),
        labeler,
        splitter,
        writer,
        repeat_penalty=config.repeat_penalty,
        threshold=config.threshold,
        scoring=config.claim_score,
    )
    return [
        ScoredAnswer(
            text=text, score=v.score, rejected=v.rejected, repeated=v.repeated, claims=[asdict(c) for c in v.claims]
        )
        for text, v in zip(answers, verdicts, strict=True)
    ]


def sample_candidates(
    pair: Any, prompts: Sequence[PromptItem], config: FeedbackConfig, *, seed: int
) -> list[list[tuple[str, int, str]]]:
    """N candidates per prompt as (text, num_tokens, finish_reason); one SamplingParams for all of a prompt."""
    from rlaifv.reward.sampling import SamplingParams

    encoded = [encode_prompt_item(pair, p) for p in prompts]
    params = [
        SamplingParams(
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_tokens=config.max_tokens,
            seed=prompt_seed(seed, p.id),
        )
        for p in prompts
    ]
    samples = pair.sample(encoded, [config.num_samples] * len(prompts), params)
    return [[(pair.decode(s.token_ids), len(s.token_ids), s.finish_reason) for s in group] for group in samples]


def encode_prompt_item(pair: Any, item: PromptItem) -> Any:
    """The model's prompt for an item. A LLaVA-format question's `<image>` placeholder goes: the image is given
    apart (as in DPO's `without_markup_rows`)."""
    from rlaifv.reward.prompt import markup_free

    return pair.encode([image_bytes(item.image)], **prompt_text(markup_free(pair.processor, item.question)))


def fitting_prompts(pair: Any, prompts: Sequence[PromptItem], *, progress: bool = False) -> list[PromptItem]:
    """The prompts the model's positions hold. The others are left out with a warning naming them, before any
    sampling: one over-long prompt stopped a run partway, naming no prompt."""
    from tqdm.auto import tqdm

    from rlaifv.reward.errors import ContextLengthError

    fitting, over = [], []
    for item in tqdm(prompts, desc="prompt lengths", unit="prompt", disable=None if progress else True):
        try:
            encode_prompt_item(pair, item)
        except ContextLengthError as exc:
            over.append((item.id, exc))
        else:
            fitting.append(item)
    if not fitting:
        raise DataError(f"no prompt fits the model: {over[0][1]}")
    if over:
        shown = ", ".join(repr(i) for i, _ in over[:5]) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
        warnings.warn(
            f"{len(over)} of {len(prompts)} prompts left out: too long for the model ({over[0][1]}): {shown}",
            stacklevel=3,
        )
    return fitting


def sampling_pair(policy: Any, processor: Any, end_of_turn: str | None = None) -> Any:
    """A `ModelPair` used only to encode and sample (same stop/blocked tokens as the service)."""
    from rlaifv.reward.model_pair import ModelPair, is_peft_model

    return ModelPair(policy, processor, reference=None if is_peft_model(policy) else policy, end_of_turn=end_of_turn)


def collect_feedback(
    policy: Any,
    processor: Any,
    prompts: Sequence[PromptItem],
    config: FeedbackConfig,
    *,
    labeler: Labeler | None = None,
    splitter: ClaimSplitter | None = None,
    writer: QuestionWriter | None = None,
    seed: int | None = None,
    end_of_turn: str | None = None,
    progress: bool = True,
    shards: FeedbackShards | None = None,
) -> list[PromptFeedback]:
    """Sample `config.num_samples` candidates per prompt from `policy` and score them by verification.

    With `shards`, each batch of prompts is saved as it is done and a rerun goes on after the last saved one;
    SIGTERM then stops between batches (`TrainingInterrupted`), or at once while the batch waits on the LLM
    splitter/writer's server (its calls cancelled, the batch sampled again on resuming). The batches are the same
    in a resumed run, and each prompt's samples depend on its seed only, so the result is that of a run never
    stopped.
    """
    from tqdm.auto import tqdm

    from rlaifv.reward.images import decode_image

    seed = config.seed if seed is None else seed
    if splitter is None or writer is None:
        default_splitter, default_writer = make_splitter_and_writer(config)
        splitter = splitter or default_splitter
        writer = writer or default_writer
    labeler = labeler or make_labeler(config, policy, processor)
    pair = sampling_pair(policy, processor, end_of_turn)
    policy.eval()
    prompts = fitting_prompts(pair, prompts, progress=progress)
    results, sampled_total, truncated = ([], 0, 0) if shards is None else shards.resume(prompts, config.prompt_batch)
    bar = tqdm(total=len(prompts), initial=len(results), desc="feedback", unit="prompt", disable=not progress)

    def stopped(start: int, how: str = "") -> TrainingInterrupted:
        assert shards is not None
        bar.close()
        return TrainingInterrupted(
            f"after {start} of {len(prompts)} prompts{how}; their feedback is saved in {shards.folder}: rerun the"
            " same command to resume",
            step=0,
        )

    with stop_on_sigterm() if shards is not None else nullcontext(_never) as stop_asked:
        for start in range(len(results), len(prompts), config.prompt_batch):
            if shards is not None and stop_asked():
                raise stopped(start)
            batch = prompts[start : start + config.prompt_batch]
            sampled = sample_candidates(pair, batch, config, seed=seed)
            counts = (
                sum(len(candidates) for candidates in sampled),
                sum(c[2] == "length" for candidates in sampled for c in candidates),
            )
            sampled_total, truncated = sampled_total + counts[0], truncated + counts[1]
            kept = [
                [c for c in candidates if not blank(c[0]) and not (config.drop_truncated and c[2] == "length")]
                for candidates in sampled
            ]
            data = [image_bytes(item.image) for item in batch]
            images = [decode_image(d) for d in data]
            try:
                scored = score_batch(
                    images, [[c[0] for c in group] for group in kept], labeler, splitter, writer, config
                )
            except TrainingInterrupted:  # the LLM's calls, cancelled by the stop (it waited out their every retry)
                if shards is None:
                    raise
                raise stopped(start, " (the next batch's LLM calls cancelled)") from None
            done = []
            for item, raw, answers, group, blob in zip(batch, sampled, scored, kept, data, strict=True):
                for answer, (_, tokens, reason) in zip(answers, group, strict=True):
                    answer.num_tokens, answer.finish_reason = tokens, reason
                done.append(PromptFeedback(item.id, blob, item.question, answers, dropped=len(raw) - len(group)))
            if shards is not None:
                shards.add(start, done, *counts)
            results += done
            bar.update(len(batch))
    bar.close()
    if config.drop_truncated and truncated > TRUNCATED_WARNING * max(1, sampled_total):
        warnings.warn(
            f"{truncated} of {sampled_total} candidates reached max_tokens={config.max_tokens} and were dropped:"
            " the pairs then favour short answers; raise max_tokens (RLAIF-V: 512) or set drop_truncated=false",
            stacklevel=2,
        )
    if config.splitter == "llm" or hasattr(splitter, "split_many"):
        _warn_without_claims(results, config)
    return results


def _warn_without_claims(results: Sequence[PromptFeedback], config: FeedbackConfig) -> None:
    """An LLM splitter that finds no claim in most answers (a server answering [] to each) made every score 0 and
    the run passed, with mean_claims 0 and "no pairs: raise the temperature" as the only sign."""
    from rlaifv.trainer.credentials import shown_url

    answers = [a for f in results for a in f.answers if a.text.strip()]
    without = sum(a.num_claims == 0 for a in answers)
    if len(answers) >= NO_CLAIMS_MIN_ANSWERS and without > NO_CLAIMS_WARNING * len(answers):
        where = shown_url(config.llm_url) if config.llm_url else config.llm_model or "its backend"
        warnings.warn(
            f"the LLM claim splitter (feedback.splitter=llm) found no claims in {without} of {len(answers)} answers,"
            " so they all score 0: check that its model (feedback.llm_name"
            f"={config.llm_name!r} at {where}) follows the splitting instruction, or use feedback.splitter=spacy",
            stacklevel=3,
        )


def score_batch(
    images: Sequence[Any],
    answers: Sequence[Sequence[str]],
    labeler: Labeler,
    splitter: ClaimSplitter,
    writer: QuestionWriter,
    config: FeedbackConfig,
) -> list[list[ScoredAnswer]]:
    """`score_answers` for several images at once: one labeler call when it has `p_yes_batch` (YesNoJudge).

    Same plan/score functions as `reward.claims.verify_answers`, so the scores are identical.
    """
    from rlaifv.reward.claims import plan_claims, score_plans

    if hasattr(splitter, "split_many"):  # an LLM splitter: the batch's distinct answers asked together, remembered
        splitter.split_many([text for group in answers for text in group])
    if not hasattr(labeler, "p_yes_batch"):
        return [
            score_answers(image, list(group), labeler, splitter, writer, config) if group else []
            for image, group in zip(images, answers, strict=True)
        ]
    planned = [plan_claims(list(group), splitter, writer) for group in answers]
    asked = [(image, questions) for image, (_, questions) in zip(images, planned, strict=True) if questions]
    replies = iter(labeler.p_yes_batch(asked) if asked else [])
    results = []
    for group, (plans, questions) in zip(answers, planned, strict=True):
        p_yes = dict(zip(questions, next(replies), strict=True)) if questions else {}
        verdicts = score_plans(
            plans, p_yes, repeat_penalty=config.repeat_penalty, threshold=config.threshold, scoring=config.claim_score
        )
        results.append(
            [
                ScoredAnswer(
                    text=text,
                    score=v.score,
                    rejected=v.rejected,
                    repeated=v.repeated,
                    claims=[asdict(c) for c in v.claims],
                )
                for text, v in zip(group, verdicts, strict=True)
            ]
        )
    return results


def feedback_summary(feedback: Sequence[PromptFeedback]) -> dict[str, float]:
    answers = [a for f in feedback for a in f.answers]
    n = max(1, len(answers))
    return {
        "prompts": len(feedback),
        "candidates": len(answers),
        "dropped_candidates": sum(f.dropped for f in feedback),
        "mean_score": sum(a.score for a in answers) / n,
        "mean_rejected": sum(a.rejected for a in answers) / n,
        "mean_repeated": sum(a.repeated for a in answers) / n,
        "mean_claims": sum(a.num_claims for a in answers) / n,
        "mean_words": sum(len(a.text.split()) for a in answers) / n,
    }


MADE_KEY = b"rlaifv_made"


def write_feedback(path: str | Path, feedback: Sequence[PromptFeedback], *, made: dict[str, Any] | None = None) -> Path:
    """Parquet: one row per prompt (id, image bytes, question, answers as JSON, dropped). `made` (what the feedback
    was made from) goes in the file's metadata: written with it, it names it whatever else a stop left undone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.table(
        {
            "id": [f.id for f in feedback],
            "image": pa.array([f.image for f in feedback], type=pa.binary()),
            "question": [f.question for f in feedback],
            "answers": [json.dumps([asdict(a) for a in f.answers]) for f in feedback],
            "dropped": pa.array([f.dropped for f in feedback], type=pa.int32()),
        }
    )
    if made is not None:
        table = table.replace_schema_metadata({MADE_KEY: json.dumps(made)})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def feedback_made(path: str | Path) -> dict[str, Any] | None:
    """The `made` record of a feedback file, None when it has none (an earlier version wrote it); a `DataError`
    when the file cannot be read."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(MADE_KEY)
        made = json.loads(raw) if raw is not None else None
    except Exception as exc:
        raise DataError(f"not a readable feedback file: {exc}", source=str(path)) from None
    return made if isinstance(made, dict) else None


def read_feedback(*paths: str | Path) -> list[PromptFeedback]:
    """The feedback in one file or several (a run's saved batches), in order.

    Images go to one spill for all files (disk, as the reader keeps a dataset's: `trainer.image_spill`): one
    map however many batches a long run saved."""
    import pyarrow.parquet as pq

    rows: list[tuple[PromptFeedback, int]] = []
    with ImageSpill() as spill:
        for path in map(Path, paths):
            try:
                with pq.ParquetFile(path) as parquet:
                    for batch in parquet.iter_batches(batch_size=256):
                        for r in batch.to_pylist():
                            answers = [ScoredAnswer(**a) for a in json.loads(r["answers"])]
                            image, _ = spill.add(r["image"])
                            rows.append((PromptFeedback(r["id"], b"", r["question"], answers, r["dropped"]), image))
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"not a readable feedback file: {exc}", source=str(path)) from None
        return spill.attach(rows)


def _never() -> bool:
    return False


class FeedbackShards:
    """The feedback of a run in progress: one parquet per batch of prompts under `folder`, valid for runs whose
    settings and models hash to `key` (or to one of `key`, the first being the one saved: `feedback_keys`). A rerun
    goes on from the saved batches that hold its own first prompts (a run with a raised `--limit` too); anything
    else is cleared with a warning that says why.

    `finished`: the feedback file of a finished run with the same key, if any: with no batches saved, its whole
    batches over this run's first prompts are taken as saved ones, so a rerun with another `--limit` samples only
    the prompts it adds (it sampled every prompt again)."""

    KEY_FILE = "run_key"

    def __init__(
        self,
        folder: str | Path,
        key: str | Sequence[str],
        settings: dict[str, Any] | None = None,
        *,
        finished: Path | None = None,
    ) -> None:
        self.keys = (key,) if isinstance(key, str) else tuple(key)
        self.folder, self.key, self.settings = Path(folder), self.keys[0], settings or {}
        self.finished = finished

    def resume(self, prompts: Sequence[PromptItem], batch: int) -> tuple[list[PromptFeedback], int, int]:
        """The saved feedback with its candidates sampled and truncated, when it is this run's and covers the
        first prompts in order; else nothing (the folder is cleared). Only batches a run never stopped would have
        made stay: whole ones within this run's prompts, and a short one only where this run's prompts end."""
        shards = sorted(self.folder.glob("batch-*.parquet"))
        if not shards and self.finished is not None and self._seed(prompts, batch):
            shards = sorted(self.folder.glob("batch-*.parquet"))
        why = self._other_run() if shards else None
        if shards and why is None:
            kept: list[Path] = []
            done: list[PromptFeedback] = []
            sampled = truncated = 0
            for shard in shards:
                try:
                    part = read_feedback(shard)
                    counts = json.loads(shard.with_suffix(".json").read_text())
                    more = int(counts["sampled"]), int(counts["truncated"])
                except (DataError, OSError, ValueError, KeyError, TypeError) as exc:
                    # damaged (a disk that lost its last writes): it blocked every rerun
                    warnings.warn(
                        f"{shard} cannot be read ({exc}): it and those after it are sampled again", stacklevel=3
                    )
                    break
                end = len(done) + len(part)
                if end > len(prompts) or (len(part) < batch and end < len(prompts)):
                    break  # past a lowered --limit, or a short last batch that more prompts follow now
                kept.append(shard)
                done += part
                sampled, truncated = sampled + more[0], truncated + more[1]
            shards = kept
            why = _other_prompts(done, prompts)
            if why is None:
                self._keep(len(shards))
                return done, sampled, truncated
        if why is not None:
            warnings.warn(f"the feedback saved in {self.folder} was {why}: starting over", stacklevel=3)
        self.clear()
        self._keep(0)
        return [], 0, 0

    def _seed(self, prompts: Sequence[PromptItem], batch: int) -> bool:
        """Save the finished run's feedback as batches when it is that of this run's first prompts. Its counts are
        what the file tells: every candidate sampled; truncated, the kept ones that were and, with drop_truncated,
        the dropped ones (empty answers are dropped too, but rarely)."""
        assert self.finished is not None
        try:
            finished = read_feedback(self.finished)
        except DataError:
            return False  # unreadable: sampled again, as without it
        if len(finished) > len(prompts):  # a lowered --limit: its whole batches within this run's prompts, no more
            finished = finished[: len(prompts) // batch * batch]
        if not finished or _other_prompts(finished, prompts) is not None:
            return False
        self.clear()
        self._keep(0)
        for start in range(0, len(finished), batch):
            part = finished[start : start + batch]
            sampled = sum(len(f.answers) + f.dropped for f in part)
            truncated = sum(a.finish_reason == "length" for f in part for a in f.answers)
            truncated += sum(f.dropped for f in part) if self.settings.get("drop_truncated") else 0
            self.add(start, part, sampled, truncated)
        return True

    def _other_run(self) -> str | None:
        """Why the saved batches are not this run's (None: they are)."""
        key_file = self.folder / self.KEY_FILE
        try:
            saved = json.loads(key_file.read_text())
        except (OSError, ValueError):
            return "made by an earlier version of this program"
        if not isinstance(saved, dict):
            return "made by an earlier version of this program"
        if saved.get("key") in self.keys:
            return None
        old = saved.get("settings") or {}
        # bookkeeping settings (llm_retries, llm_url...) are in no key: naming them said the wrong thing changed
        names = (self.settings.keys() | old.keys()) - set(FeedbackConfig.BOOKKEEPING)
        changed = sorted(k for k in names if self.settings.get(k) != old.get(k))
        if changed:
            return "made with other settings (" + ", ".join(f"feedback.{k}" for k in changed) + ")"
        return "sampled from other models (or the models changed)"

    def _keep(self, shards: int) -> None:
        """Remove the saved batches past the first `shards` and mark the folder as this run's."""
        for shard in sorted(self.folder.glob("batch-*.parquet"))[shards:]:
            shard.with_suffix(".json").unlink(missing_ok=True)
            shard.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / self.KEY_FILE, {"key": self.key, "settings": self.settings})

    def add(self, start: int, feedback: Sequence[PromptFeedback], sampled: int, truncated: int) -> None:
        """The batch's counts first: its parquet, written last, is what makes it count as saved."""
        shard = self.folder / f"batch-{start:09d}.parquet"
        write_json(shard.with_suffix(".json"), {"sampled": sampled, "truncated": truncated})
        write_feedback(shard, feedback)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _other_prompts(done: Sequence[PromptFeedback], prompts: Sequence[PromptItem]) -> str | None:
    """Why saved feedback is not that of the first prompts (None: it is): ids, questions and images."""
    if len(done) > len(prompts):
        return f"for {len(done)} prompts, more than the {len(prompts)} of this run"
    for k, (saved, item) in enumerate(zip(done, prompts, strict=False)):
        same_image = hashlib.sha256(saved.image).digest() == hashlib.sha256(image_bytes(item.image)).digest()
        if saved.id != item.id or saved.question != item.question or not same_image:
            return f"for other prompts (prompt {k + 1} was {saved.id!r}, is {item.id!r} now)"
    return None


def feedback_key(config: FeedbackConfig, models: Sequence[str | Path]) -> str:
    """What makes a run's feedback, besides its prompts (`FeedbackShards.resume` compares those one by one): its
    settings (seed included) and the models sampled from (by fingerprint)."""
    return feedback_keys(config, models)[0]


def feedback_keys(config: FeedbackConfig, models: Sequence[str | Path]) -> list[str]:
    """The keys a run's feedback may have been saved under: `feedback_key` (what saves use), then the keys an
    earlier version made: while the models' files are as they were then (`saved_identities`), with llm_url and
    llm_max_tokens in the key (before they were bookkeeping: the same values then resume), and with the labeler's
    and the claims LLM's folders by path.

    The key holds those two folders by content, as the models sampled from: a copy elsewhere (or the same folder
    by another path) resumes, and one replaced in place does not (a claims LLM was known by its path alone, so
    one retrained in place went on from batches the earlier one had split)."""
    from rlaifv.trainer.dpo import model_identity, saved_identities

    named = [*models, *([config.labeler] if config.labeler != "self" else [])]
    settings = [config.result_settings()]
    by_content = settings[0] | {name: model_identity(folder) for name, folder in config.model_folders().items()}
    earlier = config.result_settings(FeedbackConfig.EARLIER_BOOKKEEPING)
    if earlier != settings[0]:
        settings.append(earlier)
    identities = saved_identities(named)
    keys = [_key(by_content, identities[0])]
    keys += [_key(values, each) for each in identities for values in settings]
    return list(dict.fromkeys(keys))


def _key(settings: dict[str, Any], identities: Sequence[str | None]) -> str:
    return hashlib.sha256(json.dumps([settings, identities]).encode()).hexdigest()
