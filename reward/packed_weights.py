"""Linear layers on pre-packed weights (bfloat16 and float32), for inference on the CPU.

Why: oneDNN's matrix product takes the weight in the plain (out, in) layout on every call, and at decode
sizes (1-16 rows) that costs 1.5-3x a product on a weight packed once in the layout its kernels read.
bfloat16 (one thread, 8 rows: Intel AMX, 2026-12-05, 1408 x 512 104 us against 46 us, the 31,999 x 512
output layer 4.7 ms against 1.5 ms; AMD Zen 5 (AVX512_BF16), 2026-12-06, 69 against 46 us and 2.3 against
1.3 ms; the same bits on every row count measured on both). float32 products go to MKL's GEMM by default,
which takes a slow path on AMD CPUs: on Zen 4 (2 threads, 2026-12-06) oneDNN's packed product is 1.4-3x
faster at 1-64 rows (the output layer at 8 rows 11.2 against 3.6 ms) and 1.1-1.7x at 595, float32 all
through (summation order differs: ~1e-6 relative). This is the weight prepacking of PyTorch's inductor
(`freezing`) and of Intel's extension for PyTorch, done here without compiling anything: each plain
`nn.Linear` keeps its parameters (training, `state_dict`, LoRA merges see nothing new) and gains an
instance `forward` that uses a packed copy when no gradient is needed. The price is one more copy of the
linear weights in memory, so `auto` packs only where that copy fits in half the memory left.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rlaifv.reward.cpu_info import cpuinfo_field
from rlaifv.reward.errors import PackingUnavailableError

PackMode = Literal["auto", "on", "off"]
log = logging.getLogger(__name__)

_PACKABLE = (torch.bfloat16, torch.float32)
_DECODE_ROWS = 8  # oneDNN's layout hint; measured alike for 1..595 rows except a hint of 1 on big products


def packing_supported(dtype: torch.dtype = torch.bfloat16) -> bool:
    """This CPU and torch build have oneDNN's packed linear for `dtype`: bfloat16 needs AVX512_BF16 or AMX,
    float32 an x86 CPU with AVX2 or AVX-512."""
    cpu = torch.cpu
    onednn = (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )
    if not onednn:
        return False
    if dtype == torch.bfloat16:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    if dtype == torch.float32:
        return str(torch.backends.cpu.get_cpu_capability()).startswith(("AVX2", "AVX512"))
    return False


def packs_by_default(dtype: torch.dtype) -> bool:
    """`auto`'s rule, where measured faster (docs/performance.md): bfloat16 wherever supported (Intel AMX, AMD
    Zen 4 and Zen 5); float32 on AMD CPUs, whose float32 products otherwise take MKL's slow path (best-of-8
    1.7x faster on Zen 4). Intel CPUs keep MKL's float32 GEMM, Intel's own: on a Xeon with AMX (2 threads,
    2026-12-06) oneDNN's packed product is slower at 1-8 rows on every product but the output layer, and the
    pipeline gained nothing measurable (best-of-8 2.16 against 2.22 s, one answer 1.42 against 1.39 s)."""
    if dtype == torch.float32:
        return packing_supported(dtype) and cpuinfo_field("vendor_id") == "AuthenticAMD"
    return packing_supported(dtype)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the machine's available memory, or less under a cgroup (v2 or v1)
    limit, as in a Kubernetes pod (where /proc/meminfo shows the node); None where neither can be read."""
    limits: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                limits.append(max(int(limit) - int(usage), 0))
        except (OSError, ValueError):
            continue
    return min(limits) if limits else None


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
            or x.dtype != weight.dtype
            or x.device.type != "cpu"
            or weight.dtype not in _PACKABLE
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

    def __init__(self, model: nn.Module, dtypes: Collection[torch.dtype] = _PACKABLE) -> None:
        self.suspended = False
        self.forwards: list[_PackedForward] = []
        for module in _candidates(model, dtypes):
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


def _candidates(model: nn.Module, dtypes: Collection[torch.dtype]) -> list[nn.Linear]:
    # Exactly nn.Linear: subclasses (quantised layers, ...) compute something else with their weight.
    return [
        module
        for module in model.modules()
        if type(module) is nn.Linear and _packable(module, dtypes) and "forward" not in module.__dict__
    ]


def _packable(module: nn.Linear, dtypes: Collection[torch.dtype]) -> bool:
    weight, bias = module.weight, module.bias
    return (
        weight.dtype in dtypes
        and weight.device.type == "cpu"
        and weight.layout == torch.strided
        and (bias is None or (bias.dtype == weight.dtype and bias.device.type == "cpu"))
    )


def pack_linears(models: list[Any], mode: PackMode) -> list[PackedLinears]:
    """Pack the CPU linears of `models` (each model once) as `mode` says; [] when it says not to.

    `auto` packs the dtypes `packs_by_default` names, and nothing (with a warning) where the packed copies
    would take more than half the memory left (`available_memory`). `on` packs every dtype this CPU can
    (`packing_supported`) whatever the memory, and raises `PackingUnavailableError` where no layer can be.
    """
    if mode == "off":
        return []
    rule = packs_by_default if mode == "auto" else packing_supported
    dtypes = tuple(d for d in _PACKABLE if rule(d))
    unique = list({id(m): m for m in models if m is not None}.values())
    extra = sum(m.weight.numel() * m.weight.element_size() for model in unique for m in _candidates(model, dtypes))
    if mode == "auto" and extra:
        available = available_memory()
        if available is not None and 2 * extra > available:
            log.warning(
                "not packing weights: the packed copies (%.0f MB) would take more than half the memory left "
                "(%.0f MB); RLAIFV_PACK_WEIGHTS=on packs anyway",
                extra / 2**20,
                available / 2**20,
            )
            return []
    handles = [handle for model in unique if (handle := PackedLinears(model, dtypes)).count]
    if mode == "on" and not handles:
        raise PackingUnavailableError(
            "pack_weights=on packs CPU linears in bfloat16 (needs oneDNN and AVX512_BF16 or AMX) or float32 (an "
            "x86 CPU with AVX2 or AVX-512); this model has none that this CPU can pack"
        )
    return handles
