"""A KV cache that grows in place, for the decode loop.

`transformers`' DynamicCache appends each new token with `torch.cat`, which
allocates and copies every layer's whole key/value tensor at every step. For a
micro-batch of many requests (16 prompts x 8 samples = 128 rows) those tensors
are megabytes each, and on CPU every fresh allocation of that size also pays
page faults: the copies, not the matrix products, became the largest cost of a
batched decode step and made it grow faster than the number of rows. Here each
layer's keys and values live in a buffer sized once for the prefix plus the
answers' token budget; a step writes one column and hands attention a view.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a buffer with room for `reserve` more tokens.

    Covers what the decode loop uses: `update` (one step) and `batch_select_indices` (fork, compaction).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, reserve: int) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._length = keys.shape[-2]
        self._key_buf = self._allocate(keys, self._length + reserve)
        self._value_buf = self._allocate(values, self._length + reserve)
        self._expose()

    @staticmethod
    def _allocate(states: torch.Tensor, capacity: int) -> torch.Tensor:
        buf = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
        buf[..., : states.shape[-2], :] = states
        return buf

    def _expose(self) -> None:
        self.keys = self._key_buf[..., : self._length, :]
        self.values = self._value_buf[..., : self._length, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self._length + new > self._key_buf.shape[-2]:  # over budget: grow (rare; keeps correctness)
            grow = max(new, self._key_buf.shape[-2] // 2)
            self._key_buf = self._allocate(self.keys, self._length + grow)
            self._value_buf = self._allocate(self.values, self._length + grow)
        self._key_buf[..., self._length : self._length + new, :] = key_states
        self._value_buf[..., self._length : self._length + new, :] = value_states
        self._length += new
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._key_buf = self._key_buf[indices]
        self._value_buf = self._value_buf[indices]
        self._expose()


def preallocate(cache: Any, reserve: int, length: int | None = None) -> Any:
    """Swap each full-attention layer of a DynamicCache for a `PreallocatedLayer` with room for `reserve` tokens.

    Layers of other types (sliding windows, linear attention) are left as they are, and with `length` (the
    prefix's) so are layers holding another number of tokens: Mllama's cross-attention layers hold the image's
    keys, which never grow.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        filled = type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.numel()
        if filled and (length is None or layer.keys.shape[-2] == length):
            layers[i] = PreallocatedLayer(layer.keys, layer.values, reserve)
    return cache
