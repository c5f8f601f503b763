"""Linear layers on pre-packed bfloat16 weights, for inference on CPUs with bf16 matrix instructions.

Why: oneDNN's bfloat16 matrix product takes the weight in the plain (out, in) layout on every
call, and at decode sizes (1-16 rows) that costs 1.5-3x a product on a weight packed once in the
layout its kernels read (one thread, 8 rows: Intel AMX, 2026-12-05, 1408 x 512 104 us against 46 us,
the 31,999 x 512 output layer 4.7 ms against 1.5 ms; AMD Zen 5 (AVX512_BF16), 2026-12-06, 69 against
46 us and 2.3 against 1.3 ms; the same bits on every row count measured on both). This is
the weight prepacking of PyTorch's inductor (`freezing`) and of Intel's extension for PyTorch, done here
without compiling anything: each plain `nn.Linear` keeps its parameters (training, `state_dict`,
LoRA merges see nothing new) and gains an instance `forward` that uses a packed copy when no
gradient is needed. The price is one more copy of the linear weights in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from rlaifv.reward.errors import PackingUnavailableError

PackMode = Literal["auto", "on", "off"]

_DECODE_ROWS = 8  # oneDNN's layout hint; measured alike for 1..595 rows except a hint of 1 on big products


def packing_supported() -> bool:
    """This CPU and torch build have oneDNN's packed bfloat16 linear (AVX512_BF16 or AMX)."""
    cpu = torch.cpu
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and (cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    )


class _PackedForward:
    """The instance `forward` of one `nn.Linear`: the packed product without gradient, the plain one otherwise."""

    def __init__(self, module: nn.Linear, owner: PackedLinears) -> None:
        self.module = module
        self.owner = owner
        self.repack()

    def repack(self) -> None:
        weight = self.module.weight
        self.packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _DECODE_ROWS)
        self.key = (weight.data_ptr(), weight._version)

    def current(self) -> torch.Tensor:
        """The packed weight, packed again first if the weight changed since."""
        weight = self.module.weight
        if (weight.data_ptr(), weight._version) != self.key:
            self.repack()
        return self.packed

    def applies(self, x: torch.Tensor) -> bool:
        weight = self.module.weight
        return not (
            self.owner.suspended
            or x.dtype != torch.bfloat16
            or x.device.type != "cpu"
            or weight.dtype != torch.bfloat16
            or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if not self.applies(x):
            return nn.Linear.forward(module, x)
        return torch.ops.mkldnn._linear_pointwise(x, self.current(), module.bias, "none", [], "")


class PackedLinears:
    """The packed layers of one model: `suspend()` runs it plain for a while, `remove()` for good."""

    def __init__(self, model: nn.Module) -> None:
        self.suspended = False
        self.forwards: list[_PackedForward] = []
        for module in model.modules():
            # Exactly nn.Linear: subclasses (quantised layers, ...) compute something else with their weight.
            if type(module) is nn.Linear and _packable(module) and "forward" not in module.__dict__:
                forward = _PackedForward(module, self)
                module.forward = forward
                self.forwards.append(forward)

    @property
    def count(self) -> int:
        return len(self.forwards)

    @property
    def extra_bytes(self) -> int:
        """Memory the packed copies add (the plain weights stay)."""
        return sum(f.module.weight.numel() * f.module.weight.element_size() for f in self.forwards)

    @contextmanager
    def suspend(self) -> Iterator[None]:
        """The plain products inside (a benchmark's baseline on the very same model object)."""
        before, self.suspended = self.suspended, True
        try:
            yield
        finally:
            self.suspended = before

    def remove(self) -> None:
        for forward in self.forwards:
            if forward.module.__dict__.get("forward") is forward:
                del forward.module.forward
        self.forwards = []


def _packable(module: nn.Linear) -> bool:
    weight, bias = module.weight, module.bias
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.layout == torch.strided
        and (bias is None or (bias.dtype == torch.bfloat16 and bias.device.type == "cpu"))
    )


def pack_linears(models: list[Any], mode: PackMode) -> list[PackedLinears]:
    """Pack the bfloat16 CPU linears of `models` (each model once) as `mode` says; [] when it says not to.

    `on` raises `PackingUnavailableError` where the CPU or torch cannot pack or no layer is bfloat16 on CPU;
    `auto` packs wherever the CPU can (measured faster on Intel AMX, AMD Zen 4 and Zen 5; docs/performance.md) and
    silently does nothing elsewhere.
    """
    if mode == "off":
        return []
    if not packing_supported():
        if mode == "auto":
            return []
        raise PackingUnavailableError(
            "pack_weights=on needs oneDNN's bfloat16 linear and a CPU with AVX512_BF16 or AMX; this one has neither"
        )
    handles: list[PackedLinears] = []
    seen: set[int] = set()
    for model in models:
        if model is None or id(model) in seen:
            continue
        seen.add(id(model))
        handle = PackedLinears(model)
        if handle.count:
            handles.append(handle)
    if mode == "on" and not handles:
        raise PackingUnavailableError("pack_weights=on packs bfloat16 weights on the CPU; this model has none")
    return handles
