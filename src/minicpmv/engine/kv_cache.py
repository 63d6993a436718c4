"""Key/value caches for incremental decoding.

Every cache kind of the engine lives here. All implement the duck-typed protocol the attention
layers use (``update(layer_idx, k, v) -> (k_all, v_all)`` with shapes ``[B, n_kv, T, hd]`` and
``get_seq_length()``):

* ``KVCache``: one buffer per layer with spare capacity, grown geometrically (a decode step
  copies only its own keys, not the whole history as ``torch.cat`` would); all rows share one
  length (left-padded batches, as transformers lays them out). Bookkeeping for generation: row
  reordering for beam search (``reorder``), changing the batch (``select_rows``), truncation
  (``crop``, for conversation reuse) and copying (``clone``).
* ``StaticKVCache``: the same with a fixed, preallocated capacity (an update past it raises;
  ``reserve`` grows it on request). In decode mode (``decode(write)``) a step writes at a device
  index and attends over the whole capacity: the shapes of a decode step never change, which is
  what a compiled / CUDA-graph step needs.
* ``SlotKVCache``: ``slots`` independent rows of ``capacity`` positions for continuous batching;
  each row has its own length and key mask, a prefill fills one slot, a decode step writes one
  position per row at that row's own length.

The preallocated caches put each layer's buffers on that layer's device (``layer_devices`` of a
model split across devices, see ``modeling/placement.py``). A cache in a fixed-shape decode step
says so with ``static_shapes`` (the model then skips its all-keys-visible check, a host sync).

This module does not know about models beyond the attributes read by ``for_model``, and it never
computes positions (the engine does); the slot cache keeps each row's key mask because rows of
different lengths share one decode call.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import ContextLengthError, InputError

_GROW_MIN = 256  # positions added at least when a dynamic cache grows


class KVCache:
    """Dynamic cache: per layer a buffer ``[B, n_kv, capacity, hd]`` of which the first
    ``get_seq_length(layer)`` positions are filled; it grows by half (at least ``_GROW_MIN``
    positions) when an update does not fit."""

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise InputError(f"a KV cache needs at least one layer, got num_layers={num_layers}")
        self.num_layers = num_layers
        self._kbuf: list[torch.Tensor | None] = [None] * num_layers
        self._vbuf: list[torch.Tensor | None] = [None] * num_layers
        self._len = [0] * num_layers

    static_shapes = False  # see the module docstring

    @classmethod
    def for_model(cls, model: Any, batch_size: int, capacity: int | None = None) -> KVCache:
        """A cache sized for ``model``: dynamic when ``capacity`` is None, else static."""
        if capacity is None:
            return cls(model.num_layers)
        return StaticKVCache(
            model.num_layers, batch_size, model.num_kv_heads, model.head_dim, capacity,
            dtype=model.dtype, device=layer_devices(model),
        )

    # -- protocol used by the attention layers ---------------------------------------------
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ([B, n_kv, T_new, hd]) to layer ``layer_idx``; return views of the
        whole cached sequence ([B, n_kv, T_old+T_new, hd])."""
        self._check_layer(layer_idx)
        start = self._len[layer_idx]
        end = start + k.shape[2]
        kbuf, vbuf = self._kbuf[layer_idx], self._vbuf[layer_idx]
        if kbuf is not None:
            _check_compatible(kbuf, k)
        if kbuf is None or vbuf is None or end > kbuf.shape[2]:
            kbuf, vbuf = self._reserve(layer_idx, k, end)
        # A buffer made under inference_mode may be written later from a thread (or a resumed
        # generator) that is not in it, e.g. a streamed session turn served by a web UI worker.
        with torch.inference_mode(kbuf.is_inference()):
            kbuf[:, :, start:end] = k  # [B, n_kv, T_new, hd]
            vbuf[:, :, start:end] = v
        self._len[layer_idx] = end
        return kbuf[:, :, :end], vbuf[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions in ``layer_idx`` (layer 0 by default, as HF does)."""
        return self._len[layer_idx]

    def _reserve(self, layer_idx: int, k: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of layer ``layer_idx`` with room for ``needed`` positions (filled part kept)."""
        old_k, old_v = self._kbuf[layer_idx], self._vbuf[layer_idx]  # shapes checked by update
        have = 0 if old_k is None else old_k.shape[2]
        cap = max(needed, have + max(have // 2, _GROW_MIN))
        shape = (k.shape[0], k.shape[1], cap, k.shape[3])
        kbuf = torch.empty(shape, dtype=k.dtype, device=k.device)  # [B, n_kv, cap, hd]
        vbuf = torch.empty(shape, dtype=k.dtype, device=k.device)
        n = self._len[layer_idx]
        if old_k is not None and old_v is not None and n:
            kbuf[:, :, :n] = old_k[:, :, :n]
            vbuf[:, :, :n] = old_v[:, :, :n]
        self._kbuf[layer_idx], self._vbuf[layer_idx] = kbuf, vbuf
        return kbuf, vbuf

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def batch_size(self) -> int | None:
        """Rows held, or None while the cache is empty."""
        k = self._kbuf[0]
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
            k, v = self._kbuf[i], self._vbuf[i]
            if k is not None and v is not None:
                idx = rows.to(k.device)
                self._kbuf[i], self._vbuf[i] = k.index_select(0, idx), v.index_select(0, idx)

    def crop(self, n: int) -> None:
        """Drop every cached position >= ``n``."""
        if n < 0:
            raise InputError(f"cannot crop a KV cache to a negative length ({n})")
        self._len = [min(length, n) for length in self._len]

    def clone(self) -> KVCache:
        """An independent copy (filled positions copied; capacity kept)."""
        out = copy.copy(self)
        out._kbuf = [None if t is None else t.clone() for t in self._kbuf]
        out._vbuf = [None if t is None else t.clone() for t in self._vbuf]
        out._len = list(self._len)
        return out

    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.num_layers:
            raise InputError(f"layer index {layer_idx} out of range for a {self.num_layers}-layer cache")


class StaticKVCache(KVCache):
    """Preallocated cache of ``capacity`` positions; an update beyond it raises
    ``ContextLengthError`` instead of growing (``reserve`` grows it explicitly).

    Two modes. Appending (the default, prefill): ``update`` writes after the filled positions and
    returns views of them, exactly like ``KVCache``. Decoding (``decode(write)``, until the next
    ``append``): ``update`` writes each layer's one new position at the device index ``write``
    ([1] int64, shared by the rows) and returns the whole buffers ``[B, n_kv, capacity, hd]``;
    ``get_seq_length`` reports ``capacity - 1`` so the model expects a key mask of the full
    capacity. Nothing in decode mode reads or changes host-side lengths: the caller advances them
    (``set_length``) outside a compiled step.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | list[torch.device] = "cpu",
    ) -> None:
        super().__init__(num_layers)
        if batch_size < 1 or capacity < 1:
            raise InputError(
                f"static cache needs batch_size >= 1 and capacity >= 1, got {batch_size}, {capacity}"
            )
        self.capacity = capacity
        self._devices = _per_layer(device, num_layers)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self._kbuf = [torch.zeros(shape, dtype=dtype, device=d) for d in self._devices]
        self._vbuf = [torch.zeros(shape, dtype=dtype, device=d) for d in self._devices]
        self._write: torch.Tensor | None = None

    @property
    def static_shapes(self) -> bool:  # type: ignore[override]
        return self._write is not None

    def decode(self, write: torch.Tensor) -> StaticKVCache:
        """Let the next forward passes decode one position per row at device index ``write`` [1]."""
        self._write = write
        return self

    def append(self) -> StaticKVCache:
        """Back to appending after the filled positions (a prefill, a session's next turn)."""
        self._write = None
        return self

    def set_length(self, n: int) -> None:
        """Record that the first ``n`` positions of every layer are filled (after decode steps)."""
        if not 0 <= n <= self.capacity:
            raise InputError(f"length {n} outside 0..{self.capacity} of a static KV cache")
        self._len = [n] * self.num_layers

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._write is None:
            return super().update(layer_idx, k, v)
        kbuf, vbuf = self._kbuf[layer_idx], self._vbuf[layer_idx]
        assert kbuf is not None and vbuf is not None
        write = self._write.to(kbuf.device)
        kbuf.index_copy_(2, write, k.to(kbuf.dtype))  # k: [B, n_kv, 1, hd] at position write
        vbuf.index_copy_(2, write, v.to(vbuf.dtype))
        return kbuf, vbuf  # [B, n_kv, capacity, hd]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity - 1 if self._write is not None else self._len[layer_idx]

    def reserve(self, capacity: int) -> None:
        """Grow every layer's buffers to ``capacity`` positions (filled positions kept)."""
        if capacity <= self.capacity:
            return
        for i in range(self.num_layers):
            for bufs in (self._kbuf, self._vbuf):
                old = bufs[i]
                assert old is not None
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])  # [B, n_kv, cap, hd]
                new[:, :, : self._len[i]] = old[:, :, : self._len[i]]
                bufs[i] = new
        self.capacity = capacity

    def mark_static(self) -> None:
        """Tell ``torch.compile`` the buffers keep their addresses (CUDA graphs may write them)."""
        for t in [*self._kbuf, *self._vbuf]:
            torch._dynamo.mark_static_address(t)

    def _reserve(self, layer_idx: int, k: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise ContextLengthError(
            f"static KV cache capacity {self.capacity} exceeded ({needed} positions needed); "
            "allocate a larger cache or shorten the prompt / max_new_tokens"
        )

    def clone(self) -> StaticKVCache:
        out = super().clone()
        assert isinstance(out, StaticKVCache)
        out._write = None
        return out

    @property
    def batch_size(self) -> int:
        return int(self._kbuf[0].shape[0])  # type: ignore[union-attr]


def layer_devices(model: Any) -> list[torch.device] | torch.device:
    """Where each layer's KV rows live: the model's per-layer devices when it has them (a model
    split across devices), else its one device."""
    devices = getattr(model, "layer_devices", None)
    return list(devices) if devices is not None else model.device


def _per_layer(device: torch.device | str | list[torch.device], num_layers: int) -> list[torch.device]:
    if isinstance(device, (list, tuple)):
        if len(device) != num_layers:
            raise InputError(f"{len(device)} layer devices given for a {num_layers}-layer cache")
        return [torch.device(d) for d in device]
    return [torch.device(device)] * num_layers


def _check_compatible(old: torch.Tensor, new: torch.Tensor) -> None:
    if old.shape[0] != new.shape[0] or old.shape[1] != new.shape[1] or old.shape[3] != new.shape[3]:
        raise InputError(
            f"cache holds k of shape {tuple(old.shape)} but got {tuple(new.shape)}; "
            "batch, head and head_dim sizes must match"
        )


class SlotKVCache:
    """``slots`` rows x ``capacity`` positions per layer, plus each row's key mask ``[S, C]``.

    Used in two modes. ``prefill(slot)``: ``update`` stores one sequence's keys/values (batch 1)
    in that slot and hands them back unchanged, so the prefill attends exactly as with a fresh
    cache. ``decode(rows, width, write)``: ``update`` writes row r's new key/value at
    ``write[r]`` and returns the first ``width`` positions of the first ``rows`` slots;
    ``get_seq_length`` then reports ``width - 1`` cached positions. ``static=True`` marks a
    fixed-shape step (``static_shapes``). The key mask lives on ``device`` (the model's input
    side); layer i's buffers on ``layer_devices[i]`` when given.
    """

    def __init__(
        self, num_layers: int, slots: int, num_kv_heads: int, head_dim: int, capacity: int, *,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        layer_devices: list[torch.device] | None = None,
    ) -> None:
        if slots < 1 or capacity < 1:
            raise InputError(f"a slot cache needs slots >= 1 and capacity >= 1, got {slots}, {capacity}")
        shape = (slots, num_kv_heads, capacity, head_dim)  # [S, n_kv, C, hd]
        devices = _per_layer(layer_devices if layer_devices is not None else device, num_layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.mask = torch.zeros(slots, capacity, dtype=torch.long, device=device)  # [S, C]
        self.slots, self.capacity = slots, capacity
        self._prefill_slot: int | None = None
        self._rows, self._width = slots, capacity
        self._write = torch.zeros(slots, dtype=torch.long, device=device)  # [S]
        self.static_shapes = False

    @classmethod
    def for_model(cls, model: Any, slots: int, capacity: int) -> SlotKVCache:
        devices = layer_devices(model)
        return cls(model.num_layers, slots, model.num_kv_heads, model.head_dim, capacity,
                   dtype=model.dtype, device=model.device,
                   layer_devices=devices if isinstance(devices, list) else None)

    def mark_static(self) -> None:
        """Tell ``torch.compile`` the buffers keep their addresses (CUDA graphs may write them)."""
        for t in [*self.k, *self.v]:
            torch._dynamo.mark_static_address(t)

    def prefill(self, slot: int, mask_row: torch.Tensor) -> SlotKVCache:
        """Let the next forward pass (one sequence) fill ``slot``; ``mask_row`` [T] is its key mask."""
        t = int(mask_row.shape[0])
        if t > self.capacity:
            raise ContextLengthError(f"a prompt of {t} tokens does not fit a slot of {self.capacity} positions")
        self._prefill_slot = slot
        self.static_shapes = False
        self.mask[slot].zero_()
        self.mask[slot, :t] = mask_row
        return self

    def decode(self, rows: int, width: int, write: torch.Tensor, *, static: bool = False) -> SlotKVCache:
        """Let the next forward pass decode one token for each of the first ``rows`` slots."""
        self._prefill_slot = None
        self._rows, self._width, self._write = rows, width, write  # write: [rows]
        self.static_shapes = static
        return self

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Give slot ``dst`` the first ``length`` positions of ``src`` (choices sharing a prompt)."""
        for kb, vb in zip(self.k, self.v, strict=True):
            kb[dst, :, :length] = kb[src, :, :length]
            vb[dst, :, :length] = vb[src, :, :length]
        self.mask[dst].zero_()
        self.mask[dst, :length] = self.mask[src, :length]

    def release(self, slot: int) -> None:
        self.mask[slot].zero_()

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        if self._prefill_slot is not None:
            t = k.shape[2]
            kb[self._prefill_slot, :, :t] = k[0]  # [n_kv, T, hd]
            vb[self._prefill_slot, :, :t] = v[0]
            return k, v
        rows = k.shape[0]  # == the rows given to decode(); read from the tensor so it may stay symbolic
        idx = torch.arange(rows, device=kb.device)
        write = self._write.to(kb.device)
        kb[idx, :, write] = k[:, :, 0].to(kb.dtype)  # k: [rows, n_kv, 1, hd] -> one position per row
        vb[idx, :, write] = v[:, :, 0].to(vb.dtype)
        return kb[:rows, :, : self._width], vb[:rows, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._prefill_slot is not None else self._width - 1
