"""The OmniLMM configuration: the keys of the published config.json of OmniLMM-12B and RLAIF-V-12B.

The published config is a flat Mistral config (the language model) plus the multimodal keys the
OmniLMM code reads: `mm_vision_tower` (a timm model name; the tower's architecture comes from that
name, not from the config), `num_query` (resampler queries = image tokens, a square number),
`image_size` (the side images are resized to) and `mm_use_im_start_end` (always true: images are
framed by `<im_start>` ... `<im_end>`). The training flags (`fully_tune`, `tune_CLIP`,
`tune_mm_mlp_adapter`, `use_mm_proj`) are kept so a folder round-trips unchanged.

Two keys are ours and absent from the published file:

- `im_start_token_id`, `im_end_token_id`, `im_patch_token_id`: the original code looked them up in
  the tokenizer at run time; `rlaifv.convert.omnilmm` writes them into the converted folder, so the
  model can splice image features without a tokenizer.
- `mm_vision_config`: an explicit tower architecture (timm `Eva` keyword names) that overrides
  the one named by `mm_vision_tower`. Only tiny test instances set it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers import MistralConfig

# timm's `eva02_enormous_patch14_clip_224` (timm/models/eva.py): EVA-CLIP-E, residual post-norm blocks,
# GELU MLP, absolute position embeddings (no rope), a class token, final LayerNorm ("token" pooling).
EVA_TOWERS: dict[str, dict[str, Any]] = {
    "eva02_enormous_patch14_clip_224": {
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": 1792,
        "depth": 64,
        "num_heads": 16,
        "mlp_ratio": 15360 / 1792,
    },
}
EVA_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass(frozen=True)
class EvaSpec:
    """One EVA tower's architecture, in timm's terms (`depth` counts the block OmniLMM replaces by identity)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float

    @property
    def used_blocks(self) -> int:
        """OmniLMM replaces the last block by identity: the features are the penultimate block's, then the norm."""
        return self.depth - 1

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # timm's rounding

    @property
    def grid(self) -> int:
        """Side of the patch grid the absolute position embedding was trained at (16 for 224 / 14)."""
        return self.img_size // self.patch_size


class OmniLMMConfig(MistralConfig):
    """OmniLMM-12B / RLAIF-V-12B: a Mistral language model with an EVA tower and a 2-D resampler."""

    model_type = "omnilmm"

    mm_vision_tower: str = "eva02_enormous_patch14_clip_224.laion2b_plus"
    num_query: int = 256
    image_size: int = 448
    mm_use_im_start_end: bool = True
    use_mm_proj: bool = True
    fully_tune: bool = True
    tune_CLIP: bool = True
    tune_mm_mlp_adapter: bool = False
    im_start_token_id: int | None = None
    im_end_token_id: int | None = None
    im_patch_token_id: int | None = None
    mm_vision_config: dict[str, Any] | None = None

    def vision_spec(self) -> EvaSpec:
        """The tower's architecture: `mm_vision_config` if given, else the timm model named by `mm_vision_tower`."""
        if self.mm_vision_config is not None:
            missing = [key for key in EVA_KEYS if key not in self.mm_vision_config]
            if missing:
                raise ValueError(f"mm_vision_config lacks {missing}")
            values = self.mm_vision_config
        else:
            name = str(self.mm_vision_tower).split(".")[0]  # drop the pretrained tag (".laion2b_plus")
            if name not in EVA_TOWERS:
                raise ValueError(
                    f"unknown OmniLMM vision tower {self.mm_vision_tower!r}; known: {', '.join(sorted(EVA_TOWERS))}"
                )
            values = EVA_TOWERS[name]
        return EvaSpec(
            img_size=int(values["img_size"]),
            patch_size=int(values["patch_size"]),
            embed_dim=int(values["embed_dim"]),
            depth=int(values["depth"]),
            num_heads=int(values["num_heads"]),
            mlp_ratio=float(values["mlp_ratio"]),
        )

    @property
    def query_grid(self) -> int:
        """Side of the resampler's query grid (16 for 256 queries)."""
        side = math.isqrt(self.num_query)
        if side * side != self.num_query:
            raise ValueError(f"num_query must be a square number, got {self.num_query}")
        return side

    @property
    def resampler_heads(self) -> int:
        """The original builds the resampler with hidden_size // 128 heads (32 for Mistral-7B)."""
        heads = int(self.hidden_size) // 128
        if heads < 1 or int(self.hidden_size) % heads:
            raise ValueError(f"hidden_size {self.hidden_size} gives no valid resampler head count (hidden_size // 128)")
        return heads


__all__ = ["EVA_TOWERS", "EvaSpec", "OmniLMMConfig"]
