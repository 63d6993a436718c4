"""MiniCPM-V 2.0's vision tower: timm's ``VisionTransformer`` (SigLIP so400m/14), re-implemented.

The official code builds ``vit_so400m_patch14_siglip_384`` with timm (``dynamic_img_size``), drops
the attention-pool head and its last block, and calls ``forward_features`` on one slice at a time
(spec 2.0 §2.3). Differences from the NaViT tower of 2.5/2.6: pre-norm blocks with a packed
``qkv`` projection and exact (erf) GELU, a learned 27x27 position table that is resampled to each
slice's patch grid with float32 bicubic interpolation with antialiasing (no resampling for a
27x27 grid, as timm returns early there), and a final ``norm``. Parameter names equal the
checkpoint's ``vpm.*`` keys without the prefix. No timm or torchvision dependency.

Slices arrive in the processor's patch layout ``[3, P, L*P]``; the patch convolution over that
layout equals the convolution over the ``[3, h*P, w*P]`` image (patches are independent, row-major
order is kept). This module does not run the resampler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..errors import InputError
from .vision_siglip import TgtSizes, _sizes_list


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=p, stride=p)


class TimmAttention(nn.Module):
    """Self-attention with one packed ``qkv`` projection (rows [q; k; v], heads contiguous)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise InputError(f"vision embed_dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # [B, N, D]
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, h, N, hd]
        o = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, hd]
        return self.proj(o.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU


class TimmBlock(nn.Module):
    """``x += attn(norm1(x)); x += mlp(norm2(x))`` (LayerNorm eps from config)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = TimmAttention(d, cfg.num_attention_heads)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = TimmMlp(d, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # [B, N, D]
        return x + self.mlp(self.norm2(x))  # [B, N, D]


def resample_pos_embed(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed`` without prefix tokens: [1, S*S, D] -> [1, rows*cols, D].

    float32 bicubic interpolation with antialiasing (align_corners False); the table is returned
    unchanged when the target grid is the table's own square grid.
    """
    n, dim = table.shape[1], table.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise InputError(f"position table of {n} rows is not a square grid")
    if rows * cols == n and rows == cols:
        return table
    grid = table.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, S, S]
    out = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(table.dtype)  # [1, rows*cols, D]


class TimmSiglipVisionTransformer(nn.Module):
    """The ``vpm`` child of MiniCPM-V 2.0 with ``num_layers`` blocks (the last one dropped)."""

    def __init__(self, cfg: VisionConfig, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1 or num_layers > cfg.num_hidden_layers:
            raise InputError(f"num_layers must be in 1..{cfg.num_hidden_layers}, got {num_layers}")
        self.cfg = cfg
        side = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side, cfg.hidden_size))
        self.blocks = nn.ModuleList(TimmBlock(cfg) for _ in range(num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """One slice [3, P, L*P] with L = rows*cols patches (row-major) -> [L, D] after ``norm``."""
        p = self.cfg.patch_size
        if pixel_values.dim() != 3 or pixel_values.shape[1] != p or pixel_values.shape[2] != rows * cols * p:
            raise InputError(
                f"slice pixels must be [3, {p}, {rows * cols}*{p}] for a {rows}x{cols} grid, "
                f"got {tuple(pixel_values.shape)}"
            )
        weight = self.patch_embed.proj.weight
        x = self.patch_embed.proj(pixel_values[None].to(dtype=weight.dtype))  # [1, D, 1, L]
        x = x.flatten(2).transpose(1, 2)  # [1, L, D]
        x = x + resample_pos_embed(self.pos_embed, rows, cols)  # [1, L, D]
        for block in self.blocks:
            x = block(x)  # [1, L, D]
        return self.norm(x)[0]  # [L, D]

    def encode_slices(
        self, pixel_values: Sequence[torch.Tensor], tgt_sizes: TgtSizes, *, batch_size: int = 16
    ) -> torch.Tensor:
        """Slices one at a time (as the reference) -> [S, Lmax, D], zero rows past each slice."""
        sizes = _sizes_list(tgt_sizes)
        if len(sizes) != len(pixel_values) or not sizes:
            raise InputError(f"{len(pixel_values)} slices but {len(sizes)} tgt_sizes (need >= 1)")
        weight = self.patch_embed.proj.weight
        lmax = max(h * w for h, w in sizes)
        out = torch.zeros(len(sizes), lmax, self.cfg.hidden_size, dtype=weight.dtype, device=weight.device)
        for i, (pv, (h, w)) in enumerate(zip(pixel_values, sizes, strict=True)):
            out[i, : h * w] = self(pv.to(device=weight.device), h, w)  # [L, D]
        return out  # [S, Lmax, D]
