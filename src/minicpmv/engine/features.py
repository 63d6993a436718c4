"""Resampler-output cache keyed by the content of the slices that produced it.

One *entry* is what the resampler turns into ``query_num`` rows: a single slice for images, or
a group of frame slices for 4.5 temporal packing. Its key hashes a digest of each slice (see
``slice_digest``), the patch sizes and the temporal ids, so the same image in a later turn (or
another request sharing the cache) is not encoded again. The cache is bounded by bytes (least
recently used entries go first). It does not run the model; ``ChatModel.encode_features`` does.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..processing.image import PatchList


def slice_digest(pixel_values: Sequence[Any], i: int) -> bytes:
    """Digest of slice ``i`` of one conversation's ``pixel_values``.

    The processor's lazy ``PatchList`` is digested from its uint8 slice (no float tensor is made,
    so a cache hit costs no patch work); any other sequence from its float array.
    """
    if isinstance(pixel_values, PatchList):
        return b"slice:" + pixel_values.source_digest(i)
    arr = np.ascontiguousarray(pixel_values[i])
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((arr.dtype.str, arr.shape)).encode())
    h.update(arr.tobytes())
    return b"array:" + h.digest()


def entry_key(digests: Sequence[bytes], sizes: Sequence[Sequence[int]], temporal: Sequence[int]) -> str:
    """Key of one resampler entry from its slices' digests, patch sizes and temporal ids."""
    h = hashlib.blake2b(digest_size=20)
    for d, size in zip(digests, sizes, strict=True):
        h.update(d)
        h.update(repr(tuple(int(s) for s in size)).encode())
    h.update(repr(tuple(int(t) for t in temporal)).encode())
    return h.hexdigest()


class FeatureCache:
    """LRU map from entry key to a [Q, H] tensor, bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return t

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.numel() * old.element_size()
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0
