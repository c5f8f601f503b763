"""OmniLMM's resampler: `num_query` learned queries cross-attend once to the EVA patch tokens.

As the original (`omnilmm/model/resampler.py`, after Qwen-VL's) computes it:

- the keys/values are the tower's patch tokens, projected to the language model's width
  (`kv_proj`, no bias) and layer-normed (`ln_kv`);
- queries are layer-normed (`ln_q`) learned vectors plus a fixed 2-D sin-cos table over the
  query grid (`pos_embed`, 16 x 16 for 256 queries, stored in the checkpoint); keys get the same
  table bicubically resized (no antialiasing, float32) to the patch grid (32 x 32 at 448 px);
  values get none;
- one `nn.MultiheadAttention` with hidden_size // 128 heads, then `ln_post` and a bias-free
  square matrix `proj`.

LayerNorms use eps 1e-6. Parameter names are the original's (`query`, `pos_embed`, `kv_proj`,
`attn.in_proj_weight`, `attn.in_proj_bias`, `attn.out_proj`, `ln_q`, `ln_kv`, `ln_post`, `proj`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlaifv.reward.omnilmm.eva import resample_grid_embedding

LAYER_NORM_EPS = 1e-6


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """The MAE 2-D sin-cos position table (grid * grid, dim), rows in row-major (h, w) order.

    The first half of the channels encodes the column (w), the second half the row (h); within a
    half, sines then cosines of position * 10000 ** (-2i / half), computed in float32 like the
    NumPy original.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos table needs a width divisible by 4, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float32) / (half / 2.0))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )

    def encode(position: torch.Tensor) -> torch.Tensor:
        angles = position.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


class Resampler(nn.Module):
    def __init__(self, *, num_query: int, embed_dim: int, num_heads: int, kv_dim: int) -> None:
        super().__init__()
        self.grid = math.isqrt(num_query)
        if self.grid * self.grid != num_query:
            raise ValueError(f"num_query must be a square number, got {num_query}")
        self.embed_dim = embed_dim
        self.pos_embed = nn.Parameter(torch.zeros(num_query, embed_dim), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(num_query, embed_dim))
        self.kv_proj: nn.Module = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.ln_post = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, kv_dim) patch tokens, N a square number -> (B, num_query, embed_dim)."""
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ValueError(f"the resampler needs a square patch grid, got {patches.shape[1]} tokens")
        key_pos = resample_grid_embedding(self.pos_embed, (self.grid, self.grid), (side, side), antialias=False)
        context = self.ln_kv(self.kv_proj(patches)).transpose(0, 1)  # (N, B, E): the module is sequence-first
        queries = self.ln_q(self.query).unsqueeze(1).expand(-1, patches.shape[0], -1)
        out, _ = self.attn(
            queries + self.pos_embed.unsqueeze(1), context + key_pos.unsqueeze(1), context, need_weights=False
        )
        return self.ln_post(out.transpose(0, 1)) @ self.proj


__all__ = ["Resampler", "sincos_table"]
