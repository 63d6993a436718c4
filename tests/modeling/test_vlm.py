"""MiniCPMV end to end (vision tower -> resampler -> embedding merge -> LLM) against the official
vectors of every image case of 2.6 and 4.5, plus the embedding-merge contract."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from minicpmv.errors import PlaceholderMismatchError
from minicpmv.modeling.layers import SimpleKVCache

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
IMAGE_CASES = sorted(
    (p.parent.name, p.name)
    for v in ("2.6", "4.5")
    for p in (CONF / v).iterdir()
    if (p / "expected" / "slices").is_dir()
)
STEPS = 16


def _features(model, case) -> list[torch.Tensor | None]:
    tids = case.meta.get("resampler_temporal_ids") if case.version == "4.5" else None
    with torch.no_grad():
        feats = model.encode_images(case.pixel_values(), case.t["tgt_sizes"], tids)  # [N, Q, H]
    assert list(feats.shape) == case.meta["resampler_out_shape"]
    return case.split_features(feats)


def test_image_cases_found() -> None:
    assert len(IMAGE_CASES) >= 18
    assert ("4.5", "video_temporal_2x3") in IMAGE_CASES


@pytest.mark.parametrize("version,name", IMAGE_CASES)
def test_image_case_matches_reference(tiny_models, load_case, positions, version, name) -> None:
    case = load_case(version, name)
    model = tiny_models[version]
    ids, mask = case.t["input_ids"], case.t["attention_mask"]
    with torch.no_grad():
        embeds = model.embed(ids, _features(model, case), case.bounds())  # [B, T, H]
    torch.testing.assert_close(embeds.double().sum(-1), case.t["embeds_rowsum"], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(
        embeds.double().abs().sum(-1), case.t["embeds_rowabssum"], atol=1e-3, rtol=1e-5
    )
    # Teacher-forced decoding with the reference's greedy tokens and a KV cache: every step's raw
    # logits must match (step 0 = last prompt position).
    gen = case.t["greedy_ids"]  # [B, 16]
    cache = SimpleKVCache()
    step_in, full_mask, logits = embeds, mask, []
    with torch.no_grad():
        for k in range(STEPS):
            pos = positions(full_mask)[:, -step_in.shape[1]:]
            logits.append(model(step_in, pos, full_mask, cache=cache, last_only=True)[:, -1])  # [B, V]
            step_in = model.embed_tokens(gen[:, k : k + 1])  # [B, 1, H]
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
    logits_t = torch.stack(logits, 1)  # [B, 16, V]
    torch.testing.assert_close(logits_t[:, 0], case.t["step_logits"][:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits_t, case.t["step_logits"], atol=1e-4, rtol=1e-4)
    if case.meta["generate_kwargs"].get("repetition_penalty", 1.0) == 1.0:
        assert logits_t.argmax(-1).tolist() == gen.tolist()


def test_vision_chunking_is_equivalent(tiny_models, load_case) -> None:
    case = load_case("2.6", "single_1344_grid3x3")  # 10 slices
    model = tiny_models["2.6"]
    pv, tgt = case.pixel_values(), case.t["tgt_sizes"]
    original = model.config
    with torch.no_grad():
        whole = model.encode_images(pv, tgt)
        try:
            model.config = dataclasses.replace(original, vision_batch_size=3)
            chunked = model.encode_images([p.double() for p in pv], tgt)  # pixels cast to vision dtype
        finally:
            model.config = original
    assert whole.shape == (10, 64, 256) and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_embed_scatter_contract(tiny_models) -> None:
    model = tiny_models["4.5"]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])
    feats = torch.randn(2, 2, 256, requires_grad=True)  # two blocks of Q=2 rows
    bounds = [[(1, 3), (5, 7)], []]
    weight_before = model.llm.model.embed_tokens.weight.detach().clone()
    out = model.embed(ids, [feats, None], bounds)  # [2, 8, 256]
    plain = model.embed_tokens(ids)
    torch.testing.assert_close(out[0, [1, 2, 5, 6]], feats.detach().reshape(4, 256))
    torch.testing.assert_close(out[0, [0, 3, 4, 7]], plain[0, [0, 3, 4, 7]])
    torch.testing.assert_close(out[1], plain[1])
    assert torch.equal(model.llm.model.embed_tokens.weight, weight_before)  # out of place
    out[0, 1].sum().backward()
    assert feats.grad is not None and feats.grad[0, 0].abs().sum() > 0
    flat = model.embed(ids, [feats.detach().reshape(4, 256), None], bounds)  # [n*Q, H] form
    torch.testing.assert_close(flat, out.detach())
    half = model.embed(ids, [feats.detach().half(), None], bounds)  # cast to embedding dtype
    assert half.dtype == model.dtype


def test_embed_count_mismatch_names_both_counts(tiny_models) -> None:
    model = tiny_models["2.6"]
    ids = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(PlaceholderMismatchError, match=r"4 image placeholder positions but 6"):
        model.embed(ids, [torch.zeros(3, 2, 256)], [[(1, 3), (5, 7)]])
    with pytest.raises(PlaceholderMismatchError, match=r"2 image placeholder positions but 0"):
        model.embed(ids, [None], [[(1, 3)]])


def test_model_properties(tiny_models, tiny_state) -> None:
    m = tiny_models["4.5"]
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.vocab_size, m.hidden_size) == (2, 2, 64, 612, 256)
    assert m.dtype == torch.float32 and m.device == torch.device("cpu")
    assert set(m.state_dict()) == set(tiny_state("4.5"))
