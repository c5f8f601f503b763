"""What each model family needs from the shared-prefix engine: positions and how its vision inputs batch.

The engine runs B prompts' prefixes in one left-padded forward and then
continues every answer from the prefix's KV cache, passing position ids itself.
That is exact only when the engine follows the family's own rules:

- positions: most families count 1-D positions over real tokens. Qwen-VL
  families and GLM-4.1V use 3-axis multimodal rope (mrope): image tokens get (t, h, w) grid
  positions and text continues from the highest prefix position + 1, which is
  fewer than the prefix's length. Those positions come from the model's own
  `get_rope_index`, never from our arithmetic.
- sequence-aligned inputs (`token_type_ids`, `mm_token_type_ids`, Mllama's
  `cross_attention_mask`) are padded with the ids, on the same side; those a
  family needs for every later token as well (`Family.continued`) go with each
  answer token as the prompt's last row, as the family's `generate` does.
- vision tensors of different shapes (a wide image with more crops or patches
  than a square one, images of different sizes): families whose model reads
  the real extent from sizes or masks accept zero padding; for any other, the
  micro-batch is split into groups of equal shapes, which is exact too.

A model type with mrope that is not registered here is refused at load time:
its rope-index function may take other inputs, and wrong positions give
plausible but wrong log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlaifv.reward.errors import ModelLoadError
from rlaifv.reward.prompt import EncodedPrompt

if TYPE_CHECKING:
    import torch

SEQUENCE_KEYS = frozenset({"token_type_ids", "mm_token_type_ids", "cross_attention_mask"})
ROPE_INDEX_KEYS = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


@dataclass(frozen=True)
class Family:
    """One family's rules.

    mrope: positions come from the model's `get_rope_index` (3 axes).
    pad_vision: per-image tensors of different shapes may be zero-padded to one
    shape (the model crops them back by `image_sizes` or drops all-zero crops
    under a pixel mask), so prompts of any image shapes share a micro-batch.
    verified: covered by the per-family tests (tests/reward/test_families.py).
    vision, projector: dotted module paths (as in parameter names) of the image encoder and of what maps its
    features into the language model; the trainer freezes them by these (a projector inside the encoder, as
    Qwen-VL's `visual.merger`, is the projector).
    continued: sequence-aligned inputs every later token needs too (Mllama's `cross_attention_mask`: which
    images a token reads); each answer token gets the prompt's last row.
    image_cache_layers: the text config's list of layers whose cache holds the image's keys (Mllama's
    `cross_attention_layers`): kept once per prompt (`reward.kv_cache.ImageKeysLayer`), never copied per answer;
    such a cache is not one of prefix keys only, so the shared-prefix layout (`reward.shared_prefix`) passes it by.
    """

    name: str
    mrope: bool = False
    pad_vision: bool = False
    verified: bool = True
    vision: tuple[str, ...] = ("vision_tower",)
    projector: tuple[str, ...] = ("multi_modal_projector",)
    continued: tuple[str, ...] = ()
    image_cache_layers: str | None = None


_QWEN_VISION: dict[str, Any] = {"vision": ("visual",), "projector": ("visual.merger",)}
_IDEFICS_VISION: dict[str, Any] = {"vision": ("vision_model",), "projector": ("connector",)}

FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA-1.5"),
    "llava_next": Family("LLaVA-NeXT", pad_vision=True, projector=("multi_modal_projector", "image_newline")),
    "llava_onevision": Family("LLaVA-OneVision", pad_vision=True, projector=("multi_modal_projector", "image_newline")),
    "qwen2_vl": Family("Qwen2-VL", mrope=True, **_QWEN_VISION),
    "qwen2_5_vl": Family("Qwen2.5-VL", mrope=True, **_QWEN_VISION),
    "qwen3_vl": Family(
        "Qwen3-VL", mrope=True, vision=("visual",), projector=("visual.merger", "visual.deepstack_merger_list")
    ),
    "qwen3_vl_moe": Family(
        "Qwen3-VL-MoE", mrope=True, vision=("visual",), projector=("visual.merger", "visual.deepstack_merger_list")
    ),
    "glm4v": Family("GLM-4.1V", mrope=True, **_QWEN_VISION),
    "gemma3": Family("Gemma3"),
    "idefics2": Family("Idefics2", pad_vision=True, **_IDEFICS_VISION),
    "idefics3": Family("Idefics3", pad_vision=True, **_IDEFICS_VISION),
    "smolvlm": Family("SmolVLM", pad_vision=True, **_IDEFICS_VISION),
    "mistral3": Family("Mistral3 / Pixtral", pad_vision=True, verified=False),  # its processor needs torchvision
    "internvl": Family("InternVL"),
    "omnilmm": Family("OmniLMM / RLAIF-V-12B", projector=("resampler",)),  # native implementation: reward/omnilmm/
    "mllama": Family(
        "Llama 3.2 Vision (Mllama)",
        vision=("vision_model",),
        continued=("cross_attention_mask",),
        image_cache_layers="cross_attention_layers",
    ),
    "vipllava": Family("VipLLaVA"),
    "aya_vision": Family("Aya Vision"),
}


def module_part(family: Family, parameter: str) -> str | None:
    """'projector', 'vision' or None: which image part a parameter name (`model.visual.blocks.0...`) is in."""
    dotted = f".{parameter}."
    for part, paths in (("projector", family.projector), ("vision", family.vision)):
        if any(f".{path}." in dotted for path in paths):
            return part
    return None


def image_cache_layers(model: Any, family: Family) -> list[int]:
    """Indices of the layers whose cache holds the image's keys (`Family.image_cache_layers`), from the config."""
    if family.image_cache_layers is None:
        return []
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [int(i) for i in getattr(text, family.image_cache_layers, None) or ()]


def model_type(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", "") or "")


def rope_module(model: Any) -> Any | None:
    """The module holding `get_rope_index` (the base model of a Qwen-VL), through a PEFT wrapper if any."""
    candidates = [model, getattr(model, "model", None)]
    if hasattr(model, "get_base_model"):
        base = model.get_base_model()
        candidates += [base, getattr(base, "model", None)]
    for module in candidates:
        if module is not None and callable(getattr(module, "get_rope_index", None)):
            return module
    return None


def family_of(model: Any) -> Family:
    """The rules for `model`; unknown 1-D families get the safe defaults, unknown mrope ones are refused."""
    kind = model_type(model)
    if kind in FAMILIES:
        return FAMILIES[kind]
    if rope_module(model) is not None:
        known = ", ".join(sorted(k for k, f in FAMILIES.items() if f.mrope))
        raise ModelLoadError(
            f"model type {kind!r} uses multimodal rope positions that this engine has not been verified for"
            f" (verified: {known}); serving it would give wrong log-probs"
        )
    return Family(kind or "unknown", verified=False)


def vision_signature(prompt: EncodedPrompt) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Shapes of a prompt's per-image tensors past the first axis: prompts with equal signatures concatenate."""
    return tuple(
        sorted((key, tuple(value.shape[1:])) for key, value in prompt.vision.items() if key not in SEQUENCE_KEYS)
    )


def batch_groups(prompts: Sequence[EncodedPrompt], family: Family) -> list[list[int]]:
    """Indices of prompts that can share one forward; one group unless shapes differ and padding is not allowed."""
    if family.pad_vision or len(prompts) < 2:
        return [list(range(len(prompts)))]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(vision_signature(prompt), []).append(index)
    return list(groups.values())


def stack_vision(
    prompts: Sequence[EncodedPrompt], width: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The prompts' processor outputs as one batch, the sequence-aligned ones left-padded to `width`.

    Per-image tensors are concatenated on their first axis, zero-padded on the
    others to the largest shape (callers group prompts whose family cannot take
    that: `batch_groups`).
    """
    import torch

    keys = sorted({key for p in prompts for key in p.vision})
    vision: dict[str, torch.Tensor] = {}
    for key in keys:
        parts = [p.vision[key] for p in prompts if key in p.vision]
        if key in SEQUENCE_KEYS:
            rows = [as_sequence(part) for part in parts]  # (1, L, *rest): rest equal within a batch group
            padded = rows[0].new_zeros((len(prompts), width, *rows[0].shape[2:]))
            for row, prompt in enumerate(prompts):
                values = prompt.vision.get(key)
                if values is not None:
                    values = as_sequence(values)
                    padded[row, width - values.shape[1] :] = values[0]
            vision[key] = padded.to(device)
            continue
        shape = [max(part.shape[d] for part in parts) for d in range(1, parts[0].dim())]
        if any(list(part.shape[1:]) != shape for part in parts):
            parts = [_zero_pad(part, shape) for part in parts]
        tensor = torch.cat(parts, dim=0).to(device)
        vision[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return vision


def truncate(prompt: EncodedPrompt, length: int) -> EncodedPrompt:
    """The prompt's first `length` tokens, its sequence-aligned processor outputs cut alike (the per-image
    tensors stay whole: the cut must keep every image token, as the yes/no judge's shared prefix does)."""
    vision = {
        key: as_sequence(value)[:, :length] if key in SEQUENCE_KEYS else value for key, value in prompt.vision.items()
    }
    return EncodedPrompt(prompt.input_ids[:length], vision)


def as_sequence(values: torch.Tensor) -> torch.Tensor:
    """A sequence-aligned processor output as (1, L, *rest): token type ids come as (1, L) or (L,), Mllama's
    cross-attention mask as (1, L, images, tiles)."""
    return values.reshape(1, -1) if values.dim() < 2 else values


def extended(values: torch.Tensor, width: int, continued: bool) -> torch.Tensor:
    """A batch's sequence-aligned input (B, L, *rest) over `width` more tokens of text: zeros (text's id), or the
    last row repeated for a `Family.continued` input."""
    import torch

    if continued:
        more = values[:, -1:].expand(values.shape[0], width, *values.shape[2:])
    else:
        more = values.new_zeros((values.shape[0], width, *values.shape[2:]))
    return torch.cat([values, more], dim=1)


def _zero_pad(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(tensor.shape[1:]) == shape:
        return tensor
    out = tensor.new_zeros((tensor.shape[0], *shape))
    out[(slice(None), *(slice(0, size) for size in tensor.shape[1:]))] = tensor
    return out


def prefix_positions(
    model: Any, family: Family, input_ids: torch.Tensor, mask: torch.Tensor, vision: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of a left-padded prefix batch, and each row's next position (the first answer token's).

    1-D: (B, L) counting real tokens. mrope: (3, B, L) from the model's
    `get_rope_index`; the next position is the highest one + 1.
    """
    if not family.mrope:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return positions, mask.sum(-1)
    module = rope_module(model)
    if module is None:  # pragma: no cover - registry says mrope, model disagrees
        raise ModelLoadError(f"{family.name} model has no get_rope_index")
    kwargs = {key: vision[key] for key in ROPE_INDEX_KEYS if key in vision}
    if "mm_token_type_ids" not in kwargs:
        kwargs["mm_token_type_ids"] = input_ids.new_zeros(input_ids.shape)
    positions, _ = module.get_rope_index(input_ids=input_ids, attention_mask=mask, **kwargs)
    positions = positions.to(input_ids.device)
    return positions, positions.amax(dim=(0, 2)) + 1


def continue_positions(family: Family, start: torch.Tensor, width: int) -> torch.Tensor:
    """Positions of `width` tokens after the prefix, per row from `start` (rows,): (rows, T), or (3, rows, T)."""
    import torch

    positions = start[:, None] + torch.arange(width, device=start.device)[None, :]
    return positions.unsqueeze(0).expand(3, -1, -1) if family.mrope else positions


__all__ = [
    "FAMILIES",
    "Family",
    "batch_groups",
    "continue_positions",
    "family_of",
    "prefix_positions",
    "stack_vision",
]
