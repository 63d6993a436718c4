"""SigLIP/NaViT vision tower: position bucketing, conformance vectors, packing, grouping, dtypes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _vision_helpers import (  # noqa: E402
    CONF,
    image_cases,
    load_case,
    model_config,
    vision_features,
    vision_tower,
)

from minicpmv.errors import InputError  # noqa: E402
from minicpmv.modeling.vision_siglip import (  # noqa: E402
    SiglipVisionTransformer,
    bucket_coords,
    pack_slices,
    slice_position_ids,
)

CASES = [(v, c) for v in ("2.6", "4.5") for c in image_cases(v)]


# ------------------------------------------------------------------------------ bucketing


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_position_buckets_match_reference_table(version: str) -> None:
    table = json.loads((CONF / version / "_tables" / "position_buckets.json").read_text())
    side = table["num_patches_per_side"]
    assert side == 70
    for axis in ("rows", "cols"):
        for n, expected in table[axis].items():
            assert list(bucket_coords(int(n), side)) == expected, (axis, n)


def test_position_buckets_differ_from_exact_formula_where_documented() -> None:
    # The float32 arange artefacts matter: n=25 has a bucket that floor(r*70/n) gets wrong.
    assert list(bucket_coords(25, 70)) != [r * 70 // 25 for r in range(25)]
    assert list(bucket_coords(32, 70)) == [r * 70 // 32 for r in range(32)]


def test_slice_position_ids_row_major() -> None:
    table = json.loads((CONF / "2.6" / "_tables" / "position_buckets.json").read_text())
    for h, w in [(3, 5), (23, 45), (55, 18), (1, 1)]:
        ids = slice_position_ids(h, w, 70).tolist()
        expected = [table["rows"][str(h)][r] * 70 + table["cols"][str(w)][c]
                    for r in range(h) for c in range(w)]
        assert ids == expected


def test_bucket_coords_rejects_empty() -> None:
    with pytest.raises(InputError):
        bucket_coords(0, 70)


# ------------------------------------------------------------------------------ conformance


def test_module_names_match_checkpoint() -> None:
    vpm = vision_tower("2.6")  # built with a strict load_state_dict of the stripped vpm.* keys
    names = set(vpm.state_dict())
    assert "embeddings.patch_embedding.weight" in names
    assert "encoder.layers.1.self_attn.out_proj.bias" in names
    assert "post_layernorm.weight" in names
    assert vpm.embeddings.position_embedding.weight.shape == (70 * 70, 64)


@pytest.mark.parametrize("version,case", CASES)
def test_pixel_helper_matches_processor_layout(version: str, case: str) -> None:
    c = load_case(version, case)
    np.testing.assert_array_equal(c.pixels[0][:, :, : 16 * 14].numpy(),
                                  c.tensors["pixel_values_head_0"])
    stats = c.tensors["pixel_values_stats"]
    for s, pv in enumerate(c.pixels):
        x = pv.numpy().astype(np.float64)
        np.testing.assert_allclose([x.sum(), (x * x).sum(), x.size], stats[s, [0, 1, 3]], rtol=1e-9)


@pytest.mark.parametrize("version,case", CASES)
def test_vision_matches_reference(version: str, case: str) -> None:
    c = load_case(version, case)
    feats = vision_features(version, case)  # [S, Lmax, Dv], whole request padded, chunks of 16
    lens = (c.tgt_sizes[:, 0] * c.tgt_sizes[:, 1]).tolist()
    for s in range(len(c.pixels)):
        rows = c.tensors[f"vpm_rows_{s:03d}"]
        np.testing.assert_allclose(feats[s][rows].numpy(), c.tensors[f"vpm_out_{s:03d}"],
                                   atol=1e-4, rtol=1e-4)
    colsum = np.stack([feats[s, : lens[s]].double().sum(0).numpy() for s in range(len(lens))])
    np.testing.assert_allclose(colsum, c.tensors["vpm_colsum"], atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("version,case", [("2.6", "multi_image_2"), ("4.5", "fewshot")])
def test_per_slice_and_grouped_match_padded_batch(version: str, case: str) -> None:
    c = load_case(version, case)
    vpm = vision_tower(version)
    padded = vision_features(version, case)
    lens = (c.tgt_sizes[:, 0] * c.tgt_sizes[:, 1]).tolist()
    with torch.no_grad():
        grouped = vpm.encode_slices(c.pixels, c.tgt_sizes, batch_size=2)  # [S, Lmax, Dv]
        for s, n in enumerate(lens):
            one = vpm(c.pixels[s][None], torch.ones(1, 1, n, dtype=torch.bool), c.tgt_sizes[s : s + 1])
            torch.testing.assert_close(one[0], padded[s, :n], atol=1e-5, rtol=1e-5)
    assert grouped.shape == (len(lens), max(lens), 64)
    for s, n in enumerate(lens):
        torch.testing.assert_close(grouped[s, :n], padded[s, :n], atol=1e-5, rtol=1e-5)
        assert not grouped[s, n:].any()


def test_padding_mask_changes_valid_rows_only_through_masking() -> None:
    # Without the key mask the padded zeros would leak into the valid rows: must differ.
    c = load_case("2.6", "multi_image_2")
    vpm = vision_tower("2.6")
    padded, mask = pack_slices(c.pixels, c.tgt_sizes)
    n = int(c.tgt_sizes[3, 0] * c.tgt_sizes[3, 1])
    with torch.no_grad():
        good = vpm(padded[3:4], mask[3:4], c.tgt_sizes[3:4])[0, :n]
        leaky = vpm(padded[3:4], torch.ones_like(mask[3:4]), c.tgt_sizes[3:4])[0, :n]
    assert (good - leaky).abs().max() > 1e-3


# ------------------------------------------------------------------------------ packing, errors


def test_pack_slices_layout() -> None:
    a = torch.randn(3, 14, 6 * 14)
    b = torch.randn(3, 14, 4 * 14)
    padded, mask = pack_slices([a, b], [(2, 3), (2, 2)])
    assert padded.shape == (2, 3, 14, 6 * 14) and mask.shape == (2, 1, 6)
    assert mask.dtype == torch.bool
    assert mask[0].all() and mask[1, 0].tolist() == [True] * 4 + [False] * 2
    assert torch.equal(padded[1, :, :, : 4 * 14], b) and not padded[1, :, :, 4 * 14 :].any()


def test_pack_slices_rejects_mismatch() -> None:
    with pytest.raises(InputError):
        pack_slices([torch.zeros(3, 14, 5 * 14)], [(2, 3)])
    with pytest.raises(InputError):
        pack_slices([torch.zeros(3, 14, 6 * 14)], [(2, 3), (1, 1)])


def test_forward_rejects_bad_sizes() -> None:
    vpm = vision_tower("2.6")
    pv = torch.zeros(1, 3, 14, 4 * 14)
    mask = torch.ones(1, 1, 4, dtype=torch.bool)
    with pytest.raises(InputError):
        vpm(pv, mask, torch.tensor([[3, 3]]))
    with pytest.raises(InputError):
        vpm(pv, mask, torch.tensor([[2, 2], [2, 2]]))
    with pytest.raises(InputError):
        SiglipVisionTransformer(model_config("2.6").vision, 3)


def test_bfloat16_runs_close_to_float32() -> None:
    c = load_case("2.6", "beam_default")
    vpm32 = vision_tower("2.6")
    vpm16 = SiglipVisionTransformer(vpm32.cfg, len(vpm32.encoder.layers))
    vpm16.load_state_dict(vpm32.state_dict())
    vpm16 = vpm16.to(torch.bfloat16)
    padded, mask = pack_slices(c.pixels, c.tgt_sizes)
    with torch.no_grad():
        out = vpm16(padded, mask, c.tgt_sizes)
    assert out.dtype == torch.bfloat16
    ref = vision_features("2.6", "beam_default")
    n = int(c.tgt_sizes[0, 0] * c.tgt_sizes[0, 1])
    err = (out[0, :n].float() - ref[0, :n]).abs().mean() / ref[0, :n].abs().mean()
    assert torch.isfinite(out[0, :n].float()).all() and err < 0.05


def test_encode_slices_runs_each_patch_count_unpadded_and_unmasked(monkeypatch) -> None:
    c = load_case("2.6", "multi_image_2")  # slices of several patch counts
    vpm = vision_tower("2.6")
    lens = (c.tgt_sizes[:, 0] * c.tgt_sizes[:, 1]).tolist()
    assert len(set(lens)) > 1
    calls: list[tuple[int, int, bool]] = []
    real = vpm.forward

    def spy(pixel_values, patch_attention_mask, tgt_sizes):
        calls.append((pixel_values.shape[0], pixel_values.shape[-1] // 14, bool(patch_attention_mask.all())))
        return real(pixel_values, patch_attention_mask, tgt_sizes)

    monkeypatch.setattr(vpm, "forward", spy)
    with torch.no_grad():
        out = vpm.encode_slices(c.pixels, c.tgt_sizes, batch_size=16)  # [S, Lmax, Dv]
    assert sorted((b, n) for b, n, _ in calls) == sorted((lens.count(n), n) for n in set(lens))
    assert all(unmasked for _, _, unmasked in calls)
    padded = vision_features("2.6", "multi_image_2")
    for s, n in enumerate(lens):
        torch.testing.assert_close(out[s, :n], padded[s, :n], atol=1e-5, rtol=1e-5)
        assert not out[s, n:].any()


def test_embeddings_output_is_contiguous() -> None:
    vpm = vision_tower("2.6")
    with torch.no_grad():
        x = vpm.embeddings(torch.zeros(2, 3, 14, 6 * 14), [(2, 3), (3, 2)])  # [2, 6, Dv]
    assert x.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_attention_is_the_reference_formula(dtype, monkeypatch):
    """The CPU vision attention computes the reference's eager attention exactly (bf16: scores
    and probabilities rounded where the reference rounds them), whatever the head chunking."""
    from minicpmv.modeling import vision_siglip as vs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 3, 3, 24, generator=g).to(dtype)  # [B, L, 3, h, hd] as a qkv projection lays it out
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # each [B, h, L, hd], strided views
    scores = torch.matmul(q, k.transpose(-1, -2)) * 24**-0.5  # [B, h, L, L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    ref = torch.matmul(probs, v).transpose(1, 2).reshape(2, 50, 72)  # [B, L, h*hd]
    got = vs.eager_attention(q, k, v)
    assert got.shape == (2, 50, 72) and torch.equal(got, ref)
    monkeypatch.setattr(vs, "ATTENTION_CHUNK_BYTES", 1)  # one head per step
    assert torch.equal(vs.eager_attention(q, k, v), ref)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 50, 72)
    torch.testing.assert_close(got, sdpa, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
    assert torch.equal(vs.attend(q, k, v, None), got)
