"""The encoded-image cache: keys by content, LRU bound by bytes, and ChatSession turns that
send an image already seen cost no vision work and give the same greedy tokens as a fresh run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.engine.features import FeatureCache, entry_key, slice_digest
from minicpmv.engine.session import ChatSession
from minicpmv.processing.image import PatchList

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
GREEDY = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=6)


def test_entry_key_depends_on_pixels_sizes_and_temporal_ids() -> None:
    a = np.zeros((3, 14, 4 * 14), dtype=np.float32)
    b = a.copy()
    b[0, 0, 0] = 1e-6
    base = entry_key([slice_digest([a], 0)], [(2, 2)], [-1])
    assert entry_key([slice_digest([a.copy()], 0)], [(2, 2)], [-1]) == base
    assert entry_key([slice_digest([b], 0)], [(2, 2)], [-1]) != base
    assert entry_key([slice_digest([a], 0)], [(1, 4)], [-1]) != base
    assert entry_key([slice_digest([a], 0)], [(2, 2)], [3]) != base
    assert slice_digest([a.reshape(3, 28, 28)], 0) != slice_digest([a], 0)  # same bytes, other shape


def test_patch_list_digest_follows_the_uint8_slice_and_the_normalisation() -> None:
    img = Image.new("RGB", (28, 28), (10, 200, 30))
    other = img.copy()
    other.putpixel((5, 5), (11, 200, 30))
    plain = PatchList([img, img.copy(), other])
    assert slice_digest(plain, 0) == slice_digest(plain, 1) != slice_digest(plain, 2)
    clip = PatchList([img], 14, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))  # other mean/std: other tensors
    assert slice_digest(clip, 0) != slice_digest(plain, 0)
    assert slice_digest(plain, 0) != slice_digest([plain[0]], 0)  # lazy and materialised never collide


def test_a_cache_hit_makes_no_pixel_tensors(model26, monkeypatch) -> None:
    """Keys come from the uint8 slices: a second request with the same image runs no to_patches,
    and a miss makes each slice's tensor once."""
    import minicpmv.processing.image as image_mod

    made: list[int] = []
    real = image_mod.to_patches

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(image_mod, "to_patches", counting)
    cache = FeatureCache()
    msgs = [[{"role": "user", "content": [_image(), "q"]}]]
    inputs = model26.processor(msgs)
    first = model26.runner.encode_features(inputs, cache)[0]
    assert len(made) == len(inputs.pixel_values[0]) > 1
    made.clear()
    again = model26.runner.encode_features(model26.processor(msgs), cache)[0]
    assert made == [] and torch.equal(first, again)


def test_lru_bound_by_bytes() -> None:
    cache = FeatureCache(max_bytes=3 * 64 * 4)  # three [8, 8] float32 entries
    for k in "abc":
        cache.put(k, torch.zeros(8, 8))
    assert cache.get("a") is not None  # "a" becomes the most recent
    cache.put("d", torch.zeros(8, 8))
    assert len(cache) == 3 and cache.get("b") is None and cache.get("a") is not None
    cache.put("huge", torch.zeros(64, 64))  # larger than the whole budget: not kept
    assert cache.get("huge") is None and len(cache) == 3
    assert cache.hits == 2 and cache.misses == 2


@pytest.fixture()
def vision_calls(model26, monkeypatch) -> list[int]:
    """Counts slices through the vision tower of the shared tiny 2.6 model."""
    vpm = model26.model.vpm
    calls: list[int] = []
    real = vpm.forward

    def counting(pixel_values, *args, **kwargs):
        calls.append(int(pixel_values.shape[0]))
        return real(pixel_values, *args, **kwargs)

    monkeypatch.setattr(vpm, "forward", counting)
    return calls


def _image() -> Image.Image:
    files = sorted((CONF / "2.6" / "single_1920x1080" / "inputs").glob("*.png"))
    with Image.open(files[0]) as im:
        return im.convert("RGB")


def test_same_image_in_a_later_turn_costs_no_vision(model26, vision_calls) -> None:
    img = _image()
    session = ChatSession(model26, **GREEDY)
    session.ask([img, "What is in the picture?"])
    assert sum(vision_calls) > 1  # the first turn encoded every slice
    vision_calls.clear()
    answer = session.ask([img, "Look again: what colour dominates?"])
    assert vision_calls == [], "a turn re-sending a cached image ran the vision tower"
    fresh = model26.chat(session.history[:-1], **GREEDY)  # same conversation, nothing cached
    assert answer == fresh


def test_another_session_sharing_the_cache_costs_no_vision(model26, vision_calls) -> None:
    img = _image()
    shared = FeatureCache()
    first = ChatSession(model26, feature_cache=shared, **GREEDY).ask([img, "Describe it."])
    vision_calls.clear()
    second = ChatSession(model26, feature_cache=shared, **GREEDY).ask([img, "Describe it."])
    assert vision_calls == []
    assert second == first


def test_features_are_encoded_in_bounded_chunks(model26, vision_calls, monkeypatch):
    """Many slices go through the vision tower a few at a time, with features identical to
    one big batch (each slice's features do not depend on its neighbours)."""
    from minicpmv.engine.runner import _chunks

    assert list(_chunks([0, 1, 2, 3, 4], [3, 3, 1, 9, 2], 4)) == [[0], [1, 2], [3], [4]]
    inputs = model26.processor([[{"role": "user", "content": [_image(), _image().rotate(90), "q"]}]])
    n = len(inputs.pixel_values[0])
    whole = model26.runner.encode_features(inputs)[0]
    assert max(vision_calls) > 2
    vision_calls.clear()
    import dataclasses

    monkeypatch.setattr(model26.runner, "config", dataclasses.replace(model26.config, vision_batch_size=2))
    chunked = model26.runner.encode_features(inputs)[0]
    assert max(vision_calls) <= 2 and sum(vision_calls) == n
    assert torch.equal(whole, chunked)
