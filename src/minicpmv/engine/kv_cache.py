"""Key/value caches for incremental decoding.

``KVCache`` grows per-layer tensors by concatenation; ``StaticKVCache`` preallocates a buffer of
fixed capacity, writes new entries in place and hands out views. Both implement the duck-typed
protocol the attention layers use (``update(layer_idx, k, v) -> (k_all, v_all)`` with shapes
``[B, n_kv, T, hd]`` and ``get_seq_length()``), plus the bookkeeping generation needs: row
reordering for beam search (``reorder``), changing the batch (``select_rows``), truncation
(``crop``) and copying (``clone``).

This module does not know about models beyond the four attributes read by ``for_model``, and it
never builds attention masks or positions (the engine does).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ContextLengthError, InputError


class KVCache:
    """Dynamic cache: one (k, v) pair per layer, each ``[B, n_kv, T, hd]``, grown with ``cat``."""

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise InputError(f"a KV cache needs at least one layer, got num_layers={num_layers}")
        self.num_layers = num_layers
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers

    @classmethod
    def for_model(cls, model: Any, batch_size: int, capacity: int | None = None) -> KVCache:
        """A cache sized for ``model``: dynamic when ``capacity`` is None, else static."""
        if capacity is None:
            return cls(model.num_layers)
        return StaticKVCache(
            model.num_layers, batch_size, model.num_kv_heads, model.head_dim, capacity,
            dtype=model.dtype, device=model.device,
        )

    # -- protocol used by the attention layers ---------------------------------------------
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ([B, n_kv, T_new, hd]) to layer ``layer_idx``; return the full tensors."""
        self._check_layer(layer_idx)
        old_k, old_v = self._k[layer_idx], self._v[layer_idx]
        if old_k is None or old_v is None:
            self._k[layer_idx], self._v[layer_idx] = k, v
        else:
            _check_compatible(old_k, k)
            self._k[layer_idx] = torch.cat([old_k, k], dim=2)  # [B, n_kv, T_old+T_new, hd]
            self._v[layer_idx] = torch.cat([old_v, v], dim=2)
        return self._k[layer_idx], self._v[layer_idx]  # type: ignore[return-value]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions in ``layer_idx`` (layer 0 by default, as HF does)."""
        k = self._k[layer_idx]
        return 0 if k is None else int(k.shape[2])

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def batch_size(self) -> int | None:
        """Rows held, or None while the cache is empty."""
        k = self._k[0]
        return None if k is None else int(k.shape[0])

    def reorder(self, index: torch.Tensor) -> None:
        """Replace row i by row ``index[i]`` (beam search); the batch size must not change."""
        bs = self.batch_size
        if bs is not None and index.numel() != bs:
            raise InputError(
                f"reorder index has {index.numel()} entries for a batch of {bs}; use select_rows"
            )
        self.select_rows(index)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (any length, repeats allowed) in that order, e.g. to expand beams."""
        for i in range(self.num_layers):
            k, v = self._k[i], self._v[i]
            if k is not None and v is not None:
                idx = rows.to(k.device)
                self._k[i], self._v[i] = k.index_select(0, idx), v.index_select(0, idx)

    def crop(self, n: int) -> None:
        """Drop every cached position >= ``n``."""
        if n < 0:
            raise InputError(f"cannot crop a KV cache to a negative length ({n})")
        for i in range(self.num_layers):
            k, v = self._k[i], self._v[i]
            if k is not None and v is not None and k.shape[2] > n:
                self._k[i], self._v[i] = k[:, :, :n], v[:, :, :n]

    def clone(self) -> KVCache:
        """An independent copy (tensors copied)."""
        out = KVCache(self.num_layers)
        out._k = [None if t is None else t.clone() for t in self._k]
        out._v = [None if t is None else t.clone() for t in self._v]
        return out

    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.num_layers:
            raise InputError(f"layer index {layer_idx} out of range for a {self.num_layers}-layer cache")


class StaticKVCache(KVCache):
    """Preallocated cache of ``capacity`` positions; ``update`` writes in place and returns views."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(num_layers)
        if batch_size < 1 or capacity < 1:
            raise InputError(
                f"static cache needs batch_size >= 1 and capacity >= 1, got {batch_size}, {capacity}"
            )
        self.capacity = capacity
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self._kbuf = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._vbuf = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._len = [0] * num_layers

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` ([B, n_kv, T_new, hd]) after the cached positions; return views."""
        self._check_layer(layer_idx)
        kbuf, vbuf = self._kbuf[layer_idx], self._vbuf[layer_idx]
        if k.shape[0] != kbuf.shape[0] or k.shape[1] != kbuf.shape[1] or k.shape[3] != kbuf.shape[3]:
            raise InputError(
                f"static cache holds [B={kbuf.shape[0]}, n_kv={kbuf.shape[1]}, hd={kbuf.shape[3]}] "
                f"but got k of shape {tuple(k.shape)}"
            )
        start, end = self._len[layer_idx], self._len[layer_idx] + k.shape[2]
        if end > self.capacity:
            raise ContextLengthError(
                f"static KV cache capacity {self.capacity} exceeded ({end} positions needed); "
                "allocate a larger cache or shorten the prompt / max_new_tokens"
            )
        kbuf[:, :, start:end] = k  # [B, n_kv, T_new, hd]
        vbuf[:, :, start:end] = v
        self._len[layer_idx] = end
        return kbuf[:, :, :end], vbuf[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len[layer_idx]

    @property
    def batch_size(self) -> int:
        return int(self._kbuf[0].shape[0])

    def select_rows(self, rows: torch.Tensor) -> None:
        for i in range(self.num_layers):
            idx = rows.to(self._kbuf[i].device)
            self._kbuf[i] = self._kbuf[i].index_select(0, idx)  # [len(rows), n_kv, cap, hd]
            self._vbuf[i] = self._vbuf[i].index_select(0, idx)

    def crop(self, n: int) -> None:
        if n < 0:
            raise InputError(f"cannot crop a KV cache to a negative length ({n})")
        self._len = [min(length, n) for length in self._len]

    def clone(self) -> StaticKVCache:
        out = StaticKVCache.__new__(StaticKVCache)
        out.num_layers, out.capacity = self.num_layers, self.capacity
        out._k, out._v = [None] * self.num_layers, [None] * self.num_layers
        out._kbuf = [t.clone() for t in self._kbuf]
        out._vbuf = [t.clone() for t in self._vbuf]
        out._len = list(self._len)
        return out


def _check_compatible(old: torch.Tensor, new: torch.Tensor) -> None:
    if old.shape[0] != new.shape[0] or old.shape[1] != new.shape[1] or old.shape[3] != new.shape[3]:
        raise InputError(
            f"cache holds k of shape {tuple(old.shape)} but got {tuple(new.shape)}; "
            "batch, head and head_dim sizes must match"
        )
