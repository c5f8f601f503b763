"""Token log-probabilities of answers given an image+question prefix.

This is the one log-prob primitive of the project: best-of-N sampling, the
service's reward, and the trainer's DPO loss all call `answer_logprobs`, so a
pair scored anywhere gets the same numbers.

Shared-prefix evaluation: the B prefixes (image tokens + prompt) run once,
left-padded into one batch; the answers then continue from that cache, one
row per answer, and a single forward scores all answers, right-padded. Where
`reward.shared_prefix` applies (no gradient, plain full attention) the rows
attend to one copy of their prompt's prefix; otherwise the cache is gathered
to one copy per row. Naive equivalent, per answer a:
log_softmax(model(prefix ++ a).logits)[answer positions].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from rlaifv.reward.decode_attention import decode_attention
from rlaifv.reward.decode_attention import pays as decode_attention_pays
from rlaifv.reward.families import (
    SEQUENCE_KEYS,
    Family,
    batch_groups,
    continue_positions,
    extended,
    family_of,
    image_cache_layers,
    prefix_positions,
    stack_vision,
)
from rlaifv.reward.kv_cache import keep_image_keys_once
from rlaifv.reward.prompt import EncodedPrompt
from rlaifv.reward.shared_prefix import eligible, share, shared_prefix_attention


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., labels] without materialising the (…, V) log-prob tensor.

    logits (..., V), labels (...) -> (...) float32. Raw logits: temperature 1, no
    top-p/top-k, whatever the sampling settings were.

    One fused `log_softmax` kernel rather than `picked - logsumexp`: torch's CPU logsumexp runs as separate
    passes with temporaries (max, subtract, exp, sum, log). Two Zen 4 threads, 2026-12-06: the reference
    pass's 504 x 31,999 logits 12.6 -> 7.8 ms, 64 decode steps of 8 rows 11.2 -> 5.5 ms; the numbers differ
    in rounding only (rewards within 1e-8).
    On CPU without gradient, many rows (the reference pass: answers x positions x V) go through in
    cache-sized chunks: each row's numbers are the same bit for bit, and the float32 copy and the
    log-softmax output stay in cache instead of streaming hundreds of MB.
    """
    vocab = logits.shape[-1]
    rows = max(torch.get_num_threads(), _CHUNK_ELEMENTS // max(vocab, 1))
    if logits.device.type != "cpu" or torch.is_grad_enabled() or logits.numel() <= rows * vocab:
        return _selective_log_softmax(logits, labels)
    flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    parts = [
        _selective_log_softmax(flat[i : i + rows], flat_labels[i : i + rows]) for i in range(0, flat.shape[0], rows)
    ]
    return torch.cat(parts).view(labels.shape)


_CHUNK_ELEMENTS = 2**18  # 1 MB of float32 logits per chunk


def _selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@dataclass
class PrefixState:
    """The model state after the prefixes: one row per (future) answer or sample.

    cache: KV cache over the padded prefix, (rows, heads, L, d) per layer;
    logits: (rows, V) next-token logits after the prefix;
    mask: (rows, L) 1 for real prefix tokens, 0 for left padding;
    next_position: (rows,) position id of the first answer token (on every rope axis);
    family: the model family's rules (`reward.families`);
    shared: the cache holds each prompt's prefix once (`reward.shared_prefix`): model calls on it
    go inside `attending`;
    continued: (rows, 1, ...) the prompt's last row of each input the family needs for every later token
    (`Family.continued`).
    """

    cache: Any
    logits: torch.Tensor
    mask: torch.Tensor
    next_position: torch.Tensor
    family: Family
    shared: bool = False
    continued: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, index: torch.Tensor) -> PrefixState:
        """Keep/duplicate rows (index may repeat: that forks a prefix for N answers)."""
        self.cache.batch_select_indices(index)
        return self.rows(self.cache, index, self.shared)

    def rows(self, cache: Any, index: torch.Tensor, shared: bool) -> PrefixState:
        """This state's rows `index` over `cache` (already laid out for them)."""
        continued = {key: value[index] for key, value in self.continued.items()}
        return PrefixState(
            cache, self.logits[index], self.mask[index], self.next_position[index], self.family, shared, continued
        )

    def positions(self, width: int) -> torch.Tensor:
        """Position ids of the next `width` tokens of every row."""
        return continue_positions(self.family, self.next_position, width)

    def inputs(self, width: int) -> dict[str, torch.Tensor]:
        """What a model call on the next `width` tokens of every row needs besides ids, mask and positions."""
        return {key: value.expand(value.shape[0], width, *value.shape[2:]) for key, value in self.continued.items()}


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def prefill(model: Any, prompts: Sequence[EncodedPrompt], pad_id: int = 0) -> PrefixState:
    """Run B prefixes in one left-padded forward; return their cache and last logits.

    The prompts must be batchable together (`families.batch_groups`).
    """
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    family = family_of(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt.input_ids.to(device)
        mask[row, width - len(prompt) :] = 1
    vision = stack_vision(prompts, width, device, dtype)
    positions, next_position = prefix_positions(model, family, input_ids, mask, vision)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **vision,
    )
    continued = {key: vision[key][:, -1:] for key in family.continued if key in vision}
    cache = keep_image_keys_once(out.past_key_values, image_cache_layers(model, family))
    return PrefixState(cache, out.logits[:, -1, :], mask, next_position, family, continued=continued)


def fork(model: Any, state: PrefixState, rows: torch.Tensor, reserve: int) -> PrefixState:
    """One row per answer from a prefill's one row per prompt (`rows`: each answer's prompt, ascending).

    With shared-prefix attention the prefix stays one copy per prompt and `reserve` answer tokens per row
    are allocated; otherwise the cache rows are copied (`PrefixState.select`) and grow as before. Sharing
    needs a prompt with two answers or more, and is skipped where its buffers would be the bigger: each
    prompt reserves room for as many answers as the largest group (a batch of one n=16 request and many
    n=1 requests is cheaper as copies).
    """
    prompts, length = state.mask.shape
    slots = int(torch.bincount(rows).max())
    smaller = prompts * (length + slots * reserve) < rows.shape[0] * (length + reserve)
    if slots < 2 or not smaller or not eligible(model, state.cache, length + reserve):
        return state.select(rows)
    return state.rows(share(state.cache, rows, state.mask, reserve), rows, True)


@contextmanager
def attending(model: Any, state: PrefixState) -> Iterator[None]:
    """The context model calls on `state`'s cache run in: shared-prefix attention when the cache is shared,
    else one-token steps around the CPU kernel's slow cases (`reward.decode_attention`) where they apply."""
    if state.shared:
        context: Any = shared_prefix_attention(model)
    elif decode_attention_pays(model):
        context = decode_attention(model)
    else:
        context = nullcontext()
    with context:
        yield


def split_for_batching(model: Any, prompts: Sequence[EncodedPrompt]) -> list[list[int]]:
    """Groups of prompt indices that share one forward (one group unless their image shapes cannot be padded)."""
    return batch_groups(prompts, family_of(model))


def step(model: Any, state: PrefixState, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (rows, 1) after `state`; returns next logits (rows, V). Mutates state."""
    rows = tokens.shape[0]
    state.mask = torch.cat([state.mask, state.mask.new_ones((rows, 1))], dim=1)
    out = model(
        input_ids=tokens,
        attention_mask=state.mask,
        position_ids=state.positions(1),
        past_key_values=state.cache,
        use_cache=True,
        **state.inputs(1),
    )
    state.next_position = state.next_position + 1
    state.cache = out.past_key_values
    state.logits = out.logits[:, -1, :]
    return state.logits


def answer_logprobs(
    model: Any,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
) -> list[list[torch.Tensor]]:
    """Per-token log-probs of answers[b][i] given prompts[b]; each result is (T_bi,).

    Differentiable when grad is enabled (the trainer's DPO loss uses it). Every
    answer must have at least one token.
    """
    return _per_answer(model, prompts, answers, pad_id, full=False)


def answer_distributions(
    model: Any,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
) -> list[list[torch.Tensor]]:
    """The whole next-token log-distribution at every answer position: (T_bi, V) float32 per answer.

    What a per-token KL between two models needs (the trainer's `token_kl` term); `answer_logprobs` is this
    gathered at the answer's own tokens, without materialising (T, V) log-probs.
    """
    return _per_answer(model, prompts, answers, pad_id, full=True)


def _per_answer(
    model: Any,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    *,
    full: bool,
) -> list[list[torch.Tensor]]:
    if len(prompts) != len(answers):
        raise ValueError("one answer list per prompt")
    groups = split_for_batching(model, prompts)
    if len(groups) > 1:
        results: list[list[torch.Tensor]] = [[] for _ in prompts]
        for group in groups:
            part = _per_answer(model, [prompts[i] for i in group], [answers[i] for i in group], pad_id, full=full)
            for i, value in zip(group, part, strict=True):
                results[i] = value
        return results
    counts = [len(group) for group in answers]
    flat = [list(a) for group in answers for a in group]
    if not flat:
        return [[] for _ in prompts]
    if any(len(a) == 0 for a in flat):
        raise ValueError("every answer needs at least one token")
    device = model_device(model)
    keep = [b for b, c in enumerate(counts) if c > 0]
    state = prefill(model, [prompts[b] for b in keep], pad_id)
    rows = torch.repeat_interleave(
        torch.arange(len(keep), device=device), torch.tensor([counts[b] for b in keep], device=device)
    )
    lengths = torch.tensor([len(a) for a in flat], device=device)
    width = int(lengths.max())
    state = fork(model, state, rows, width - 1)

    tokens = torch.full((len(flat), width), pad_id, dtype=torch.long, device=device)
    for row, answer in enumerate(flat):
        tokens[row, : len(answer)] = torch.tensor(answer, device=device)
    answer_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()

    logits = state.logits.unsqueeze(1)  # (R, 1, V): the prefix's last logits predict token 0
    if width > 1:
        # Feed tokens 0..T-2; their logits predict tokens 1..T-1 (the last token needs no forward).
        with attending(model, state):
            out = model(
                input_ids=tokens[:, :-1],
                attention_mask=torch.cat([state.mask, answer_mask[:, :-1]], dim=1),
                position_ids=state.positions(width - 1),
                past_key_values=state.cache,
                use_cache=True,
                **state.inputs(width - 1),
            )
    if full:
        if width > 1:
            logits = torch.cat([logits, out.logits], dim=1)
        per_row = torch.log_softmax(logits.float(), dim=-1)
    else:
        per_row = selective_log_softmax(logits, tokens[:, :1])
        if width > 1:
            per_row = torch.cat([per_row, selective_log_softmax(out.logits, tokens[:, 1:])], dim=1)
        per_row = per_row * answer_mask

    grouped: list[list[torch.Tensor]] = [[] for _ in prompts]
    row = 0
    for b, count in enumerate(counts):
        for _ in range(count):
            grouped[b].append(per_row[row, : int(lengths[row])])
            row += 1
    return grouped


def full_forward_logprobs(model: Any, prompt: EncodedPrompt, answer: Sequence[int]) -> torch.Tensor:
    """The naive equivalent of `answer_logprobs` for one answer: one forward over prefix ++ answer.

    Kept as the ground truth for tests and the baseline of `rlaifv bench reward`: the model computes its own
    positions (mrope included); sequence-aligned inputs are extended over the answer as text (those the family
    continues, as its `generate` does).
    """
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    ids = torch.cat([prompt.input_ids.to(device), torch.tensor(list(answer), device=device)]).unsqueeze(0)
    vision = stack_vision([prompt], len(prompt), device, dtype)
    continued = family_of(model).continued
    for key in SEQUENCE_KEYS & prompt.vision.keys():
        vision[key] = extended(vision[key], len(answer), continued=key in continued)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **vision)
    start = len(prompt)
    return selective_log_softmax(out.logits[0, start - 1 : -1], ids[0, start:])


def continuation_logits(
    model: Any,
    prompts: Sequence[EncodedPrompt],
    continuations: Sequence[Sequence[Sequence[int]]],
    pad_id: int = 0,
) -> list[torch.Tensor]:
    """Next-token logits after prompts[b] ++ continuations[b][i], prefixes shared; returns (n_b, V) per prompt.

    The yes/no judge uses it: the image+template prefix runs once and each
    question is a continuation, so checking k claims costs one prefix pass.
    """
    groups = split_for_batching(model, prompts)
    if len(groups) > 1:
        merged: list[torch.Tensor] = [torch.empty(0) for _ in prompts]
        for group in groups:
            part = continuation_logits(model, [prompts[i] for i in group], [continuations[i] for i in group], pad_id)
            for i, value in zip(group, part, strict=True):
                merged[i] = value
        return merged
    counts = [len(group) for group in continuations]
    flat = [list(c) for group in continuations for c in group]
    if any(len(c) == 0 for c in flat):
        raise ValueError("every continuation needs at least one token")
    device = model_device(model)
    vocab_out: list[torch.Tensor] = []
    keep = [b for b, c in enumerate(counts) if c > 0]
    if not keep:
        return [torch.empty(0) for _ in prompts]
    state = prefill(model, [prompts[b] for b in keep], pad_id)
    rows = torch.repeat_interleave(
        torch.arange(len(keep), device=device), torch.tensor([counts[b] for b in keep], device=device)
    )
    lengths = torch.tensor([len(c) for c in flat], device=device)
    width = int(lengths.max())
    state = fork(model, state, rows, width)
    tokens = torch.full((len(flat), width), pad_id, dtype=torch.long, device=device)
    for row, cont in enumerate(flat):
        tokens[row, : len(cont)] = torch.tensor(cont, device=device)
    mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    with attending(model, state):
        out = model(
            input_ids=tokens,
            attention_mask=torch.cat([state.mask, mask], dim=1),
            position_ids=state.positions(width),
            past_key_values=state.cache,
            use_cache=True,
            **state.inputs(width),
        )
    last = out.logits[torch.arange(len(flat), device=device), lengths - 1].float()  # (R, V)
    row = 0
    for count in counts:
        vocab_out.append(last[row : row + count])
        row += count
    return vocab_out
