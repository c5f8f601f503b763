"""DPO on (image, question, chosen, rejected) with the reward core's log-prob function.

Why not TRL's `DPOTrainer`: (1) it refuses to precompute reference log-probs for
vision data, so the frozen reference would run again on every step of every
epoch; (2) it tokenizes prompt+answer its own way (`add_special_tokens=False`,
its own truncation), so the log-probs it optimises would not be the ones the
service scores. Here the policy and reference both go through
`reward.logprobs.answer_logprobs` on prompts/answers encoded by
`reward.prompt`, exactly as `ModelPair.score` does, so the implicit reward of a
pair is the same number in training and in serving.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))  +  nll_weight * (-pi_c / T_c)
           + token_kl * KL_tokens

pi/ref are *summed* answer log-probs (end-of-turn token included). Reference
sums are computed once (no grad) and cached in the output folder, in
`reference_logprobs.parquet`, keyed by the reference model and the pairs, so
reruns and later epochs never recompute them; a pass cut short keeps the sums
done so far in `reference_logprobs.partial.parquet` and the rerun goes on.

KL_tokens (off by default) is KL(pi(.|context) || ref(.|context)) over the
whole vocabulary, averaged over each answer's positions, then over the two answers. DPO only says
"this token up, that one down"; where the freed probability lands is left to
the network, and some lands on tokens neither model would say. A sampled
answer holding such a token then has the largest log-ratio of its group, so
the length-normalised implicit reward picks it (the shapes world: 15 of the
17 hallucinated objects in one cell's best-of-8 picks were in such captions).
The KL needs the reference's whole distribution, which is too big to cache
for a real vocabulary, so the reference runs every step (no grad).

accelerate does device placement, gradient accumulation and multi-GPU/DeepSpeed
by configuration, not code:

    accelerate launch --config_file multi_gpu.yaml -m rlaifv.cli.main train dpo data/ --model sft/ -o out/
    torchrun --standalone --nproc_per_node 8 -m rlaifv.cli.main train dpo ...

Pairs are sharded across processes; metrics are averaged over them; rank 0
writes the policy, the report and the bundle. Ranks meet after each load or
save (`interrupt.together`): one that fails there (a full disk, a read-only
folder) ends every rank, each naming its error, instead of leaving the others
waiting in the next collective. The model is wrapped in
`PairScorer` so a data-parallel wrapper sees one forward per backward even
though scoring runs the prefix and the answers separately. (Each process
computes the reference log-probs of all pairs once; the cache makes that a
one-time cost.)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaifv.reward.models import write_text_atomically
from rlaifv.trainer.data import PreferenceRow, write_json
from rlaifv.trainer.dpo_config import DPOConfig
from rlaifv.trainer.errors import ConfigError, DataError, RunStateError, TrainerError, TrainingInterrupted
from rlaifv.trainer.interrupt import agreed, stop_on_sigterm, together
from rlaifv.trainer.user_cache import cache_root

if TYPE_CHECKING:
    import torch

    from rlaifv.reward.prompt import EncodedPrompt

REFERENCE_CACHE = "reference_logprobs.parquet"
REFERENCE_PARTIAL = "reference_logprobs.partial.parquet"
DPO_REPORT = "dpo_report.json"


@dataclass
class EncodedPair:
    """A preference pair with answers tokenized as the service tokenizes them; reference sums once computed."""

    id: str
    image: bytes | memoryview
    question: str
    chosen: str
    rejected: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    def digest(self) -> str:
        payload = json.dumps([self.question, self.chosen_ids, self.rejected_ids]).encode()
        return hashlib.sha256(hashlib.sha256(self.image).digest() + payload).hexdigest()


@dataclass
class DPOTerms:
    """Per-pair quantities of one batch, (B,) each; `loss` is the batch mean."""

    loss: torch.Tensor
    dpo_loss: torch.Tensor
    nll: torch.Tensor
    token_kl: torch.Tensor | None
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards


@dataclass
class DPOResult:
    policy_dir: Path
    policy_type: str
    num_pairs: int
    dropped_pairs: int
    optimizer_steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    reference_cache: Path | None = None
    reference_cache_hit: bool = False
    is_main_process: bool = True


# -- encoding ---------------------------------------------------------------------------------


def without_markup_rows(rows: Sequence[PreferenceRow], processor: Any) -> tuple[list[PreferenceRow], int]:
    """Rows with the model's markup taken out of their texts (a row left with an empty answer is dropped; one left
    with an empty question is an image-only prompt), and how many held some.

    Datasets in LLaVA's format put an `<image>` placeholder in the question (the image column is the image: the
    family's chat template places it), and answers may hold a literal `</s>`. The service refuses such text from a
    user; in training it would be an image placeholder without an image (a failure mid-run) or an end of turn
    inside an answer, taught as one."""
    import dataclasses

    from rlaifv.reward.prompt import markup_free

    out, changed = [], 0
    for row in rows:
        texts = {name: markup_free(processor, getattr(row, name)) for name in ("question", "chosen", "rejected")}
        if any(texts[name] != getattr(row, name) for name in texts):
            changed += 1
            if not (texts["chosen"] and texts["rejected"]):  # an answer of markup only: nothing to learn from
                continue
            row = dataclasses.replace(
                row, question=texts["question"], chosen=texts["chosen"], rejected=texts["rejected"]
            )
        out.append(row)
    return out, changed


def encode_pairs(
    rows: Sequence[PreferenceRow],
    tokenizer: Any,
    *,
    eot_id: int,
    max_answer_tokens: int | None = None,
    processor: Any = None,
) -> tuple[list[EncodedPair], dict[str, int]]:
    """Tokenize answers with `reward.prompt.encode_answer`, as inside the turn the chat template renders (the
    processor's template where only it has one: a legacy chat_template.json). Dropped, and counted by reason:
    pairs with an answer over `max_answer_tokens`, and pairs whose answers are the same tokens (their DPO margin
    is 0 whatever the weights: no gradient, only a lower reported accuracy)."""
    from rlaifv.reward.prompt import answer_seam, encode_answer

    if processor is not None:
        answer_seam(processor)  # found with the processor's template, kept for every answer of the tokenizer
    pairs: list[EncodedPair] = []
    dropped = {"over_max_answer_tokens": 0, "identical_answers": 0}
    for row in rows:
        chosen = encode_answer(tokenizer, row.chosen, eot_id=eot_id)
        rejected = encode_answer(tokenizer, row.rejected, eot_id=eot_id)
        if max_answer_tokens is not None and max(len(chosen), len(rejected)) > max_answer_tokens:
            dropped["over_max_answer_tokens"] += 1
            continue
        if chosen == rejected:
            dropped["identical_answers"] += 1
            continue
        pairs.append(EncodedPair(row.id, row.image, row.question, row.chosen, row.rejected, chosen, rejected))
    return pairs, dropped


def _mostly_unknown(pairs: Sequence[EncodedPair], tokenizer: Any) -> int:
    """Pairs with an answer more than half made of the unknown token (a word-level vocabulary given other
    words); byte-level and SentencePiece-with-fallback tokenizers have none to give."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0
    return sum(any(2 * ids.count(unk) > len(ids) for ids in (p.chosen_ids, p.rejected_ids)) for p in pairs)


def encode_prompts(processor: Any, pairs: Sequence[EncodedPair], max_length: int | None = None) -> list[EncodedPrompt]:
    """Image + question -> model prefix, via `reward.prompt.encode_prompt` (what `ModelPair.encode` does)."""
    from rlaifv.reward.images import decode_image
    from rlaifv.reward.prompt import encode_prompt
    from rlaifv.trainer.data import prompt_text

    return [
        encode_prompt(processor, [decode_image(p.image)], **prompt_text(p.question), max_length=max_length)
        for p in pairs
    ]


# -- the loss ---------------------------------------------------------------------------------


def _pair_sums(
    model: Any,
    prompts: Sequence[EncodedPrompt],
    pairs: Sequence[EncodedPair],
    pad_id: int,
    reference: list[list[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed answer log-probs (B, 2) [chosen, rejected] and lengths (B, 2), prefix shared per pair.

    With `reference` (its `answer_distributions` of the same pairs) also the mean per-token KL(model || reference)
    of each answer, (B, 2); otherwise None.
    """
    import torch

    from rlaifv.reward.logprobs import answer_distributions, answer_logprobs

    answers = [[p.chosen_ids, p.rejected_ids] for p in pairs]
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs])
    if reference is None:
        per_token = answer_logprobs(model, prompts, answers, pad_id)
        sums = torch.stack([torch.stack([group[0].sum(), group[1].sum()]) for group in per_token])
        return sums, lengths.to(sums.device), None
    dists = answer_distributions(model, prompts, answers, pad_id)
    sums_rows, kl_rows = [], []
    for group, ref_group, ids in zip(dists, reference, answers, strict=True):
        triples = list(zip(group, ref_group, ids, strict=True))
        picked = [d.gather(-1, torch.tensor(a, device=d.device)[:, None]).sum() for d, _, a in triples]
        sums_rows.append(torch.stack(picked))
        kl_rows.append(torch.stack([(d.exp() * (d - r.to(d))).sum(-1).mean() for d, r, _ in triples]))
    sums = torch.stack(sums_rows)
    return sums, lengths.to(sums.device), torch.stack(kl_rows)


def reference_distributions(
    reference: Any, prompts: Sequence[EncodedPrompt], pairs: Sequence[EncodedPair], pad_id: int
) -> list[list[torch.Tensor]]:
    """The reference's next-token log-distributions over both answers of each pair (no grad, eval mode)."""
    from rlaifv.reward.logprobs import answer_distributions

    with _inference(reference):
        return answer_distributions(reference, prompts, [[p.chosen_ids, p.rejected_ids] for p in pairs], pad_id)


@contextmanager
def _inference(model: Any) -> Iterator[None]:
    """Eval mode and no gradient inside; the model's training mode comes back after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _pair_scorer_class() -> type[torch.nn.Module]:
    import torch

    class PairScorer(torch.nn.Module):
        """Wraps a model so one `forward` scores a batch of pairs (what DDP/DeepSpeed wrap)."""

        def __init__(self, model: Any, pad_id: int) -> None:
            super().__init__()
            self.model = model
            self.pad_id = pad_id

        def forward(
            self,
            prompts: list[EncodedPrompt],
            pairs: list[EncodedPair],
            reference: list[list[torch.Tensor]] | None = None,
        ) -> torch.Tensor:
            """(B, 2) summed log-probs, or (B, 4) with the per-token KL of both answers when `reference` is given."""
            sums, _, kl = _pair_sums(self.model, prompts, pairs, self.pad_id, reference)
            return sums if kl is None else torch.cat([sums, kl], dim=1)

    return PairScorer


def dpo_terms(
    policy_sums: torch.Tensor,
    reference_sums: torch.Tensor,
    lengths: torch.Tensor,
    *,
    beta: float,
    nll_weight: float = 0.0,
    token_kl: torch.Tensor | None = None,
    token_kl_weight: float = 0.0,
) -> DPOTerms:
    """The DPO loss from summed log-probs (B, 2) [chosen, rejected] of policy and reference.

    `token_kl` (B, 2): the mean per-token KL of each answer, added with `token_kl_weight`.

    chosen_rewards / rejected_rewards are beta * (pi - ref): the implicit reward
    the service returns with `normalize="sum"` (divide by T for "mean").
    """
    import torch.nn.functional as F

    reference_sums = reference_sums.to(policy_sums)
    rewards = beta * (policy_sums - reference_sums)  # (B, 2)
    logits = rewards[:, 0] - rewards[:, 1]
    dpo_loss = -F.logsigmoid(logits)
    nll = -policy_sums[:, 0] / lengths[:, 0].to(policy_sums)
    loss = dpo_loss.mean() + nll_weight * nll.mean()
    kl = None
    if token_kl is not None:
        kl = token_kl.mean(dim=1)
        loss = loss + token_kl_weight * kl.mean()
    return DPOTerms(loss, dpo_loss, nll, kl, policy_sums[:, 0], policy_sums[:, 1], rewards[:, 0], rewards[:, 1])


def score_pairs(
    model: Any, processor: Any, pairs: Sequence[EncodedPair], *, beta: float, nll_weight: float = 0.0, pad_id: int = 0
) -> DPOTerms:
    """The training computation for `pairs` under `model` (pairs must carry reference sums)."""
    import torch

    if any(p.ref_chosen is None or p.ref_rejected is None for p in pairs):
        raise ValueError("pairs need reference log-probs; run compute_reference_logprobs first")
    sums, lengths, _ = _pair_sums(model, encode_prompts(processor, pairs), pairs, pad_id)
    ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=torch.float64)
    return dpo_terms(sums, ref, lengths, beta=beta, nll_weight=nll_weight)


# -- reference log-probs, computed once -------------------------------------------------------


def require_model_folder(path: Path, what: str) -> None:
    """A model folder here, or a `ConfigError` naming `what` (models are never downloaded: a typo was tried as a
    hub id for minutes before an unrelated network error)."""
    from rlaifv.reward.errors import ModelLoadError
    from rlaifv.reward.models import check_model_folder

    try:
        check_model_folder(path, what=what)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None


def _where(path: str | Path | None) -> str:
    """A folder as an absolute path (an export resolves the report's paths later, from another working folder:
    a relative one found nothing there, or another model of the same name); a hub id as given."""
    return str(Path(path).resolve()) if path is not None and Path(path).is_dir() else str(path)


def model_identity(path: str | Path) -> str:
    """A local folder by its files (a model retrained in place is another model); a hub id by its name."""
    return model_fingerprint(path) if Path(path).is_dir() else str(path)


def saved_identities(paths: Sequence[str | Path | None]) -> list[list[str | None]]:
    """The identities under which work on the models at `paths` (None stays None) may have been saved: each one's
    `model_identity` (what saves use), then, where one is a folder, each one's identity by the rule of versions
    before content fingerprints (`legacy_model_fingerprint`). A key made from the second list matches work saved by
    such a version only while the folders' weight files keep the names, sizes and mtimes they had then (that rule's
    limit: bytes rewritten with the mtime restored are not seen), so a run stopped before an upgrade resumes once
    and its work is saved again under the first list's keys; weights changed since (new mtimes) match neither."""
    current = [model_identity(p) if p is not None else None for p in paths]
    legacy = [(legacy_model_fingerprint(p) if Path(p).is_dir() else str(p)) if p is not None else None for p in paths]
    return [current, legacy] if legacy != current else [current]


def _keys(key: str | Sequence[str]) -> tuple[str, ...]:
    """A run's key or keys: the first is the one saves use; all are accepted (`saved_identities`)."""
    return (key,) if isinstance(key, str) else tuple(key)


FINGERPRINT_PREFIX = "content:"
"""Begins a fingerprint of the files' bytes; a run file of an earlier version holds one of their sizes and mtimes."""


def model_fingerprint(path: str | Path) -> str:
    """Identity of a model folder by content: its configs and the bytes of its weight files (and their names).

    A copy that does not keep mtimes (gsutil, aws s3 cp) is the same model, so a run staged again resumes; a model
    retrained in place is another. The cost is reading every weight file once per version of it on this machine:
    a 7B model's ~15 GB take about 10 s at SHA-256's 1.5 GB/s, longer where the disk is slower. `_file_digest`
    keeps each file's hash in this process and in the user's cache while its stat is unchanged, so the later calls
    of a run (reference cache, checkpoints, feedback) and later runs read a 64-byte file instead; under
    `accelerate launch`/torchrun `train_dpo` hashes on the main process only and sends the result to the others
    (8 ranks read the model and reference once, not 8 times)."""
    return FINGERPRINT_PREFIX + _folder_digest(Path(path), _file_digest)


def legacy_model_fingerprint(path: str | Path) -> str:
    """The fingerprint of versions before `model_fingerprint` read the bytes (weight files by size and mtime):
    what a run file of theirs holds, to tell whether the model is still the one it names."""
    return _folder_digest(Path(path), lambda file: f"{file.stat().st_size}:{file.stat().st_mtime_ns}")


def _folder_digest(path: Path, weights: Callable[[Path], str]) -> str:
    """The configs' bytes and, for each weight file, its name and what `weights` says of it."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name in ("config.json", "adapter_config.json"):
            digest.update(file.read_bytes())
        elif file.suffix == ".safetensors" or file.name.endswith(".safetensors.index.json"):
            digest.update(f"{file.name}:{weights(file)}".encode())
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}
RACY_NS = 2_000_000_000
"""A file changed this close to its hashing is hashed again next time: a write in the same clock tick as the one
before it leaves the stat as it was (git's "racy" entries)."""
DIGEST_CACHE = "file-digests"
"""The folder of `_file_digest`'s kept hashes in the user's cache (`user_cache.cache_root`): one file per weight file's
version (its 64 hex characters, named by the hash of its stat identity), a few KB for all the models ever used."""


def _file_digest(file: Path) -> str:
    """SHA-256 of the file, kept while its device, inode, size, mtime and ctime stay the same: for this process,
    and in the user's cache (`DIGEST_CACHE`) for the other processes and runs on this machine. ctime cannot be set
    back (utime sets it to now), so bytes changed with the mtime restored are hashed again. The cache is written
    atomically (a new file renamed over) and only helps: where it cannot be read or written the file is hashed."""

    def identity(stat: os.stat_result) -> tuple[str, int, int, int, int, int]:
        return (str(file.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

    before = identity(file.stat())
    if before in _DIGESTS:
        return _DIGESTS[before]
    kept = cache_root() / DIGEST_CACHE / hashlib.sha256(json.dumps(before).encode()).hexdigest()
    try:
        value = kept.read_text().strip()
    except (OSError, UnicodeDecodeError):
        value = ""
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        _DIGESTS[before] = value
        return value
    started = time.time_ns()
    with open(file, "rb") as handle:
        value = hashlib.file_digest(handle, "sha256").hexdigest()
    if identity(file.stat()) == before and max(before[4], before[5]) < started - RACY_NS:
        _DIGESTS[before] = value
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(kept, value)
        except OSError:
            pass  # a read-only or full cache: hashed again next time
    return value


def reference_cache_key(reference_id: str, pairs: Sequence[EncodedPair]) -> str:
    return reference_cache_keys([reference_id], pairs)[0]


def reference_cache_keys(reference_ids: Sequence[str], pairs: Sequence[EncodedPair]) -> list[str]:
    """`reference_cache_key` of each reference id, the pairs (their images) hashed once for all."""
    digests = [hashlib.sha256(reference_id.encode()) for reference_id in reference_ids]
    for pair in pairs:
        value = pair.digest().encode()
        for digest in digests:
            digest.update(value)
    return [digest.hexdigest() for digest in digests]


def compute_reference_logprobs(
    reference: Any,
    processor: Any,
    pairs: Sequence[EncodedPair],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
    start: int = 0,
    stop: Callable[[], bool] | None = None,
    keep: Callable[[int], None] | None = None,
    keep_every: int = 64,
    max_positions: int | None = None,
) -> int:
    """Fill `ref_chosen`/`ref_rejected` of `pairs[start:]` (no grad, same function as training and serving).

    Returns how many pairs (from the first) have their sums: all of them, unless `stop` said so before a batch.
    `keep(done)` is called every `keep_every` batches, so that a pass of hours can be resumed from its last keep.
    A pair whose prompt + longer answer is over `max_positions` (the model's, which the service refuses past) is
    not run: its sums are NaN, and `fitting` leaves it out of training.
    """
    from tqdm.auto import tqdm

    with _inference(reference):
        starts = range(start, len(pairs), batch_size)
        begin: int
        for index, begin in enumerate(tqdm(starts, desc="reference log-probs", disable=not progress, unit="batch")):
            if stop is not None and stop():
                return begin
            batch = pairs[begin : begin + batch_size]
            prompts = encode_prompts(processor, batch)
            fit = [
                max_positions is None or len(prompt) + max(len(p.chosen_ids), len(p.rejected_ids)) <= max_positions
                for p, prompt in zip(batch, prompts, strict=True)
            ]
            for pair in itertools.compress(batch, [not f for f in fit]):
                pair.ref_chosen = pair.ref_rejected = math.nan
            runs = list(itertools.compress(batch, fit))
            if runs:
                sums, _, _ = _pair_sums(reference, list(itertools.compress(prompts, fit)), runs, pad_id)
                for pair, (chosen, rejected) in zip(runs, sums.double().tolist(), strict=True):
                    pair.ref_chosen, pair.ref_rejected = chosen, rejected
            if keep is not None and (index + 1) % keep_every == 0:
                keep(begin + len(batch))
    return len(pairs)


def fitting(pairs: Sequence[EncodedPair]) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(pairs to train on, pairs over the model's positions: NaN reference sums, see `compute_reference_logprobs`)."""
    long = [p for p in pairs if p.ref_chosen is not None and math.isnan(p.ref_chosen)]
    if not long:
        return list(pairs), []
    return [p for p in pairs if p.ref_chosen is None or not math.isnan(p.ref_chosen)], long


def write_partial_reference(path: Path, pairs: Sequence[EncodedPair], key: str) -> None:
    """The sums of a reference pass cut short (the first pairs only; no images: the full cache has them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "ref_chosen": pa.array([p.ref_chosen for p in pairs], type=pa.float64()),
            "ref_rejected": pa.array([p.ref_rejected for p in pairs], type=pa.float64()),
        }
    ).replace_schema_metadata({"rlaifv_reference_key": key})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _readable_table(path: Path, columns: list[str] | None = None) -> Any:
    """The parquet at `path`, or None when there is none or it cannot be read (warned: a file a disk lost the end
    of stopped every rerun with a traceback; its sums are computed again instead)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    try:
        return pq.read_table(path, columns=columns)
    except Exception as exc:  # pyarrow's ArrowInvalid, an OSError, a missing column: not this cache
        warnings.warn(f"{path} cannot be read ({exc}): its reference sums are computed again", stacklevel=3)
        return None


def _saved_key(table: Any, key: str | Sequence[str]) -> str | None:
    """Which of the keys (`_keys`) the reference table was made under; None: none of them."""
    saved = (table.schema.metadata or {}).get(b"rlaifv_reference_key", b"").decode()
    return saved if saved in _keys(key) else None


def read_partial_reference(path: Path, key: str | Sequence[str], pairs: Sequence[EncodedPair]) -> int:
    """Fill the first pairs' sums from a cut-short pass made for this reference and these pairs (made under one of
    the keys); how many."""
    table = _readable_table(path)
    if table is None:
        return 0
    if _saved_key(table, key) is None or table.num_rows > len(pairs):
        return 0
    done: int = table.num_rows
    for pair, chosen, rejected in zip(
        pairs[:done], table["ref_chosen"].to_pylist(), table["ref_rejected"].to_pylist(), strict=True
    ):
        pair.ref_chosen, pair.ref_rejected = chosen, rejected
    return done


REFERENCE_CACHE_ROWS = 512
"""Pairs per row group of the reference cache: written a group at a time, so the images (GBs for RLAIF-V's 83k
pairs) are never copied whole into one table beside the pairs that hold them."""


def write_reference_cache(path: Path, pairs: Sequence[EncodedPair], key: str) -> None:
    """Pairs with their reference sums: a self-contained parquet (images included), keyed in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.binary()),
            ("question", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("chosen_ids", pa.list_(pa.int32())),
            ("rejected_ids", pa.list_(pa.int32())),
            ("ref_chosen", pa.float64()),
            ("ref_rejected", pa.float64()),
        ],
        metadata={"rlaifv_reference_key": key},
    )
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(pairs), REFERENCE_CACHE_ROWS):
            group = pairs[start : start + REFERENCE_CACHE_ROWS]
            columns = {
                "id": [p.id for p in group],
                "image": [p.image for p in group],
                "question": [p.question for p in group],
                "chosen": [p.chosen for p in group],
                "rejected": [p.rejected for p in group],
                "chosen_ids": [p.chosen_ids for p in group],
                "rejected_ids": [p.rejected_ids for p in group],
                "ref_chosen": [p.ref_chosen for p in group],
                "ref_rejected": [p.ref_rejected for p in group],
            }
            writer.write_table(pa.table(columns, schema=schema))
    tmp.replace(path)


def read_reference_cache(path: Path, key: str | Sequence[str], pairs: Sequence[EncodedPair]) -> str | None:
    """Fill reference sums from the cache when it was made for this reference and these pairs: the key (one of
    `key`) it was made under, None when it was not."""
    table = _readable_table(path, columns=["ref_chosen", "ref_rejected"])
    if table is None:
        return None
    saved = _saved_key(table, key)
    if saved is None or table.num_rows != len(pairs):
        return None
    for pair, chosen, rejected in zip(
        pairs, table["ref_chosen"].to_pylist(), table["ref_rejected"].to_pylist(), strict=True
    ):
        pair.ref_chosen, pair.ref_rejected = chosen, rejected
    return saved


# -- training ---------------------------------------------------------------------------------


def _trainable_parameters(model: Any, config: DPOConfig) -> None:
    """Freeze the image encoder and/or projector by the family's module paths; a freeze that finds nothing
    to freeze is an error, so a family with other names cannot train its encoder by surprise."""
    if config.lora:
        return
    from rlaifv.reward.families import family_of, module_part

    family = family_of(model)
    wanted = {part for part, on in (("vision", config.freeze_vision), ("projector", config.freeze_projector)) if on}
    found: set[str] = set()
    for name, param in model.named_parameters():
        part = module_part(family, name)
        found.add(part or "")
        param.requires_grad_(part not in wanted)
    missing = wanted - found
    if missing:
        paths = {"vision": family.vision, "projector": family.projector}
        raise ConfigError(
            f"freeze_{sorted(missing)[0]} is set but model type {family.name!r} has no parameters under "
            f"{', '.join(p for part in sorted(missing) for p in paths[part])}; set it to false for this model"
        )


def disable_dropout(model: Any) -> int:
    """Dropout off in `model` while it stays in train mode (`DPOConfig.disable_dropout`); how many dropouts were on.

    As TRL's `disable_dropout_in_model`, every dropout module's p is set to 0, and also each module's dropout
    probability kept as a number (transformers' attention modules pass `attention_dropout`, CLIP's and SigLIP's
    `dropout`, to the attention function in train mode: TRL's leaves those on). peft's `lora_dropout` modules keep
    their p: LoRA's dropout is a setting of its own. 0: the model trains as it would with its dropout left on."""
    import torch

    kinds = (
        torch.nn.Dropout,
        torch.nn.Dropout1d,
        torch.nn.Dropout2d,
        torch.nn.Dropout3d,
        torch.nn.AlphaDropout,
        torch.nn.FeatureAlphaDropout,
    )
    adapters = [
        m.lora_dropout for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.Module)
    ]
    kept = {id(m) for adapter in adapters for m in adapter.modules()}
    changed = 0
    for module in model.modules():
        if id(module) in kept:
            continue
        if isinstance(module, kinds):
            changed += int(module.p > 0)
            module.p = 0.0
            continue
        rates = [
            name
            for name, value in vars(module).items()
            if name.endswith("dropout") and isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        ]
        for name in rates:
            setattr(module, name, 0.0)
        changed += len(rates)
    return changed


def _optimizer(model: Any, config: DPOConfig) -> torch.optim.Optimizer:
    import torch

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(param)
    if not decay and not no_decay:
        raise RunStateError("no trainable parameters (check freeze_* settings and lora_targets)")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _load_policy(config: DPOConfig, model_path: Path, device: Any, init_adapter: Path | None) -> Any:
    from rlaifv.reward.models import load_model

    model = load_model(model_path, device=str(device), dtype=config.dtype)
    if not config.lora:
        if init_adapter is not None:
            raise RunStateError("init_adapter needs lora=True")
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated property: nothing the user can change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if init_adapter is not None:
            return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_targets,
        )
        try:
            return get_peft_model(model, lora)
        except ValueError as exc:  # peft: no module matches lora_targets, or one it cannot wrap (a vision tower's)
            raise ConfigError(f"lora_targets {config.lora_targets!r}: {str(exc).splitlines()[0]}") from None


def train_dpo(
    config: DPOConfig,
    rows: Sequence[PreferenceRow],
    *,
    model_path: str | Path,
    output_dir: str | Path,
    reference_path: str | Path | None = None,
    init_adapter: str | Path | None = None,
    reference_is_start: bool = False,
    progress: bool = True,
    clear_checkpoints: bool = False,
) -> DPOResult:
    """Train the model at `model_path` on `rows`; write `output_dir/policy` and `output_dir/dpo_report.json`.

    Full fine-tune: the reference is the model at `reference_path` (default:
    `model_path`), loaded only to precompute its log-probs and then freed.
    LoRA: the reference is the base with the adapter disabled; `init_adapter`
    continues training an existing adapter over the same base, and with
    `reference_is_start` the reference is that starting adapter instead (RLAIF-V's
    round reference: the previous round's policy), its sums taken before step 1.

    SIGTERM stops the run where its work can be kept (between reference batches, after an optimizer step) and
    raises `TrainingInterrupted`; the same call resumes. A finished run keeps its checkpoints (a rerun resumes from
    them) unless `clear_checkpoints`.
    """
    with stop_on_sigterm() as stop_asked:
        return _train_dpo(
            config,
            rows,
            model_path=Path(model_path),
            output_dir=Path(output_dir),
            reference_path=reference_path,
            init_adapter=init_adapter,
            reference_is_start=reference_is_start,
            progress=progress,
            clear_checkpoints=clear_checkpoints,
            stop_asked=stop_asked,
        )


def _train_dpo(
    config: DPOConfig,
    rows: Sequence[PreferenceRow],
    *,
    model_path: Path,
    output_dir: Path,
    reference_path: str | Path | None,
    init_adapter: str | Path | None,
    reference_is_start: bool,
    progress: bool,
    stop_asked: Callable[[], bool],
    clear_checkpoints: bool = False,
) -> DPOResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from rlaifv.reward.models import load_model, load_processor, max_positions, save_processor
    from rlaifv.reward.prompt import end_of_turn_id

    started = time.time()
    init_adapter = Path(init_adapter) if init_adapter is not None else None
    if reference_is_start and (not config.lora or init_adapter is None):
        raise ConfigError("reference_is_start needs lora=True and an init_adapter (the starting policy)")
    if reference_is_start and config.token_kl > 0:
        raise ConfigError(
            "token_kl needs the reference's whole distribution at every step, which a LoRA run has only for the base:"
            " use the base as reference (train iterate: reference_mode=initial) or token_kl=0"
        )
    reference_path = check_models(config, model_path, reference_path)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        cpu=config.cpu,
    )
    show = progress and accelerator.is_local_main_process
    set_seed(config.seed)

    # Every rank loads the model: one that cannot (a node without the files, a GPU out of memory) ends them all,
    # which otherwise waited for it in the next collective (the fingerprints' broadcast).
    with together(accelerator, "loading the model"):
        processor = load_processor(model_path)
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    read = len(rows)
    rows, markup_rows = without_markup_rows(rows, processor)
    if markup_rows and accelerator.is_main_process:
        warnings.warn(
            f"{markup_rows} rows held the model's markup (an image placeholder or a special token such as <image> or"
            " </s>) in their question or answers; it was removed before training (rows left without an answer were"
            " dropped)",
            stacklevel=2,
        )
    pairs, dropped = encode_pairs(
        rows,
        tokenizer,
        eot_id=end_of_turn_id(tokenizer, config.end_of_turn, processor),
        max_answer_tokens=config.max_answer_tokens,
        processor=processor,
    )
    dropped = {"markup_only_answers": read - len(rows), **dropped}
    if dropped["identical_answers"] and accelerator.is_main_process:
        warnings.warn(
            f"{dropped['identical_answers']} pairs dropped whose chosen and rejected answers are the same tokens"
            " (the same text, or texts this tokenizer reads alike: words outside its vocabulary)",
            stacklevel=2,
        )
    if accelerator.is_main_process and (unknown := _mostly_unknown(pairs, tokenizer)):
        warnings.warn(
            f"{unknown} of {len(pairs)} pairs have an answer that is mostly the tokenizer's unknown token"
            f" ({tokenizer.unk_token}): words outside its vocabulary, which DPO cannot tell apart",
            stacklevel=2,
        )
    if dropped["over_max_answer_tokens"] and accelerator.is_main_process:
        warnings.warn(
            f"{dropped['over_max_answer_tokens']} pairs with an answer over max_answer_tokens"
            f" ({config.max_answer_tokens}) dropped",
            stacklevel=2,
        )
    if not pairs:
        raise DataError(f"no usable pairs of {read} rows (dropped: {_dropped_text(dropped)})")

    with together(accelerator, "loading the model"):
        policy = _load_policy(config, model_path, accelerator.device, init_adapter)
    _trainable_parameters(policy, config)
    zeroed = disable_dropout(policy) if config.disable_dropout else 0
    limit = max_positions(policy)

    # Reference log-probs: once, cached in the output folder.
    cache = output_dir / REFERENCE_CACHE
    # Keys under each rule that work may have been saved by (`saved_identities`): saves use the first.
    models = [reference_path if not config.lora else model_path, init_adapter if reference_is_start else None]
    identities = _on_main_process(accelerator, lambda: saved_identities([*models, model_path, init_adapter]))
    reference_ids = []
    for reference, adapter, *_ in identities:
        reference_id = str(reference)
        if reference_is_start:
            reference_id += f"|adapter:{adapter}"
        if (config.dtype, config.mixed_precision) != ("float32", "no"):
            reference_id += f"|{config.dtype}|{config.mixed_precision}"
        # pairs over the positions are NaN in the cache: a cache without them is another
        reference_id += f"|fits:{limit}"
        reference_ids.append(reference_id)
    keys = reference_cache_keys(reference_ids, pairs)
    key = keys[0]
    run_keys = _run_keys(config, keys, identities, accelerator.num_processes, dropout_turned_off=zeroed > 0)
    run_key = run_keys[0]
    finished = _finished_run(output_dir, run_keys)
    if finished is not None:
        if accelerator.is_main_process:
            warnings.warn(
                f"{output_dir / 'policy'} is this run's trained policy ({DPO_REPORT} names the same settings, data"
                " and models): it is not trained again",
                stacklevel=2,
            )
        return DPOResult(
            policy_dir=output_dir / "policy",
            policy_type="lora" if config.lora else "full",
            num_pairs=finished["num_pairs"],
            dropped_pairs=finished["dropped_pairs"],
            optimizer_steps=finished["optimizer_steps"],
            metrics=finished["metrics"],
            history=finished["history"],
            reference_cache=cache,
            reference_cache_hit=True,
            is_main_process=accelerator.is_main_process,
        )
    # Every rank reads the cache (and a cut-short pass) before any rank can write one: they must agree on hit or
    # miss and on where a pass resumes, since the pass checks for SIGTERM with a collective per batch.
    accelerator.wait_for_everyone()
    saved_under = read_reference_cache(cache, keys, pairs)
    hit = saved_under is not None
    partial = output_dir / REFERENCE_PARTIAL
    if not hit:
        start = read_partial_reference(partial, keys, pairs)

        def keep(done: int) -> None:
            with together(accelerator, "keeping the reference sums"):
                if accelerator.is_main_process:
                    try:
                        write_partial_reference(partial, pairs[:done], key)
                    except _save_errors() as exc:
                        raise _save_failed(partial, "reference sums", exc, remove=False) from None

        def reference_pass(model: Any) -> int:
            return compute_reference_logprobs(
                model,
                processor,
                pairs,
                batch_size=config.ref_batch_size,
                pad_id=pad_id,
                progress=show,
                start=start,
                stop=lambda: agreed(accelerator, stop_asked()),
                keep=keep,
                max_positions=limit,
            )

        # Under the policy's autocast, so that both sides of the log-ratio round alike (a margin of 0 at step 0, up
        # to float rounding: this pass's attention shares the prompt, the training pass's does not).
        if config.lora:
            # The base (adapter off), or the starting policy itself: before step 1 the adapter is the start's.
            with nullcontext() if reference_is_start else policy.disable_adapter(), accelerator.autocast():
                done = reference_pass(policy)
        else:
            with together(accelerator, "loading the reference"):
                reference = load_model(reference_path, device=str(accelerator.device), dtype=config.dtype)
            with accelerator.autocast():
                done = reference_pass(reference)
            del reference
        if done < len(pairs):
            keep(done)
            raise TrainingInterrupted(
                f"in the reference pass after {done} of {len(pairs)} pairs; their sums are saved"
                f" in {partial}: rerun the same command to resume",
                step=0,
            )
    # The cache is written before any rank goes on; one an earlier version made is kept under this one's key.
    with together(accelerator, "writing the reference cache"):
        if accelerator.is_main_process and saved_under != key:
            try:
                write_reference_cache(cache, pairs, key)
            except _save_errors() as exc:
                raise _save_failed(cache, "reference log-probs", exc, remove=False) from None
            if not hit:
                partial.unlink(missing_ok=True)
    pairs, too_long = fitting(pairs)
    dropped["over_model_positions"] = len(too_long)
    if too_long and accelerator.is_main_process:
        warnings.warn(
            f"{len(too_long)} pairs do not fit the model's {limit} positions (prompt + longer answer; the service"
            f" refuses such answers) and were dropped, the first row {too_long[0].id!r}",
            stacklevel=2,
        )
    if not pairs:
        raise DataError(f"no usable pairs of {read} rows (dropped: {_dropped_text(dropped)})")
    # The token-KL term's reference (a LoRA policy's is its base with the adapter off). On a cache miss this loads
    # the reference a second time: loading it once for both changed the trained weights' bits (measured: the
    # shapes recipe's round no longer reproduced), so fold the two loads together with the next recipe change.
    kl_reference = None
    if config.token_kl > 0 and not config.lora:
        with together(accelerator, "loading the reference"):
            kl_reference = load_model(reference_path, device=str(accelerator.device), dtype=config.dtype)
        kl_reference.requires_grad_(False)

    scorer = _pair_scorer_class()(policy, pad_id)
    scorer.train()
    optimizer = _optimizer(scorer, config)
    loader = torch.utils.data.DataLoader(
        list(range(len(pairs))),
        batch_size=config.batch_size,
        sampler=EpochSampler(len(pairs), config.seed),
        collate_fn=list,
        # Each iterator draws a base seed; from the global RNG, a resumed epoch's second draw shifted every dropout
        # mask after it (the checkpoint restores the global RNG as it was after the epoch's first draw).
        generator=torch.Generator().manual_seed(config.seed),
    )
    updates_per_epoch = math.ceil(len(loader) / accelerator.num_processes / config.gradient_accumulation_steps)
    total_updates = max(1, updates_per_epoch * config.epochs)
    scheduler = get_scheduler(
        config.lr_scheduler if config.lr_scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_updates) * accelerator.num_processes,
        num_training_steps=total_updates * accelerator.num_processes,
    )
    scorer, optimizer, loader, scheduler = accelerator.prepare(scorer, optimizer, loader, scheduler)

    history: list[dict[str, float]] = []
    running: dict[str, list[float]] = {}
    epoch_stats: dict[str, list[float]] = {}
    updates = start_epoch = epoch_updates = 0
    rank = accelerator.process_index
    checkpoints = CheckpointStore(
        output_dir / CHECKPOINTS, run_keys, keep=config.keep_checkpoints, settings=config.training_settings()
    )
    # DeepSpeed and FSDP save and load the model themselves (accelerate's hooks see no weights there).
    trainable_only = config.lora and accelerator.distributed_type not in _OWN_CHECKPOINTS
    if trainable_only:
        _checkpoint_trainable_only(accelerator)
    resumed = checkpoints.latest()  # made by checkpoint_every_* or by a SIGTERM, with the same settings
    stale = checkpoints.others()
    if stale and accelerator.is_main_process:
        changed = checkpoints.changed_settings(stale)
        why = f"settings changed: {', '.join(f'dpo.{k}' for k in changed)}" if changed else "other settings or model"
        warnings.warn(
            f"{len(stale)} checkpoint(s) in {checkpoints.root} ({_size_gb(stale):.1f} GB) are not resumed from"
            f" ({why}; or never completed): this run trains from step 0, and replaces those of the steps it saves"
            " (delete the rest if not needed; rerun with the earlier settings to resume them)",
            stacklevel=2,
        )
    if resumed is not None:
        with together(accelerator, f"reading checkpoint {resumed.folder.name}"):  # each rank reads its RNG state
            try:
                _check_random_states(resumed.folder, accelerator.process_index)
                accelerator.load_state(str(resumed.folder), **({"strict": False} if trainable_only else {}))
            except _load_errors() as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RunStateError(
                    f"checkpoint {resumed.folder} cannot be read ({detail}): delete it to resume from an earlier"
                    " checkpoint or start over"
                ) from None
        state = resumed.state
        start_epoch, updates, epoch_updates = state["epoch"], state["updates"], state["epoch_updates"]
        history = state["history"]
        # Each rank's own running means (the logged history averages them across ranks).
        running, epoch_stats = state["running"][rank], state["epoch_stats"][rank]

    def save(epoch: int, epoch_updates: int) -> Path:
        from accelerate.utils import gather_object

        ranks = gather_object([(running, epoch_stats if epoch_updates else {})])
        state = {
            "epoch": epoch,
            "epoch_updates": epoch_updates,
            "updates": updates,
            "history": history,
            "running": [r for r, _ in ranks],
            "epoch_stats": [e for _, e in ranks],
        }
        return checkpoints.save(accelerator, updates, state)

    if agreed(accelerator, stop_asked()):  # asked while loading or in the last reference batch: stop before a step
        raise TrainingInterrupted(
            f"before step {updates + 1} of {total_updates}: rerun the same command to resume",
            step=updates,
        )
    batches_per_epoch = len(loader)
    sizes = [len(b) for b in loader.batch_sampler]  # this rank's micro-batches of an epoch (each epoch's alike)
    bar = tqdm(total=total_updates, initial=updates, desc="DPO", disable=not show, unit="step")
    for epoch in range(start_epoch, config.epochs):
        loader.set_epoch(epoch)
        skipped = epoch_updates * config.gradient_accumulation_steps if epoch == start_epoch else 0
        batches = accelerator.skip_first_batches(loader, skipped) if skipped else loader
        if epoch != start_epoch or not skipped:
            epoch_stats, epoch_updates = {}, 0
        for batch_index, indices in enumerate(batches, start=skipped):
            batch = [pairs[int(i)] for i in indices]
            prompts = encode_prompts(processor, batch)
            ref_dists = None
            if config.token_kl > 0:
                unwrapped = accelerator.unwrap_model(scorer).model
                with accelerator.autocast():
                    ref_dists = _reference_for_kl(unwrapped, kl_reference, prompts, batch, pad_id)
            with accelerator.accumulate(scorer):
                out = scorer(prompts, batch, ref_dists)
                sums, kl = out[:, :2], (out[:, 2:] if ref_dists is not None else None)
                lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in batch], device=sums.device)
                ref = torch.tensor(
                    [[p.ref_chosen, p.ref_rejected] for p in batch], dtype=sums.dtype, device=sums.device
                )
                terms = dpo_terms(
                    sums,
                    ref,
                    lengths,
                    beta=config.beta,
                    nll_weight=config.nll_weight,
                    token_kl=kl,
                    token_kl_weight=config.token_kl,
                )
                # Over the window's pairs, not its micro-batches: accelerate divides every micro-batch's loss by
                # the accumulation steps, also in an epoch's last window, which may hold fewer micro-batches,
                # and an epoch's last micro-batch may hold fewer pairs (the step's gradient was 1/4 of the mean
                # with 4 steps and 1 micro-batch left, 1.1 times it with micro-batches of 4 and 2).
                weight = _window_weight(sizes, batch_index, len(batch), config.gradient_accumulation_steps)
                accelerator.backward(terms.loss * weight)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(scorer.parameters(), config.max_grad_norm)
                applied_lr = optimizer.param_groups[0]["lr"]  # this update's rate (the scheduler then moves on)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            stats = {
                "loss": float(terms.loss.detach()),
                "dpo_loss": float(terms.dpo_loss.detach().mean()),
                "nll": float(terms.nll.detach().mean()),
                "margin": float(terms.margins.detach().mean()),
                "accuracy": float((terms.margins.detach() > 0).float().mean()),
                "chosen_reward": float(terms.chosen_rewards.detach().mean()),
                "rejected_reward": float(terms.rejected_rewards.detach().mean()),
            }
            if terms.token_kl is not None:
                stats["token_kl"] = float(terms.token_kl.detach().mean())
            stats[PAIRS] = float(len(batch))
            for name, value in stats.items():
                running.setdefault(name, []).append(value)
                epoch_stats.setdefault(name, []).append(value)
            if accelerator.sync_gradients:
                updates += 1
                epoch_updates += 1
                bar.update(1)
                if updates % config.log_every == 0 or updates == total_updates:
                    means = _pair_means(running)
                    reduced = {
                        k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                        for k, v in means.items()
                    }
                    history.append({"step": updates, "epoch": epoch, "lr": applied_lr, **reduced})
                    bar.set_postfix(loss=f"{reduced['loss']:.4f}", margin=f"{reduced['margin']:.3f}")
                    running = {}
                end_of_epoch = batch_index + 1 >= batches_per_epoch
                if updates < total_updates and agreed(accelerator, stop_asked()):
                    folder = save(epoch + 1, 0) if end_of_epoch else save(epoch, epoch_updates)
                    bar.close()
                    raise TrainingInterrupted(
                        f"after step {updates} of {total_updates}; state saved in {folder}:"
                        " rerun the same command to resume",
                        step=updates,
                    )
                every = config.checkpoint_every_steps
                if every and updates % every == 0 and not end_of_epoch:
                    save(epoch, epoch_updates)
        last_step_due = config.checkpoint_every_steps and updates % config.checkpoint_every_steps == 0
        if epoch + 1 < config.epochs and (config.checkpoint_every_epoch or last_step_due):
            save(epoch + 1, 0)
    bar.close()

    accelerator.wait_for_everyone()
    policy_dir = output_dir / "policy"
    model = accelerator.unwrap_model(scorer).model
    metrics = {f"train_{k}": v for k, v in _pair_means(epoch_stats).items()}
    with together(accelerator, "saving the policy"):  # the others waited for a main process that had failed
        if accelerator.is_main_process:
            try:
                (output_dir / DPO_REPORT).unlink(
                    missing_ok=True
                )  # it names a finished run: not until this policy is saved
                if policy_dir.exists():  # an earlier run's files (a LoRA adapter beside a full model) must not mix in
                    shutil.rmtree(policy_dir)
                model.save_pretrained(policy_dir, safe_serialization=True)
                if not config.lora:
                    save_processor(processor, model_path, policy_dir)
            except _save_errors() as exc:
                raise _save_failed(policy_dir, "policy", exc) from None
            report = {
                "kind": "dpo",
                "run_key": run_key,  # the policy beside it is this run's, whole: a rerun of it goes on from here
                "config": config.to_dict(),
                "effective_learning_rate": config.lr,
                "model": _where(model_path),
                "reference": (
                    f"{_where(init_adapter)} over {_where(model_path)}"
                    if reference_is_start
                    else _where(reference_path)
                ),
                "init_adapter": str(init_adapter) if init_adapter else None,
                "rows_read": read,
                "num_pairs": len(pairs),
                "markup_removed_rows": markup_rows,
                "dropped_pairs": sum(dropped.values()),
                "dropped": dropped,
                "optimizer_steps": updates,
                "resumed_from_epoch": start_epoch,
                "resumed_from_step": resumed.state["updates"] if resumed is not None else 0,
                "num_processes": accelerator.num_processes,
                "reference_cache": {"path": cache.name, "key": key, "hit": hit},
                "metrics": metrics,
                "history": history,
                "seconds": time.time() - started,
            }
            try:
                write_json(output_dir / DPO_REPORT, report)
            except OSError as exc:
                raise _save_failed(output_dir / DPO_REPORT, "report", exc, remove=False) from None
            kept = [c.folder for c in checkpoints.complete()]
            if kept and clear_checkpoints:  # a caller that never reruns a finished run (iterate's DONE rounds)
                shutil.rmtree(checkpoints.root, ignore_errors=True)
            elif kept:  # what a rerun of this command would resume from (and train the steps after it again)
                warnings.warn(
                    f"the run is done and its policy saved; {len(kept)} checkpoint(s) stay in {checkpoints.root}"
                    f" ({_size_gb(kept):.1f} GB): a rerun of the same command uses the saved policy, and resumes from"
                    " the newest only if the policy is removed; delete them when the policy is all you need",
                    stacklevel=2,
                )
    accelerator.free_memory()
    return DPOResult(
        policy_dir=policy_dir,
        policy_type="lora" if config.lora else "full",
        num_pairs=len(pairs),
        dropped_pairs=sum(dropped.values()),
        optimizer_steps=updates,
        metrics=metrics,
        history=history,
        reference_cache=cache,
        reference_cache_hit=hit,
        is_main_process=accelerator.is_main_process,
    )


def _on_main_process(accelerator: Any, compute: Callable[[], Any]) -> Any:
    """`compute()` on the main process only, its value (or its error) sent to the others: under torchrun each rank
    fingerprinted the model and the reference itself (8 ranks x two 15 GB models read 240 GB at every start)."""
    if accelerator.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    sent: list[Any] = [None, None]
    failed: Exception | None = None
    if accelerator.is_main_process:
        try:
            sent[0] = compute()
        except Exception as exc:  # sent too: the others would wait for the value until the collective's timeout
            failed, sent[1] = exc, f"{type(exc).__name__}: {exc}"
    broadcast_object_list(sent)
    if failed is not None:
        raise failed
    if sent[1] is not None:
        raise TrainerError(f"the main process failed: {sent[1]}")
    return sent[0]


def _run_keys(
    config: DPOConfig,
    cache_keys: Sequence[str],
    identities: Sequence[Sequence[Any]],
    processes: int,
    *,
    dropout_turned_off: bool,
) -> list[str]:
    """The keys this run's checkpoints and finished policy may carry, the first the one saves use: its data and
    reference (`cache_keys`), settings, process count and models. The policy trained is part of the run: a
    checkpoint of another --model (the same output folder, the model corrected after a stop) resumed its weights
    under this model's name. A run of a version before disable_dropout is this run where the setting turned no
    dropout off."""
    settings = [config.training_settings()]
    if not dropout_turned_off:
        settings.append(config.training_settings(DPOConfig.EARLIER_LEFT_OUT))
    return [
        hashlib.sha256(json.dumps([k, values, processes, ids[2:]]).encode()).hexdigest()
        for k, ids in zip(cache_keys, identities, strict=True)
        for values in settings
    ]


def _finished_run(output_dir: Path, run_keys: Sequence[str]) -> dict[str, Any] | None:
    """The report of this very run (saved under one of its keys) when it finished in `output_dir` (the report is
    removed before its policy is written again, and written after it is whole): a stop after the last step (Ctrl-C
    in it, SIGTERM or a full disk in the export that follows) trained the whole run again on the rerun."""
    try:
        report = json.loads((output_dir / DPO_REPORT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("run_key") not in run_keys or not (output_dir / "policy").is_dir():
        return None
    return report


def check_models(
    config: DPOConfig,
    model_path: Path,
    reference_path: str | Path | None,
    *,
    names: tuple[str, str] = ("model", "reference"),
) -> Path:
    """The run's reference folder, once the models can make this run: local folders, no separate reference for a
    LoRA run (its reference is the base with the adapter off: one given was ignored), and a reference that
    tokenizes as the policy does (else the trained bundle would never load). `names` name them in errors."""
    from rlaifv.reward.bundle import check_tokenizers_match
    from rlaifv.reward.errors import BundleError

    model_name, reference_name = names
    if config.lora and reference_path is not None and Path(reference_path).resolve() != model_path.resolve():
        raise ConfigError(
            f"a LoRA run's reference is its base model ({model_path}) with the adapter off; a separate"
            f" {reference_name} ({reference_path}) is for full fine-tuning only"
        )
    require_model_folder(model_path, model_name)
    reference = Path(reference_path) if reference_path is not None else model_path
    if reference.resolve() != model_path.resolve():
        require_model_folder(reference, reference_name)
        try:
            check_tokenizers_match(model_path, reference)
        except BundleError as exc:
            raise ConfigError(str(exc)) from None
    return reference


def _dropped_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in dropped.items() if count) or "none"


def _reference_for_kl(
    policy: Any, reference: Any | None, prompts: Sequence[EncodedPrompt], pairs: Sequence[EncodedPair], pad_id: int
) -> list[list[torch.Tensor]]:
    """The KL term's reference distributions: the separate reference, or (LoRA) the base with the adapter off."""
    if reference is not None:
        return reference_distributions(reference, prompts, pairs, pad_id)
    with policy.disable_adapter():
        return reference_distributions(policy, prompts, pairs, pad_id)


class EpochSampler:
    """A fresh seeded permutation per epoch (seed + epoch), so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    state: dict[str, Any]


class CheckpointStore:
    """Training state saved by `accelerate` under `step-NNNNNNN/`, complete once its trainer_state.json is written.

    Only a run with the same training settings (`run_key`) resumes from a checkpoint; older checkpoints of the
    run are removed after a newer one is complete, so a crash while saving never leaves none.
    """

    def __init__(
        self, root: Path, run_key: str | Sequence[str], *, keep: int, settings: dict[str, Any] | None = None
    ) -> None:
        self.root, self.run_keys, self.keep = root, _keys(run_key), keep
        self.run_key = self.run_keys[0]  # what saves record; the others (`saved_identities`) are resumed from too
        self.settings = settings or {}

    def changed_settings(self, folders: list[Path]) -> list[str]:
        """The training settings in which the checkpoints in `folders` differ from this run's (those that record
        theirs: checkpoints of older versions hold only the run's key)."""
        changed: set[str] = set()
        for folder in folders:
            try:
                recorded = json.loads((folder / TRAINER_STATE).read_text()).get("settings")
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(recorded, dict):
                changed |= {
                    k for k in recorded.keys() | self.settings.keys() if recorded.get(k) != self.settings.get(k)
                }
        return sorted(changed)

    def complete(self) -> list[Checkpoint]:
        """This run's complete checkpoints, oldest first."""
        found = []
        for folder in sorted(self.root.glob("step-*")) if self.root.is_dir() else []:
            state_file = folder / TRAINER_STATE
            if not state_file.is_file():
                continue
            try:
                state = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                continue
            if state.get("key") in self.run_keys:
                found.append(Checkpoint(folder, state))
        return sorted(found, key=lambda c: c.state["updates"])

    def latest(self) -> Checkpoint | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def others(self) -> list[Path]:
        """Checkpoint folders this run will not resume: another run's settings, or never completed."""
        mine = {c.folder for c in self.complete()}
        return [f for f in sorted(self.root.glob("step-*")) if f not in mine] if self.root.is_dir() else []

    def save(self, accelerator: Any, updates: int, state: dict[str, Any]) -> Path:
        """Every rank writes its files (its RNG state) before the main process marks the folder complete; a rank
        that cannot ends them all, and the folder is removed once none writes there."""
        folder = self.root / f"step-{updates:07d}"
        try:
            with together(accelerator, "saving a checkpoint"):
                try:
                    if accelerator.is_main_process:  # a folder being overwritten is incomplete until the state is new
                        (folder / TRAINER_STATE).unlink(missing_ok=True)
                    accelerator.save_state(str(folder))
                except _save_errors() as exc:
                    raise _save_failed(folder, "checkpoint", exc, remove=False) from None
        except Exception:
            if accelerator.is_main_process:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        with together(accelerator, "saving a checkpoint"):
            if accelerator.is_main_process:
                recorded = state | {"key": self.run_key, "settings": self.settings}
                try:
                    write_json(folder / TRAINER_STATE, recorded)
                except OSError as exc:
                    raise _save_failed(folder, "checkpoint", exc) from None
                if self.keep:
                    for old in self.complete()[: -self.keep]:
                        shutil.rmtree(old.folder, ignore_errors=True)
        return folder


_OWN_CHECKPOINTS = ("DEEPSPEED", "FSDP", "MEGATRON_LM")
"""accelerate's distributed types whose engines write and read the model's state themselves."""


def _checkpoint_trainable_only(accelerator: Any) -> None:
    """A LoRA run's checkpoints hold the trainable weights only: the frozen base is the --model folder's, and
    saving it too made every checkpoint of a 7B run 14 GB. Loading checks that each trainable weight is there
    (the load is not strict), so a damaged checkpoint never resumes from an adapter's initial values."""
    from safetensors import safe_open

    def trainable(model: Any) -> set[str]:
        return {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    def drop_frozen(models: list[Any], weights: list[dict[str, Any]], _folder: str) -> None:
        for model, state in zip(models, weights, strict=True):
            keep = trainable(model)
            for name in [name for name in state if name not in keep]:
                del state[name]

    def require_trainable(models: list[Any], folder: str) -> None:
        for index, model in enumerate(models):
            file = Path(folder) / (f"model_{index}.safetensors" if index else "model.safetensors")
            if not file.is_file():
                raise RunStateError(f"checkpoint {Path(folder).name} lacks {file.name}: delete {folder} to start over")
            with safe_open(str(file), "pt") as saved:
                lacking = sorted(trainable(model) - set(saved.keys()))
            if lacking:
                raise RunStateError(
                    f"checkpoint {Path(folder).name} lacks {len(lacking)} trainable weight(s), the first {lacking[0]}:"
                    f" delete {folder} to resume from an earlier checkpoint or start over"
                )

    accelerator.register_save_state_pre_hook(drop_frozen)
    accelerator.register_load_state_pre_hook(require_trainable)


def _save_errors() -> tuple[type[BaseException], ...]:
    """What a save to a full disk or a read-only folder raises: torch's writer a RuntimeError, safetensors its own."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


def _check_random_states(folder: Path, rank: int) -> None:
    """This rank's RNG state in a checkpoint can be read. accelerate resumes without one it cannot read (it logs
    "Could not load random states" at info level and goes on), so dropout after the resume silently differed from
    the run's own; every checkpoint of this run has one per rank (the run key holds the number of ranks)."""
    from accelerate.utils import load

    file = folder / f"random_states_{rank}.pkl"
    try:
        states = load(file)
    except _load_errors() as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{file.name}: {detail}") from None
    if not isinstance(states, dict) or "torch_manual_seed" not in states:
        raise ValueError(f"{file.name} holds no random state")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or cut-short checkpoint raises: a save's errors, or a truncated or foreign pickle."""
    return (*_save_errors(), EOFError, ValueError, pickle.UnpicklingError)


def _save_failed(path: Path, what: str, exc: BaseException, *, remove: bool = True) -> RunStateError:
    """The error of a save that failed, once the folder it wrote is removed: a partial folder looked saved to a
    rerun, and the traceback said nothing of where. `remove=False`: the caller removes it (once no other rank writes
    there), or it is a file written whole or not at all."""
    if remove:
        shutil.rmtree(path, ignore_errors=True)
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RunStateError(
        f"cannot save the {what} in {path} ({detail}): is the disk full or the folder read-only? No part of it is"
        " kept; rerun the same command once there is room"
    )


def _size_gb(folders: Sequence[Path]) -> float:
    return sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file()) / 1e9


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


PAIRS = "pairs"
"""The statistics' entry holding each micro-batch's number of pairs, the weights of its means."""


def _pair_means(stats: dict[str, list[float]]) -> dict[str, float]:
    """Each statistic's mean over pairs: a micro-batch's mean counts once per pair it holds (an epoch's last
    micro-batch may hold fewer). Statistics a checkpoint saved without the pair counts count once per micro-batch."""
    weights = stats.get(PAIRS, [])
    means = {}
    for name, values in stats.items():
        if name == PAIRS:
            continue
        if len(weights) != len(values) or not sum(weights):
            means[name] = _mean(values)
        else:
            means[name] = float(sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights))
    return means


def _window_weight(sizes: Sequence[int], index: int, pairs: int, steps: int) -> float:
    """What a micro-batch's mean loss is multiplied by so that its accumulation window's gradient is the mean over
    the window's pairs, once accelerate has divided it by `steps`: `sizes` are the epoch's micro-batch sizes
    (read from the batch sampler, not by reading batches ahead, which would end accelerate's window early)."""
    first = index - index % steps
    window = sum(sizes[first : first + steps])
    if index >= len(sizes) or sizes[index] != pairs or not window:  # not the batches the sampler said: as before
        return 1.0
    return pairs * steps / window
