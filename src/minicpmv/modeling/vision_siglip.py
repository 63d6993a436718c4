"""SigLIP vision tower with NaViT-style variable resolution (spec §5), as used by MiniCPM-V.

``SiglipVisionTransformer`` maps padded slices ``[B, 3, P, Lmax*P]`` (patches laid side by side)
to ``[B, Lmax, Dv]`` features after ``post_layernorm``. Submodule names equal the checkpoint's
``vpm.*`` keys without the prefix, so a stripped state dict loads strictly. Position ids follow
the reference bucketing onto the fixed ``side x side`` table exactly, float32 ``arange``
artefacts included. Attention (``attend``) is the reference's eager formula run a few heads at a
time on a CPU (bit-identical to it in bf16; SDPA's flash kernel keeps float32 scores, and its
speed there depends on the host: 2x slower on the host this was written on, 1.2-2x faster on an
Intel Sapphire Rapids VM with torch 2.13), and SDPA on GPUs and for a padded batch (additive
key-padding mask), which matches it to float32 rounding.

``encode_slices`` (the path ``MiniCPMV.encode_images`` takes) wastes nothing on padding: slices
with equal patch counts run together without a mask, in chunks of ``batch_size`` (on a GPU,
unmasked equal-length batches are what SDPA's flash / memory-efficient kernels take). (Packing
slices of different sizes into one sequence with a block-diagonal mask was measured ~10x slower
on CPU: SDPA has no variable-length kernel there, so it computes the whole masked square.)
``compile_layers`` optionally wraps each encoder layer in ``torch.compile`` (off by default).

Also here: ``pack_slices`` (list of per-slice tensors -> padded batch + mask), used by the
conformance harness, which runs ``forward`` on the reference's padded batch. This module does
not load weights, pick dtypes or devices, or run the resampler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..errors import InputError

log = logging.getLogger(__name__)

TgtSizes = torch.Tensor | Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------
# Position ids (NaViT bucketing)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _boundaries(side: int) -> torch.Tensor:
    # float32 arange(1/side, 1, 1/side) on CPU, exactly as the reference builds it.
    return torch.arange(1 / side, 1.0, 1 / side)  # [side-1] float32


@lru_cache(maxsize=4096)
def bucket_coords(n: int, side: int) -> tuple[int, ...]:
    """Bucket index (0..side-1) of each of the ``n`` patch rows (or columns) of a slice.

    Reproduces the reference: fractional coords = float32 ``arange(0, 1-1e-6, 1/n)`` with ``1/n``
    a float32 division of the integer count, then ``bucketize(right=True)`` on the boundaries.
    Always computed on CPU (device kernels of ``arange`` may round differently).
    """
    if n < 1:
        raise InputError(f"a slice must be at least 1 patch tall and wide, got {n} patches")
    step = (torch.tensor(1.0) / torch.tensor(n, dtype=torch.int32)).item()  # float32 1/n
    frac = torch.arange(0, 1 - 1e-6, step)  # [n] float32
    buckets = torch.bucketize(frac, _boundaries(side), right=True)  # [n] int64
    if buckets.numel() != n:
        raise InputError(f"position bucketing produced {buckets.numel()} coordinates for {n} patches")
    return tuple(int(v) for v in buckets.tolist())


@lru_cache(maxsize=1024)
def _slice_position_ids(h: int, w: int, side: int) -> torch.Tensor:
    rows = torch.tensor(bucket_coords(h, side), dtype=torch.long)  # [h]
    cols = torch.tensor(bucket_coords(w, side), dtype=torch.long)  # [w]
    return (rows[:, None] * side + cols[None, :]).flatten()  # [h*w], row-major


def slice_position_ids(h: int, w: int, side: int) -> torch.Tensor:
    """Position-table index of every patch of an ``h x w`` slice, row-major, CPU int64 [h*w]."""
    return _slice_position_ids(h, w, side).clone()


def _sizes_list(tgt_sizes: TgtSizes) -> list[tuple[int, int]]:
    if isinstance(tgt_sizes, torch.Tensor):
        if tgt_sizes.dim() != 2 or tgt_sizes.shape[1] != 2:
            raise InputError(f"tgt_sizes must have shape [B, 2], got {tuple(tgt_sizes.shape)}")
        rows = tgt_sizes.tolist()
    else:
        rows = [list(r) for r in tgt_sizes]
    out = []
    for r in rows:
        if len(r) != 2 or int(r[0]) < 1 or int(r[1]) < 1:
            raise InputError(f"every tgt_size must be (h, w) with h, w >= 1 patches, got {r}")
        out.append((int(r[0]), int(r[1])))
    return out


# --------------------------------------------------------------------------------------------
# Modules (names follow the checkpoint)
# --------------------------------------------------------------------------------------------


class SiglipVisionEmbeddings(nn.Module):
    """Patch conv + position embedding looked up through the NaViT bucketing."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.num_patches_per_side = cfg.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, cfg.hidden_size)

    def position_ids(self, sizes: list[tuple[int, int]], lmax: int) -> torch.Tensor:
        """[B, lmax] int64 on CPU; padded positions get id 0 (as the reference)."""
        out = torch.zeros(len(sizes), lmax, dtype=torch.long)  # [B, Lmax]
        for b, (h, w) in enumerate(sizes):
            out[b, : h * w] = _slice_position_ids(h, w, self.num_patches_per_side)
        return out

    def forward(self, pixel_values: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(dtype=weight.dtype))  # [B, Dv, 1, Lmax]
        # contiguous: a transposed layout would make every LayerNorm and linear below copy it
        x = x.flatten(2).transpose(1, 2).contiguous()  # [B, Lmax, Dv]
        pos = self.position_ids(sizes, x.shape[1]).to(weight.device)  # [B, Lmax]
        return x + self.position_embedding(pos)  # [B, Lmax, Dv]


ATTENTION_CHUNK_BYTES = 4 * 2**20  # score block per step of ``eager_attention`` (stays in cache)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked ``softmax(q k^T * hd^-0.5) v`` as the reference's eager attention computes it,
    q, k, v ``[B, h, L, hd]`` (any strides) -> ``[B, L, h*hd]``.

    The scores are made, scaled and softmaxed in the input dtype (bf16 softmax accumulates in
    float32 and rounds once, like the reference's ``softmax(dtype=float32).to(bf16)``), a few
    heads at a time so each score block stays in cache. It gives the reference's bf16 numbers bit
    for bit, where SDPA's flash kernel keeps float32 scores (which of the two is faster depends on
    the CPU: see the module docstring).
    """
    b, h, n, hd = q.shape
    out = q.new_empty(b, n, h, hd)  # [B, L, h, hd]
    step = max(1, min(h, ATTENTION_CHUNK_BYTES // max(n * n * q.element_size(), 1)))
    scale = hd**-0.5
    for i in range(b):
        for j in range(0, h, step):
            s = torch.matmul(q[i, j : j + step], k[i, j : j + step].transpose(-1, -2))  # [c, L, L]
            s = torch.softmax(s.mul_(scale), dim=-1)  # [c, L, L]
            out[i, :, j : j + step] = torch.matmul(s, v[i, j : j + step]).transpose(0, 1)  # [L, c, hd]
    return out.view(b, n, h * hd)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Vision self-attention, q, k, v ``[B, h, L, hd]`` -> ``[B, L, h*hd]``: ``eager_attention``
    on a CPU without a mask, else SDPA (flash/memory-efficient kernels on GPUs; the additive
    key-padding mask of a padded batch)."""
    if mask is None and q.device.type == "cpu":
        return eager_attention(q, k, v)
    b, h, n, hd = q.shape
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, L, hd]
    return o.transpose(1, 2).reshape(b, n, h * hd)


class SiglipAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (``attend``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // self.num_heads
        if self.head_dim * self.num_heads != d:
            raise InputError(f"vision hidden_size {d} is not divisible by {self.num_heads} heads")
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, h, L, hd]
        k = self.k_proj(x).view(shape).transpose(1, 2)  # [B, h, L, hd]
        v = self.v_proj(x).view(shape).transpose(1, 2)  # [B, h, L, hd]
        return self.out_proj(attend(q, k, v, mask))  # [B, L, Dv]


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # [B, L, Dv]


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)  # [B, L, Dv]
        return x + self.mlp(self.layer_norm2(x))  # [B, L, Dv]


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)  # [B, L, Dv]
        return x


class SiglipVisionTransformer(nn.Module):
    """The ``vpm`` child of MiniCPM-V: embeddings, ``num_layers`` encoder blocks, post LayerNorm."""

    def __init__(self, cfg: VisionConfig, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1 or num_layers > cfg.num_hidden_layers:
            raise InputError(
                f"num_layers must be in 1..{cfg.num_hidden_layers} (vision_config.num_hidden_layers), "
                f"got {num_layers}"
            )
        self.cfg = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg, num_layers)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_attention_mask: torch.Tensor,
        tgt_sizes: TgtSizes,
    ) -> torch.Tensor:
        """pixel_values [B,3,P,Lmax*P], patch_attention_mask [B,1,Lmax] bool, tgt_sizes [B,2]
        (h, w in patches) -> [B, Lmax, Dv]. Rows past a slice's h*w patches are garbage."""
        sizes = _sizes_list(tgt_sizes)
        p = self.cfg.patch_size
        if pixel_values.dim() != 4 or pixel_values.shape[2] != p or pixel_values.shape[3] % p:
            raise InputError(
                f"pixel_values must be [B, 3, {p}, Lmax*{p}], got {tuple(pixel_values.shape)}"
            )
        b, lmax = pixel_values.shape[0], pixel_values.shape[3] // p
        if len(sizes) != b:
            raise InputError(f"{len(sizes)} tgt_sizes for a batch of {b} slices")
        too_long = [(h, w) for h, w in sizes if h * w > lmax]
        if too_long:
            raise InputError(f"tgt_sizes {too_long} need more than the {lmax} patches of pixel_values")
        valid = patch_attention_mask.reshape(b, lmax).to(torch.bool)  # [B, Lmax]
        x = self.embeddings(pixel_values, sizes)  # [B, Lmax, Dv]
        mask = None
        if not bool(valid.all()):
            mask = torch.zeros(b, 1, 1, lmax, dtype=x.dtype, device=x.device)  # [B,1,1,Lmax]
            mask.masked_fill_(~valid.to(x.device)[:, None, None, :], torch.finfo(x.dtype).min)
        x = self.encoder(x, mask)  # [B, Lmax, Dv]
        return self.post_layernorm(x)  # [B, Lmax, Dv]

    def position_sizes(self, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (rows, cols) patch grid the position lookup sees for each slice: the real one."""
        return sizes

    def encode_slices(
        self, pixel_values: Sequence[torch.Tensor], tgt_sizes: TgtSizes, *, batch_size: int = 16
    ) -> torch.Tensor:
        """Slices [3, P, L*P] (any dtype/device) + tgt_sizes [S, 2] -> features [S, Lmax, Dv].

        No padding waste: slices with equal patch counts run together (no mask), in chunks of
        ``batch_size``. Rows past each slice's h*w patches are zero (the layout ``forward`` and
        the resampler expect); the output is in input order.
        """
        sizes = _sizes_list(tgt_sizes)
        if len(sizes) != len(pixel_values) or not sizes:
            raise InputError(f"{len(pixel_values)} slices but {len(sizes)} tgt_sizes (need >= 1)")
        lens = [h * w for h, w in sizes]
        p = self.cfg.patch_size
        bad = [i for i, (pv, n) in enumerate(zip(pixel_values, lens, strict=True))
               if pv.dim() != 3 or pv.shape[1] != p or pv.shape[2] != n * p]
        if bad:
            i = bad[0]
            raise InputError(f"slice {i}: pixel tensor {tuple(pixel_values[i].shape)} does not match "
                             f"tgt_size {sizes[i]} (expected [3, {p}, {lens[i] * p}])")
        weight = self.post_layernorm.weight
        step = max(int(batch_size), 1)
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(lens):
            by_len.setdefault(n, []).append(i)
        chunks = [idx[k : k + step] for idx in by_len.values() for k in range(0, len(idx), step)]
        if len(chunks) == 1:
            return self._encode_equal(pixel_values, sizes)  # [S, L, Dv], already in order
        out = torch.zeros(len(lens), max(lens), self.cfg.hidden_size, dtype=weight.dtype,
                          device=weight.device)  # [S, Lmax, Dv]
        for chunk in chunks:
            feats = self._encode_equal([pixel_values[i] for i in chunk], [sizes[i] for i in chunk])  # [b, n, Dv]
            out[torch.tensor(chunk, device=weight.device), : feats.shape[1]] = feats
        return out

    def _encode_equal(self, pixel_values: Sequence[torch.Tensor], sizes: list[tuple[int, int]]) -> torch.Tensor:
        """Slices of one patch count n as one unmasked batch -> [b, n, Dv]."""
        device = self.post_layernorm.weight.device
        pv = torch.stack(list(pixel_values)).to(device)  # [b, 3, P, n*P]
        mask = torch.ones(len(sizes), 1, pv.shape[-1] // self.cfg.patch_size, dtype=torch.bool,
                          device=device)  # [b, 1, n]
        return self(pv, mask, self.position_sizes(sizes))  # [b, n, Dv]

    def compile_layers(self, **options: Any) -> None:
        """Wrap every encoder layer in ``torch.compile`` (in place; ``options`` go to it). Off by
        default: on a 2-core CPU (bf16) it saved only ~3% per layer (fused LayerNorm/GELU/bias;
        attention and matmuls are library kernels either way), compiling costs 6-20 s, and the
        fused kernels round differently from eager mode."""
        for layer in self.encoder.layers:
            layer.compile(**options)


def pack_slices(
    pixel_values: Sequence[torch.Tensor], tgt_sizes: TgtSizes
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-slice tensors [3, P, L*P] to one batch.

    Returns (padded [B, 3, P, Lmax*P] zero-padded, patch_attention_mask [B, 1, Lmax] bool with
    True on each slice's first L = h*w positions).
    """
    sizes = _sizes_list(tgt_sizes)
    if len(sizes) != len(pixel_values) or not sizes:
        raise InputError(f"{len(pixel_values)} slices but {len(sizes)} tgt_sizes (need >= 1)")
    first = pixel_values[0]
    c, p = first.shape[0], first.shape[1]
    lens = [h * w for h, w in sizes]
    lmax = max(lens)
    padded = first.new_zeros(len(sizes), c, p, lmax * p)  # [B, 3, P, Lmax*P]
    mask = torch.zeros(len(sizes), 1, lmax, dtype=torch.bool, device=first.device)  # [B,1,Lmax]
    for b, (pv, n) in enumerate(zip(pixel_values, lens, strict=True)):
        if pv.dim() != 3 or pv.shape[0] != c or pv.shape[1] != p or pv.shape[2] != n * p:
            raise InputError(
                f"slice {b}: pixel tensor {tuple(pv.shape)} does not match tgt_size {sizes[b]} "
                f"(expected [{c}, {p}, {n * p}])"
            )
        padded[b, :, :, : n * p] = pv
        mask[b, 0, :n] = True
    return padded, mask
