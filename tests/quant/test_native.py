"""The native CPU kernels (quant/kernels.cpp via quant/native.py): results against float64
references on awkward shapes, rows independent of the batch, the layers that use them, and the
fallbacks when they are missing, fail to build or compute wrong numbers."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicpmv.quant import linear as L
from minicpmv.quant import native
from minicpmv.quant.linear import (
    PackedLinear,
    QuantLinear,
    QuantSpec,
    chunk_rows,
    dequantize_weight,
    pack_nibbles,
    unchunk_rows,
)

OPS = native.ops()
needs_native = pytest.mark.skipif(OPS is None, reason=f"native kernels unavailable: {native.why_unavailable()}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@needs_native
@pytest.mark.parametrize("k", [32, 100, 288, 3584])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_bf16_gemv_sums_in_float32(m: int, k: int) -> None:
    g = torch.Generator().manual_seed(k + m)
    x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(37, k, generator=g).bfloat16()
    y = OPS.bf16_gemv(x, w)  # [m, 37] float32
    assert y.dtype == torch.float32 and _rel(y, x.double() @ w.double().t()) < 1e-6


needs_blocked = pytest.mark.skipif(
    OPS is None or not L.can_prepack(torch.bfloat16, "cpu"), reason="no native kernels or no oneDNN bf16"
)


@needs_blocked
@pytest.mark.parametrize("n, k", [(1, 2), (3, 1), (65, 95), (130, 97), (64 * 13 + 5, 1000), (900, 1536), (700, 1700)])
def test_bf16_blocked_gemv_gives_pytorchs_linear_bits(n: int, k: int) -> None:
    """On a weight in oneDNN's blocked layout every output is summed as PyTorch's bf16 linear sums
    a single row (oneDNN's order: one chain per 512 values of K): equal after the bf16 rounding,
    row by row, whatever the batch and wherever the rows fall among the blocks read together.
    N and K off the layout's multiples of 64 and 32 (its zero padding), K over several chains.
    (K of 64 and less: oneDNN rounds some rare outputs otherwise; the layers check each shape.)"""
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    x = torch.randn(32, k, generator=g).bfloat16()  # rows enough that another order shows in ties
    blocked = torch.ops.mkldnn._reorder_linear_weight(w, None)
    y = OPS.bf16_blocked_gemv(x, blocked)  # [32, n] float32
    assert y.dtype == torch.float32 and y.shape == (32, n)
    assert torch.equal(y.bfloat16(), torch.cat([F.linear(x[i : i + 1], w) for i in range(32)]))
    for i in (0, 5):  # batched = single
        assert torch.equal(OPS.bf16_blocked_gemv(x[i : i + 1].contiguous(), blocked), y[i : i + 1])


@needs_blocked
def test_bf16_blocked_gemv_rejects_other_weights_with_a_message() -> None:
    w = torch.randn(64, 96).bfloat16()
    with pytest.raises(RuntimeError, match="bf16_blocked_gemv: expects a 2-D bf16 oneDNN"):
        OPS.bf16_blocked_gemv(torch.randn(1, 96).bfloat16(), w)  # a plain weight
    blocked = torch.ops.mkldnn._reorder_linear_weight(w, None)
    with pytest.raises(RuntimeError, match=r"bf16_blocked_gemv: expects bf16 x \[M, 96\]"):
        OPS.bf16_blocked_gemv(torch.randn(1, 64).bfloat16(), blocked)
    with pytest.raises(RuntimeError, match="bf16_blocked_gemv: expects x"):
        OPS.bf16_blocked_gemv(torch.randn(96).bfloat16(), blocked)


@needs_native
@pytest.mark.parametrize("group, k", [(16, 48), (16, 256), (32, 96), (32, 512), (32, 1184)])  # odd group counts too
@pytest.mark.parametrize("half", [False, True])
def test_q8_gemv_matches_the_dequantized_weight(group: int, k: int, half: bool) -> None:
    g = torch.Generator().manual_seed(group + k)
    q = torch.randint(-127, 128, (29, k), generator=g, dtype=torch.int8)
    s = torch.rand(29, k // group, generator=g) / 50
    s = s.half() if half else s
    w = (q.double().view(29, -1, group) * s.double()[..., None]).view(29, k)
    for m in (1, 2, 5):
        x = torch.randn(m, k, generator=g)
        ref = x.double() @ w.t()
        got = OPS.q8_gemv(x, q, s, group) if group == 16 else OPS.q8_0_gemv(x, chunk_rows(q, s))  # GGUF's Q8_0
        assert _rel(got, ref) < 1e-4  # activations as 16-bit fixed point
        assert torch.equal(OPS.q8_dequant(q, s, group, torch.float32).double(), w.float().double())


@needs_native
@pytest.mark.parametrize("group, k", [(32, 96), (32, 256), (32, 608), (64, 192), (128, 384), (256, 512)])
@pytest.mark.parametrize("zeros", [False, True])
def test_q4_gemv_matches_the_dequantized_weight(group: int, k: int, zeros: bool) -> None:
    g = torch.Generator().manual_seed(group + k + zeros)
    q = torch.randint(0, 16, (33, k), generator=g, dtype=torch.uint8)
    s = torch.rand(33, k // group, generator=g) / 50
    z = torch.randn(33, k // group, generator=g) / 50 if zeros else None
    st = {"qweight": pack_nibbles(q), "scales": s, "zeros": z if zeros else torch.zeros_like(s)}
    w = dequantize_weight(st, QuantSpec(4, group), torch.float32)  # [33, k]
    for m in (1, 4):
        x = torch.randn(m, k, generator=g)
        assert _rel(OPS.q4_gemv(x, st["qweight"], s, z), x.double() @ w.double().t()) < 1e-4  # 16-bit activations
        if group == 32 and not zeros:  # GGUF's Q4_0: its own kernel, llama.cpp's 8-bit activations
            assert _rel(OPS.q4_0_gemv(x, chunk_rows(st["qweight"], s)), _q8_0_reference(x, q, s)) < 1e-4
        if group == 32 and zeros:  # GGUF's Q4_K: chunked with its zeros, the same bits as q4_gemv
            assert torch.equal(OPS.q4z_gemv(x, chunk_rows(st["qweight"], s, z)), OPS.q4_gemv(x, st["qweight"], s, z))
            sh, zh = s.half(), z.half()  # float16 chunks
            assert torch.equal(OPS.q4z_gemv(x, chunk_rows(st["qweight"], sh, zh)),
                               OPS.q4_gemv(x, st["qweight"], sh, zh.float()))
    assert torch.equal(OPS.q4_dequant(st["qweight"], s, z, torch.float32), w)


@pytest.mark.parametrize("groups", [1, 5, 16, 37, 112])  # a partial chunk alone, full chunks, both
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("width, zeros", [(16, False), (32, False), (16, True)])  # Q4_0, Q8_0, Q4_K
def test_chunked_rows_put_16_groups_scales_before_their_values(groups: int, dtype: torch.dtype, width: int,
                                                                 zeros: bool) -> None:
    """The native kernels' rows: per 16 groups their scales' bytes (then their zeros'), then their
    values, the last chunk with the groups it has; unchunk_rows gives the storage back exactly."""
    g = torch.Generator().manual_seed(groups)
    q = torch.randint(0, 256, (3, groups * width), generator=g, dtype=torch.uint8)
    s = (torch.rand(3, groups, generator=g) / 50).to(dtype)
    z = (torch.randn(3, groups, generator=g) / 50).to(dtype) if zeros else None
    rows = chunk_rows(q, s, z)
    fb, h = s.element_size(), 2 if zeros else 1
    assert rows.shape == (3, groups * (width + h * fb)) and rows.is_contiguous()
    first = min(16, groups)  # the first chunk: its scales, its zeros, then its values
    assert torch.equal(rows[:, : first * fb], s[:, :first].contiguous().view(torch.uint8))
    if zeros:
        assert torch.equal(rows[:, first * fb: 2 * first * fb], z[:, :first].contiguous().view(torch.uint8))
    assert torch.equal(rows[:, h * first * fb: first * (width + h * fb)], q[:, : first * width])
    back_q, back_s, back_z = unchunk_rows(rows, groups, width, fb, zeros=zeros)
    assert torch.equal(back_q, q) and back_s.dtype == dtype and torch.equal(back_s, s)
    assert (back_z is None) if z is None else torch.equal(back_z, z)


def _q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's quantize_row_q8_0 on x86: per 32 values d = amax / 127 stored as float16,
    q = round(x * (127 / amax)), ties to even. Returns (q [M, K], d [M, K/32])."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)  # torch.round: half to even
    return q.reshape(x.shape), (amax / 127).half().float().squeeze(-1)


def _q8_0_reference(x: torch.Tensor, q4: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Q4_0 x Q8_0 as llama.cpp computes it: per block, (s_w * d_x) * sum (q - 8) * xq, in float64."""
    xq, d = _q8_0(x)
    sums = torch.einsum("mgj,ngj->mng", xq.double().reshape(x.shape[0], -1, 32),
                        (q4.double() - 8).reshape(q4.shape[0], -1, 32))  # [M, N, G]
    scale = s.float().double()[None] * d.double()[:, None]  # [M, N, G]
    return (sums * scale).sum(-1)


@needs_native
@pytest.mark.parametrize("groups", [5, 16, 37])
@pytest.mark.parametrize("bits, zeros", [(4, False), (8, False), (4, True)])
@pytest.mark.parametrize("half", [False, True])
def test_chunked_rows_dequantize_as_the_storage_does(groups: int, bits: int, zeros: bool, half: bool) -> None:
    """Prefill dequantizes chunked rows in place: bit for bit what the unchunked storage gives."""
    g = torch.Generator().manual_seed(groups + bits)
    k = groups * 32
    if bits == 4:
        q = pack_nibbles(torch.randint(0, 16, (9, k), generator=g, dtype=torch.uint8))
    else:
        q = torch.randint(-127, 128, (9, k), generator=g, dtype=torch.int8)
    s = torch.rand(9, groups, generator=g) / 50
    z = torch.randn(9, groups, generator=g) / 50 if zeros else None
    s, z = (s.half(), z.half() if zeros else None) if half else (s, z)
    rows = chunk_rows(q, s, z)
    for dtype in (torch.float32, torch.bfloat16):
        zf = z.float() if zeros else None  # q4_dequant takes float32 zeros
        want = OPS.q4_dequant(q, s, zf, dtype) if bits == 4 else OPS.q8_dequant(q, s, 32, dtype)
        assert torch.equal(OPS.chunked_dequant(rows, k, bits, zeros, dtype), want)


@needs_native
@pytest.mark.parametrize("k", [32, 96, 512, 608, 3584])
def test_q4_0_weights_meet_activations_as_llama_cpp_q8_0_blocks(k: int) -> None:
    """Symmetric group-32 weights: the 8-bit activation blocks of llama.cpp (float16 scale, ties
    to even), so the sums are its sums up to float32 accumulation (1e-6), not merely close to the
    float product (about 0.5% off); an all-zero block and a NaN are carried through."""
    g = torch.Generator().manual_seed(k)
    q = torch.randint(0, 16, (21, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(21, k // 32, generator=g) / 50).half()
    x = torch.randn(3, k, generator=g)
    x[1, :32] = 0  # an all-zero block: d = 0
    rows = chunk_rows(pack_nibbles(q), s)
    got = OPS.q4_0_gemv(x, rows)
    ref = _q8_0_reference(x, q, s)
    assert _rel(got, ref) < 1e-6
    w = (q.float() - 8) * s.float().repeat_interleave(32, 1)
    assert _rel(got, x.double() @ w.double().t()) > 1e-5  # really the 8-bit path, not the float one
    assert torch.equal(OPS.q4_0_gemv(x, chunk_rows(pack_nibbles(q), s.float())), got)  # float32 scales
    x[2, 5] = float("nan")
    got = OPS.q4_0_gemv(x, rows)
    assert got[2].isnan().all() and not got[:2].isnan().any()


@needs_native
@pytest.mark.parametrize("zeros", [False, True])  # the Q8_0 path / the 16-bit path
def test_q4_gemv_rows_read_in_blocks_equal_rows_read_alone(zeros: bool) -> None:
    """On wide rows (K > 8192) the kernels read a block of weight rows per activation load (8 or 12
    here); each row's sum is the same bits as when that row is the whole weight (then read alone),
    for every remainder of a task (37 rows over two threads: a block and the rest)."""
    g = torch.Generator().manual_seed(7)
    k = 8288  # 259 groups: full and partial chunks of 16 groups, pairs and a last single group
    q = pack_nibbles(torch.randint(0, 16, (37, k), generator=g, dtype=torch.uint8))
    s = (torch.rand(37, k // 32, generator=g) / 50).half()
    z = torch.randn(37, k // 32, generator=g) / 50 if zeros else None
    if zeros:
        s = s.float()
    x = torch.randn(3, k, generator=g)
    if zeros:
        full = OPS.q4_gemv(x, q, s, z)  # [3, 37]
        alone = torch.cat([OPS.q4_gemv(x, q[r:r + 1].contiguous(), s[r:r + 1].contiguous(), z[r:r + 1].contiguous())
                           for r in range(37)], 1)
        rows = chunk_rows(q, s, z)  # GGUF's Q4_K: chunked, the same bits
        assert torch.equal(OPS.q4z_gemv(x, rows), full)
        assert torch.equal(torch.cat([OPS.q4z_gemv(x, rows[r:r + 1].contiguous()) for r in range(37)], 1), full)
    else:
        rows = chunk_rows(q, s)
        full = OPS.q4_0_gemv(x, rows)
        alone = torch.cat([OPS.q4_0_gemv(x, rows[r:r + 1].contiguous()) for r in range(37)], 1)
    assert torch.equal(full, alone)


@needs_native
@pytest.mark.parametrize("kind", ["bf16", "q8_g16", "q8_g32", "q8_channel", "q6k"])
def test_bf16_int8_and_q6k_rows_read_in_blocks_equal_rows_read_alone(kind: str) -> None:
    """The same for the bf16, int8 and Q6_K kernels (37 rows: blocks of 4, 8 or 12 and the rest of
    each task)."""
    g = torch.Generator().manual_seed(8)
    n, k = 37, 8448 if kind == "q6k" else 8288  # wide enough for the row blocks
    x = torch.randn(2, k, generator=g)
    if kind == "q6k":
        q6 = _q6k_blocks(n, k, 8)
        def run(rows: slice) -> torch.Tensor:
            return OPS.q6k_gemv(x, q6[rows].contiguous())
    elif kind == "bf16":
        w = torch.randn(n, k, generator=g).bfloat16()
        def run(rows: slice) -> torch.Tensor:
            return OPS.bf16_gemv(x.bfloat16(), w[rows].contiguous())
    else:
        group = {"q8_g16": 16, "q8_g32": 32, "q8_channel": 0}[kind]
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand((n, k // group) if group else (n,), generator=g) / 50
        chunked = chunk_rows(q, s) if group == 32 else None  # GGUF's Q8_0: its kernel's rows
        def run(rows: slice) -> torch.Tensor:
            if chunked is not None:
                return OPS.q8_0_gemv(x, chunked[rows].contiguous())
            return OPS.q8_gemv(x, q[rows].contiguous(), s[rows].contiguous(), group)
    assert torch.equal(run(slice(None)), torch.cat([run(slice(r, r + 1)) for r in range(n)], 1))


def _q6k_blocks(n: int, k: int, seed: int) -> torch.Tensor:
    """Random Q6_K rows (any bytes are valid blocks) with block scales d = 2^-7."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 256, 210), generator=g, dtype=torch.uint8)
    blocks[..., 208:210] = torch.tensor([0x00, 0x20], dtype=torch.uint8)
    return blocks.view(n, -1)


def _q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's quantize_row_q8_K: per 256 values iscale = -127 / max, max the value of the
    largest magnitude (the first on ties), q = min(127, round(iscale * x)), ties to even,
    d = 1 / iscale. Returns (q [M, K], d [M, K/256])."""
    blocks = x.float().reshape(x.shape[0], -1, 256)
    top = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))  # argmax: the first on ties
    iscale = -127.0 / top
    q = torch.round(iscale * blocks).clamp(max=127)
    return q.reshape(x.shape), (1.0 / iscale).squeeze(-1)


def _q6k_q8k_reference(x: torch.Tensor, q6: torch.Tensor) -> torch.Tensor:
    """Q6_K x Q8_K as llama.cpp computes it: per block, (d_w * d_x) * sum (w / d_w) * xq, in float64."""
    xq, d = _q8_k(x)
    w = L.dequantize_q6k(q6).double()  # [N, K]: d_w * sc * (q - 32), exact in float32
    n, k = w.shape
    d_w = q6.view(n, k // 256, 210)[..., 208:].contiguous().view(torch.float16).double()  # [N, K/256, 1]
    sums = torch.einsum("mbj,nbj->mnb", xq.double().reshape(x.shape[0], -1, 256),
                        (w.reshape(n, -1, 256) / d_w))  # [M, N, K/256]: integers
    return (sums * (d_w.squeeze(-1)[None] * d.float().double()[:, None])).sum(-1)


@needs_native
@pytest.mark.parametrize("k", [256, 768])
def test_q6k_gemv_reads_the_blocks_as_stored_with_llama_cpp_arithmetic(k: int) -> None:
    """Decode: the blocks against llama.cpp's 8-bit activation blocks (Q8_K), as llama.cpp sums
    them; prefill: a GEMM on the exactly dequantized blocks."""
    q = _q6k_blocks(21, k, k)
    w = L.dequantize_q6k(q)  # [21, k], checked against the gguf package in tests/formats
    assert torch.equal(OPS.q6k_dequant(q, k, torch.float32), w)
    assert torch.equal(OPS.q6k_dequant(q, k, torch.bfloat16), w.bfloat16())
    for m in (1, 3, 8):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        got = OPS.q6k_gemv(x, q)
        assert _rel(got, _q6k_q8k_reference(x, q)) < 1e-6
        assert 1e-4 < _rel(got, x.double() @ w.double().t()) < 2e-2  # 8-bit activations: close, not exact
    layer = QuantLinear.from_storage({"qweight": q}, QuantSpec(6, 16), 21, k, dtype=torch.float32, device="cpu")
    assert layer.kind == "q6k_native" and torch.equal(layer.storage()["qweight"], q)
    x = torch.randn(L.NATIVE_MAX_ROWS + 3, k)
    assert torch.equal(layer(x[:4]), torch.cat([layer(r[None]) for r in x[:4]]))  # rows independent of the batch
    assert _rel(layer(x), x.double() @ w.double().t()) < 1e-5  # prefill: GEMM on the dequantized blocks


@needs_native
def test_q6k_gemv_is_exact_at_the_extremes_of_weights_and_activations() -> None:
    """Largest 6-bit values (63 and 0) and block scales (127, -128) against activations at +-127 in
    8 bits: the 16-bit pair sums (vpmaddubsw saturates) and the int32 sums must not overflow, so
    the result is llama.cpp's up to float32 sums."""
    k = 512
    q = _q6k_blocks(6, k, 0).view(6, k // 256, 210)
    q[:, :, :192] = torch.tensor([255, 0, 255, 0, 255, 0], dtype=torch.uint8)[:, None, None]  # q = 63 or 0
    q[:, :, 192:208] = torch.tensor([127, 127, 128, 128, 127, 128], dtype=torch.uint8)[:, None, None]
    q = q.reshape(6, -1)
    x = torch.full((3, k), 1.5)
    x[1, ::2] = -1.5
    x[2, : k // 2] = -1.5
    assert _rel(OPS.q6k_gemv(x, q), _q6k_q8k_reference(x, q)) < 1e-6
    assert _rel(OPS.q6k_gemv(x, q), x.double() @ L.dequantize_q6k(q).double().t()) < 1e-6  # +-1.5: exact in 8 bits


@needs_native
def test_q6k_gemv_carries_nan_of_a_row_to_that_row_only() -> None:
    q = _q6k_blocks(5, 512, 1)
    x = torch.randn(3, 512)
    x[1, 300] = float("nan")
    x[2, 7] = float("inf")
    got = OPS.q6k_gemv(x, q)
    assert got[1:].isnan().all() and not got[0].isnan().any()


@needs_native
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 128), QuantSpec(8, 32), QuantSpec(8),
                                  QuantSpec(6, 16)])
def test_bf16_prefill_dequantizes_block_by_block_on_the_float32_gemm(choice, monkeypatch: pytest.MonkeyPatch,
                                                                      spec: QuantSpec) -> None:
    """bf16 prefill through the float32 GEMM (weights dequantized a few rows at a time, with a
    tail block) gives what the oneDNN GEMM on the whole dequantized weight gives, up to the order
    of float32 sums; a block of wrong rows would be far off."""
    from minicpmv.quant import wide_gemm

    g = torch.Generator().manual_seed(3)
    if spec.bits == 6:
        layer = QuantLinear.from_storage({"qweight": _q6k_blocks(37, 256, 256)}, spec, 37, 256, dtype=torch.bfloat16,
                                         device="cpu")
    else:
        layer = QuantLinear.from_float(torch.randn(37, 256, generator=g) / 16, None, spec, dtype=torch.bfloat16)
    x = torch.randn(L.NATIVE_MAX_ROWS + 5, 256, generator=g).bfloat16()
    monkeypatch.setattr(wide_gemm, "BLOCK_FLOATS", 8 * 256)  # blocks of 8 rows: 4 and a tail of 5
    monkeypatch.setattr(wide_gemm, "MIN_BLOCK_ROWS", 1)
    out = {}
    for forced in wide_gemm.CHOICES:
        choice(forced)
        out[forced] = layer(x).float()
    assert _rel(out["fp32"], out["onednn"]) < 2 ** -7  # one or two bf16 roundings apart at most


@needs_native
def test_kernels_reject_wrong_shapes_with_a_message() -> None:
    with pytest.raises(RuntimeError, match="group size must be 32, 64, 128 or 256"):
        OPS.q4_gemv(torch.randn(1, 96), torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 6), None)
    with pytest.raises(RuntimeError, match="columns"):
        OPS.bf16_gemv(torch.randn(1, 64).bfloat16(), torch.randn(4, 32).bfloat16())
    with pytest.raises(RuntimeError, match="rows of 35 bytes for K = 64"):
        OPS.q4_0_gemv(torch.randn(1, 64), torch.zeros(4, 35, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="expects x"):
        OPS.q8_0_gemv(torch.randn(1, 2, 64), torch.zeros(4, 68, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        OPS.chunked_dequant(torch.zeros(4, 36, dtype=torch.uint8), 64, 6, False, torch.float32)
    with pytest.raises(RuntimeError, match="q6k_gemv: expects x"):
        OPS.q6k_gemv(torch.randn(256), torch.zeros(4, 210, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="q4_gemv: expects x"):
        OPS.q4_gemv(torch.randn(96), torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 3), None)
    with pytest.raises(RuntimeError, match="q8_gemv: expects x"):
        OPS.q8_gemv(torch.randn(64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), 0)
    with pytest.raises(RuntimeError, match="bf16_gemv: expects x"):
        OPS.bf16_gemv(torch.randn(64).bfloat16(), torch.randn(4, 64).bfloat16())
    with pytest.raises(RuntimeError, match="K % 256 == 0"):
        OPS.q6k_gemv(torch.randn(1, 300), torch.zeros(4, 210, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="weight has 200 columns, expected 210"):
        OPS.q6k_gemv(torch.randn(1, 256), torch.zeros(4, 200, dtype=torch.uint8))


@needs_native
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 128), QuantSpec(8, 32), QuantSpec(8, 16),
                                  QuantSpec(8)])
def test_native_layers_rows_do_not_depend_on_the_batch(spec: QuantSpec) -> None:
    """Decode rows (<= NATIVE_MAX_ROWS) give each row what it gets alone, bit for bit; prefill
    (a GEMM on the dequantized weight) agrees with the reference."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(70, 256, generator=g), torch.randn(70, generator=g)
    layer = QuantLinear.from_float(w, b, spec, dtype=torch.float32)
    assert layer.kind == {4: "int4_native", 8: "int8_native" if spec.group_size else "int8c_native"}[spec.bits]
    ref = QuantLinear.from_float(w, b, spec, dtype=torch.float32, kind="dequant")
    x = torch.randn(L.NATIVE_MAX_ROWS + 4, 256, generator=g)
    rows = x[: L.NATIVE_MAX_ROWS]
    assert torch.equal(layer(rows), torch.cat([layer(r[None]) for r in rows]))
    assert _rel(layer(rows), ref(rows)) < 1e-4 and _rel(layer(x), ref(x)) < 1e-5


@needs_native
def test_per_channel_int8_needs_rows_of_32() -> None:
    w = torch.randn(16, 100)  # 100 columns: not a multiple of 32, so PyTorch's / oneDNN's kernel runs
    layer = QuantLinear.from_float(w, None, QuantSpec(8), dtype=torch.float32)
    assert layer.kind in ("int8_onednn", "int8")
    x = torch.randn(2, 100)
    ref = x.double() @ dequantize_weight(L.quantize_weight(w, QuantSpec(8)), QuantSpec(8), torch.float32).double().t()
    assert _rel(layer(x), ref) < 1e-4
    with pytest.raises(RuntimeError, match="K % 32"):
        OPS.q8_gemv(x, layer.storage()["qweight"], layer.storage()["scales"].float(), 0)


@needs_native
def test_grouped_int8_round_trips_and_symmetric_int4_drops_its_zeros() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 64, generator=g)
    spec8 = QuantSpec(8, 16)
    layer = QuantLinear.from_float(w, None, spec8, dtype=torch.float32)
    st = L.quantize_weight(w, spec8)
    assert {k: v.shape for k, v in layer.storage().items()} == {"qweight": (40, 64), "scales": (40, 4)}
    assert all(torch.equal(layer.storage()[k], st[k]) for k in st)
    q4 = {"qweight": pack_nibbles(torch.randint(0, 16, (40, 64), generator=g, dtype=torch.uint8)),
          "scales": torch.rand(40, 2, generator=g).half().float(), "zeros": torch.zeros(40, 2)}
    sym = QuantLinear(64, 40, QuantSpec(4, 32), bias=False, dtype=torch.float32, device="meta")
    sym.set_storage(q4, None, device="cpu")
    sym.prepare()
    # GGUF's Q4_0: the Q4_0 kernel's rows replace the storage, float16 scales: 0.5625 bytes per weight
    assert set(sym._buffers) == {"chunks"} and sym.chunks.shape == (40, 2 * 18)
    assert all(torch.equal(sym.storage()[k], q4[k]) for k in q4)
    asym = QuantLinear.from_float(w, None, QuantSpec(4, 32), dtype=torch.float32)  # GGUF's Q4_K-like
    assert asym.chunk_zeros and set(asym._buffers) == {"chunks"}
    st4 = L.quantize_weight(w, QuantSpec(4, 32))
    assert all(torch.equal(asym.storage()[k], st4[k]) for k in st4)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_0_layers_decode_with_llama_cpp_arithmetic_and_prefill_from_their_rows(dtype: torch.dtype) -> None:
    """A symmetric group-32 int4 layer (GGUF's Q4_0; 113 groups: full chunks and a tail, a bias):
    decode rows are llama.cpp's Q4_0 x Q8_0 sums, prefill rows multiply the dequantized weight,
    and moving the layer gives the same storage back."""
    g = torch.Generator().manual_seed(4)
    n, k = 24, 113 * 32
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, k // 32, generator=g) / 50).bfloat16().float()  # exact in bf16 and float16
    st = {"qweight": pack_nibbles(q), "scales": s, "zeros": torch.zeros_like(s)}
    bias = torch.randn(n, generator=g)
    layer = QuantLinear(k, n, QuantSpec(4, 32), bias=True, dtype=dtype, device="meta")
    layer.set_storage(st, bias, device="cpu")
    layer.prepare()
    assert "chunks" in layer._buffers
    x = torch.randn(L.NATIVE_MAX_ROWS + 3, k, generator=g).to(dtype)
    decode = layer(x[:2]).double()
    ref = _q8_0_reference(x[:2].float(), q, s) + bias.to(dtype).double()
    assert _rel(decode, ref) < (1e-6 if dtype == torch.float32 else 2**-7)
    w = (q.double() - 8) * s.double().repeat_interleave(32, 1)
    exact = x.double() @ w.t() + bias.to(dtype).double()
    assert _rel(layer(x).double(), exact) < (1e-5 if dtype == torch.float32 else 2**-7)  # prefill
    moved = layer.double()
    assert all(torch.equal(moved.storage()[key], st[key].double()) for key in ("scales", "zeros"))
    assert torch.equal(moved.storage()["qweight"], st["qweight"])


@needs_native
def test_packed_linear_runs_the_native_gemv_for_decode_rows() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(200, 48, dtype=torch.bfloat16)
    layer = PackedLinear(lin)
    assert layer.weight.layout == torch.strided  # plain, for the GEMV
    x = torch.randn(3, 200).bfloat16()
    with torch.no_grad():
        exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert _rel(layer(x), exact) < 2**-8  # one rounding of float32 sums (+ bias) to bf16
        assert torch.equal(layer(x), torch.cat([layer(r[None]) for r in x]))


def test_a_wrong_kernel_is_caught_and_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_works compares with the dequantized reference: a kernel returning wrong numbers is
    refused and the layer falls back to PyTorch's kernel."""
    if OPS is None:
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")

    class Broken:
        def __getattr__(self, name: str):
            real = getattr(OPS, name)
            return lambda *a: real(*a) * 1.1 if name.endswith("gemv") else real(*a)

    monkeypatch.setattr(native, "ops", lambda: Broken())
    L.kernel_works.cache_clear()
    try:
        assert not L.kernel_works("int4_native", "cpu", torch.float32)
        layer = QuantLinear.from_float(torch.randn(32, 64), None, QuantSpec(4, 32), dtype=torch.float32)
        assert layer.kind == "int4_cpu"
    finally:
        L.kernel_works.cache_clear()


def test_the_kernels_build_wherever_this_machine_can_build_them() -> None:
    """Every other test here skips without the kernels: a source that no longer compiles must
    fail here instead of passing as skips."""
    if native.why_unavailable() is None:
        assert OPS is not None, "kernels.cpp did not build (see the minicpmv.quant.native log)"


def test_unavailable_or_failing_builds_fall_back(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("MINICPMV_NATIVE", "0")
    assert native.why_unavailable() == "MINICPMV_NATIVE=0"
    monkeypatch.delenv("MINICPMV_NATIVE")
    if native.why_unavailable() is not None:
        return  # this machine cannot build them anyway: the case above is the fallback
    monkeypatch.setenv("MINICPMV_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    monkeypatch.setattr(native.shutil, "which", lambda name: "/bin/false")
    native.ops.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="minicpmv.quant.native"):
            assert native.ops() is None
        assert "building them failed" in caplog.text
        assert not list((tmp_path / "kernels").glob("*"))  # no half-written library left behind
    finally:
        native.ops.cache_clear()
