"""KVCache / StaticKVCache: update, views, reorder, select_rows, crop, clone, errors."""

from __future__ import annotations

import pytest
import torch

from minicpmv.engine.kv_cache import KVCache, SlotKVCache, StaticKVCache
from minicpmv.errors import ContextLengthError, InputError


def _kv(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g)


def _caches(b: int = 3) -> list[KVCache]:
    return [KVCache(2), StaticKVCache(2, b, 2, 4, capacity=16)]


@pytest.mark.parametrize("kind", [0, 1])
def test_update_accumulates_and_matches_cat(kind: int) -> None:
    cache = _caches()[kind]
    k1, v1 = _kv(3, 5, 1)
    k2, v2 = _kv(3, 1, 2)
    cache.update(0, k1, v1)
    cache.update(1, k1 * 2, v1 * 2)
    assert cache.get_seq_length() == 5
    k, v = cache.update(0, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    assert cache.get_seq_length() == 6 and cache.get_seq_length(1) == 5
    assert cache.batch_size == 3


def test_dynamic_cache_empty_state() -> None:
    cache = KVCache(2)
    assert cache.get_seq_length() == 0 and cache.batch_size is None
    cache.reorder(torch.tensor([0]))  # nothing cached: a no-op, not an error


@pytest.mark.parametrize("kind", [0, 1])
def test_reorder_and_select_rows(kind: int) -> None:
    cache = _caches()[kind]
    k1, v1 = _kv(3, 4, 3)
    for layer in range(2):
        cache.update(layer, k1, v1)
    cache.reorder(torch.tensor([2, 2, 0]))
    k, v = cache.update(0, *_kv(3, 1, 4))
    assert torch.equal(k[:, :, :4], k1[[2, 2, 0]]) and torch.equal(v[:, :, :4], v1[[2, 2, 0]])
    with pytest.raises(InputError):
        cache.reorder(torch.tensor([0, 1]))
    cache.select_rows(torch.tensor([1, 1, 0, 0, 2, 2]))
    assert cache.batch_size == 6
    k, _ = cache.update(1, *_kv(6, 1, 5))
    assert torch.equal(k[:, :, :4], k1[[2, 2, 2, 2, 0, 0]])


@pytest.mark.parametrize("kind", [0, 1])
def test_crop_drops_positions_and_continues(kind: int) -> None:
    cache = _caches()[kind]
    k1, v1 = _kv(3, 6, 6)
    k2, v2 = _kv(3, 2, 7)
    for layer in range(2):
        cache.update(layer, k1, v1)
    cache.crop(4)
    assert cache.get_seq_length() == 4 and cache.get_seq_length(1) == 4
    k, v = cache.update(0, k2, v2)
    assert torch.equal(k, torch.cat([k1[:, :, :4], k2], dim=2))
    assert torch.equal(v, torch.cat([v1[:, :, :4], v2], dim=2))
    cache.crop(100)  # longer than held: nothing changes
    assert cache.get_seq_length() == 6
    with pytest.raises(InputError):
        cache.crop(-1)


@pytest.mark.parametrize("kind", [0, 1])
def test_clone_is_independent(kind: int) -> None:
    cache = _caches()[kind]
    k1, v1 = _kv(3, 3, 8)
    cache.update(0, k1, v1)
    twin = cache.clone()
    twin.update(0, *_kv(3, 2, 9))
    twin.reorder(torch.tensor([1, 0, 2]))
    assert cache.get_seq_length() == 3 and twin.get_seq_length() == 5
    k, _ = cache.update(0, *_kv(3, 1, 10))
    assert torch.equal(k[:, :, :3], k1)
    assert type(twin) is type(cache)


def test_static_cache_capacity_and_shape_errors() -> None:
    cache = StaticKVCache(1, 2, 2, 4, capacity=5)
    cache.update(0, *_kv(2, 4, 11))
    with pytest.raises(ContextLengthError):
        cache.update(0, *_kv(2, 2, 12))
    with pytest.raises(InputError):
        cache.update(0, *_kv(3, 1, 13))  # wrong batch size
    with pytest.raises(InputError):
        cache.update(1, *_kv(2, 1, 14))  # no such layer


def test_dynamic_cache_rejects_mismatched_update() -> None:
    cache = KVCache(1)
    cache.update(0, *_kv(2, 2, 15))
    with pytest.raises(InputError):
        cache.update(0, *_kv(3, 1, 16))


def test_for_model_picks_variant(tiny_lm) -> None:
    dyn = KVCache.for_model(tiny_lm, 2)
    assert type(dyn) is KVCache and dyn.num_layers == tiny_lm.num_layers
    static = KVCache.for_model(tiny_lm, 2, capacity=32)
    assert isinstance(static, StaticKVCache) and static.capacity == 32 and static.batch_size == 2
    k, _ = static.update(0, *(torch.zeros(2, tiny_lm.num_kv_heads, 3, tiny_lm.head_dim),) * 2)
    assert k.shape == (2, tiny_lm.num_kv_heads, 3, tiny_lm.head_dim)


def test_cache_made_in_inference_mode_grows_from_another_thread() -> None:
    """A streamed session turn may be resumed by a web-UI worker thread outside inference_mode."""
    import threading

    cache = KVCache(1)
    with torch.inference_mode():
        cache.update(0, torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    errors: list[BaseException] = []

    def other() -> None:
        try:
            k, _ = cache.update(0, torch.full((1, 2, 1, 4), 2.0), torch.full((1, 2, 1, 4), 2.0))
            assert k.shape[2] == 4 and float(k[0, 0, 3, 0]) == 2.0
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert not errors, errors


def test_static_cache_decode_mode_writes_at_the_device_index() -> None:
    cache = StaticKVCache(2, 2, 2, 4, capacity=8)
    k1, v1 = _kv(2, 3, 20)
    for layer in range(2):
        cache.update(layer, k1, v1)
    assert not cache.static_shapes and cache.get_seq_length() == 3
    write = torch.tensor([3])
    cache.decode(write)
    assert cache.static_shapes and cache.get_seq_length() == 7  # capacity - 1: the mask covers all of it
    k2, v2 = _kv(2, 1, 21)
    k, v = cache.update(0, k2, v2)
    assert k.shape == (2, 2, 8, 4)  # the whole buffer, every step the same shape
    assert torch.equal(k[:, :, :3], k1) and torch.equal(k[:, :, 3:4], k2) and torch.equal(v[:, :, 3:4], v2)
    assert torch.count_nonzero(k[:, :, 4:]) == 0
    write += 1  # the caller moves the index in place; nothing is read on the host
    cache.update(0, k2 * 2, v2 * 2)
    assert torch.equal(k[:, :, 4:5], k2 * 2)
    cache.append()
    assert cache.get_seq_length() == 3  # host lengths move only when told
    cache.set_length(5)
    assert cache.get_seq_length() == 5 and cache.get_seq_length(1) == 5
    with pytest.raises(InputError):
        cache.set_length(9)


def test_static_cache_reserve_keeps_filled_positions() -> None:
    cache = StaticKVCache(1, 1, 2, 4, capacity=4)
    k1, v1 = _kv(1, 3, 22)
    cache.update(0, k1, v1)
    cache.reserve(2)  # never shrinks
    assert cache.capacity == 4
    cache.reserve(12)
    assert cache.capacity == 12
    k, _ = cache.update(0, *_kv(1, 5, 23))
    assert k.shape[2] == 8 and torch.equal(k[:, :, :3], k1)


def test_preallocated_caches_follow_per_layer_devices() -> None:
    devices = [torch.device("cpu"), torch.device("meta")]
    static = StaticKVCache(2, 1, 2, 4, capacity=4, device=devices)
    assert [t.device for t in static._kbuf] == devices
    slots = SlotKVCache(2, 3, 2, 4, 8, layer_devices=devices)
    assert [t.device for t in slots.k] == devices and slots.mask.device.type == "cpu"
    with pytest.raises(InputError):
        StaticKVCache(2, 1, 2, 4, capacity=4, device=devices[:1])


def test_slot_cache_static_flag_is_per_step() -> None:
    slots = SlotKVCache(1, 2, 2, 4, 8)
    slots.decode(2, 8, torch.tensor([0, 0]), static=True)
    assert slots.static_shapes
    slots.prefill(0, torch.ones(3, dtype=torch.long))
    assert not slots.static_shapes
