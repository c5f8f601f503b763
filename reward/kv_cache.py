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

from collections.abc import Sequence
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


def preallocate(cache: Any, reserve: int) -> Any:
    """Swap each full-attention layer of a DynamicCache for a `PreallocatedLayer` with room for `reserve` tokens.

    Layers of other types (sliding windows, linear attention, `ImageKeysLayer`) are left as they are.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.numel():
            layers[i] = PreallocatedLayer(layer.keys, layer.values, reserve)
    return cache


class ImageKeysLayer(DynamicLayer):
    """A cross-attention layer's cache (Mllama): the image's keys and values, one copy per prompt, never growing.

    Answers fork and finished rows drop by re-indexing `owner` (row -> prompt), never by copying the image's
    keys (at 11B, 4 tiles: ~210 MB per row in bfloat16). A reader gets one prompt's keys as a zero-copy view
    for all rows, or rows gathered for the one attention call that reads them.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._prompt_keys, self._prompt_values = keys, values
        self.owner = torch.arange(keys.shape[0], device=keys.device)
        self._identity = True  # row i is prompt i: no indexing at all

    def _rows(self, states: torch.Tensor | None) -> torch.Tensor | None:
        if states is None or self._identity:
            return states
        if states.shape[0] == 1:
            return states.expand(self.owner.shape[0], *states.shape[1:])
        return states.index_select(0, self.owner)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._rows(self._prompt_keys)

    @keys.setter  # DynamicLayer's __init__ sets None
    def keys(self, value: torch.Tensor | None) -> None:
        self._prompt_keys = value

    @property
    def values(self) -> torch.Tensor | None:
        return self._rows(self._prompt_values)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._prompt_values = value

    def update(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("an image's cross-attention keys are set once, at the prefill")

    def get_seq_length(self) -> int:
        return int(self._prompt_keys.shape[-2]) if self._prompt_keys is not None else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.owner = self.owner[indices]
        prompts = self._prompt_keys.shape[0] if self._prompt_keys is not None else 0
        self._identity = self.owner.shape[0] == prompts and bool((self.owner == torch.arange(prompts)).all())


def keep_image_keys_once(cache: Any, layer_indices: Sequence[int]) -> Any:
    """Swap the cross-attention layers `layer_indices` of a prefill's cache for `ImageKeysLayer`s (those that hold
    an image: a prompt without one leaves them empty)."""
    for i in (i for i in layer_indices if i < len(cache.layers)):
        layer = cache.layers[i]
        if type(layer) is DynamicLayer and layer.is_initialized:
            cache.layers[i] = ImageKeysLayer(layer.keys, layer.values)
    return cache
