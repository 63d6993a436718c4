"""Resampler: sin-cos tables, conformance vectors (2D and 4.5 temporal), grouping semantics."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _vision_helpers import (  # noqa: E402
    image_cases,
    load_case,
    model_config,
    resampler,
    state_dict,
    vision_features,
)

from minicpmv.errors import InputError  # noqa: E402
from minicpmv.modeling.resampler import (  # noqa: E402
    Resampler,
    sincos_2d_table,
    temporal_rows,
)

CASES = [(v, c) for v in ("2.6", "4.5") for c in image_cases(v)]
D = 256


# ------------------------------------------------------------------------------ tables


def _reference_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """The reference recipe, written out step by step in float32."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def test_2d_table_column_first_then_row() -> None:
    table = sincos_2d_table(D, 5, 7)  # [h, w, D]
    assert table.shape == (5, 7, D) and table.dtype == np.float32
    r, c = 3, 6
    np.testing.assert_array_equal(table[r, c, : D // 2], _reference_1d(D // 2, np.array([c]))[0])
    np.testing.assert_array_equal(table[r, c, D // 2 :], _reference_1d(D // 2, np.array([r]))[0])


def test_2d_table_growth_keeps_values() -> None:
    small = sincos_2d_table(D, 70, 70)
    big = sincos_2d_table(D, 90, 75)
    np.testing.assert_array_equal(big[:70, :70], small)


def test_temporal_rows_equal_full_table_rows() -> None:
    full = _reference_1d(D, np.arange(72000, dtype=np.float32))  # the reference's 72000-row table
    ids = [0, 1, 3, 6, 10, 13, 16, 17, 255, 4097, 33333, 71998, 71999]
    np.testing.assert_array_equal(temporal_rows(D, ids), full[ids])
    # growth past the table: same recipe
    np.testing.assert_array_equal(temporal_rows(D, [80000]), _reference_1d(D, np.array([80000.0])))


def test_temporal_rows_need_float32_products() -> None:
    omega64 = 1.0 / 10000 ** (np.arange(D // 2) / (D / 2))
    exact = np.sin(70000.0 * omega64)
    assert np.abs(temporal_rows(D, [70000])[0, : D // 2] - exact).max() > 1e-4


def test_tables_not_in_state_dict() -> None:
    res = resampler("4.5")
    keys = set(res.state_dict())
    assert keys == set(state_dict("4.5", "resampler."))
    assert keys >= {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "proj"}
    assert not any("pos_embed" in k or "temporal" in k for k in keys)


def test_kv_proj_identity_when_widths_match() -> None:
    cfg = replace(model_config("2.6").resampler, kv_dim=D)
    res = Resampler(cfg)
    assert isinstance(res.kv_proj, torch.nn.Identity)
    assert not any(k.startswith("kv_proj") for k in res.state_dict())


# ------------------------------------------------------------------------------ conformance


@pytest.mark.parametrize("version,case", CASES)
def test_resampler_matches_reference(version: str, case: str) -> None:
    c = load_case(version, case)
    feats = vision_features(version, case)  # [S, Lmax, Dv]
    temporal_ids = c.meta["resampler_temporal_ids"]
    assert (temporal_ids is None) == (version == "2.6")
    with torch.no_grad():
        out = resampler(version)(feats, c.tgt_sizes, temporal_ids).double().numpy()  # [N, Q, D]
    assert list(out.shape) == c.meta["resampler_out_shape"]
    rows = c.tensors["resampler_rows"]
    np.testing.assert_allclose(out[:, rows], c.tensors["resampler_out_sel"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.sum(1), c.tensors["resampler_colsum"], atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(out.sum(2), c.tensors["resampler_rowsum"], atol=1e-3, rtol=1e-5)


def test_video_groups_depend_on_temporal_ids() -> None:
    c = load_case("4.5", "video_temporal_2x3")
    feats = vision_features("4.5", "video_temporal_2x3")
    with torch.no_grad():
        real = resampler("4.5")(feats, c.tgt_sizes, [[0, 3, 6], [10, 13, 16]])
        shifted = resampler("4.5")(feats, c.tgt_sizes, [[1, 3, 6], [10, 13, 16]])
    assert (real[0] - shifted[0]).abs().max() > 1e-4
    torch.testing.assert_close(real[1], shifted[1], atol=0, rtol=0)


# ------------------------------------------------------------------------------ grouping


def _features(sizes: list[tuple[int, int]], lmax: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(sizes), lmax, 64, generator=g)  # [B, Lmax, Dv]
    for b, (h, w) in enumerate(sizes):
        x[b, h * w :] = 1e3  # garbage in padded rows must not matter
    return x


def _loop_reference(res: Resampler, x: torch.Tensor, sizes, groups) -> torch.Tensor:
    """Straightforward per-group computation on the VALID rows only (no padding anywhere)."""
    table = torch.from_numpy(sincos_2d_table(D, 70, 70))
    outs, start = [], 0
    for ids in groups:
        keys, vals = [], []
        for j, t in enumerate(ids):
            h, w = sizes[start + j]
            kv = res.ln_kv(res.kv_proj(x[start + j, : h * w]))  # [L, D]
            pos = table[:h, :w].reshape(h * w, D)
            tb = torch.zeros(D) if t == -1 else torch.from_numpy(temporal_rows(D, [t])[0])
            keys.append(kv + pos + tb)
            vals.append(kv)
        start += len(ids)
        q = res.ln_q(res.query)[:, None, :]  # [Q, 1, D]
        k, v = torch.cat(keys)[:, None, :], torch.cat(vals)[:, None, :]  # [K, 1, D]
        o, _ = F.multi_head_attention_forward(
            q, k, v, D, res.cfg.num_heads, res.attn.in_proj_weight, res.attn.in_proj_bias,
            None, None, False, 0.0, res.attn.out_proj.weight, res.attn.out_proj.bias,
            training=False, need_weights=False,
        )
        outs.append(o[:, 0])  # [Q, D]
    return res.ln_post(torch.stack(outs)) @ res.proj  # [G, Q, D]


def test_all_minus_one_groups_equal_2d_path() -> None:
    res = resampler("4.5")
    sizes = [(3, 4), (2, 5), (6, 6), (1, 1)]
    x = _features(sizes, 40)
    with torch.no_grad():
        flat = res(x, sizes, None)
        grouped = res(x, sizes, [[-1]] * len(sizes))
        looped = _loop_reference(res, x, sizes, [[-1]] * len(sizes))
    assert flat.shape == (4, 64, D)
    torch.testing.assert_close(grouped, flat, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(flat, looped, atol=2e-5, rtol=2e-5)


def test_uneven_groups_match_per_group_loop() -> None:
    res = resampler("4.5")
    sizes = [(3, 4), (2, 5), (4, 4), (5, 3), (2, 2)]
    groups = [[5, 9], [-1], [0, 70000]]
    x = _features(sizes, 20, seed=1)
    with torch.no_grad():
        batched = res(x, torch.tensor(sizes), groups)
        looped = _loop_reference(res, x, sizes, groups)
    assert batched.shape == (3, 64, D)
    torch.testing.assert_close(batched, looped, atol=2e-5, rtol=2e-5)


def test_extra_padding_rows_do_not_change_output() -> None:
    res = resampler("2.6")
    sizes = [(3, 4), (2, 5)]
    x = _features(sizes, 12)
    wider = torch.cat([x, torch.full((2, 30, 64), 7.0)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(res(x, sizes), res(wider, sizes), atol=1e-5, rtol=1e-5)


def test_position_table_grows_past_70() -> None:
    res = Resampler(model_config("2.6").resampler)
    res.load_state_dict(resampler("2.6").state_dict())
    sizes = [(2, 80), (75, 1)]
    x = _features(sizes, 160)
    with torch.no_grad():
        out = res(x, sizes)
        looped = _loop_reference_big(res, x, sizes)
    torch.testing.assert_close(out, looped, atol=2e-5, rtol=2e-5)


def _loop_reference_big(res: Resampler, x: torch.Tensor, sizes) -> torch.Tensor:
    table = torch.from_numpy(sincos_2d_table(D, 80, 80))
    outs = []
    for b, (h, w) in enumerate(sizes):
        kv = res.ln_kv(res.kv_proj(x[b, : h * w]))
        key = (kv + table[:h, :w].reshape(h * w, D))[:, None]
        o, _ = F.multi_head_attention_forward(
            res.ln_q(res.query)[:, None], key, kv[:, None], D, res.cfg.num_heads,
            res.attn.in_proj_weight, res.attn.in_proj_bias, None, None, False, 0.0,
            res.attn.out_proj.weight, res.attn.out_proj.bias, training=False, need_weights=False,
        )
        outs.append(o[:, 0])
    return res.ln_post(torch.stack(outs)) @ res.proj


def test_2d_resampler_ignores_temporal_ids() -> None:
    res = resampler("2.6")
    sizes = [(3, 4), (2, 5)]
    x = _features(sizes, 12)
    with torch.no_grad():
        torch.testing.assert_close(res(x, sizes, [[4, 8]]), res(x, sizes), atol=0, rtol=0)


@pytest.mark.parametrize("bad", [[[1, 2, 3]], [[1], [2], [3]], [[], [1, 2]], [[-2], [1]]])
def test_bad_temporal_ids_raise(bad) -> None:
    res = resampler("4.5")
    sizes = [(3, 4), (2, 5)]
    with pytest.raises(InputError):
        res(_features(sizes, 12), sizes, bad)


def test_shape_errors_raise() -> None:
    res = resampler("2.6")
    with pytest.raises(InputError):
        res(torch.zeros(2, 12, 64), [(3, 4)])
    with pytest.raises(InputError):
        res(torch.zeros(1, 10, 64), [(3, 4)])


def test_bfloat16_runs_close_to_float32() -> None:
    res32 = resampler("4.5")
    res16 = Resampler(res32.cfg)
    res16.load_state_dict(res32.state_dict())
    res16 = res16.to(torch.bfloat16)
    sizes = [(3, 4), (2, 5), (4, 4)]
    x = _features(sizes, 16)
    with torch.no_grad():
        ref = res32(x, sizes, [[3, 6], [-1]])
        out = res16(x.to(torch.bfloat16), sizes, [[3, 6], [-1]])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert ((out.float() - ref).abs().mean() / ref.abs().mean()) < 0.05
