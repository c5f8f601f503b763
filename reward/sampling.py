"""Sampling N answers per prompt with their raw log-probs recorded during generation.

Why our own decode loop rather than `generate()`: `generate(num_return_sequences=N)`
copies the prompt N times *before* prefill, so the image+prompt prefix would be
encoded N times. Here each prefix runs once, its KV cache is forked N ways,
finished rows are dropped from the batch, and the log-prob of every sampled
token under the *raw* model distribution (temperature 1, no top-p/top-k) is
kept, so the policy term of the reward needs no second pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from reward.logprobs import model_device, prefill, step
from reward.prompt import EncodedPrompt


class SamplingParams(BaseModel):
    """Decoding settings; the same for all N samples of a prompt ("deconfounded")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    max_tokens: int = Field(64, ge=1, description="Maximum new tokens per answer, end-of-turn included.")
    seed: int | None = Field(None, description="Seed for reproducible samples; random when omitted.")


@dataclass
class Sample:
    """One sampled answer: its tokens (end-of-turn included when generated) and raw log-probs (T,)."""

    token_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: Literal["stop", "length"]


def _choose(
    logits: torch.Tensor, params: SamplingParams, blocked: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Pick next tokens (rows,) from raw logits (rows, V) under the sampling settings."""
    logits = logits.float().clone()
    if blocked.numel():
        logits[:, blocked] = float("-inf")
    if params.temperature < 1e-5:
        return logits.argmax(dim=-1)
    # Shift before dividing so tiny temperatures give huge negative numbers, never inf - inf = NaN.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


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
) -> list[list[Sample]]:
    """Sample counts[b] answers for prompts[b] with params[b]; returns samples grouped per prompt."""
    device = model_device(model)
    state = prefill(model, prompts, pad_id)
    group_of_row = torch.repeat_interleave(
        torch.arange(len(prompts), device=device), torch.tensor(list(counts), device=device)
    )
    state = state.select(group_of_row)
    generators = [_generator(p.seed) for p in params]
    stops = torch.tensor(list(stop_ids), device=device)
    blocked = torch.tensor(sorted(set(blocked_ids) - set(stop_ids)), dtype=torch.long, device=device)
    limits = torch.tensor([params[int(g)].max_tokens for g in group_of_row], device=device)

    total = int(group_of_row.shape[0])
    tokens: list[list[int]] = [[] for _ in range(total)]
    logps: list[list[torch.Tensor]] = [[] for _ in range(total)]
    reasons: list[str] = ["length"] * total
    active = torch.arange(total, device=device)  # original row index of each batch row
    alive = torch.ones(total, dtype=torch.bool, device=device)  # finished rows ride along until compaction
    logits = state.logits
    while True:
        raw = torch.log_softmax(logits.float(), dim=-1)
        chosen = torch.full((active.shape[0],), pad_id, dtype=torch.long, device=device)
        groups = group_of_row[active]
        for g in torch.unique(groups[alive]).tolist():
            rows = ((groups == g) & alive).nonzero().squeeze(-1)
            chosen[rows] = _choose(logits[rows], params[g], blocked, generators[g])
        picked = raw.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        done = torch.isin(chosen, stops)
        for i in alive.nonzero().squeeze(-1).tolist():
            row = int(active[i])
            tokens[row].append(int(chosen[i]))
            logps[row].append(picked[i])
            if bool(done[i]):
                reasons[row] = "stop"
        lengths = torch.tensor([len(tokens[r]) for r in active.tolist()], device=device)
        alive = alive & ~done & (lengths < limits[active])
        if not bool(alive.any()):
            break
        # Dropping finished rows re-copies the whole KV cache, so do it only once a quarter of the batch is dead.
        if int((~alive).sum()) * 4 >= alive.shape[0]:
            keep = alive.nonzero().squeeze(-1)
            state = state.select(keep)
            active, chosen, alive = active[keep], chosen[keep], alive[keep]
        chosen = chosen.masked_fill(~alive, pad_id)
        logits = step(model, state, chosen.unsqueeze(-1))

    grouped: list[list[Sample]] = [[] for _ in prompts]
    for row in range(total):
        sample = Sample(tokens[row], torch.stack(logps[row]).cpu(), reasons[row])  # type: ignore[arg-type]
        grouped[int(group_of_row[row])].append(sample)
    return grouped
