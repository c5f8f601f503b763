"""Attention for one-token steps of a bfloat16 model on the CPU, around two slow cases of torch's CPU kernel.

Decode steps that do not share a prefix (one answer per prompt: chat with n = 1, batched n = 1 requests,
best-of-1) give `scaled_dot_product_attention` one query per head. Measured with torch 2.13 on 2 AMD Zen 4
threads (2026-12-06), 620 cached tokens:

- one query per head (8 heads x 64): bfloat16 282 us, the same call in float32 (inputs converted inside
  the time) 83 us; with 2 queries bfloat16 takes 95 us: only the single query is slow.
- grouped-query attention (28 query heads over 4 key heads, d 128): without a mask transformers asks the
  kernel for `enable_gqa`, 1,857 us in bfloat16; each key head's 7 query heads as 7 queries of that head
  (what transformers itself does when there is a mask) take 184 us.

On an Intel CPU with AMX (2026-12-06, 2 threads) the bfloat16 kernel is the fast one: one query over 620
tokens 40 us, where the float32 call with its conversions takes 772 us (48 us without them); the single answer
0.82 s in bfloat16 against 0.93 s routed through float32. GQA there: `enable_gqa` 151 us, packed 90 us.

So a one-token step with one query per key head runs in float32 where the CPU has no AMX tiles (also nearer
the float32 numbers), and a GQA step runs as each key head's queries in bfloat16 everywhere. Every other call
(more than one token, other dtypes and devices, features this does not cover) goes to transformers' own SDPA
attention unchanged. Wired like `reward.shared_prefix`: inside `decode_attention(model)` the decoder's SDPA
layers call `attention`, and the masks are SDPA's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlaifv.reward.shared_prefix import attention_implementation, has_amx_tiles, runs_sdpa

NAME = "rlaifv_decode_sdpa"
_UNCOVERED = ("softcap", "position_bias", "s_aux", "sinks", "cache")  # features left to transformers' function


def pays(model: Any) -> bool:
    """Worth routing: a bfloat16 decoder on the CPU whose self-attention runs SDPA, without gradient."""
    if torch.is_grad_enabled():
        return False
    try:
        weight = next(model.parameters())
    except StopIteration:
        return False
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and runs_sdpa(model)


@contextmanager
def decode_attention(model: Any) -> Iterator[None]:
    """Route the decoder's SDPA attention through `attention` for the duration (one model thread at a time)."""
    _register()
    with attention_implementation(model, NAME):
        yield


def _covered(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float, kwargs: Any) -> bool:
    return (
        query.device.type == "cpu"
        and query.dtype == torch.bfloat16
        and query.shape[2] == 1
        and query.shape[1] % key.shape[1] == 0
        and (query.shape[1] > key.shape[1] or not has_amx_tiles())  # one query per head: slow without AMX only
        and not dropout
        and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1))
        and not any(kwargs.get(name) is not None for name in _UNCOVERED)
    )


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
    """query (B, H, T, d) over key/value (B, Hkv, K, d); returns (B, T, H, d) like transformers' SDPA function."""
    if not _covered(query, key, attention_mask, dropout, kwargs):
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out, None
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if groups > 1:
        # Query head h reads key head h // groups (transformers' repeat_kv order): one key head's query heads
        # become its queries. The mask (B, 1, 1, K) broadcasts over them.
        packed = query.reshape(batch, kv_heads, groups, dim)
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    else:
        mask = attention_mask
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask, scale=scaling)
        out = out.to(query.dtype)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def _register() -> None:
    """Make `NAME` an attention implementation whose masks are SDPA's (registering again overwrites in place)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
