"""Perceiver resampler of MiniCPM-V: 2D (2.6-style, spec §10) and 3D temporal (4.5, spec §11).

``Resampler`` compresses each slice's vision features ``[Lmax, Dv]`` into ``Q`` vectors of the
LLM width through one cross-attention from learned queries. Position embeddings (2D sin-cos
over the slice's patch grid, plus for 4.5 a 1D temporal sin-cos per slice) are added to the
KEYS only. With ``temporal_ids`` (4.5), consecutive slices are grouped (one group per
``temporal_ids`` entry) and each group is compressed jointly into one ``[Q, D]`` block. When
every entry is one slice (images, with or without temporal ids), slices with equal patch counts
run together over their real rows only, so padded rows cost no projection or attention work;
on a GPU such a group attends without a mask, so SDPA may pick its flash kernel (the CPU keeps
the all-true mask: its numbers stay exactly as before).

Parameter names equal the checkpoint's ``resampler.*`` keys without the prefix. The sin-cos
tables are computed in float32 numpy exactly as the reference (float32 products matter for
parity) and kept as plain cached tensors, never in the state dict: the 2D table grows past
70x70 when needed, temporal rows are computed only for the ids actually used (identical to the
corresponding rows of the reference's 72000-row table). This module does not run the vision
tower or decide how slices map to placeholders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ResamplerConfig
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

TgtSizes = torch.Tensor | Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------
# Sin-cos tables (float32 numpy, spec §10, §11, §12)
# --------------------------------------------------------------------------------------------


def _omega(dim: int) -> np.ndarray:
    """Frequencies of a ``dim``-wide 1D sin-cos embedding: 1/10000^(k/(dim/2)), float32 [dim/2]."""
    om = np.arange(dim // 2, dtype=np.float32)  # [dim/2]
    om /= dim / 2.0
    return np.asarray(1.0 / 10000**om, dtype=np.float32)  # [dim/2]


def _sincos(pos: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """[..., 2*len(omega)] = [sin(pos*omega), cos(pos*omega)], all float32."""
    out = np.einsum("...,d->...d", pos.astype(np.float32), omega)  # [..., dim/2] float32 products
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)  # [..., dim]


def sincos_2d_table(embed_dim: int, height: int, width: int) -> np.ndarray:
    """The 2D table [height, width, D]: first half encodes the COLUMN index, second the row."""
    if embed_dim % 4:
        raise ConfigError(f"resampler embed_dim must be a multiple of 4, got {embed_dim}")
    cols = np.broadcast_to(np.arange(width, dtype=np.float32)[None, :], (height, width))  # [h, w]
    rows = np.broadcast_to(np.arange(height, dtype=np.float32)[:, None], (height, width))  # [h, w]
    omega = _omega(embed_dim // 2)  # [D/4]
    return np.concatenate([_sincos(cols, omega), _sincos(rows, omega)], axis=-1)  # [h, w, D]


def temporal_rows(embed_dim: int, ids: Sequence[int]) -> np.ndarray:
    """Rows ``ids`` of the 1D temporal table T[t] = [sin(t*w), cos(t*w)], float32 [len(ids), D]."""
    if embed_dim % 2:
        raise ConfigError(f"resampler embed_dim must be even, got {embed_dim}")
    pos = np.asarray(list(ids), dtype=np.float32).reshape(-1)  # [n]
    return _sincos(pos, _omega(embed_dim))  # [n, D]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class ResamplerAttention(nn.Module):
    """Cross-attention with torch ``MultiheadAttention``'s parameter layout (packed in_proj).

    Computes the same math as ``nn.MultiheadAttention`` (batch-first here) through SDPA. The three
    in-projections run through ``self.project`` (``F.linear``; a loader may route it through a
    faster GEMM for the weights it holds, as it swaps the ``nn.Linear`` layers for packed ones).
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ConfigError(f"resampler embed_dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.project: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = F.linear
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None
    ) -> torch.Tensor:
        """query [Q, D] (shared), key/value [N, K, D], key_valid [N, K] bool (None: every key is
        valid) -> [N, Q, D]."""
        n, k, d = key.shape
        nq, h = query.shape[0], self.num_heads
        wq, wk, wv = self.in_proj_weight.chunk(3)  # each [D, D]
        bq, bk, bv = self.in_proj_bias.chunk(3)  # each [D]
        q = self.project(query, wq, bq).view(nq, h, d // h).transpose(0, 1)  # [h, Q, hd]
        q = q.unsqueeze(0).expand(n, h, nq, d // h).contiguous()  # [N, h, Q, hd]
        kh = self.project(key, wk, bk).view(n, k, h, d // h).transpose(1, 2)  # [N, h, K, hd]
        vh = self.project(value, wv, bv).view(n, k, h, d // h).transpose(1, 2)  # [N, h, K, hd]
        mask = None if key_valid is None else key_valid[:, None, None, :]  # [N, 1, 1, K] True = attend
        o = F.scaled_dot_product_attention(q, kh, vh, attn_mask=mask)  # [N, h, Q, hd]
        return self.out_proj(o.transpose(1, 2).reshape(n, nq, d))  # [N, Q, D]


class Resampler(nn.Module):
    """The ``resampler`` child of MiniCPM-V (2D; temporal grouping when ``cfg.temporal``)."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        if d % 4:
            raise ConfigError(f"resampler embed_dim must be a multiple of 4, got {d}")
        self.cfg = cfg
        self.embed_dim = d
        self.query = nn.Parameter(torch.empty(cfg.query_num, d))
        self.kv_proj: nn.Module = (
            nn.Linear(cfg.kv_dim, d, bias=False) if cfg.kv_dim != d else nn.Identity()
        )
        self.attn = ResamplerAttention(d, cfg.num_heads)
        self.ln_q = nn.LayerNorm(d, eps=1e-6)
        self.ln_kv = nn.LayerNorm(d, eps=1e-6)
        self.ln_post = nn.LayerNorm(d, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(d, d))
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.normal_(self.proj, std=d**-0.5)
        # Plain cached tensors (not buffers): never in state_dict, unaffected by meta init.
        self._grid = (int(cfg.max_size[0]), int(cfg.max_size[1]))
        self._pos2d_cpu: torch.Tensor | None = None  # [H*W + 1, D] float32, last row zeros
        self._pos2d_dev: dict[str, torch.Tensor] = {}

    # -- position embeddings -------------------------------------------------------------------

    def _pos2d_flat(self, device: torch.device) -> torch.Tensor:
        """Flattened 2D table on ``device``: [Hc*Wc + 1, D] float32 (row Hc*Wc is all zeros)."""
        if self._pos2d_cpu is None:
            hc, wc = self._grid
            table = torch.from_numpy(sincos_2d_table(self.embed_dim, hc, wc))  # [Hc, Wc, D]
            zero = torch.zeros(1, self.embed_dim, dtype=torch.float32)  # [1, D]
            self._pos2d_cpu = torch.cat([table.reshape(hc * wc, -1), zero])  # [Hc*Wc+1, D]
            self._pos2d_dev = {}
        key = str(device)
        if key not in self._pos2d_dev:
            self._pos2d_dev[key] = self._pos2d_cpu.to(device)
        return self._pos2d_dev[key]

    def _ensure_grid(self, sizes: list[tuple[int, int]]) -> None:
        hc, wc = self._grid
        need_h = max(h for h, _ in sizes)
        need_w = max(w for _, w in sizes)
        if need_h > hc or need_w > wc:
            self._grid = (max(hc, need_h), max(wc, need_w))
            self._pos2d_cpu = None  # values do not depend on the grid size; only indices do
            log.debug("resampler 2D position table grown to %s", self._grid)

    def pos_embed_2d(self, sizes: list[tuple[int, int]], lmax: int, device: torch.device) -> torch.Tensor:
        """[B, lmax, D] float32: row-major table rows of each slice's h x w grid, zero padded."""
        self._ensure_grid(sizes)
        hc, wc = self._grid
        idx = torch.full((len(sizes), lmax), hc * wc, dtype=torch.long)  # [B, Lmax] -> zero row
        for b, (h, w) in enumerate(sizes):
            cell = torch.arange(h)[:, None] * wc + torch.arange(w)[None, :]  # [h, w]
            idx[b, : h * w] = cell.flatten()
        return self._pos2d_flat(device)[idx.to(device)]  # [B, Lmax, D]

    def temporal_embed(self, flat_ids: Sequence[int], device: torch.device) -> torch.Tensor:
        """[B, D] float32: temporal table row per slice; id -1 gives a zero vector."""
        out = np.zeros((len(flat_ids), self.embed_dim), dtype=np.float32)  # [B, D]
        used = [i for i, t in enumerate(flat_ids) if t != -1]
        if used:
            out[used] = temporal_rows(self.embed_dim, [flat_ids[i] for i in used])
        return torch.from_numpy(out).to(device)  # [B, D]

    # -- forward -------------------------------------------------------------------------------

    def queries(self) -> torch.Tensor:
        """The attention queries [Q, D]: ``ln_q(query)``."""
        return self.ln_q(self.query)

    def forward(
        self,
        x: torch.Tensor,
        tgt_sizes: TgtSizes,
        temporal_ids: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """x [B, Lmax, Dv] vision features (rows past h*w ignored), tgt_sizes [B, 2] (h, w) ->
        [N, Q, D]; N = B (2D path) or the number of ``temporal_ids`` entries (3D path)."""
        sizes = _sizes_list(tgt_sizes)
        if x.dim() != 3 or x.shape[0] != len(sizes):
            raise InputError(f"resampler input {tuple(x.shape)} does not match {len(sizes)} tgt_sizes")
        b, lmax = x.shape[0], x.shape[1]
        lens = [h * w for h, w in sizes]
        if max(lens) > lmax:
            raise InputError(f"tgt_sizes need {max(lens)} rows but the features have only {lmax}")
        dtype, device = x.dtype, x.device
        use_temporal = temporal_ids is not None and self.cfg.temporal
        if temporal_ids is not None and not self.cfg.temporal:
            log.debug("temporal_ids ignored: this resampler has no temporal embedding")
        groups = _check_temporal_ids(temporal_ids, b) if use_temporal else None

        q = self.queries()  # [Q, D]
        if groups is None or all(len(g) == 1 for g in groups):  # one slice per entry (images)
            flat_ids = None if groups is None else [g[0] for g in groups]
            out = self._attend_by_length(q, x, sizes, flat_ids)  # [B, Q, D]
        else:
            kv = self.ln_kv(self.kv_proj(x))  # [B, Lmax, D]
            key = kv + self.pos_embed_2d(sizes, lmax, device).to(dtype)  # [B, Lmax, D]
            lens_t = torch.tensor(lens, device=device)  # [B]
            valid = torch.arange(lmax, device=device)[None, :] < lens_t[:, None]  # [B, Lmax]
            flat = [t for g in groups for t in g]
            key = key + self.temporal_embed(flat, device).to(dtype)[:, None, :]  # [B, Lmax, D]
            idx, slot_ok = _group_index([len(g) for g in groups], device)  # [G, n], [G, n]
            g, n = idx.shape
            key_g = key[idx].reshape(g, n * lmax, -1)  # [G, n*Lmax, D] slice-major
            val_g = kv[idx].reshape(g, n * lmax, -1)  # [G, n*Lmax, D]
            valid_g = (valid[idx] & slot_ok[:, :, None]).reshape(g, n * lmax)  # [G, n*Lmax]
            out = self.attn(q, key_g, val_g, valid_g)  # [G, Q, D]
        return self.ln_post(out) @ self.proj  # [N, Q, D]

    def _attend_by_length(
        self, q: torch.Tensor, x: torch.Tensor, sizes: list[tuple[int, int]], temporal: list[int] | None
    ) -> torch.Tensor:
        """One slice per entry: slices with equal patch counts attend together over their real
        rows only (no projection or attention work on padded rows) -> [B, Q, D] in input order.
        ``temporal``: one temporal id per slice (-1: none), or None."""
        by_len: dict[int, list[int]] = {}
        for i, (h, w) in enumerate(sizes):
            by_len.setdefault(h * w, []).append(i)
        if len(by_len) == 1:
            return self._attend_rows(q, x[:, : sizes[0][0] * sizes[0][1]], sizes, temporal)  # [B, Q, D]
        parts = []
        for n, idx in by_len.items():
            index = torch.tensor(idx, device=x.device)
            ids = None if temporal is None else [temporal[i] for i in idx]
            parts.append((index, self._attend_rows(q, x[index, :n], [sizes[i] for i in idx], ids)))  # [b, Q, D]
        out = parts[0][1].new_empty(x.shape[0], *parts[0][1].shape[1:])  # [B, Q, D]
        for index, part in parts:
            out[index] = part
        return out

    def _attend_rows(
        self, q: torch.Tensor, x: torch.Tensor, sizes: list[tuple[int, int]], temporal: list[int] | None
    ) -> torch.Tensor:
        """Slices whose n = h*w rows are all real: x [b, n, Dv] -> [b, Q, D]."""
        b, n = x.shape[0], x.shape[1]
        kv = self.ln_kv(self.kv_proj(x))  # [b, n, D]
        key = kv + self.pos_embed_2d(sizes, n, x.device).to(kv.dtype)  # [b, n, D]
        if temporal is not None and any(t != -1 for t in temporal):
            key = key + self.temporal_embed(temporal, x.device).to(kv.dtype)[:, None, :]  # [b, n, D]
        valid = None if x.device.type == "cuda" else torch.ones(b, n, dtype=torch.bool, device=x.device)  # [b, n]
        return self.attn(q, key, kv, valid)  # [b, Q, D]


class QueryPosResampler(Resampler):
    """MiniCPM-V 2.0's resampler (spec 2.0 §2.4): the 2D variant plus a stored [Q, D] position
    table ``pos_embed`` (an 8x8 sin-cos grid in the official checkpoint) added to the queries."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.query_num, cfg.embed_dim))

    def queries(self) -> torch.Tensor:
        return self.ln_q(self.query) + self.pos_embed  # [Q, D]


def build_resampler(cfg: ResamplerConfig) -> Resampler:
    """The resampler variant ``cfg`` describes."""
    return QueryPosResampler(cfg) if cfg.query_pos_embed else Resampler(cfg)


def _sizes_list(tgt_sizes: TgtSizes) -> list[tuple[int, int]]:
    rows = tgt_sizes.tolist() if isinstance(tgt_sizes, torch.Tensor) else [list(r) for r in tgt_sizes]
    out = []
    for r in rows:
        if len(r) != 2 or int(r[0]) < 1 or int(r[1]) < 1:
            raise InputError(f"every tgt_size must be (h, w) with h, w >= 1 patches, got {r}")
        out.append((int(r[0]), int(r[1])))
    if not out:
        raise InputError("the resampler needs at least one slice")
    return out


def _check_temporal_ids(temporal_ids: Sequence[Sequence[int]], num_slices: int) -> list[list[int]]:
    groups = [[int(t) for t in entry] for entry in temporal_ids]
    if any(len(g) == 0 for g in groups):
        raise InputError("every temporal_ids entry must hold at least one id")
    total = sum(len(g) for g in groups)
    if total != num_slices:
        raise InputError(
            f"temporal_ids hold {total} ids but there are {num_slices} slices; "
            "give one id per slice (-1 for a plain image)"
        )
    bad = [t for g in groups for t in g if t < -1]
    if bad:
        raise InputError(f"temporal ids must be >= 0 (or -1 for none), got {bad[:5]}")
    return groups


def _group_index(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice index of every (group, slot) and whether the slot is real (groups right-padded)."""
    n = max(lengths)
    idx = torch.zeros(len(lengths), n, dtype=torch.long)  # [G, n]; pad slots point at slice 0
    ok = torch.zeros(len(lengths), n, dtype=torch.bool)  # [G, n]
    start = 0
    for g, length in enumerate(lengths):
        idx[g, :length] = torch.arange(start, start + length)
        ok[g, :length] = True
        start += length
    return idx.to(device), ok.to(device)

