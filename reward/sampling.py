"""Sampling N answers per prompt with their raw log-probs recorded during generation.

Why our own decode loop rather than `generate()`: `generate(num_return_sequences=N)`
copies the prompt N times *before* prefill, so the image+prompt prefix would be
encoded N times. Here each prefix runs once and its N samples attend to that one
copy (`reward.shared_prefix`; where that does not apply, the KV cache is forked N
ways into buffers that grow in place, `reward.kv_cache`), finished rows are dropped
from the batch, and the log-prob of every sampled
token under the *raw* model distribution (temperature 1, no top-p/top-k, no
penalties or logit bias) is kept, so the policy term of the reward needs no
second pass. OpenAI's presence/frequency penalties and logit_bias shape only
the distribution tokens are drawn from; stop strings end a row early (the
caller cuts the text).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from rlaifv.reward.errors import Aborted, ContextLengthError
from rlaifv.reward.kv_cache import preallocate
from rlaifv.reward.logprobs import (
    attending,
    fork,
    model_device,
    prefill,
    selective_log_softmax,
    split_for_batching,
    step,
)
from rlaifv.reward.prompt import EncodedPrompt

Decode = Callable[[Sequence[int]], str]
"""Token ids -> text, for stop strings."""


class SamplingParams(BaseModel):
    """Decoding settings; the same for all N samples of a prompt ("deconfounded")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Drop tokens less likely than min_p x the likeliest one (after temperature)."
    )
    max_tokens: int = Field(64, ge=1, description="Maximum new tokens per answer, end-of-turn included.")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Seed for reproducible samples; random when omitted."
    )
    stop: tuple[str, ...] = Field(
        (), description="Stop strings: a sample ends at the step whose text first contains one (OpenAI `stop`)."
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of every token already sampled in this answer."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time it was already sampled."
    )
    logit_bias: dict[int, float] = Field(
        default_factory=dict, description="Token id -> added to its logit (-100 bans, +100 forces in practice)."
    )

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or biases change the sampling distribution (never the recorded log-probs)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def fit_to_positions(
    params: SamplingParams,
    prompt_tokens: int,
    limit: int | None,
    *,
    given: str | None,
    prompt_param: str,
    reserve: int = 0,
) -> SamplingParams:
    """`params` with room for its answers in the model's `limit` positions (`reserve` more kept free). A max_tokens
    the caller gave (`given`: the name they gave it by) that does not fit is refused, naming it: answers sampled
    past the positions are noise. A default is shortened to fit; a prompt leaving no room is refused, naming
    `prompt_param` (the default is not the caller's to fix)."""
    room = None if limit is None else limit - prompt_tokens - reserve
    if room is None or params.max_tokens <= room:
        return params
    if given is None:
        if room >= 1:
            return params.model_copy(update={"max_tokens": room})
        raise ContextLengthError(
            f"prompt ({prompt_tokens} tokens) leaves no room for an answer in the model's {limit} positions"
            + (f" ({reserve} kept free)" if reserve else ""),
            param=prompt_param,
        )
    raise ContextLengthError(
        f"prompt ({prompt_tokens} tokens) + {given} ({params.max_tokens}) exceeds the model's {limit} positions",
        param=given,
    )


@dataclass
class Sample:
    """One sampled answer: its tokens (end-of-turn included when generated) and raw log-probs (T,).

    `top_ids`/`top_logprobs` (T, k): the k most likely tokens of the raw distribution at each step, when asked.
    """

    token_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: Literal["stop", "length"]
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def _transform(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Raw logits (rows, V) -> sampling logits under temperature, top-k, top-p and min-p (-inf = excluded).

    The order is vLLM's (its V1 sampler: temperature, min-p, then top-k and top-p), so that both engines keep the
    same tokens; transformers applies min-p last, which differs only when top-p is set too."""
    # Shift before dividing so tiny temperatures give huge negative numbers, never inf - inf = NaN. `amax`, not
    # `max(dim)`: the same values without the indices, 7x faster on the CPU (8 x 31,999: 20 against 144 us).
    logits = logits - logits.amax(dim=-1, keepdim=True)
    if params.temperature != 1.0:  # x / 1.0 == x: skip a pass over (rows, V) at the default temperature
        logits = logits / params.temperature
    if params.min_p > 0.0:  # the likeliest logit is 0 after the shift: p / p_max >= min_p <=> logit >= log(min_p)
        logits = logits.masked_fill(logits < math.log(params.min_p), float("-inf"))
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        drop_sorted[..., 0] = False  # and the likeliest always: a top_p that is 0 in float32 (1e-300) kept none
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class _Chooser:
    """Picks next tokens for all rows of a batch in a few tensor ops, whatever the mix of prompts.

    Rows with the same decoding settings are transformed together; each prompt's
    own generator draws one uniform number per row of that prompt, and tokens
    come from inverse-CDF sampling. A prompt's samples therefore depend only on
    its seed, not on what else shares the batch, as far as its logits do: in
    float32 a batch's padding moves log-probs by about 1e-6 (a probe saw no token
    change: docs/handover.md, though a draw that close to a boundary could flip one); in
    bfloat16 by rounding, and a near tie can flip a token (the rewards move at the
    noise level, about 1e-4). The N samples of a request share its generator: a
    seed fixes the whole group, not each sample alone (n=1 is not the first of n=4).
    """

    def __init__(self, params: Sequence[SamplingParams], blocked: torch.Tensor, rows: int) -> None:
        self.params = list(params)
        self.blocked = blocked
        self.rows = rows
        self.adjusts = any(p.adjusts_logits for p in params)
        self.counts: torch.Tensor | None = None  # (rows, V) times each token was sampled, for the penalties
        self.bias: torch.Tensor | None = None  # (prompts, V) logit_bias
        device = blocked.device
        self.presence = torch.tensor([p.presence_penalty for p in params], device=device)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], device=device)
        self.generators = [_generator(p.seed) for p in params]
        members: dict[tuple[float, float, int, float], list[int]] = {}
        for g, p in enumerate(params):
            members.setdefault((p.temperature, p.top_p, p.top_k, p.min_p), []).append(g)
        self.members = list(members.values())  # prompts sharing one decoding setting, per setting
        setting_of_group = [0] * len(self.params)
        for s, groups in enumerate(self.members):
            for g in groups:
                setting_of_group[g] = s
        self.setting_of_group = torch.tensor(setting_of_group, device=blocked.device)

    def __call__(self, logits: torch.Tensor, groups: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """logits (rows, V) of live rows, groups (rows,) their prompt index, sorted ascending, rows their row ids.

        Works on a copy: the caller records log-probs from the raw logits it passed.
        """
        logits = logits.float()
        if self.blocked.numel():
            logits = logits.index_fill(-1, self.blocked, float("-inf"))
        if self.adjusts:
            logits = self._adjust(logits, groups, rows)
        counts = torch.bincount(groups, minlength=len(self.params)).tolist()
        if len(self.members) == 1:
            return self._pick(logits, self.members[0], counts)
        setting = self.setting_of_group[groups]
        chosen = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for s, members in enumerate(self.members):
            rows = (setting == s).nonzero().squeeze(-1)
            if rows.numel():
                chosen[rows] = self._pick(logits[rows], members, counts)
        return chosen

    def _adjust(self, logits: torch.Tensor, groups: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """OpenAI's penalties: logit - frequency * count - presence * (count > 0) + bias."""
        vocab = logits.shape[-1]
        if self.counts is None:
            self.counts = torch.zeros((self.rows, vocab), device=logits.device)
            bias = torch.zeros((len(self.params), vocab), device=logits.device)
            for g, p in enumerate(self.params):
                if p.logit_bias:
                    ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                        raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
                    values = torch.tensor(list(p.logit_bias.values()), device=logits.device)
                    bias[g] = bias[g].index_put((ids,), values)
            self.bias = bias if any(p.logit_bias for p in self.params) else None
        counts = self.counts[rows]
        logits = logits - self.frequency[groups, None] * counts - self.presence[groups, None] * (counts > 0).float()
        if self.bias is not None:
            logits = logits + self.bias[groups]
        return logits

    def observe(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the tokens just sampled (the penalties' state)."""
        if self.counts is not None:
            self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)

    def _pick(self, logits: torch.Tensor, members: list[int], counts: list[int]) -> torch.Tensor:
        params = self.params[members[0]]
        if params.temperature < 1e-5:
            return logits.argmax(dim=-1)
        cdf = _transform(logits, params).softmax(-1).cumsum(-1)
        draws = [torch.rand(counts[g], generator=self.generators[g]) for g in members if counts[g]]
        uniform = torch.cat(draws).to(logits.device).unsqueeze(-1) * cdf[:, -1:]
        # right=True: the first token whose CDF exceeds u, so zero-probability tokens are never picked.
        return torch.searchsorted(cdf, uniform, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@torch.no_grad()
def sample_answers(
    model: Any,
    prompts: Sequence[EncodedPrompt],
    counts: Sequence[int],
    params: Sequence[SamplingParams],
    *,
    stop_ids: Sequence[int],
    blocked_ids: Sequence[int] = (),
    pad_id: int = 0,
    top_logprobs: Sequence[int] | None = None,
    decode: Decode | Sequence[Decode] | None = None,
    abort: threading.Event | None = None,
    withdrawn: Sequence[threading.Event | None] | None = None,
) -> list[list[Sample]]:
    """Sample counts[b] answers for prompts[b] with params[b]; returns samples grouped per prompt.

    `abort`, once set, stops the sampling at its next step (`Aborted`). `withdrawn[b]`, once set, ends prompt b's
    rows at the step that sees it (their samples are cut short: the caller drops them), so a request whose client
    left stops taking decode steps from the rest of its batch.

    top_logprobs[b] > 0 records that many most likely tokens (raw distribution) per step of prompt b's samples.
    `decode` (token ids -> text; one for all prompts, or one per prompt, e.g. reading a continuation after its
    prompt) is needed when any params[b].stop is set: a row stops at the step whose decoded text first contains
    one of its stop strings (the caller truncates the text).
    """
    decodes = [decode] * len(prompts) if decode is None or callable(decode) else list(decode)
    tops = list(top_logprobs) if top_logprobs is not None else [0] * len(prompts)
    if any(p.stop and d is None for p, d in zip(params, decodes, strict=True)):
        raise ValueError("stop strings need a decode function")
    withdrawals = list(withdrawn) if withdrawn is not None else [None] * len(prompts)
    groups = split_for_batching(model, prompts)
    if len(groups) > 1:
        merged: list[list[Sample]] = [[] for _ in prompts]
        for group in groups:
            group = [i for i in group if not (withdrawals[i] is not None and withdrawals[i].is_set())]  # type: ignore[union-attr]
            if not group:
                continue
            part = sample_answers(
                model,
                [prompts[i] for i in group],
                [counts[i] for i in group],
                [params[i] for i in group],
                stop_ids=stop_ids,
                blocked_ids=blocked_ids,
                pad_id=pad_id,
                top_logprobs=[tops[i] for i in group],
                decode=[decodes[i] for i in group],
                abort=abort,
                withdrawn=[withdrawals[i] for i in group],
            )
            for i, samples in zip(group, part, strict=True):
                merged[i] = samples
        return merged
    if abort is not None and abort.is_set():
        raise Aborted("sampling stopped before its prefill")
    device = model_device(model)
    state = prefill(model, prompts, pad_id)
    group_of_row = torch.repeat_interleave(
        torch.arange(len(prompts), device=device), torch.tensor(list(counts), device=device)
    )
    limits = torch.tensor([params[int(g)].max_tokens for g in group_of_row], device=device)
    width = int(limits.max())
    state = fork(model, state, group_of_row, width)
    if not state.shared:
        preallocate(state.cache, width)
    stops = torch.tensor(list(stop_ids), device=device)
    blocked = torch.tensor(sorted(set(blocked_ids) - set(stop_ids)), dtype=torch.long, device=device)
    total = int(group_of_row.shape[0])
    choose = _Chooser(params, blocked, total)
    # Every live row gets one token per step, so step t writes column t; rows stop at different t.
    token_buf = torch.full((total, width), pad_id, dtype=torch.long, device=device)
    logp_buf = torch.zeros((total, width), device=device)
    lengths = torch.zeros(total, dtype=torch.long, device=device)
    stopped = torch.zeros(total, dtype=torch.bool, device=device)
    active = torch.arange(total, device=device)  # original row index of each batch row
    alive = torch.ones(total, dtype=torch.bool, device=device)  # finished rows ride along until compaction
    k = min(max(tops, default=0), int(state.logits.shape[-1]))
    top_ids = torch.zeros((total, width, k), dtype=torch.long, device=device) if k else None
    top_vals = torch.zeros((total, width, k), device=device) if k else None
    prompt_of_row = group_of_row.tolist()
    row_stops = [params[g].stop for g in prompt_of_row]
    texts: list[list[int]] | None = [[] for _ in range(total)] if any(row_stops) else None
    logits = state.logits
    dead = 0  # finished rows still in the batch; while there are none, no gather and no index of live rows
    watched = [b for b, event in enumerate(withdrawals) if event is not None]
    with attending(model, state):
        for t in range(width):
            if abort is not None and abort.is_set():
                raise Aborted(f"sampling stopped at step {t} of {width}")
            if dead:
                live = alive.nonzero().squeeze(-1)
                rows, live_logits = active[live], logits[live]
            else:
                rows, live_logits = active, logits
            raw = live_logits.float()  # one conversion for the sampler, the log-probs and the top tokens
            new = choose(raw, group_of_row[rows], rows)
            choose.observe(rows, new)
            stop = torch.isin(new, stops)
            token_buf[rows, t] = new
            logp_buf[rows, t] = selective_log_softmax(raw, new)
            if top_ids is not None and top_vals is not None:
                values, ids = raw.log_softmax(-1).topk(k, dim=-1)
                top_ids[rows, t], top_vals[rows, t] = ids, values
            if texts is not None:
                hits = []
                for row, token, ended in zip(rows.tolist(), new.tolist(), stop.tolist(), strict=True):
                    texts[row].append(token)
                    reader = decodes[prompt_of_row[row]]
                    if row_stops[row] and not ended and reader and any(s in reader(texts[row]) for s in row_stops[row]):
                        hits.append(row)
                if hits:
                    stop = stop | torch.isin(rows, torch.tensor(hits, device=device))
            lengths[rows] = t + 1
            stopped[rows] = stop
            going = ~stop & (t + 1 < limits[rows])
            if watched and (gone := [b for b in watched if withdrawals[b].is_set()]):  # type: ignore[union-attr]
                watched = [b for b in watched if b not in gone]
                going &= ~torch.isin(group_of_row[rows], torch.tensor(gone, device=device))
            if dead:
                alive[live] = going
                feed = torch.full((active.shape[0],), pad_id, dtype=torch.long, device=device)
                feed[live] = new
            else:
                alive, feed = going, new
            dead = int((~alive).sum())  # read on the host once per step (was three reads)
            if dead == alive.shape[0]:
                break
            feed = feed.masked_fill(~alive, pad_id)
            # Dropping finished rows re-copies a forked KV cache, so do it only once a quarter of the batch is dead;
            # a shared-prefix cache copies nothing (only its layout changes), so drop them at once.
            if dead and (state.shared or dead * 4 >= alive.shape[0]):
                keep = alive.nonzero().squeeze(-1)
                state = state.select(keep)
                active, feed, alive = active[keep], feed[keep], alive[keep]
                dead = 0
            logits = step(model, state, feed.unsqueeze(-1))

    token_lists = token_buf.tolist()
    logp_rows = logp_buf.cpu()
    top_id_rows = top_ids.cpu() if top_ids is not None else None
    top_val_rows = top_vals.cpu() if top_vals is not None else None
    grouped: list[list[Sample]] = [[] for _ in prompts]
    for row, (n, stop, group) in enumerate(zip(lengths.tolist(), stopped.tolist(), group_of_row.tolist(), strict=True)):
        sample = Sample(token_lists[row][:n], logp_rows[row, :n].clone(), "stop" if stop else "length")
        if tops[group] and top_id_rows is not None and top_val_rows is not None:
            sample.top_ids = top_id_rows[row, :n, : tops[group]].clone()
            sample.top_logprobs = top_val_rows[row, :n, : tops[group]].clone()
        grouped[group].append(sample)
    return grouped
