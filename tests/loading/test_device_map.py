"""device_map: where each unit goes (explicit maps and "auto" by memory budgets), and a model split
across devices answering exactly like the unsplit one.

CI has one device kind (the CPU), so a CPU + CPU split cannot show by itself that anything moves.
Two things make the split real here: a split over the CPU and the ``meta`` device (a tensor that
reaches a layer on the other device raises, so every hand-over must move activations, masks and
rotary tables, and every layer's KV rows must be on its own device), and a hook recording the
device each layer's input was on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import minicpmv
from minicpmv.engine.batch import BatchEngine, generate_batch
from minicpmv.engine.kv_cache import KVCache, SlotKVCache
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import InputError
from minicpmv.loading import build_on_meta
from minicpmv.loading.device_map import (
    Placement,
    explicit_map,
    model_units,
    parse_device,
    parse_size,
    plan_auto,
    resolve_device_map,
    unit_bytes,
)
from minicpmv.modeling.layers import AttnMask

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
GPU0, GPU1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
UNITS_26 = ["llm.model.embed_tokens", "vpm", "resampler", "llm.model.layers.0", "llm.model.layers.1",
            "llm.model.norm", "llm.lm_head"]


def test_units_in_model_order(tiny_config) -> None:
    cfg = tiny_config("2.6")
    assert model_units(build_on_meta(cfg)) == UNITS_26
    tied = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=True))
    assert "llm.lm_head" not in model_units(build_on_meta(tied))  # it shares the embeddings' device


def test_explicit_map_longest_entry_wins() -> None:
    got = explicit_map(UNITS_26, {"": "cpu", "llm.model.layers": "cuda:0", "llm.model.layers.1": 1, "vpm": GPU0})
    assert got == {"llm.model.embed_tokens": CPU, "vpm": GPU0, "resampler": CPU, "llm.model.layers.0": GPU0,
                   "llm.model.layers.1": GPU1, "llm.model.norm": CPU, "llm.lm_head": CPU}
    placement = Placement(got)
    assert placement.device_of("llm.model.layers.1.mlp.up_proj.weight") == GPU1
    assert placement.device_of("vpm.encoder.layers.0.mlp.fc1.bias") == GPU0
    assert placement.devices == [CPU, GPU0, GPU1]
    with pytest.raises(InputError, match="no unit"):
        placement.device_of("apm.conv1.weight")


@pytest.mark.parametrize("bad,message", [
    ({"vpm.encoder.layers.0": "cpu", "": "cpu"}, "part of 'vpm'"),
    ({"llm.model.layer": "cpu", "": "cpu"}, "names no part"),
    ({"llm": "cpu"}, "no device to 2 part"),
    ({"": "gpu"}, "not a device"),
    ({}, "non-empty mapping"),
])
def test_explicit_map_errors(bad, message) -> None:
    with pytest.raises(InputError, match=message):
        explicit_map(UNITS_26, bad)


def test_auto_fills_devices_in_model_order() -> None:
    sizes = [("embed", 10), ("vpm", 30), ("layer0", 20), ("layer1", 20), ("layer2", 20), ("norm", 1), ("head", 10)]
    got = plan_auto(sizes, [(GPU0, 45), (GPU1, 30), (CPU, 100)])
    assert got == {"embed": GPU0, "vpm": GPU0, "layer0": GPU1, "layer1": CPU, "layer2": CPU, "norm": CPU, "head": CPU}
    assert set(plan_auto(sizes, [(GPU0, 10**9), (CPU, 0)]).values()) == {GPU0}
    with pytest.raises(InputError, match=r"needs 0\.0 GiB but the devices offer"):
        plan_auto(sizes, [(GPU0, 50), (CPU, 50)])


def test_auto_on_a_model_with_budgets(tiny_config) -> None:
    model = build_on_meta(tiny_config("2.6"))
    sizes = unit_bytes(model, UNITS_26, lambda key: torch.float32)
    assert sum(sizes.values()) == 4 * sum(p.numel() for p in model.parameters())
    first = sizes["llm.model.embed_tokens"] + sizes["vpm"] + sizes["resampler"] + sizes["llm.model.layers.0"]
    placement = resolve_device_map(model, "auto", dtype_of=lambda key: torch.float32,
                                   max_memory={"cpu": "1GiB", "cuda:0": first})
    assert [placement.units[u] for u in UNITS_26] == [GPU0] * 4 + [CPU] * 3
    half = unit_bytes(model, UNITS_26, lambda key: torch.bfloat16)
    assert half["vpm"] * 2 == sizes["vpm"]
    with pytest.raises(InputError, match="'auto' or a mapping"):
        resolve_device_map(model, "balanced", dtype_of=lambda key: torch.float32)
    with pytest.raises(InputError, match="only to device_map='auto'"):
        resolve_device_map(model, {"": "cpu"}, dtype_of=lambda key: torch.float32, max_memory={"cpu": 1})


def test_sizes_and_devices_parse() -> None:
    assert parse_size("20GiB") == 20 * 2**30 and parse_size("1.5 GB") == 1_500_000_000 and parse_size(7) == 7
    assert parse_device(1) == GPU1 and parse_device("cpu") == CPU
    for bad in ("lots", "-1GB", True):
        with pytest.raises(InputError):
            parse_size(bad)


def test_load_arguments_are_checked() -> None:
    ckpt = CONF / "2.6" / "_checkpoint"
    with pytest.raises(InputError, match="either device= or device_map="):
        minicpmv.load(ckpt, dtype="float32", device="meta", device_map="auto")
    with pytest.raises(InputError, match="only to device_map='auto'"):
        minicpmv.load(ckpt, dtype="float32", max_memory={"cpu": "1GiB"})


@pytest.fixture(scope="module")
def split26():
    """The 2.6 checkpoint loaded split by an explicit map (every unit on a CPU device)."""
    return minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32",
                         device_map={"": "cpu", "llm.model.layers.1": "cpu:0", "llm.lm_head": "cpu:0"})


def _image():
    from PIL import Image

    with Image.open(sorted((CONF / "2.6" / "single_448" / "inputs").glob("*.png"))[0]) as im:
        return im.convert("RGB")


def test_cpu_split_answers_like_the_unsplit_model(split26, model26) -> None:
    msgs = [{"role": "user", "content": [_image(), "What is in the picture?"]}]
    greedy = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=12)
    assert split26.chat(msgs, **greedy) == model26.chat(msgs, **greedy)
    assert split26.chat(msgs, seed=5, max_new_tokens=12) == model26.chat(msgs, seed=5, max_new_tokens=12)
    assert split26.chat(msgs, sampling=False, max_new_tokens=8) == model26.chat(msgs, sampling=False, max_new_tokens=8)
    turns = [[_image(), "Describe it."], "And the colours?"]
    a, b = minicpmv.ChatSession(split26, **greedy), minicpmv.ChatSession(model26, **greedy)
    assert [a.ask(t) for t in turns] == [b.ask(t) for t in turns]
    convs = [msgs, [{"role": "user", "content": ["Hello!"]}]]
    answers = [generate_batch(BatchEngine(m, max_batch_size=2, max_model_len=512),
                              [(m.processor([c]), SamplingParams(max_new_tokens=6)) for c in convs])
               for m in (split26, model26)]
    assert answers[0] == answers[1]


def test_split_moves_activations_and_kv_rows_between_devices() -> None:
    """Layer 1, the final norm, lm_head and the resampler on ``meta``: nothing computes there, but a
    tensor reaching a unit on the other device raises, so this runs only if every hand-over moves."""
    chat = minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32")
    model = chat.model
    for name in ("llm.model.layers.1", "llm.model.norm", "llm.lm_head", "resampler"):
        model.get_submodule(name).to("meta")
    layer1 = model.llm.model.layers[1]
    cos = sin = torch.ones(1, 1, model.head_dim)
    with pytest.raises(RuntimeError, match="device"):  # what a missing move would hit
        layer1(torch.zeros(1, 1, model.hidden_size), cos, sin, AttnMask(None, False), None)
    seen = []
    for layer in model.llm.model.layers:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].device))
    assert model.layer_devices == [CPU, torch.device("meta")]
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 0, 1]])
    caches = [KVCache(2), KVCache.for_model(model, 1, capacity=16),
              SlotKVCache.for_model(model, 2, 16).prefill(1, mask[0])]
    for cache in caches:
        seen.clear()
        with torch.no_grad():
            logits = model(model.embed_tokens(ids), None, mask, cache=cache)
        assert logits.device.type == "meta" and logits.shape == (1, 1, model.vocab_size)
        assert seen == [CPU, torch.device("meta")]
        buffers = cache._kbuf if isinstance(cache, KVCache) else cache.k
        assert [b.device.type for b in buffers] == ["cpu", "meta"]
    pv = [torch.zeros(3, 14, 14 * 4)]
    with torch.no_grad():
        feats = model.encode_images(pv, torch.tensor([[2, 2]]))  # vpm on the CPU, resampler on meta
    assert feats.device.type == "meta" and feats.shape == (1, model.query_num, model.hidden_size)
