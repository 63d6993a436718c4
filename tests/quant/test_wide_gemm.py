"""The prefill GEMM of bf16 linears (quant/wide_gemm.py): the float32 path against a float64
reference, block edges, the choice between the two GEMMs and its override, and PackedLinear's use."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicpmv.errors import ConfigError
from minicpmv.modeling.resampler import ResamplerAttention
from minicpmv.quant import wide_gemm
from minicpmv.quant.linear import NATIVE_MAX_ROWS, PackedLinear, route_in_projections


def _case(rows: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, k, generator=g).bfloat16()  # [2, rows, K]
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()  # [N, K]
    return x, w, torch.randn(n, generator=g).bfloat16()


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 product of the same bf16 values, rounded once to bf16."""
    y = x.double() @ w.double().t()  # [..., N]
    return (y if bias is None else y + bias.double()).bfloat16()


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two bf16 tensors in units in the last place."""
    ia = a.view(torch.int16).int()
    ib = b.view(torch.int16).int()
    ia = torch.where(ia < 0, -32768 - ia, ia)  # sign-magnitude to ordered integers
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("bias", [False, True])
def test_widened_linear_matches_float64_across_blocks(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    monkeypatch.setattr(wide_gemm, "BLOCK_FLOATS", 16 * 96)  # blocks of 16 rows: 6 full ones and a tail of 5
    monkeypatch.setattr(wide_gemm, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(wide_gemm, "ROW_CHUNK", 32)  # 74 activation rows: 32, 32 and 10
    x, w, b = _case(rows=37, n=101, k=96)
    y = wide_gemm.widened_linear(x, w, b if bias else None)
    ref = _reference(x, w, b if bias else None)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 37, 101) and y.is_contiguous()
    assert _ulps(y, ref) <= 1  # float32 sums, one rounding: at most a tie the other way
    assert (y == ref).float().mean() > 0.99


def test_reference_comparison_sees_a_dropped_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above fails on a product that loses the last block of rows."""
    monkeypatch.setattr(wide_gemm, "BLOCK_FLOATS", 16 * 96)
    monkeypatch.setattr(wide_gemm, "MIN_BLOCK_ROWS", 1)
    x, w, _ = _case(rows=37, n=101, k=96)
    y = wide_gemm.widened_linear(x, w[:96], None)  # 101 - 96 = the tail block missing
    broken = torch.cat([y, torch.zeros(2, 37, 5, dtype=y.dtype)], dim=-1)
    assert _ulps(broken, _reference(x, w, None)) > 1


@pytest.mark.parametrize(("n", "most"), [(1152, 974), (4304, 3640), (18944, 1170), (3584, 1170), (512, 4096),
                                         (300, 256), (1000, 999), (4096, 1024), (17, 16)])
def test_blocks_are_balanced(n: int, most: int) -> None:
    """No thin last block: the rows split into as few blocks as ``most`` allows, of equal size
    rounded up to 16 rows (1,152 rows by at most 974: 576 + 576, not 974 + 178)."""
    step = wide_gemm.balanced_step(n, most)
    blocks = -(-n // step)
    last = n - (blocks - 1) * step
    assert blocks <= -(-n // most) and (step == n or step % 16 == 0)
    assert last >= step - 16 * blocks, (step, last)


def test_choice_is_forced_by_the_environment(choice) -> None:
    choice("fp32")
    assert wide_gemm.gemm_choice() == "fp32"
    choice(" ONEDNN ")
    assert wide_gemm.gemm_choice() == "onednn"
    choice("amx")
    with pytest.raises(ConfigError, match=r"MINICPMV_BF16_GEMM='amx': expected one of onednn, fp32"):
        wide_gemm.gemm_choice()


@pytest.mark.parametrize(("onednn", "fp32", "expected"),
                         [(1.0, 0.9, "fp32"), (1.0, 0.97, "onednn"), (0.3, 1.0, "onednn")])
def test_choice_by_measurement(choice, monkeypatch: pytest.MonkeyPatch, onednn: float, fp32: float,
                               expected: str) -> None:
    """float32 is chosen only when it beats oneDNN by the margin (timings stubbed: oneDNN first)."""
    choice(None)
    monkeypatch.setattr(wide_gemm, "_best_times", lambda fns: [onednn, fp32])
    assert wide_gemm.gemm_choice() == expected


def test_the_measured_choice_is_remembered_for_this_machine(choice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later process (the in-process cache cleared) reads the choice instead of probing again;
    another thread count is another machine setting and is measured; a damaged file is measured
    over and rewritten; the environment still wins."""
    choice(None)
    probes: list[int] = []
    timings = [[1.0, 0.5]]
    monkeypatch.setattr(wide_gemm, "_best_times", lambda fns: probes.append(1) or timings[0])
    assert wide_gemm.gemm_choice() == "fp32" and probes == [1]
    timings[0] = [0.5, 1.0]  # a probe now would say oneDNN
    wide_gemm.gemm_choice.cache_clear()
    assert wide_gemm.gemm_choice() == "fp32" and probes == [1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        wide_gemm.gemm_choice.cache_clear()
        assert wide_gemm.gemm_choice() == "onednn" and probes == [1, 1]
    finally:
        torch.set_num_threads(threads)
    wide_gemm._choices_file().write_text("{not json")
    wide_gemm.gemm_choice.cache_clear()
    assert wide_gemm.gemm_choice() == "onednn" and probes == [1, 1, 1]
    assert json.loads(wide_gemm._choices_file().read_text()) == {wide_gemm._machine_key(): "onednn"}
    choice("fp32")
    assert wide_gemm.gemm_choice() == "fp32" and probes == [1, 1, 1]


def test_choice_by_measurement_on_this_cpu(choice) -> None:
    choice(None)
    assert wide_gemm.gemm_choice() in wide_gemm.CHOICES


@pytest.mark.parametrize("forced", wide_gemm.CHOICES)
def test_packed_linear_prefill_goes_through_the_chosen_gemm(choice, monkeypatch: pytest.MonkeyPatch,
                                                            forced: str) -> None:
    choice(forced)
    calls: list[int] = []
    real = wide_gemm._widened
    monkeypatch.setattr(wide_gemm, "_widened", lambda *a: calls.append(1) or real(*a))
    x, w, b = _case(rows=NATIVE_MAX_ROWS + 3, n=64, k=128, seed=1)
    lin = nn.Linear(128, 64, dtype=torch.bfloat16)
    lin.weight, lin.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        y = packed(x)
    assert len(calls) == (forced == "fp32")
    assert _ulps(y, _reference(x, w, b)) <= 1
    assert _ulps(y, F.linear(x, w, b)) <= 1


@pytest.mark.parametrize("forced", wide_gemm.CHOICES)
def test_resampler_in_projections_go_through_the_chosen_gemm(choice, monkeypatch: pytest.MonkeyPatch,
                                                             forced: str) -> None:
    """The resampler's packed in_proj (no nn.Linear to swap) is routed by ``route_in_projections``:
    its key and value projections take the chosen GEMM, and the attention output stays F.linear's
    within bf16 rounding; a float32 layer is left on F.linear."""
    choice(forced)
    calls: list[int] = []
    real = wide_gemm._widened
    monkeypatch.setattr(wide_gemm, "_widened", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    attn = ResamplerAttention(64, 4)
    with torch.no_grad():
        attn.in_proj_bias.normal_(generator=g)
    attn = attn.bfloat16().eval()
    query = torch.randn(8, 64, generator=g).bfloat16()  # [Q, D]
    kv = torch.randn(3, 40, 64, generator=g).bfloat16()  # [N, K, D]
    with torch.inference_mode():
        plain = attn(query, kv, kv, None)  # [N, Q, D]
        route_in_projections(attn)
        routed = attn(query, kv, kv, None)
    assert attn.project is wide_gemm.prefill_linear and len(calls) == 3 * (forced == "fp32")
    torch.testing.assert_close(routed.float(), plain.float(), atol=2e-2, rtol=2e-2)
    fp32 = ResamplerAttention(64, 4)
    route_in_projections(fp32)
    assert fp32.project is F.linear


def test_tensors_that_need_gradients_keep_f_linear(choice) -> None:
    """The float32 path writes blocks in place, which autograd cannot follow: with gradients on,
    F.linear runs and the gradients are F.linear's."""
    choice("fp32")
    x, w, b = _case(rows=12, n=16, k=32, seed=2)
    for needs in ("x", "w"):
        xg, wg = x.clone().requires_grad_(needs == "x"), w.clone().requires_grad_(needs == "w")
        y = wide_gemm.prefill_linear(xg, wg, b)
        y.float().sum().backward()
        ref_x, ref_w = x.clone().requires_grad_(needs == "x"), w.clone().requires_grad_(needs == "w")
        F.linear(ref_x, ref_w, b).float().sum().backward()
        got, want = (xg.grad, ref_x.grad) if needs == "x" else (wg.grad, ref_w.grad)
        assert torch.equal(got, want)


def test_small_products_skip_the_probe(choice, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below MIN_MACS multiply-adds F.linear runs without probing (a tiny model pays nothing)."""
    choice(None)
    monkeypatch.setattr(wide_gemm, "MIN_MACS", 12 * 16 * 32 + 1)
    probed: list[int] = []
    monkeypatch.setattr(wide_gemm, "_best_times", lambda fns: probed.append(1) or [1.0, 0.5])
    x, w, b = _case(rows=6, n=16, k=32, seed=4)  # 12 rows x 16 x 32
    assert torch.equal(wide_gemm.prefill_linear(x, w, b), F.linear(x, w, b)) and probed == []
    monkeypatch.setattr(wide_gemm, "MIN_MACS", 12 * 16 * 32)
    wide_gemm.prefill_linear(x, w, b)
    assert probed == [1] and wide_gemm.gemm_choice() == "fp32"
