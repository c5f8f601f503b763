"""The EVA vision tower of OmniLMM, written natively with timm's module and parameter names.

OmniLMM builds `timm.create_model('eva02_enormous_patch14_clip_224.laion2b_plus', num_classes=0,
dynamic_img_size=True, dynamic_img_pad=True)`, replaces its last block by an identity and keeps
`forward_features` minus the class token. For that variant timm's `Eva` is (timm 0.9.10, the
version OmniLMM pins; timm/models/eva.py):

- patch embedding: a stride-`patch` Conv2d with bias; inputs are zero-padded on the right/bottom to
  a multiple of the patch size (`dynamic_img_pad`); the output stays a grid (NHWC);
- a class token and an absolute position embedding for the 224 px grid (16 x 16 + 1); with
  `dynamic_img_size` the grid part is resampled to the input's grid, bicubic with antialiasing, in
  float32 (448 px -> 32 x 32); no rotary embedding in this variant;
- residual post-norm blocks (`EvaBlockPostNorm`): x + norm1(attn(x)), then x + norm2(mlp(x));
  attention with a fused qkv projection whose bias is (q_bias, 0, v_bias), no inner norm; a GELU
  MLP without the SwiGLU / sub-LN of other EVA02 sizes;
- LayerNorms with eps 1e-6, and a final LayerNorm (`norm`, "token" pooling) after the blocks.

Parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.attn.qkv`,
`blocks.{i}.attn.q_bias`, `...v_bias`, `...attn.proj`, `...norm1`, `...mlp.fc1`, `...mlp.fc2`,
`...norm2`, `norm`), so the tower's part of a published OmniLMM state dict loads unchanged; timm
keeps `k_bias` as a non-persistent zero buffer, which no checkpoint holds, so it is not a tensor here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlaifv.reward.omnilmm.configuration import EvaSpec

LAYER_NORM_EPS = 1e-6  # timm.layers.LayerNorm's default, used by Eva for every norm


class EvaPatchEmbed(nn.Module):
    def __init__(self, spec: EvaSpec) -> None:
        super().__init__()
        self.patch_size = spec.patch_size
        self.proj = nn.Conv2d(3, spec.embed_dim, kernel_size=spec.patch_size, stride=spec.patch_size, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H / p, W / p, C), after zero-padding H and W up to multiples of p."""
        height, width = pixel_values.shape[-2:]
        pad_h = (self.patch_size - height % self.patch_size) % self.patch_size
        pad_w = (self.patch_size - width % self.patch_size) % self.patch_size
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        return self.proj(pixel_values).permute(0, 2, 3, 1)


class EvaAttention(nn.Module):
    """Multi-head self-attention with a bias-free fused qkv weight plus separate q and v biases (k has none)."""

    def __init__(self, spec: EvaSpec) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.qkv = nn.Linear(spec.embed_dim, 3 * spec.embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(spec.embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(spec.embed_dim))
        self.proj = nn.Linear(spec.embed_dim, spec.embed_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, dim = hidden.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(hidden, self.qkv.weight, bias)
        query, key, value = qkv.reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(query, key, value)  # scale head_dim ** -0.5, no mask
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class EvaMlp(nn.Module):
    def __init__(self, spec: EvaSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.embed_dim, spec.mlp_hidden)
        self.fc2 = nn.Linear(spec.mlp_hidden, spec.embed_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden)))  # nn.GELU: the exact (erf) form


class EvaBlock(nn.Module):
    """timm's EvaBlockPostNorm: the norms apply to each branch's output, inside the residual."""

    def __init__(self, spec: EvaSpec) -> None:
        super().__init__()
        self.attn = EvaAttention(spec)
        self.norm1 = nn.LayerNorm(spec.embed_dim, eps=LAYER_NORM_EPS)
        self.mlp = EvaMlp(spec)
        self.norm2 = nn.LayerNorm(spec.embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.norm1(self.attn(hidden))
        return hidden + self.norm2(self.mlp(hidden))


def resample_grid_embedding(
    table: torch.Tensor, old: tuple[int, int], new: tuple[int, int], *, antialias: bool
) -> torch.Tensor:
    """A (old_h * old_w, C) row-major grid table bicubically resampled to (new_h * new_w, C), in float32.

    timm's `resample_abs_pos_embed` uses antialias=True; OmniLMM's resampler (`get_abs_pos`) does not.
    """
    if old == new:
        return table
    grid = table.float().reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1).to(table.dtype)


class EvaVisionTower(nn.Module):
    """`forward_features` of the tower with its last block removed; returns the patch tokens (B, N, C)."""

    def __init__(self, spec: EvaSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = EvaPatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.grid * spec.grid + 1, spec.embed_dim))
        self.blocks = nn.ModuleList(EvaBlock(spec) for _ in range(spec.used_blocks))
        self.norm = nn.LayerNorm(spec.embed_dim, eps=LAYER_NORM_EPS)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self.patch_embed(pixel_values)
        batch, height, width, dim = grid.shape
        table = self.pos_embed[0]
        patches = resample_grid_embedding(table[1:], (self.spec.grid, self.spec.grid), (height, width), antialias=True)
        hidden = torch.cat([self.cls_token.expand(batch, -1, -1), grid.reshape(batch, height * width, dim)], dim=1)
        hidden = hidden + torch.cat([table[:1], patches], dim=0).unsqueeze(0)
        for block in self.blocks:
            hidden = block(hidden)
        return self.norm(hidden)[:, 1:]


__all__ = ["EvaBlock", "EvaVisionTower", "resample_grid_embedding"]
