"""Weight formats for fast LLM inference: prepacked bf16 and weight-only int8 / int4 linears.

* ``PackedLinear``: a bf16 ``nn.Linear`` whose weight is reordered once into oneDNN's blocked
  layout (CPU only). At batch 1 PyTorch's plain bf16 GEMV reads weights at about 40-60% of the
  memory bandwidth; the prepacked oneDNN kernel streams them at close to 100% (results equal up
  to bf16 rounding; bit-identical at batch 1 in our checks). ``prepack_linears(module)`` swaps
  every ``nn.Linear`` of a module in place.
* ``QuantLinear``: a linear layer with weight-only quantized weights, run by PyTorch's own
  packed-weight kernels where they exist, and by dequantize-then-``F.linear`` elsewhere. Each
  kernel is checked once per (device, dtype) against the dequantized reference before it is used:

  - int8 on CPU (``int8_onednn``): oneDNN's prepacked u8 x s8 matmul
    (``torch.ops.onednn.qlinear_*``), which streams int8 weights at about the speed the bf16
    kernel streams bf16 ones. The activations enter it as 16-bit fixed point per row, split into
    two u8 digits (two matmul rows per input row, one pass over the weights) and recombined
    exactly in integers: entries within 2^8 of their row's largest magnitude are represented
    exactly, smaller ones to 2^-15 of that magnitude (finer than bf16 rounding for all but
    entries under 1/128 of the row's maximum). Every row is computed on its own, so results do
    not depend on the batch. Fallback: ``torch._weight_int8pack_mm`` (``int8``, also CUDA).
  - int4: ``torch._weight_int4pack_mm_for_cpu`` / ``torch._weight_int4pack_mm`` (CUDA). On a CPU,
    float32 activations are rounded to bf16 for the kernel (its float32 path is ~50x slower).
* ``quantize_model(model, "int8" | "int4", group_size)`` swaps the LLM's linear layers of a model
  for ``QuantLinear`` (the decoder layers' projections, and ``lm_head`` unless told otherwise).

Portable storage format (what quantized checkpoints hold; packed for a kernel at load time), for a
weight ``w`` of shape [N, K] (out, in):

* int8 (per output channel, symmetric): ``qweight`` int8 [N, K] in [-127, 127], ``scales`` [N];
  ``w[n, k] = qweight[n, k] * scales[n]``.
* int4 (groups of ``g`` input columns, asymmetric min/max): ``qweight`` uint8 [N, K/2] holding
  q in [0, 15], even k in the low nibble and odd k in the high nibble; ``scales``, ``zeros``
  [N, K/g]; ``w[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g]``.

Embeddings, norms, the vision tower and the resampler are never quantized. This module does not
read or write files (see ``quant/load_plan.py`` and ``formats/quantized.py``) and does not decide when packing applies
(``api.load`` does).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from . import native
from .wide_gemm import gemm_choice, prefill_linear, prefill_linear_rows

log = logging.getLogger(__name__)

QUANT_METHOD = "minicpmv-weight-only"
FORMATS = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept (CPU and CUDA)
Q6K_WEIGHTS, Q6K_BYTES = 256, 210  # GGML's Q6_K block
INT8_GROUP_SIZES = (16, 32)  # grouped int8: GGUF's Q6_K (16) and Q8_0 (32) blocks, held exactly
NATIVE_MAX_ROWS = 8  # native kernels: up to this many rows per call (decoding); more = prefill
DEFAULT_GROUP_SIZE = 128
MODULES_LINEAR = "llm linear"
MODULES_WITH_HEAD = "llm linear + lm_head"
_ROW_CHUNK = 4096  # rows quantized / packed at a time (multiple of 64: int4 CPU packing blocks)
_DEQUANT_MIN_ROWS = 96  # int8 kernel on CPU: from this many rows on, dequantize + GEMM beats the GEMV
_ACT_FRAC_BITS = 15  # int8_onednn: activations as round(x / 2**(e - 15)) with |x| < 2**e, 16-bit signed
_DIGIT_ZERO = 128  # int8_onednn: zero point of the u8 activation digits
# int4 on CPU with float32 activations: PyTorch's float32 path of the kernel is ~50x slower than its
# bf16 one, so activations are rounded to bf16 for the kernel (an error far below int4's own)
_INT4_COMPUTE = {("int4_cpu", torch.float32): torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """A weight-only format: ``bits`` 8 or 4, ``group_size`` (int4 only) and whether ``lm_head``
    is quantized too (never when it is tied to the embeddings)."""

    bits: int
    group_size: int | None = None
    lm_head: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (8, 4, 6):
            raise InputError(f"quantization bits must be 8 or 4, got {self.bits!r}")
        if self.bits == 6 and self.group_size != 16:  # GGML's Q6_K, read from GGUF files only
            raise InputError(f"6-bit storage is GGML's Q6_K (groups of 16), got group size {self.group_size!r}")
        if self.bits == 8 and self.group_size not in (None, *INT8_GROUP_SIZES):
            raise InputError(f"int8 is quantized per output channel or in groups of {list(INT8_GROUP_SIZES)}; "
                             f"got group size {self.group_size!r}")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise InputError(f"int4 group size must be one of {list(GROUP_SIZES)}, got {self.group_size!r}")

    @property
    def name(self) -> str:
        return "q6_k" if self.bits == 6 else f"int{self.bits}"

    def describe(self) -> str:
        group = f", group size {self.group_size}" if self.group_size else ""
        return f"{self.name}{group}, {self.modules}"

    @property
    def modules(self) -> str:
        return MODULES_WITH_HEAD if self.lm_head else MODULES_LINEAR

    @classmethod
    def parse(cls, fmt: str, group_size: int | None = None, *, lm_head: bool = True) -> QuantSpec:
        """``"int8"`` / ``"int4"`` (+ group size, default 128 for int4) -> spec; InputError otherwise."""
        bits = FORMATS.get(str(fmt).lower()) if isinstance(fmt, str) else None
        if bits is None:
            raise InputError(f"unknown quantization {fmt!r}; use one of {sorted(FORMATS)}")
        if bits == 4 and group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        if bits == 8 and group_size is not None:
            raise InputError(f"--group-size / group_size applies to int4 only (got {group_size} for int8)")
        return cls(bits, group_size, lm_head)

    @classmethod
    def of_storage(cls, storage: dict[str, torch.Tensor], in_features: int, *, lm_head: bool = True) -> QuantSpec:
        """The spec whose layout ``storage`` is: Q6_K blocks (no scales), int8 (int8 values, group
        size from the scales' width; one scale per row: per channel) or int4."""
        scales = storage.get("scales")
        if scales is None:
            return cls(6, 16, lm_head)
        group = None if scales.dim() == 1 else in_features // int(scales.shape[1])
        return cls(8 if storage["qweight"].dtype == torch.int8 else 4, group, lm_head)

    def to_config(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""
        return {"quant_method": QUANT_METHOD, "bits": self.bits, "group_size": self.group_size,
                "modules": self.modules}

    @classmethod
    def from_config(cls, d: Any) -> QuantSpec:
        """Parse config.json's ``quantization_config``; ConfigError names what is wrong."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: quantization_config must be an object, got {d!r}")
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise ConfigError(
                f"config.json: quantization method {method!r} is not supported; minicpmv loads "
                f"{QUANT_METHOD!r} checkpoints (written by `minicpmv quantize`). Load the original "
                "bf16 checkpoint instead, optionally with quantize='int8' or 'int4'"
            )
        modules = d.get("modules")
        if modules not in (MODULES_LINEAR, MODULES_WITH_HEAD):
            raise ConfigError(
                f"config.json: quantization_config.modules {modules!r} is not one of "
                f"{MODULES_LINEAR!r}, {MODULES_WITH_HEAD!r}"
            )
        try:
            return cls(int(d.get("bits")), d.get("group_size"), modules == MODULES_WITH_HEAD)
        except (InputError, TypeError, ValueError) as e:
            raise ConfigError(f"config.json: invalid quantization_config {d}: {e}") from e


StorageShapes = dict[str, tuple[tuple[int, ...], torch.dtype | None]]


def storage_shapes(spec: QuantSpec, out_features: int, in_features: int) -> StorageShapes:
    """Shape and dtype (None = floating, stored in any float dtype) of each storage tensor."""
    n, k = out_features, in_features
    if spec.bits == 6:  # GGML's Q6_K blocks as stored: 210 bytes per 256 weights
        return {"qweight": ((n, k // Q6K_WEIGHTS * Q6K_BYTES), torch.uint8)}
    if spec.bits == 8:
        scales = (n,) if spec.group_size is None else (n, k // spec.group_size)
        return {"qweight": ((n, k), torch.int8), "scales": (scales, None)}
    g = k // spec.group_size  # type: ignore[operator]
    return {"qweight": ((n, k // 2), torch.uint8), "scales": ((n, g), None), "zeros": ((n, g), None)}


def check_quantizable(name: str, linear_in: int, spec: QuantSpec) -> None:
    """InputError if ``spec`` cannot represent a layer with ``linear_in`` input features."""
    if spec.bits == 6 and linear_in % Q6K_WEIGHTS:
        raise InputError(f"Q6_K needs input features in multiples of {Q6K_WEIGHTS}; {name} has {linear_in}")
    if spec.bits == 8 and spec.group_size and linear_in % spec.group_size:
        raise InputError(f"int8 group size {spec.group_size} does not divide the {linear_in} input features of {name}")
    if spec.bits == 4 and linear_in % spec.group_size:  # type: ignore[operator]
        fits = [g for g in GROUP_SIZES if linear_in % g == 0]
        raise InputError(
            f"int4 group size {spec.group_size} does not divide the {linear_in} input features of "
            f"{name}; use one of {fits or 'none: this model cannot be quantized to int4'}"
        )


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize (storage format)
# ---------------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Float weight [N, K] -> storage tensors (CPU; float32 scales/zeros), ``_ROW_CHUNK`` rows at a time."""
    if spec.bits == 6:
        raise InputError("Q6_K layers come only from GGUF files; quantize to int8 or int4 instead")
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, weight.shape[0], _ROW_CHUNK):
        w = weight[start : start + _ROW_CHUNK].detach().to(device="cpu", dtype=torch.float32)  # [n, K]
        chunk = _quantize8(w, spec.group_size) if spec.bits == 8 else _quantize4(w, spec.group_size)  # type: ignore[arg-type]
        for key, t in chunk.items():
            parts.setdefault(key, []).append(t)
    return {key: torch.cat(ts) for key, ts in parts.items()}


def _quantize8(w: torch.Tensor, group_size: int | None = None) -> dict[str, torch.Tensor]:
    n, k = w.shape
    wg = w.view(n, 1 if group_size is None else k // group_size, -1)  # [n, G, g]
    amax = wg.abs().amax(dim=-1)  # [n, G]
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wg / scales[..., None]).clamp_(-127, 127).to(torch.int8).view(n, k)  # [n, K]
    return {"qweight": q, "scales": scales[:, 0] if group_size is None else scales}


def _quantize4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    n, k = w.shape
    wg = w.view(n, k // group_size, group_size)  # [n, G, g]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [n, G]
    scales = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(lo))
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)
    return {"qweight": pack_nibbles(q), "scales": scales, "zeros": lo + 8.0 * scales}


def dequantize_q6k(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/256*210] Q6_K rows -> float32 [N, K]: w = d * sc * (q - 32) (see kernels.cpp)."""
    n = blocks.shape[0]
    b = blocks.reshape(-1, Q6K_BYTES)  # [B, 210]
    ql, qh = b[:, :128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)  # per half
    low = torch.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)  # [B, 2, 4, 32]
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).float().reshape(-1, 16, 16) - 32.0  # [B, 16 groups, 16]
    d = b[:, 208:210].contiguous().view(torch.float16).float()  # [B, 1]
    scales = d * b[:, 192:208].contiguous().view(torch.int8).float()  # [B, 16], exact
    return (q * scales[..., None]).reshape(n, -1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K/2], even k in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] values 0..15 (inverse of ``pack_nibbles``)."""
    return torch.stack([p & 15, p >> 4], dim=-1).view(p.shape[0], -1)


CHUNK_GROUPS = 16  # groups of 32 weights per chunk of the Q8_0 / Q4_0 / Q4_K kernels' rows


def chunk_rows(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped weights as the native Q8_0 / Q4_0 / Q4_K kernels read them: ``values`` [N, G * b]
    (b bytes a group: int8 32, nibble pairs 16), float16 or float32 ``scales`` [N, G] and optional
    ``zeros`` of the same type -> uint8 rows [N, G * (b + float bytes)], per 16 groups their
    scales' bytes, their zeros' bytes, then their values (the last chunk of a row with the groups
    it has). One stream per row instead of two or three; ``unchunk_rows`` inverts it."""
    n, groups = scales.shape
    floats = [scales] if zeros is None else [scales, zeros]
    heads = [f.contiguous().view(torch.uint8).view(n, groups, -1) for f in floats]  # [N, G, bytes], little-endian
    v = values.contiguous().view(torch.uint8).view(n, groups, -1)  # [N, G, b]
    full = groups - groups % CHUNK_GROUPS
    parts = []
    if full:
        c = full // CHUNK_GROUPS
        per = [t[:, :full].reshape(n, c, -1) for t in (*heads, v)]
        parts.append(torch.cat(per, 2).view(n, -1))  # [N, c * chunk]
    if groups > full:
        parts += [t[:, full:].reshape(n, -1) for t in (*heads, v)]
    return torch.cat(parts, 1)  # [N, G * (b + float bytes)]


def unchunk_rows(rows: torch.Tensor, groups: int, group_bytes: int, float_bytes: int, *, zeros: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of ``chunk_rows``: (values uint8 [N, G * group_bytes], scales [N, G], zeros or None);
    ``float_bytes`` 2 (float16) or 4 (float32)."""
    n, b, fb = rows.shape[0], group_bytes, float_bytes
    h = 2 if zeros else 1
    full = groups - groups % CHUNK_GROUPS
    per = b + h * fb  # bytes a group
    chunks = rows[:, : full * per].reshape(n, full // CHUNK_GROUPS, CHUNK_GROUPS * per)  # [N, c, chunk]
    tail = rows[:, full * per:]  # [N, rest * per]
    rest = groups - full
    cuts = [CHUNK_GROUPS * fb * i for i in range(h + 1)]  # header boundaries within a full chunk
    tcuts = [rest * fb * i for i in range(h + 1)]
    dtype = torch.float16 if fb == 2 else torch.float32
    floats = [torch.cat([chunks[..., cuts[i]:cuts[i + 1]].reshape(n, -1), tail[:, tcuts[i]:tcuts[i + 1]]], 1)
              .contiguous().view(dtype) for i in range(h)]  # each [N, G]
    v = torch.cat([chunks[..., cuts[h]:].reshape(n, -1), tail[:, tcuts[h]:]], 1)  # [N, G*b]
    return v, floats[0], (floats[1] if zeros else None)


def dequantize_weight(storage: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """Storage tensors -> weight [N, K] in ``dtype`` (computed in float32)."""
    if spec.bits == 6:
        return dequantize_q6k(storage["qweight"]).to(dtype)
    scales = storage["scales"].float()
    if spec.bits == 8:
        q = storage["qweight"].float()  # [N, K]
        if spec.group_size is None:
            return (q * scales[:, None]).to(dtype)
        n, k = q.shape
        return (q.view(n, k // spec.group_size, -1) * scales[..., None]).view(n, k).to(dtype)
    q = unpack_nibbles(storage["qweight"]).float()  # [N, K]
    n, k = q.shape
    g = spec.group_size
    w = (q.view(n, k // g, g) - 8.0) * scales[..., None] + storage["zeros"].float()[..., None]  # type: ignore[operator]
    return w.view(n, k).to(dtype)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _int4_inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def _pack_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Storage -> (packed weight, scales_and_zeros [G, N', 2]) for the ``kind`` int4 kernel; N is
    padded with zero rows to a multiple of 16 (N' >= N), as both kernels need."""
    n, half = qweight.shape
    pad = (-n) % 16
    sz = torch.stack([scales, zeros], dim=-1)  # [N, G, 2]
    if pad:
        sz = torch.cat([sz, sz.new_zeros(pad, *sz.shape[1:])])
        qweight = torch.cat([qweight, qweight.new_zeros(pad, half)])
    sz = sz.transpose(0, 1).contiguous()  # [G, N', 2]
    if kind == "int4_cpu":
        packed = torch.cat([
            torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qweight[s : s + _ROW_CHUNK]).to(torch.int32), 1)
            for s in range(0, qweight.shape[0], _ROW_CHUNK)
        ])  # [N', K/2] in the kernel's blocked layout
    else:  # CUDA tinygemm wants the even k in the high nibble
        swapped = ((qweight & 15) << 4) | (qweight >> 4)
        packed = torch._convert_weight_to_int4pack(swapped.contiguous(), _int4_inner_k_tiles(2 * half))
    return packed, sz


def _int4_matmul(kind: str, x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    if kind == "int4_cpu":
        return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)  # [M, N']
    return torch._weight_int4pack_mm(x, packed, group_size, sz)  # [M, N]


@functools.cache
def kernel_works(kind: str, device: str, dtype: torch.dtype) -> bool:
    """Whether the ``kind`` kernel runs on ``device`` / ``dtype`` and matches the dequantized
    reference on a small random layer (checked once; a failure logs why and falls back)."""
    g = torch.Generator().manual_seed(0)
    n, k = 96, 256
    w = torch.randn(n, k, generator=g)
    x = torch.randn(3, k, generator=g).to(device=device, dtype=dtype)
    spec = {"int8_native": QuantSpec(8, 32), "q6k_native": QuantSpec(6, 16)}.get(
        kind, QuantSpec(8) if kind.startswith("int8") else QuantSpec(4, 32))
    if spec.bits == 6:  # any bytes are valid Q6_K blocks; keep the block scales d small
        blocks = torch.randint(0, 256, (n, k // Q6K_WEIGHTS, Q6K_BYTES), generator=g, dtype=torch.uint8)
        blocks[..., 208:210] = torch.tensor([0x00, 0x20], dtype=torch.uint8)  # d = 2^-7
        storage = {"qweight": blocks.view(n, -1)}
    else:
        storage = quantize_weight(w, spec)
    cases = [(storage, spec)]
    if kind == "int4_native":  # each int4 kernel: group 32 with zeros (Q4_K), without (Q4_0), group 128
        cases += [({**storage, "zeros": torch.zeros_like(storage["zeros"])}, spec),
                  (quantize_weight(w, QuantSpec(4, 128)), QuantSpec(4, 128))]
    try:
        err, top = 0.0, 0.0
        for st, sp in cases:
            ref = QuantLinear.from_storage(st, sp, n, k, dtype=dtype, device=device, kind="dequant")(x).float()
            fast = QuantLinear.from_storage(st, sp, n, k, dtype=dtype, device=device, kind=kind)
            err, top = max(err, float((fast(x).float() - ref).abs().max())), max(top, float(ref.abs().max()))
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        log.info("%s kernel unavailable on %s/%s (%s); using dequantize + F.linear", kind, device, dtype, e)
        return False
    ok = err <= 2e-2 * top + 1e-3
    if not ok:
        log.warning("%s kernel on %s/%s disagrees with the reference (max err %.3g); not used",
                    kind, device, dtype, err)
    return ok


def _kernel_for(spec: QuantSpec, device: torch.device, dtype: torch.dtype) -> str:
    """The first kernel that works for ``spec`` on ``device`` / ``dtype``, else ``"dequant"``."""
    if device.type not in ("cpu", "cuda"):
        return "dequant"
    if native_kernels_apply(spec, device):
        return _native_kind(spec)
    bits = spec.bits
    if bits == 6 or (bits == 8 and spec.group_size is not None):
        return "dequant"
    if bits == 8:
        wants = ["int8_onednn", "int8"] if device.type == "cpu" and _has_onednn_int8() else ["int8"]
    else:
        wants = ["int4_cpu" if device.type == "cpu" else "int4_cuda"]
    return next((k for k in wants if kernel_works(k, str(device), dtype)), "dequant")


def native_kernels_apply(spec: QuantSpec, device: torch.device | str) -> bool:
    """Whether this package's own CPU kernels (``quant/native.py``) run layers of ``spec`` here
    (int4, int8 per channel or grouped, Q6_K): on a CPU where they build and pass their check."""
    return (torch.device(device).type == "cpu" and native.ops() is not None
            and kernel_works(_native_kind(spec), "cpu", torch.float32))


_NATIVE_KINDS = ("int4_native", "int8_native", "int8c_native", "q6k_native")


def _native_kind(spec: QuantSpec) -> str:
    if spec.bits == 8:
        return "int8_native" if spec.group_size else "int8c_native"  # grouped / per channel
    return "int4_native" if spec.bits == 4 else "q6k_native"


def _has_onednn_int8() -> bool:
    onednn = getattr(torch.ops, "onednn", None)
    return (torch.backends.mkldnn.is_available() and onednn is not None and sys.byteorder == "little"
            and hasattr(onednn, "qlinear_prepack") and hasattr(onednn, "qlinear_pointwise"))


def _onednn_qlinear(digits: torch.Tensor, zero: int, layer: QuantLinear, w_scales: torch.Tensor) -> torch.Tensor:
    """oneDNN u8 x s8 matmul: ``w_scales[n] * sum_k (digits[m, k] - zero) * q[n, k]``, float32 [M, N]
    (int32 accumulation: |sum| <= 128 * 127 * K, fine for K < 132k)."""
    return torch.ops.onednn.qlinear_pointwise(
        digits, 1.0, zero, layer.packed, w_scales, layer.zero_points, None, 1.0, 0,
        torch.float32, "none", [], "")


def _int8_onednn_matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scales).T`` for x [M, K] with 16-bit fixed-point rows (see the module docstring)."""
    m, k = x.shape
    xf = x.float()
    exp = torch.frexp(xf.abs().amax(dim=1, keepdim=True)).exponent  # [M, 1]: row max < 2**exp
    step = torch.exp2((exp - _ACT_FRAC_BITS).float())  # [M, 1], a power of two
    limit = 2**_ACT_FRAC_BITS - 1
    xq = (xf / step).round_().clamp_(-limit, limit).to(torch.int32).add_(limit + 1)  # [M, K] in [1, 2**16)
    # little-endian bytes 0 and 1 of xq are its two base-256 digits: [2M, K], low digits first
    digits = xq.view(torch.uint8).view(m, k, 4)[..., :2].permute(2, 0, 1).reshape(2 * m, k)
    y = _onednn_qlinear(digits, _DIGIT_ZERO, layer, layer.scales_f32).view(2, m, -1)  # [2, M, N]
    # high digit d1 + 128 at zero point 128 gives s * sum d1*q; low digit d0 gives s * sum (d0 - 128)*q
    acc = torch.add(y[0], y[1], alpha=256).add_(layer.row_offset)  # [M, N] = s * sum_k xq_signed * q
    return acc.mul_(step)  # [M, N] float32


def _moved(fn: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """What ``nn.Module._apply``'s ``fn`` makes of an empty float tensor of ``dtype`` on ``device``
    (its new dtype and device), or None when it changes neither: a layer whose real tensors are
    packed checks this before unpacking anything."""
    probe = fn(torch.empty(0, dtype=dtype, device=device))
    return None if probe.dtype == dtype and probe.device == device else probe


def _narrowed(t: torch.Tensor) -> torch.Tensor:
    """float32 ``t`` as float16 when that holds every value exactly (half the bytes to read)."""
    half = t.half()
    return half if torch.equal(half.float(), t) else t


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``t`` itself if contiguous and ``alignment``-byte aligned, else an aligned copy."""
    return t if t.is_contiguous() and t.data_ptr() % alignment == 0 else t.contiguous().clone()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` with W stored in a ``QuantSpec`` format.

    Built empty (on any device, meta included) with the storage buffers ``qweight``, ``scales``
    (``zeros`` for int4) and optional ``bias`` in the checkpoint's names; ``prepare()`` then
    converts them into the layout of the kernel chosen for their device and dtype. The
    ``state_dict`` always holds the portable storage tensors.
    """

    def __init__(
        self, in_features: int, out_features: int, spec: QuantSpec, *, bias: bool,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_quantizable("this layer", in_features, spec)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.dtype = dtype
        for name, (shape, st_dtype) in storage_shapes(spec, out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=st_dtype or dtype, device=device))
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.kind: str | None = None  # kernel chosen by prepare()
        self.chunk_zeros = False  # chunked rows (native kernels) that carry zeros: GGUF's Q4_K

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, *,
        dtype: torch.dtype, device: torch.device | str | None = None, kind: str | None = None,
    ) -> QuantLinear:
        """Quantize a float weight [N, K] (and bias [N]) into a prepared layer on ``device``."""
        device = torch.device(device) if device is not None else weight.device
        layer = cls(weight.shape[1], weight.shape[0], spec, bias=bias is not None, dtype=dtype, device="meta")
        layer.set_storage(quantize_weight(weight, spec), bias, device=device)
        layer.prepare(kind)
        return layer

    @classmethod
    def from_storage(
        cls, storage: dict[str, torch.Tensor], spec: QuantSpec, out_features: int, in_features: int, *,
        dtype: torch.dtype, device: torch.device | str, kind: str | None = None,
    ) -> QuantLinear:
        """A prepared layer (no bias) from storage tensors already in ``spec``'s format."""
        layer = cls(in_features, out_features, spec, bias=False, dtype=dtype, device="meta")
        layer.set_storage(storage, None, device=device)
        layer.prepare(kind)
        return layer

    def set_storage(
        self, storage: dict[str, torch.Tensor], bias: torch.Tensor | None, *, device: torch.device | str
    ) -> None:
        """Fill the storage buffers (floats cast to this layer's dtype) and reset the kernel."""
        for name, (shape, st_dtype) in storage_shapes(self.spec, self.out_features, self.in_features).items():
            t = storage[name]
            if tuple(t.shape) != shape:
                raise InputError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
            self._buffers[name] = t.to(device=device, dtype=st_dtype or self.dtype)
        if bias is not None:
            self._buffers["bias"] = bias.detach().to(device=device, dtype=self.dtype)
        self.kind = None

    def prepare(self, kind: str | None = None) -> None:
        """Convert the storage buffers into the kernel layout for their device (idempotent)."""
        if self.kind is not None:
            return
        device = self.qweight.device if "qweight" in self._buffers else self.packed.device
        kind = kind or _kernel_for(self.spec, device, self.dtype)
        if kind == "int8c_native" and self.in_features % 32:  # the per-channel kernel takes rows of 32s
            onednn = _has_onednn_int8() and kernel_works("int8_onednn", str(device), self.dtype)
            kind = "int8_onednn" if onednn else "int8"
        if kind in _NATIVE_KINDS and self.spec.bits != 6:
            self._pack_native()
        if kind == "int8_onednn":
            self._pack_onednn()
        if kind == "int8":  # the kernel needs aligned memory; a memory-mapped tensor may not be
            for name in ("qweight", "scales"):
                self._buffers[name] = _aligned(self._buffers[name])  # type: ignore[arg-type]
        if kind in ("int4_cpu", "int4_cuda"):
            try:
                packed, sz = _pack_int4(self.qweight, self.scales, self.zeros, kind)
            except RuntimeError as e:  # a shape the kernel does not take: stay correct, not fast
                log.warning("int4 kernel cannot pack a [%d, %d] weight (%s); dequantizing per call",
                            self.out_features, self.in_features, e)
                kind = "dequant"
            else:
                for name in ("qweight", "scales", "zeros"):
                    del self._buffers[name]
                self.register_buffer("packed", packed, persistent=False)
                self.register_buffer("scales_zeros", sz.to(self.dtype), persistent=False)
                compute = _INT4_COMPUTE.get((kind, self.dtype), self.dtype)
                self.register_buffer("scales_zeros_compute", sz.to(compute), persistent=False)
        self.kind = kind

    def _pack_native(self) -> None:
        """Storage -> the native kernels' operands: float32 scales (float16 where exact: GGUF's
        block scales), zeros dropped where all zero; int8 and int4 in groups of 32 (GGUF's Q8_0, Q4_0
        and Q4_K) become their kernels' chunked rows (``chunks``, which replace the storage), the
        zeros in the scales' float type (float16 where both are exact in it)."""
        zeros = self._buffers.get("zeros")
        if zeros is not None:
            zeros = None if not zeros.any() else zeros.float().contiguous()
        if self.spec.group_size != 32:
            self._buffers["scales"] = _narrowed(self.scales.float().contiguous())  # type: ignore[union-attr]
            if "zeros" in self._buffers:
                self._buffers["zeros"] = zeros
            return
        scales = self.scales.float().contiguous()  # type: ignore[union-attr]
        if zeros is None:
            scales = _narrowed(scales)
        else:  # one float type for both
            scales, zeros = _narrowed(torch.stack([scales, zeros])).unbind(0)
        chunks = chunk_rows(self.qweight, scales, zeros)  # type: ignore[arg-type]
        for name in ("qweight", "scales", "zeros"):
            self._buffers.pop(name, None)
        self.register_buffer("chunks", chunks, persistent=False)
        self.chunk_zeros = zeros is not None

    def _unchunked(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Chunked rows -> (qweight in the storage's dtype, scales and zeros as the kernel held them)."""
        groups = self.in_features // 32
        group_bytes = 16 if self.spec.bits == 4 else 32
        h = 2 if self.chunk_zeros else 1
        v, s, z = unchunk_rows(rows, groups, group_bytes, (rows.shape[1] // groups - group_bytes) // h,
                               zeros=self.chunk_zeros)
        return (v if self.spec.bits == 4 else v.view(torch.int8)), s, z

    def _pack_onednn(self) -> None:
        """int8 storage -> oneDNN's blocked int8 weight plus the per-row terms the kernel needs."""
        q = self.qweight.contiguous()
        n, k = q.shape
        self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(q, [1, k]), persistent=False)
        scales = self.scales.float()  # [N]
        row_sums = q.sum(dim=1, dtype=torch.int64).double()  # [N]
        self.register_buffer("row_offset", (_DIGIT_ZERO * row_sums * scales).float(), persistent=False)  # [N]
        self.register_buffer("scales_f32", scales, persistent=False)  # [N]
        self.register_buffer("zero_points", torch.zeros(n, dtype=torch.long), persistent=False)  # [N]
        del self._buffers["qweight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            raise InputError("QuantLinear used before prepare(): its weights are not loaded yet")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype)  # [M, K]
        y = self._matmul(x2)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind in _NATIVE_KINDS:
            return self._native_matmul(x)
        if kind == "int8_onednn":
            return _int8_onednn_matmul(self, x).to(x.dtype) if x.shape[0] else x.new_zeros(0, self.out_features)
        if kind == "int8":
            if x.device.type == "cpu" and x.shape[0] >= _DEQUANT_MIN_ROWS:  # prefill: GEMM is faster
                return F.linear(x, self.qweight.to(x.dtype)) * self.scales  # [M, N]
            return torch._weight_int8pack_mm(x.contiguous(), self.qweight, self.scales)  # [M, N]
        if kind in ("int4_cpu", "int4_cuda"):
            sz = self.scales_zeros_compute
            y = _int4_matmul(kind, x.to(sz.dtype).contiguous(), self.packed, self.spec.group_size, sz)  # type: ignore[arg-type]
            return (y[:, : self.out_features] if y.shape[1] != self.out_features else y).to(x.dtype)
        return F.linear(x, dequantize_weight(self.storage(), self.spec, x.dtype))  # "dequant"

    def _native_matmul(self, x: torch.Tensor) -> torch.Tensor:
        ops, q = native.ops(), self._buffers.get("qweight")
        if x.shape[0] > NATIVE_MAX_ROWS:  # prefill: a GEMM on the weight, dequantized per call
            y = prefill_linear_rows(x, self.out_features, self._dequantized_rows(x.dtype))  # [M, N]
            return y * self.scales.to(x.dtype) if self.kind == "int8c_native" else y  # row scales after
        if "chunks" in self._buffers:  # GGUF's Q4_0 / Q4_K / Q8_0
            gemv = ops.q8_0_gemv if self.spec.bits == 8 else ops.q4z_gemv if self.chunk_zeros else ops.q4_0_gemv
            return gemv(x.contiguous(), self.chunks).to(x.dtype)  # [M, N]
        if self.spec.bits == 6:
            return ops.q6k_gemv(x.contiguous(), q).to(x.dtype)  # [M, N]
        s, z = self.scales, self._buffers.get("zeros")
        if self.kind == "int8c_native":
            return ops.q8_gemv(x.contiguous(), q, s, 0).to(x.dtype)  # [M, N]
        if self.spec.bits == 4:
            return ops.q4_gemv(x.contiguous(), q, s, z).to(x.dtype)  # [M, N]
        return ops.q8_gemv(x.contiguous(), q, s, self.spec.group_size).to(x.dtype)  # [M, N]

    def _dequantized_rows(self, dtype: torch.dtype) -> Callable[[int, int], torch.Tensor]:
        """(first, end) -> weight rows first..end-1 in ``dtype`` (per-channel int8: unscaled)."""
        ops, q, k = native.ops(), self._buffers.get("qweight"), self.in_features
        s, z = self._buffers.get("scales"), self._buffers.get("zeros")  # Q6_K has neither
        if self.spec.bits == 6:
            return lambda a, b: ops.q6k_dequant(q[a:b], k, dtype)
        if "chunks" in self._buffers:
            return lambda a, b: ops.chunked_dequant(self.chunks[a:b], k, self.spec.bits, self.chunk_zeros, dtype)
        if self.kind == "int8c_native":
            return lambda a, b: q[a:b].to(dtype)
        if self.spec.bits == 4:
            return lambda a, b: ops.q4_dequant(q[a:b], s[a:b], None if z is None else z[a:b], dtype)
        return lambda a, b: ops.q8_dequant(q[a:b], s[a:b], self.spec.group_size, dtype)

    def storage(self) -> dict[str, torch.Tensor]:
        """The portable storage tensors (recovered from the kernel layout when packed)."""
        if self.spec.bits == 6:  # Q6_K blocks are their own storage, whatever the kernel
            return {"qweight": self.qweight}  # type: ignore[dict-item]
        if "chunks" in self._buffers:
            q, s, z = self._unchunked(self.chunks)  # type: ignore[arg-type]
            out = {"qweight": q, "scales": s.to(self.dtype)}
            if self.spec.bits == 4:
                out["zeros"] = z.to(self.dtype) if z is not None else torch.zeros_like(out["scales"])
            return out
        if self.kind in _NATIVE_KINDS:
            out = {"qweight": self.qweight, "scales": self.scales.to(self.dtype)}  # type: ignore[union-attr]
            if self.spec.bits == 4:
                z = self._buffers.get("zeros")
                out["zeros"] = z.to(self.dtype) if z is not None else torch.zeros_like(out["scales"])
            return out
        if self.kind == "int8_onednn":  # unit scales, zero point 0: one-hot rows give columns of q
            ones = torch.ones(self.out_features)
            q = self._kernel_on_identity(torch.uint8, lambda rows: _onednn_qlinear(rows, 0, self, ones))
            return {"qweight": q.round().to(torch.int8).contiguous(), "scales": self.scales}
        if not (self.kind or "").startswith("int4"):
            keys = storage_shapes(self.spec, self.out_features, self.in_features)
            return {k: self._buffers[k] for k in keys}  # type: ignore[misc]
        n = self.out_features
        sz = self.scales_zeros[:, :n]  # [G, N, 2]
        unit = torch.zeros_like(self.scales_zeros_compute)
        unit[..., 0], unit[..., 1] = 1.0, 8.0  # (q - 8) * 1 + 8 = q: one-hot rows give columns of q
        q = self._kernel_on_identity(unit.dtype, lambda rows: _int4_matmul(
            self.kind, rows, self.packed, self.spec.group_size, unit)[:, :n])  # type: ignore[arg-type]
        q = q.round().to(torch.uint8)  # [N, K]
        return {"qweight": pack_nibbles(q), "scales": sz[..., 0].t().contiguous(),
                "zeros": sz[..., 1].t().contiguous()}

    def _kernel_on_identity(self, dtype: torch.dtype, matmul: Any) -> torch.Tensor:
        """[N, K]: ``matmul`` (one-hot rows [k, K] -> [k, N]) applied to the identity, 1024 rows at
        a time: the weight a packed kernel holds, as the kernel sees it."""
        eye = torch.eye(self.in_features, dtype=dtype, device=self.packed.device)
        return torch.cat([matmul(eye[s : s + 1024]) for s in range(0, self.in_features, 1024)]).t()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, t in self.storage().items():
            destination[prefix + name] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        """``.to`` / ``.float()`` / ``.cuda()``: the storage moves (its floats take the new float
        dtype, which becomes the activation dtype) and is prepared again for the new device."""
        device = next(iter(self._buffers.values())).device  # type: ignore[union-attr]
        probe = _moved(fn, self.dtype, device)
        if probe is None:
            return self
        prepared = self.kind is not None
        storage, bias = (self.storage() if prepared else dict(self._buffers)), self.bias  # set_storage skips "bias"
        for name in list(self._buffers):
            del self._buffers[name]
        self.dtype = probe.dtype
        self.set_storage(storage, bias, device=probe.device)  # type: ignore[arg-type]
        if prepared:
            self.prepare()
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.spec.name}, group_size={self.spec.group_size}, "
                f"bias={self.bias is not None}, kernel={self.kind}")


class PackedLinear(nn.Linear):
    """An inference-only bf16 ``nn.Linear`` for CPUs, faster than ``F.linear`` at decoding.

    A large weight (``BLOCKED_FROM_VALUES`` values and more) is reordered once into oneDNN's
    blocked layout where oneDNN's GEMM is the faster prefill GEMM (``quant/wide_gemm.py``): every
    GEMM then skips the reorder it would do per call (3-5% of a prompt's prefill, 7% of an image's
    encoding), with the same bits. Up to ``NATIVE_MAX_ROWS`` rows (decoding) on such a weight go
    through the native blocked GEMV, which sums as PyTorch's bf16 linear sums one row (oneDNN's
    order) and reads the blocked layout faster than the plain one; that layout is used only for
    the shapes where the GEMV was checked equal to ``F.linear`` (``_blocked_gemv_matches``).
    Other weights stay plain for the native bf16 GEMV where the native kernels exist (prefill:
    oneDNN or float32 MKL), or are blocked where oneDNN is all there is. Layers that never decode
    (``decodes=False``: the vision tower and resampler) skip the GEMV check. Results equal the
    plain layer's up to the order of float32 sums. ``state_dict`` gives the plain weight back. Moving or
    casting the layer (``.to``, ``.float()``, ``.cuda()``) unpacks the weight first and packs it
    again only where packing applies (bf16 on a CPU); elsewhere the layer runs as a plain
    ``F.linear``.
    """

    def __init__(self, linear: nn.Linear, *, decodes: bool = True) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.decodes = decodes
        self.weight = nn.Parameter(packed_weight(linear.weight.detach(), decodes=decodes), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // self.in_features
        decoding = 0 < rows <= NATIVE_MAX_ROWS and x.dtype == torch.bfloat16 and _bf16_native(w.device)
        if w.layout == torch._mkldnn:  # type: ignore[attr-defined]
            if decoding and self.decodes:
                return self._rounded(native.ops().bf16_blocked_gemv(x.reshape(rows, -1).contiguous(), w), x)
            return _blocked_linear(x, w, self.bias)
        if decoding and w.dtype == torch.bfloat16:
            return self._rounded(native.ops().bf16_gemv(x.reshape(rows, -1).contiguous(), w), x)
        return prefill_linear(x, w, self.bias)  # bf16 on a CPU: oneDNN or float32 MKL, the faster

    def _rounded(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A native GEMV's float32 [rows, N] as the layer's output: the bias added before the one
        rounding to bf16, as PyTorch's fused linear does."""
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Any, recurse: bool = True) -> PackedLinear:
        if _moved(fn, self.weight.dtype, self.weight.device) is None:  # nothing changes: stay packed
            return self
        self.weight = nn.Parameter(packed_weight(fn(_dense_weight(self)), decodes=self.decodes), requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.detach()), requires_grad=self.bias.requires_grad)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = _dense_weight(self)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


# Weights are oneDNN-blocked from this size on where the native kernels exist (smaller: no gain
# worth a layout that differs from the plain weight's; the recorded checkpoints' layers stay plain).
BLOCKED_FROM_VALUES = 2**20


def packed_weight(w: torch.Tensor, *, decodes: bool = True) -> torch.Tensor:
    """A dense weight in the layout its fastest kernels read: oneDNN-blocked where only oneDNN
    applies, or where the weight is large, oneDNN's GEMM is the faster prefill GEMM and (for a
    layer that decodes) the native blocked GEMV is checked on this shape; plain for the native
    bf16 GEMV otherwise; unchanged for other dtypes and devices."""
    if w.layout == torch._mkldnn:  # type: ignore[attr-defined] - blocked already (by the loader)
        return w
    if w.dtype != torch.bfloat16:
        return w.contiguous()
    if not can_prepack(w.dtype, w.device):
        return w.contiguous() if _bf16_native(w.device) else w
    if not _bf16_native(w.device):
        return torch.ops.mkldnn._reorder_linear_weight(w, None)
    if w.numel() < BLOCKED_FROM_VALUES or gemm_choice() != "onednn":
        return w.contiguous()
    blocked = torch.ops.mkldnn._reorder_linear_weight(w, None)
    return blocked if not decodes or _blocked_gemv_matches(w, blocked) else w.contiguous()


def _blocked_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's GEMM on a weight held in its blocked layout, the bias fused (no activation)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [-1], "")


_BLOCKED_CHECKED: dict[tuple[int, int], bool] = {}
_CHECKED_OUTPUTS = 2**16  # outputs compared per shape (rows of x times N): enough to meet the rare
# ties where two summation orders round to different bf16 values


def _blocked_gemv_matches(w: torch.Tensor, blocked: torch.Tensor) -> bool:
    """Whether the native blocked GEMV gives ``F.linear``'s bits on weights of ``w``'s shape
    (checked once per shape, on the first such weight): rows of x alone (3 to 64, with a bias)
    and together, and oneDNN's GEMM on ``blocked`` equal to the plain weight's for 16 rows."""
    shape = (w.shape[0], w.shape[1])
    if shape not in _BLOCKED_CHECKED:
        g = torch.Generator().manual_seed(0)
        rows = min(64, max(3, -(-_CHECKED_OUTPUTS // shape[0])))  # decode rows compared
        x = torch.randn(max(rows, 16), shape[1], generator=g).bfloat16()  # [rows or 16, K]
        bias = torch.randn(shape[0], generator=g).bfloat16()  # [N]
        try:
            y = (native.ops().bf16_blocked_gemv(x[:rows], blocked) + bias.float()).bfloat16()  # [rows, N]
        except RuntimeError as e:
            log.info("native blocked bf16 GEMV unavailable (%s)", e)
            y = None
        ok = y is not None and torch.equal(y, torch.cat([F.linear(x[i : i + 1], w, bias) for i in range(rows)]))
        ok = ok and torch.equal(
            _blocked_linear(x[:16], blocked, bias), F.linear(x[:16], w, bias)
        )
        if not ok:
            log.info("bf16 weights %s stay plain: the blocked GEMV differs from PyTorch's linear here", list(shape))
        _BLOCKED_CHECKED[shape] = ok
    return _BLOCKED_CHECKED[shape]


@functools.cache
def _bf16_native_works() -> bool:
    ops = native.ops()
    if ops is None:
        return False
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 200, generator=g).bfloat16(), torch.randn(3, 200, generator=g).bfloat16()
    ref = x.float() @ w.float().t()  # [3, 40]
    try:
        err = float((ops.bf16_gemv(x, w) - ref).abs().max())
    except RuntimeError as e:
        log.info("native bf16 GEMV unavailable (%s); using oneDNN", e)
        return False
    return err <= 1e-4 * float(ref.abs().max())


def _bf16_native(device: torch.device) -> bool:
    return device.type == "cpu" and _bf16_native_works()


def can_prepack(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``PackedLinear`` applies: bf16 weights on a CPU whose oneDNN has bf16 kernels."""
    return (
        dtype == torch.bfloat16 and torch.device(device).type == "cpu"
        and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------


def _llm(model: nn.Module) -> nn.Module:
    return getattr(model, "llm", model)


def quant_targets(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Qualified names (in ``model``) of the linear layers ``spec`` quantizes: every ``nn.Linear``
    of the LLM's decoder layers, plus ``lm_head`` if asked and not tied to the embeddings."""
    llm = _llm(model)
    prefix = "llm." if llm is not model else ""
    names = [f"{prefix}model.layers.{n}" for n, m in llm.model.layers.named_modules()
             if isinstance(m, (nn.Linear, QuantLinear))]
    head = getattr(llm, "lm_head", None)
    tied = head is not None and getattr(head, "weight", None) is llm.model.embed_tokens.weight
    if spec.lm_head and isinstance(head, (nn.Linear, QuantLinear)) and not tied:
        names.append(f"{prefix}lm_head")
    return names


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _dense_weight(linear: nn.Linear) -> torch.Tensor:
    w = linear.weight.detach()
    return w.to_dense() if w.layout == torch._mkldnn else w  # type: ignore[attr-defined]


def quantize_model(
    model: nn.Module, fmt: str = "int8", group_size: int | None = None, *, lm_head: bool = True
) -> QuantSpec:
    """Quantize the LLM linear layers of ``model`` in place (from their current weights) and return
    the spec. ``model`` is a ``MiniCPMV`` or a bare backbone; layers are prepared for their device."""
    spec = QuantSpec.parse(fmt, group_size, lm_head=lm_head)
    targets = quant_targets(model, spec)
    for name in targets:
        check_quantizable(name, model.get_submodule(name).in_features, spec)
    for name in targets:
        old = model.get_submodule(name)
        if isinstance(old, QuantLinear):
            raise InputError(f"{name} is already quantized ({old.spec.describe()})")
        w = _dense_weight(old)
        bias = None if old.bias is None else old.bias.detach()
        replace_module(model, name, QuantLinear.from_float(w, bias, spec, dtype=w.dtype, device=w.device))
        del old, w
    log.info("quantized %d LLM linear layers to %s", len(targets), spec.describe())
    return spec


def prepack_linears(module: nn.Module, *, decodes: bool = True) -> int:
    """Swap every bf16 CPU ``nn.Linear`` of ``module`` (``lm_head`` included unless tied to an
    embedding) for a ``PackedLinear`` (``decodes``: whether ``module`` runs decoding steps);
    returns how many were swapped (0 when oneDNN bf16 is missing)."""
    shared = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    names = [
        n for n, m in module.named_modules()
        if type(m) is nn.Linear and id(m.weight) not in shared and can_prepack(m.weight.dtype, m.weight.device)
    ]
    for name in names:
        replace_module(module, name, PackedLinear(module.get_submodule(name), decodes=decodes))
    route_in_projections(module)
    return len(names)


def route_in_projections(module: nn.Module) -> None:
    """Point the packed in-projections of ``module``'s attention layers (a bf16 CPU
    ``in_proj_weight`` used through a ``project`` callable, as the resampler's is) at
    ``prefill_linear``, so their prompt-size products take the GEMM the bf16 ``PackedLinear``s take."""
    for m in module.modules():
        w = getattr(m, "in_proj_weight", None)
        if isinstance(w, torch.Tensor) and hasattr(m, "project") and can_prepack(w.dtype, w.device):
            m.project = prefill_linear
