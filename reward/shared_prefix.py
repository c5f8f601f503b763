"""Shared-prefix attention: the N answers of a prompt attend to one copy of its prefix's keys and values.

The plain path forks the prefix KV cache N ways (one copy per answer) and every decode step reads all N
copies: for a 595-token image prompt and 8 answers that is most of the attention's memory traffic, and
the fork and the reference's scoring pass copy it again. Here each prompt keeps one KV buffer:

    [ prefix (L tokens) | step 0 of answers 0..S-1 | step 1 of answers 0..S-1 | ... ]

and the S answers (slots) of a prompt are S queries of one attention call over that buffer, with a mask
letting a query see the prefix's real tokens and its own answer's earlier steps only. That is the same
softmax over the same keys as the plain path (exact up to float summation order), with the prefix read
once per prompt instead of once per answer, and no copies when rows fork or finished rows are dropped.

It is wired through `transformers`' attention interface: inside `shared_prefix_attention(model)` the
decoder's attention layers call `attention` below, which reads the layout from the key tensor that the
cache layer (`SharedPrefixLayer`) returned; any other call there is an error, never a silent fallback.
Used only where every cached layer is full attention under SDPA and no gradient is needed (`eligible`);
elsewhere the engine forks copies as before (`reward.kv_cache`).

A pass that feeds whole answers at once (the reference's scoring, reranking: `done == 0`, many tokens) runs,
on the CPU, as a cascade: the queries over the prefix without a mask, then each answer's queries over its
own keys (causal), the two merged by their log-sum-exps. The masked call attends over every answer's keys
(1,099 per query for a 595-token prefix and 8 x 63 tokens, 45 % masked out), and the CPU flash kernel
spends the same time on masked keys as on real ones: the cascade is a third faster there (AMD Zen 5,
2026-12-06: 7.5 -> 5.1 ms per layer in bfloat16 and float32). Decode steps keep the one masked call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

NAME = "rlaifv_shared_prefix"
_LAYOUT = "_rlaifv_shared_prefix"  # attribute of the key tensor a SharedPrefixLayer returns
ENABLED = os.environ.get("RLAIFV_SHARED_PREFIX", "1") != "0"  # "0": always fork copies (the plain path)


class Layout:
    """Which prompt (`owner`) and slot each row of the batch is, and the prefixes' padding mask.

    Immutable: dropping rows makes a new layout (memoised, so every layer of a cache gets the same one and
    the attention mask is built once per forward, not once per layer).
    """

    def __init__(self, owner: torch.Tensor, slot: torch.Tensor, slots: int, prefix_mask: torch.Tensor) -> None:
        self.owner = owner  # (R,) prompt index of each row
        self.slot = slot  # (R,) the row's place among its prompt's answers, < slots
        self.slots = slots
        self.prefix_mask = prefix_mask.bool()  # (B, L), False on left padding
        rows = owner.shape[0]
        self.canonical = rows == prefix_mask.shape[0] * slots and bool(
            torch.equal(owner * slots + slot, torch.arange(rows, device=owner.device))
        )
        self._selected: tuple[torch.Tensor, Layout] | None = None
        self._mask: tuple[tuple[int, int, int, torch.dtype], torch.Tensor] | None = None
        self._index: tuple[tuple[int, int, int, int], tuple[torch.Tensor, ...]] | None = None
        self._cascade: tuple[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor | None]] | None = None

    @classmethod
    def for_rows(cls, owner: torch.Tensor, prefix_mask: torch.Tensor) -> Layout:
        """Rows sorted by prompt (`owner` ascending, as `repeat_interleave` makes them): slots count within a prompt."""
        counts = torch.bincount(owner, minlength=prefix_mask.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(owner.shape[0], device=owner.device) - starts[owner]
        return cls(owner, slot, int(counts.max()) if owner.numel() else 1, prefix_mask)

    @property
    def prompts(self) -> int:
        return int(self.prefix_mask.shape[0])

    @property
    def prefix_length(self) -> int:
        return int(self.prefix_mask.shape[1])

    def select(self, indices: torch.Tensor) -> Layout:
        if self._selected is not None and self._selected[0] is indices:
            return self._selected[1]
        chosen = Layout(self.owner[indices], self.slot[indices], self.slots, self.prefix_mask)
        self._selected = (indices, chosen)
        return chosen

    def write_index(self, prefix: int, done: int, width: int, heads: int) -> tuple[torch.Tensor, ...]:
        """Where rows' new tokens go in the buffers: (prompt, head, column) indices broadcasting to (R, Hkv, T)."""
        key = (prefix, done, width, heads)
        if self._index is not None and self._index[0] == key:
            return self._index[1]
        device = self.owner.device
        steps = done + torch.arange(width, device=device)
        column = prefix + steps[None, :] * self.slots + self.slot[:, None]  # (R, T)
        index = (self.owner[:, None, None], torch.arange(heads, device=device)[None, :, None], column[:, None, :])
        self._index = (key, index)
        return index

    def mask(self, done: int, width: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (B, 1, groups * slots * width, L + (done + width) * slots) for queries in slot-major order.

        Query (slot s, new token i) sees the prefix's real tokens and the keys of slot s from steps <= done + i.
        Query heads that share a key head (GQA) are folded into the query axis, hence `groups` copies.
        """
        key = (done, width, groups, dtype)
        if self._mask is not None and self._mask[0] == key:
            return self._mask[1]
        device = self.prefix_mask.device
        queries = torch.arange(self.slots * width, device=device)
        keys = torch.arange((done + width) * self.slots, device=device)
        own = (keys[None, :] % self.slots == queries[:, None] // width) & (
            keys[None, :] // self.slots <= done + queries[:, None] % width
        )
        prefix = self.prefix_mask[:, None, :].expand(-1, queries.shape[0], -1)
        allowed = torch.cat([prefix, own[None].expand(self.prompts, -1, -1)], dim=-1)
        if groups > 1:
            allowed = allowed.repeat(1, groups, 1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        mask = mask.unsqueeze(1)
        self._mask = (key, mask)
        return mask

    def cascade_masks(self, width: int, groups: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The cascade's two float32 additive masks, None where none is needed (built once per forward):
        the prefix's padding (B, 1, 1, L), and own-answer causality for GQA's (group, step) queries
        (1, 1, groups * width, width); with one query head per key head the kernel's `is_causal` does that."""
        key = (width, groups)
        if self._cascade is not None and self._cascade[0] == key:
            return self._cascade[1]
        device = self.prefix_mask.device
        padding = causal = None
        if not bool(self.prefix_mask.all()):
            padding = torch.zeros(self.prefix_mask.shape, device=device).masked_fill_(~self.prefix_mask, float("-inf"))
            padding = padding[:, None, None, :]
        if groups > 1:
            steps = torch.arange(width, device=device)
            allowed = (steps[None, :] <= steps[:, None]).repeat(groups, 1)
            causal = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))[None, None]
        self._cascade = (key, (padding, causal))
        return self._cascade[1]


class SharedPrefixLayer(DynamicLayer):
    """One layer's KV buffer per prompt: the prefix once, then the answers' tokens step-major (see module doc).

    To `transformers` it looks like a DynamicLayer whose rows are the answers, each `L + done` tokens long
    (what masks and positions are sized by); `update` returns the prompts' buffers, tagged with the layout.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, layout: Layout, reserve: int) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.layout = layout
        self.prefix = int(keys.shape[-2])
        self.done = 0  # answer tokens written per row
        self._key_buf = self._allocate(keys, reserve)
        self._value_buf = self._allocate(values, reserve)
        self.keys, self.values = self._key_buf[..., : self.prefix, :], self._value_buf[..., : self.prefix, :]

    def _allocate(self, states: torch.Tensor, reserve: int) -> torch.Tensor:
        """A buffer with room for `reserve` steps; the unwritten part zeroed, never garbage: masked keys get
        weight 0, and 0 * (NaN or inf left in fresh memory) would be NaN."""
        batch, heads, filled, dim = states.shape
        buf = states.new_empty((batch, heads, self.prefix + reserve * self.layout.slots, dim))
        buf[..., :filled, :] = states
        buf[..., filled:, :].zero_()
        return buf

    def _grow(self, needed: int) -> None:
        """Over budget (rare; kept for correctness): a bigger buffer, the filled part copied."""
        filled = self.prefix + self.done * self.layout.slots
        reserve = max(needed, self.done)
        for name in ("_key_buf", "_value_buf"):
            old = getattr(self, name)
            setattr(self, name, self._allocate(old[..., :filled, :], self.done + reserve))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.layout
        width = int(key_states.shape[-2])
        start = self.prefix + self.done * layout.slots
        end = start + width * layout.slots
        if end > self._key_buf.shape[-2]:
            self._grow(width)
        if layout.canonical:  # every slot live: the new columns are one strided block, (B, Hkv, T * S, d)
            prompts, slots = layout.prompts, layout.slots
            for buf, states in ((self._key_buf, key_states), (self._value_buf, value_states)):
                block = buf[..., start:end, :].unflatten(-2, (width, slots))  # (B, Hkv, T, S, d)
                block.copy_(states.unflatten(0, (prompts, slots)).permute(0, 2, 3, 1, 4))
        else:
            index = layout.write_index(self.prefix, self.done, width, key_states.shape[1])
            self._key_buf.index_put_(index, key_states)
            self._value_buf.index_put_(index, value_states)
        keys, values = self._key_buf[..., :end, :], self._value_buf[..., :end, :]
        setattr(keys, _LAYOUT, (layout, self.done, width))
        self.done += width
        self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.prefix + self.done

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (finished answers dropped): only the layout changes, no KV is copied."""
        self.layout = self.layout.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:  # pragma: no cover - generate() only
        raise NotImplementedError("shared-prefix layers fork through their layout")


def attention_configs(model: Any) -> list[Any]:
    """The configs of the decoder's self-attention layers (those holding a `layer_idx`), each once."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(getattr(module, "layer_idx", None), int) and getattr(module, "is_causal", False) and config:
            configs[id(config)] = config
    return list(configs.values())


def _full_attention(layer: Any, length: int) -> bool:
    """The layer attends to every earlier token of a `length`-token sequence: full attention, or a sliding
    window longer than the sequence (Mistral's 4096, OmniLMM / RLAIF-V-12B's: nothing ever slides out)."""
    if not getattr(layer, "is_initialized", False):  # (a hybrid model's state layer has none)
        return False
    if type(layer) is DynamicLayer:
        return True
    return type(layer) is DynamicSlidingWindowLayer and length < layer.sliding_window and not layer.record_past


def eligible(model: Any, cache: Any, length: int) -> bool:
    """Shared-prefix attention applies to sequences of up to `length` tokens (prefix + answer): every cached
    layer attends to all earlier tokens, the decoder runs SDPA, and no gradient is needed (the trainer's
    differentiable log-probs keep the plain path)."""
    if not ENABLED or torch.is_grad_enabled():
        return False
    layers = getattr(cache, "layers", None)
    if not layers or not all(_full_attention(layer, length) for layer in layers):
        return False
    return runs_sdpa(model)


def share(cache: Any, owner: torch.Tensor, prefix_mask: torch.Tensor, reserve: int) -> Any:
    """Turn a prefill's cache (one row per prompt) into shared-prefix layers for rows `owner` (sorted)."""
    layout = Layout.for_rows(owner, prefix_mask)
    for i, layer in enumerate(cache.layers):
        cache.layers[i] = SharedPrefixLayer(layer.keys, layer.values, layout, reserve)
    return cache


@contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """The decoder's self-attention layers run the registered implementation `name` for the duration (one model
    thread at a time); the previous ones come back after."""
    configs = attention_configs(model)
    saved = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = name
    try:
        yield
    finally:
        for config, previous in zip(configs, saved, strict=True):
            config._attn_implementation = previous


def runs_sdpa(model: Any) -> bool:
    """Every decoder self-attention layer of `model` runs transformers' SDPA implementation."""
    configs = attention_configs(model)
    return bool(configs) and all(getattr(c, "_attn_implementation", None) == "sdpa" for c in configs)


@contextmanager
def shared_prefix_attention(model: Any) -> Iterator[None]:
    """Route the decoder's attention through `attention` for the duration (one model thread at a time)."""
    _register()
    with attention_implementation(model, NAME):
        yield


def attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of rows (R, H, T, d) over their prompts' shared buffers (B, Hkv, K, d); returns (R, T, H, d)."""
    tag = getattr(key, _LAYOUT, None)
    if tag is None:
        raise RuntimeError("shared-prefix attention reached a layer whose cache is not a SharedPrefixLayer")
    layout, done, width = tag
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is not None or dropout or (window and layout.prefix_length + done + width >= window):
        raise NotImplementedError("shared-prefix attention covers plain full attention only")
    rows, heads, _, dim = query.shape
    prompts, kv_heads = key.shape[0], key.shape[1]
    groups = heads // kv_heads
    slots = layout.slots
    if layout.canonical:
        grid = query.view(prompts, slots, heads, width, dim)
    else:
        grid = query.new_zeros((prompts, slots, heads, width, dim))
        grid[layout.owner, layout.slot] = query
    # (B, S, H, T, d) -> (B, Hkv, groups * S * T, d): a key head's query heads are extra queries of that head.
    q = grid.permute(0, 2, 1, 3, 4).reshape(prompts, kv_heads, groups * slots * width, dim)
    if done == 0 and width > 1 and query.device.type == "cpu" and _cascade_pays(query.dtype, slots):
        out = _cascade(q, key, value, layout, width, groups, scaling)
    else:
        mask = layout.mask(done, width, groups, query.dtype)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    out = out.view(prompts, heads, slots, width, dim).permute(0, 2, 3, 1, 4)  # (B, S, T, H, d)
    if layout.canonical:
        return out.reshape(rows, width, heads, dim), None
    return out[layout.owner, layout.slot], None


# The CPU flash kernel with its log-sum-exp (what `scaled_dot_product_attention` calls on CPU, minus the LSE drop).
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# From this many answers per prompt the cascade pays on AMX too: the masked call's work over the other answers' keys
# grows with the square of their number (best-of-N's reference pass, bfloat16, Intel AMX, 2 threads, 2026-12-06:
# N = 16 masked 0.271 s against the cascade's 0.281 s; N = 32 0.538 against 0.482 s).
_CASCADE_SLOTS_ON_AMX = 32


def _cascade_pays(dtype: torch.dtype, slots: int) -> bool:
    """The float32 cascade beats the one masked call wherever measured, except a reduced-precision model on a
    CPU with AMX with fewer than `_CASCADE_SLOTS_ON_AMX` answers per prompt: there the masked call runs on the
    tiles in bf16 (4.8 ms per layer at N = 8) and a float32 cascade would not (8.3 ms; a bf16 cascade saved
    4 %, for partial outputs rounded before the merge)."""
    if _FLASH_WITH_LSE is None:
        return False
    return dtype == torch.float32 or slots >= _CASCADE_SLOTS_ON_AMX or not has_amx_tiles()


@functools.cache
def has_amx_tiles() -> bool:
    """This CPU has AMX tiles, where the CPU attention kernel runs bfloat16 on them (the fast case there)."""
    return bool(torch.cpu._is_amx_tile_supported())


def _cascade(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: Layout,
    width: int,
    groups: int,
    scale: float | None,
) -> torch.Tensor:
    """The first `width` tokens of every slot at once (`done == 0`), as prefix + own-answer attention merged.

    q: (B, Hkv, groups * S * T, d) in (group, slot, step) order; key/value: (B, Hkv, L + T * S, d), the
    answers' keys step-major. Returns what the masked call returns, (B, Hkv, groups * S * T, d).
    Computed in float32 whatever the model's dtype: the partial outputs then merge unrounded, and the CPU
    kernel is as fast in float32 as in bfloat16 here (bf16 in, float32 cascade: 5.1 ms and a mean error
    against float64 of 7e-5, where the masked bf16 call takes 7.7 ms with 1.1e-4).
    """
    assert _FLASH_WITH_LSE is not None
    dtype = q.dtype
    q, key, value = q.float(), key.float(), value.float()
    prompts, kv_heads, _, dim = key.shape
    slots, length = layout.slots, layout.prefix_length
    padding, causal = layout.cascade_masks(width, groups)
    out_prefix, lse_prefix = _FLASH_WITH_LSE(
        q, key[..., :length, :], value[..., :length, :], attn_mask=padding, scale=scale
    )[:2]

    def own_keys(states: torch.Tensor) -> torch.Tensor:  # -> (B * S, Hkv, T, d)
        states = states[..., length:, :].unflatten(2, (width, slots)).permute(0, 3, 1, 2, 4)
        return states.reshape(prompts * slots, kv_heads, width, dim)

    per_slot = q.view(prompts, kv_heads, groups, slots, width, dim).permute(0, 3, 1, 2, 4, 5)
    out_own, lse_own = _FLASH_WITH_LSE(
        per_slot.reshape(prompts * slots, kv_heads, groups * width, dim),
        own_keys(key),
        own_keys(value),
        is_causal=groups == 1,
        attn_mask=causal,
        scale=scale,
    )[:2]

    def back(t: torch.Tensor) -> torch.Tensor:  # (B * S, Hkv, groups * T, ...) -> (B, Hkv, groups * S * T, ...)
        t = t.unflatten(0, (prompts, slots)).unflatten(3, (groups, width))  # (B, S, Hkv, groups, T, ...)
        order = (0, 2, 3, 1, 4, *range(5, t.dim()))
        return t.permute(order).reshape(prompts, kv_heads, groups * slots * width, *t.shape[5:])

    out_own, lse_own = back(out_own), back(lse_own)
    top = torch.maximum(lse_prefix, lse_own)
    w_prefix = (lse_prefix - top).exp_().unsqueeze(-1)
    w_own = (lse_own - top).exp_().unsqueeze(-1)
    merged = (out_prefix * w_prefix + out_own * w_own) / (w_prefix + w_own)
    return merged.to(dtype)


def _register() -> None:
    """Make `NAME` a valid attention implementation (registering again is a no-op overwrite). No mask function
    is registered under it on purpose: transformers then skips building the (unused) 4-D mask at every step."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
