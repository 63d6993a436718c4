"""The encoded-image cache: keys by content, LRU bound by bytes, and ChatSession turns that
send an image already seen cost no vision work and give the same greedy tokens as a fresh run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.engine.features import FeatureCache, entry_key
from minicpmv.engine.session import ChatSession

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
GREEDY = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=6)


def test_entry_key_depends_on_pixels_sizes_and_temporal_ids() -> None:
    a = np.zeros((3, 14, 4 * 14), dtype=np.float32)
    b = a.copy()
    b[0, 0, 0] = 1e-6
    base = entry_key([a], [(2, 2)], [-1])
    assert entry_key([a.copy()], [(2, 2)], [-1]) == base
    assert entry_key([b], [(2, 2)], [-1]) != base
    assert entry_key([a], [(1, 4)], [-1]) != base
    assert entry_key([a], [(2, 2)], [3]) != base


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
    from minicpmv.engine.chat import _chunks

    assert list(_chunks([0, 1, 2, 3, 4], [3, 3, 1, 9, 2], 4)) == [[0], [1, 2], [3], [4]]
    inputs = model26.processor([[{"role": "user", "content": [_image(), _image().rotate(90), "q"]}]])
    n = len(inputs.pixel_values[0])
    whole = model26.encode_features(inputs)[0]
    assert max(vision_calls) > 2
    vision_calls.clear()
    import dataclasses

    monkeypatch.setattr(model26, "config", dataclasses.replace(model26.config, vision_batch_size=2))
    chunked = model26.encode_features(inputs)[0]
    assert max(vision_calls) <= 2 and sum(vision_calls) == n
    assert torch.equal(whole, chunked)
