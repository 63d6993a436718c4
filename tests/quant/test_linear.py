"""Weight formats (quant/linear.py): QuantSpec parsing, int8/int4 QuantLinear accuracy and
storage round trips, PackedLinear (oneDNN-prepacked bf16), quantize_model on the tiny LLMs, and
the bf16 decode-attention fast path in layers.attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicpmv.errors import ConfigError, InputError
from minicpmv.modeling.layers import AttnMask, attention, build_attn_mask
from minicpmv.modeling.llm import build_backbone
from minicpmv.quant import linear as linear_mod
from minicpmv.quant.linear import (
    PackedLinear,
    QuantLinear,
    QuantSpec,
    can_prepack,
    dequantize_weight,
    kernel_works,
    pack_nibbles,
    prepack_linears,
    quant_targets,
    quantize_model,
    quantize_weight,
    unpack_nibbles,
)

FORMATS = [("int8", None, 0.012), ("int4", 32, 0.11), ("int4", 64, 0.12), ("int4", 128, 0.14)]


def _weights(n: int = 200, k: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / 16, torch.randn(n, generator=g), torch.randn(3, 5, k, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# -- the format ---------------------------------------------------------------------------------


def test_spec_parse_and_config_round_trip() -> None:
    assert QuantSpec.parse("int8") == QuantSpec(8, None, True)
    assert QuantSpec.parse("INT4") == QuantSpec(4, 128, True)
    spec = QuantSpec.parse("int4", 64, lm_head=False)
    cfg = spec.to_config()
    assert cfg == {"quant_method": "minicpmv-weight-only", "bits": 4, "group_size": 64, "modules": "llm linear"}
    assert QuantSpec.from_config(cfg) == spec


@pytest.mark.parametrize("fmt, gs, match", [
    ("int3", None, "unknown quantization 'int3'"),
    ("int8", 64, "int4 only"),
    ("int4", 48, "group size must be one of"),
])
def test_spec_rejects_bad_requests(fmt: str, gs: int | None, match: str) -> None:
    with pytest.raises(InputError, match=match):
        QuantSpec.parse(fmt, gs)


@pytest.mark.parametrize("cfg, match", [
    ({"quant_method": "awq", "bits": 4}, "'awq' is not supported"),
    ({"quant_method": "minicpmv-weight-only", "bits": 3, "modules": "llm linear"}, "bits must be 8 or 4"),
    ({"quant_method": "minicpmv-weight-only", "bits": 8, "modules": "everything"}, "modules"),
    ("int8", "must be an object"),
])
def test_spec_rejects_bad_configs(cfg: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QuantSpec.from_config(cfg)


def test_nibbles_round_trip_and_dequant_formula() -> None:
    q = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (7, 32) and torch.equal(packed[:, 0], q[:, 0] | (q[:, 1] << 4))
    assert torch.equal(unpack_nibbles(packed), q)
    w, _, _ = _weights()
    st = quantize_weight(w, QuantSpec(4, 32))
    q = unpack_nibbles(st["qweight"]).float().view(200, 8, 32)
    manual = ((q - 8) * st["scales"][..., None] + st["zeros"][..., None]).view(200, 256)
    assert torch.allclose(dequantize_weight(st, QuantSpec(4, 32), torch.float32), manual)
    st8 = quantize_weight(w, QuantSpec(8))
    assert st8["qweight"].dtype == torch.int8 and int(st8["qweight"].abs().max()) == 127
    assert torch.allclose(dequantize_weight(st8, QuantSpec(8), torch.float32), st8["qweight"] * st8["scales"][:, None])


def test_constant_rows_and_groups_are_exact() -> None:
    w = torch.zeros(16, 64)
    w[3] = 0.25
    for spec in (QuantSpec(8), QuantSpec(4, 32)):
        assert torch.equal(dequantize_weight(quantize_weight(w, spec), spec, torch.float32), w)


# -- QuantLinear --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt, gs, bound", FORMATS)
def test_quant_linear_close_to_float(fmt: str, gs: int | None, bound: float, dtype: torch.dtype) -> None:
    w, b, x = _weights()
    ref = F.linear(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float())
    spec = QuantSpec.parse(fmt, gs)
    fast = QuantLinear.from_float(w.to(dtype), b.to(dtype), spec, dtype=dtype)
    slow = QuantLinear.from_float(w.to(dtype), b.to(dtype), spec, dtype=dtype, kind="dequant")
    assert fast.kind in ("int8_onednn", "int8", "int8c_native", "int4_cpu", "int4_native") and slow.kind == "dequant"
    y = fast(x)
    assert y.shape == (3, 5, 200) and y.dtype == dtype
    assert _rel(y, ref) < bound
    assert _rel(y, slow(x)) < 0.02  # the kernel computes what the format says
    big = torch.randn(130, 256).to(dtype)  # int8: the prefill path (dequantize + GEMM)
    assert _rel(fast(big), F.linear(big.float(), w.to(dtype).float(), b.to(dtype).float())) < bound


@pytest.mark.parametrize("fmt, gs, _bound", FORMATS)
def test_state_dict_is_the_portable_storage(fmt: str, gs: int | None, _bound: float) -> None:
    w, b, _ = _weights(n=40)  # N not a multiple of 16: the int4 CPU kernel pads rows
    spec = QuantSpec.parse(fmt, gs)
    layer = QuantLinear.from_float(w, b, spec, dtype=torch.bfloat16)
    stored = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in quantize_weight(w, spec).items()}
    sd = layer.state_dict()
    assert set(sd) == {*stored, "bias"}
    for key, t in stored.items():
        assert torch.equal(sd[key], t), key
    empty = QuantLinear(256, 40, spec, bias=True, dtype=torch.bfloat16, device="meta")
    assert {k: tuple(v.shape) for k, v in empty.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_quant_linear_rejects_bad_shapes_and_use_before_prepare() -> None:
    with pytest.raises(InputError, match="does not divide the 96 input features"):
        QuantLinear(96, 32, QuantSpec(4, 64), bias=False)
    layer = QuantLinear(64, 32, QuantSpec(8), bias=False, dtype=torch.float32)
    with pytest.raises(InputError, match="before prepare"):
        layer(torch.zeros(1, 64))


# -- PackedLinear -------------------------------------------------------------------------------

needs_onednn_bf16 = pytest.mark.skipif(not can_prepack(torch.bfloat16, "cpu"), reason="no oneDNN bf16 on this CPU")


@needs_onednn_bf16
def test_packed_linear_matches_plain_linear() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 200, dtype=torch.bfloat16)
    packed = PackedLinear(lin)
    native = linear_mod._bf16_native(torch.device("cpu"))
    assert isinstance(packed, nn.Linear) and (packed.weight.layout == torch._mkldnn) is not native
    x = torch.randn(4, 7, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        step = x[:3, -1:]  # a decode step of a batch of 3 (the native GEMV's case)
        exact = F.linear(step.float(), lin.weight.float(), lin.bias.float())  # float32 sums
        assert _rel(packed(step), exact) < 2**-7  # bf16 rounding of float32 sums
        if not native:  # oneDNN's blocked kernel: bit-identical to the plain layer at batch 1
            assert torch.equal(packed(x[:1, -1:]), lin(x[:1, -1:]))
        assert _rel(packed(x), lin(x)) < 1e-2
    sd = packed.state_dict()
    assert torch.equal(sd["weight"], lin.weight) and torch.equal(sd["bias"], lin.bias)


@needs_onednn_bf16
def test_prepack_skips_fp32_and_tied_weights(tiny_config) -> None:
    llm = build_backbone(tiny_config("4.5").text).to(torch.bfloat16)
    llm.lm_head.weight = llm.model.embed_tokens.weight  # tie
    n = prepack_linears(llm)
    assert n == 7 * llm.config.num_hidden_layers and type(llm.lm_head) is nn.Linear
    assert prepack_linears(build_backbone(tiny_config("4.5").text)) == 0  # float32: untouched


# -- whole models -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.6", "4.5"])
@pytest.mark.parametrize("fmt, gs, head", [("int8", None, True), ("int4", 64, False)])
def test_quantize_model_swaps_llm_linears(tiny_config, tiny_state, version: str, fmt: str, gs, head: bool) -> None:
    llm = build_backbone(tiny_config(version).text)
    llm.load_state_dict({k[4:]: t for k, t in tiny_state(version).items() if k.startswith("llm.")})
    llm = llm.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(2, 6, llm.config.hidden_size, generator=g) * 0.5).to(torch.bfloat16)
    with torch.no_grad():
        ref = llm(emb, None, last_only=False)
        spec = quantize_model(llm, fmt, gs, lm_head=head)
        out = llm(emb, None, last_only=False)
    layers = 7 * llm.config.num_hidden_layers
    assert len(quant_targets(llm, spec)) == layers + head
    assert sum(isinstance(m, QuantLinear) for m in llm.modules()) == layers + head
    assert isinstance(llm.lm_head, QuantLinear) == head
    assert type(llm.model.embed_tokens) is nn.Embedding
    assert _rel(out, ref) < (0.05 if fmt == "int8" else 0.3)
    with pytest.raises(InputError, match="already quantized"):
        quantize_model(llm, fmt, gs, lm_head=head)


# -- decode attention fast path -------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_decode_attention_fold_matches_gqa(padded: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 16, generator=g)  # [B, nh, 1, hd]
    k, v = torch.randn(2, 2, 30, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g)
    key_mask = torch.ones(2, 30, dtype=torch.long)
    if padded:
        key_mask[0, :7] = 0
    mask = build_attn_mask(key_mask, 1, 29, torch.float32, q.device)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                         attn_mask=mask.mask)
    assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.mask, enable_gqa=True))  # fp32: the plain call, unchanged
    bmask = build_attn_mask(key_mask, 1, 29, torch.bfloat16, q.device)
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bmask)
    assert got.shape == (2, 8, 1, 16) and got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 2e-2
    assert AttnMask(None, False).mask is None


def test_int8_kernel_gets_aligned_weights() -> None:
    w, _, x = _weights()
    spec = QuantSpec(8)
    st = quantize_weight(w, spec)
    raw = torch.empty(st["qweight"].numel() + 1, dtype=torch.int8)
    odd = raw[1:].view(st["qweight"].shape)  # an odd address, as a tensor inside a mapped file can be
    odd.copy_(st["qweight"])
    layer = QuantLinear(256, 200, spec, bias=False, dtype=torch.float32, device="meta")
    layer.set_storage({"qweight": odd, "scales": st["scales"]}, None, device="cpu")
    layer.prepare("int8")
    assert layer.qweight.data_ptr() % 64 == 0 and torch.equal(layer.qweight, st["qweight"])
    assert _rel(layer(x), F.linear(x, w)) < 0.012


# -- the oneDNN int8 path (16-bit fixed-point activations) -------------------------------------

needs_onednn_int8 = pytest.mark.skipif(not kernel_works("int8_onednn", "cpu", torch.float32),
                                       reason="no oneDNN int8 matmul in this PyTorch build")


def _int8_pair(n: int = 200, k: int = 256, dtype: torch.dtype = torch.float32) -> tuple[QuantLinear, QuantLinear]:
    w, b, _ = _weights(n, k)
    spec = QuantSpec(8)
    fast = QuantLinear.from_float(w.to(dtype), b.to(dtype), spec, dtype=dtype, kind="int8_onednn")
    return fast, QuantLinear.from_float(w.to(dtype), b.to(dtype), spec, dtype=dtype, kind="dequant")


@needs_onednn_int8
def test_onednn_int8_is_the_cpu_default_without_native_kernels_and_exact_on_fixed_point_inputs() -> None:
    fast, slow = _int8_pair()
    default = QuantLinear.from_float(torch.randn(32, 64), None, QuantSpec(8), dtype=torch.float32).kind
    assert default == ("int8c_native" if linear_mod.native_kernels_apply(QuantSpec(8), "cpu") else "int8_onednn")
    # rows whose entries are multiples of 2**(e-15) (|x| < 2**e) are represented exactly: the
    # integer sums come back exact, so the result is the dequantized matmul up to float32 rounding
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-32767, 32768, (6, 256), generator=g).float() * 2.0**-15  # |x| < 1: step 2**-15
    x[:, 0] = 0.75  # a row maximum in [0.5, 1): e = 0
    ref = F.linear(x.double(), dequantize_weight(slow.storage(), slow.spec, torch.float64), slow.bias.double())
    assert float((fast(x).double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@needs_onednn_int8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_onednn_int8_outliers_zeros_and_batch_independence(dtype: torch.dtype) -> None:
    fast, slow = _int8_pair(dtype=dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 256, generator=g)
    x[:, 5] *= 300.0  # an outlier channel: the other entries keep ~2**15 / 300 levels
    x[3] = 0.0  # an all-zero row
    x[4] *= 1e-30  # a tiny row: the fixed-point step follows the row's own magnitude
    x = x.to(dtype)
    y = fast(x)
    assert y.dtype == dtype and y.shape == (7, 200)
    want = slow(x).float()
    tol = 4e-3 if dtype == torch.bfloat16 else 1e-3  # fp32: the 16-bit activations dominate (~2e-4)
    for row in range(7):
        assert _rel(y[row], want[row]) < tol, row
        assert torch.equal(fast(x[row : row + 1]), y[row : row + 1])  # batched == single, bit for bit
    assert torch.equal(y[3], fast.bias)
    assert fast(x[:0]).shape == (0, 200)


@needs_onednn_int8
def test_onednn_int8_storage_round_trips_and_rejects_nothing_it_accepts() -> None:
    fast, slow = _int8_pair(n=40, k=96)  # small, not multiples of 16 / 64
    st = fast.storage()
    assert torch.equal(st["qweight"], slow.storage()["qweight"]) and torch.equal(st["scales"], slow.scales)
    assert not hasattr(fast, "qweight") or "qweight" not in fast._buffers  # the packed copy replaces it
    again = QuantLinear(96, 40, QuantSpec(8), bias=True, dtype=torch.float32, device="meta")
    again.load_state_dict(fast.state_dict(), assign=True)
    again.prepare(fast.kind)
    x = torch.randn(2, 96)
    assert torch.equal(again(x), fast(x))


def test_int8_falls_back_to_the_pytorch_kernel_without_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    import minicpmv.quant.linear as quant

    monkeypatch.setattr(quant, "_has_onednn_int8", lambda: False)
    monkeypatch.setattr(quant.native, "ops", lambda: None)  # and no native kernels either
    w, _, x = _weights()
    layer = QuantLinear.from_float(w, None, QuantSpec(8), dtype=torch.float32)
    assert layer.kind == "int8"
    assert _rel(layer(x), F.linear(x, w)) < 0.012


@pytest.mark.parametrize("fmt, gs", [("int8", None), ("int4", 32)])
def test_quant_linear_moves_and_casts_through_its_storage(fmt: str, gs: int | None) -> None:
    w, b, x = _weights()
    layer = QuantLinear.from_float(w.bfloat16(), b.bfloat16(), QuantSpec.parse(fmt, gs), dtype=torch.bfloat16)
    before, stored = layer(x.bfloat16()), {k: v.clone() for k, v in layer.storage().items()}
    assert layer.float() is layer and layer.dtype == torch.float32 and layer.kind is not None
    y = layer(x)
    assert y.dtype == torch.float32
    ref = F.linear(x, dequantize_weight(layer.storage(), layer.spec, torch.float32), layer.bias)
    assert _rel(y, ref) < (1e-3 if fmt == "int8" else 5e-3)  # same weights; int4's kernel takes bf16 activations
    for key, t in layer.storage().items():
        assert torch.equal(t.float(), stored[key].float()), key
    layer.to(torch.bfloat16)
    assert torch.equal(layer(x.bfloat16()), before)  # back where it started, bit for bit
    assert layer.to("cpu") is layer and torch.equal(layer(x.bfloat16()), before)


def test_int4_with_float32_activations_runs_the_bf16_kernel() -> None:
    w, b, x = _weights()
    spec = QuantSpec(4, 32)
    fast = QuantLinear.from_float(w, b, spec, dtype=torch.float32, kind="int4_cpu")
    slow = QuantLinear.from_float(w, b, spec, dtype=torch.float32, kind="dequant")
    assert fast.kind == "int4_cpu" and fast.scales_zeros_compute.dtype == torch.bfloat16
    y = fast(x)
    assert y.dtype == torch.float32 and _rel(y, slow(x)) < 5e-3
    for key, t in slow.storage().items():  # the storage keeps float32 scales and zeros
        assert torch.equal(fast.storage()[key], t), key


def test_unprepared_quant_linear_casts_its_buffers() -> None:
    layer = QuantLinear(64, 32, QuantSpec(8), bias=True, dtype=torch.bfloat16, device="cpu").float()
    assert layer.dtype == torch.float32 and layer.scales.dtype == torch.float32 and layer.bias.dtype == torch.float32
    assert layer.qweight.dtype == torch.int8 and layer.kind is None


@needs_onednn_bf16
@pytest.mark.skipif(not linear_mod._bf16_native(torch.device("cpu")), reason="no native bf16 GEMV here")
@pytest.mark.parametrize("n, k", [(1024, 1024), (640, 1700)])  # 2^20 weights and more
def test_large_decoding_weight_is_blocked_and_keeps_pytorchs_bits(monkeypatch: pytest.MonkeyPatch, n: int,
                                                                   k: int) -> None:
    """Where oneDNN's GEMM is the faster prefill GEMM, a large weight of a decoding layer is held
    blocked: decode steps (the native blocked GEMV) give ``F.linear``'s bits row by row and batched
    equal to single, prefill rows too (oneDNN's GEMM without its per-call reorder); ``state_dict``
    gives the plain weight back. Where the float32 GEMM wins, the weight stays plain."""
    from minicpmv.quant import wide_gemm

    def packed_for(choice: str) -> PackedLinear:
        monkeypatch.setenv("MINICPMV_BF16_GEMM", choice)
        wide_gemm.gemm_choice.cache_clear()
        try:
            return PackedLinear(lin)
        finally:
            wide_gemm.gemm_choice.cache_clear()

    torch.manual_seed(n)
    lin = nn.Linear(k, n, dtype=torch.bfloat16)
    assert packed_for("fp32").weight.layout == torch.strided
    packed = packed_for("onednn")
    assert packed.weight.layout == torch._mkldnn
    x, prompt = torch.randn(5, k, dtype=torch.bfloat16), torch.randn(1, 16, k, dtype=torch.bfloat16)
    with torch.no_grad():
        steps = [packed(x[i : i + 1]) for i in range(5)]  # with the layer's bias
        assert all(torch.equal(s, lin(x[i : i + 1])) for i, s in enumerate(steps))
        assert torch.equal(packed(x), torch.cat(steps))
        assert torch.equal(packed(prompt), lin(prompt))
    assert torch.equal(packed.state_dict()["weight"], lin.weight)


@needs_onednn_bf16
@pytest.mark.skipif(not linear_mod._bf16_native(torch.device("cpu")), reason="no native bf16 GEMV here")
def test_weight_stays_plain_where_the_blocked_gemv_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocked GEMV off on one output of one row (as another summation order is, on a rare
    tie) fails the shape's check: weights of that shape stay plain (the plain GEMV)."""
    from minicpmv.quant import native, wide_gemm

    real = native.ops()

    class OneOff:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def bf16_blocked_gemv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            y = real.bf16_blocked_gemv(x, w)
            y[-1, -1] += 0.05 * (1 + y[-1, -1].abs())  # the last output of the last row
            return y

    monkeypatch.setattr(native, "ops", lambda: OneOff())
    monkeypatch.setattr(linear_mod, "_BLOCKED_CHECKED", {})
    monkeypatch.setenv("MINICPMV_BF16_GEMM", "onednn")
    wide_gemm.gemm_choice.cache_clear()
    try:
        lin = nn.Linear(1024, 1100, dtype=torch.bfloat16)
        packed = PackedLinear(lin)
    finally:
        wide_gemm.gemm_choice.cache_clear()
    assert packed.weight.layout == torch.strided and linear_mod._BLOCKED_CHECKED == {(1100, 1024): False}
    x = torch.randn(2, 1024, dtype=torch.bfloat16)
    with torch.no_grad():
        assert _rel(packed(x), F.linear(x.float(), lin.weight.float(), lin.bias.float())) < 2**-7


@needs_onednn_bf16
def test_packed_linear_unpacks_when_cast_and_packs_again() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, dtype=torch.bfloat16)
    packed = PackedLinear(lin)
    x = torch.randn(3, 256)
    before = packed(x.bfloat16())
    packed.float()
    assert packed.weight.layout == torch.strided and packed.weight.dtype == torch.float32
    assert torch.equal(packed(x), F.linear(x, lin.weight.float(), lin.bias.float()))
    packed.to(torch.bfloat16)
    blocked = not linear_mod._bf16_native(torch.device("cpu"))  # else plain, for the native GEMV
    assert (packed.weight.layout == torch._mkldnn) is blocked and torch.equal(packed(x.bfloat16()), before)
    assert torch.equal(packed.state_dict()["weight"], lin.weight)
