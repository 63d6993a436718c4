"""GGML block types: the int4 mapping of Q4_0 / Q4_K and the grouped int8 mapping of Q8_0 into
``quant/linear.py``'s storage, and the Q4_K / Q6_K quantizers the ``gguf`` package lacks.

Q4_0 (32 weights: ``(q - 8) * d``) is int4 with group size 32 and zero offsets, exactly. Q4_K
(256 weights in 8 groups of 32: ``d * sc * q - dmin * m``) becomes int4 group 32 with scale
``d * sc`` and offset ``8 * d * sc - dmin * m`` (the product terms are exact in float32; the offset
is rounded once). Every other type is dequantized by the ``gguf`` package. The quantizers write
valid blocks with a plain min/max (Q4_K) or abs-max (Q6_K) fit per group, not llama.cpp's
iterative search; they are checked by decoding with ``gguf.quants.dequantize``. This module does
not read or write files.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ..quant.linear import pack_nibbles

QK = 256  # weights per K-quant super-block
INT4_EXACT = (T.Q4_0, T.Q4_K)  # block types that map onto int4 group-32 storage
INT8_EXACT = {T.Q8_0: 32, T.Q6_K: 256}  # kept quantized on the native kernels (row length multiple)


def int4_storage(data: np.ndarray, qtype: T, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Q4_0 / Q4_K blocks of an [N, K] weight -> ``qweight`` uint8 [N, K/2], ``scales``/``zeros``
    float32 [N, K/32] with ``w = (q - 8) * scales + zeros``."""
    n, k = shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, gq.GGML_QUANT_SIZES[qtype][1])
    if qtype == T.Q4_0:
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [B, 1]
        qs = blocks[:, 2:]  # [B, 16]: element j low nibble, element j + 16 high nibble
        q = np.concatenate([qs & 15, qs >> 4], axis=1)  # [B, 32]
        scales, zeros = d, np.zeros_like(d)
    else:
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = gq.Q4_K.get_scale_min(blocks[:, 4:16])  # [B, 8] 6-bit scales and mins
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 15).reshape(-1, QK)  # [B, 256]: per 64: 32 low nibbles then 32 high nibbles
        scales = d * sc.astype(np.float32)  # [B, 8], exact
        mins = dmin * m.astype(np.float32)  # [B, 8], exact
        zeros = 8.0 * scales - mins
    q = torch.from_numpy(np.ascontiguousarray(q.reshape(n, k)))
    return {"qweight": pack_nibbles(q), "scales": torch.from_numpy(np.ascontiguousarray(scales.reshape(n, -1))),
            "zeros": torch.from_numpy(np.ascontiguousarray(zeros.reshape(n, -1)))}


def int8_storage(data: np.ndarray, qtype: T, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Q8_0 blocks of an [N, K] weight -> ``qweight`` int8 [N, K] and float32 ``scales`` [N, K/32]
    (the blocks' ``d``) with ``w = qweight * scales``, exactly. (Q6_K blocks are kept as stored: the
    native kernel reads them, ``quant.linear.dequantize_q6k`` decodes them.)"""
    if qtype != T.Q8_0:
        raise ValueError(f"int8_storage takes Q8_0 blocks, not {qtype.name}")
    n, k = shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, gq.GGML_QUANT_SIZES[qtype][1])
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    q = blocks[:, 2:].view(np.int8)  # [B, 32]
    return {"qweight": torch.from_numpy(np.ascontiguousarray(q.reshape(n, k))),
            "scales": torch.from_numpy(np.ascontiguousarray(scales.reshape(n, -1)))}


def dequantize(data: np.ndarray, qtype: T) -> np.ndarray:
    """Any GGML tensor data -> float32 (the ``gguf`` package's reference dequantization)."""
    if qtype == T.F32:
        return np.asarray(data, dtype=np.float32)
    if qtype == T.F16:
        return np.asarray(data).view(np.float16).astype(np.float32)
    return gq.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)


def quantize(x: np.ndarray, qtype: T, rows: int = 2048) -> np.ndarray:
    """float32 [..., K] -> GGML data of ``qtype`` (the ``gguf`` package's quantizers, ours for K-quants,
    torch's round-to-nearest-even for BF16), ``rows`` rows at a time (bounded temporaries)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 2 and x.shape[0] > rows and qtype not in (T.F32, T.F16):
        return np.concatenate([quantize(x[i : i + rows], qtype, rows) for i in range(0, x.shape[0], rows)])
    if qtype == T.BF16:
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.uint8).numpy()  # [..., 2K] bytes
    if qtype == T.Q4_K:
        return _q4_k(x.reshape(-1, QK)).reshape(*x.shape[:-1], -1)
    if qtype == T.Q6_K:
        return _q6_k(x.reshape(-1, QK)).reshape(*x.shape[:-1], -1)
    return gq.quantize(x, qtype)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(a.shape[0], -1)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _q4_k(x: np.ndarray) -> np.ndarray:
    """[B, 256] -> [B, 144] Q4_K blocks (d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles)."""
    g = x.reshape(-1, 8, 32)  # [B, 8, 32]
    lo = np.minimum(g.min(axis=-1), 0.0)  # [B, 8]: offsets are -dmin * m <= 0
    scale = (g.max(axis=-1) - lo) / 15.0
    d = (scale.max(axis=1, keepdims=True) / 63.0).astype(np.float16).astype(np.float32)  # [B, 1]
    dmin = ((-lo).max(axis=1, keepdims=True) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d)), 0, 63).astype(np.uint8)  # [B, 8]
    m = np.clip(np.rint(_safe_div(-lo, dmin)), 0, 63).astype(np.uint8)
    step = (d * sc)[..., None]  # [B, 8, 1]
    q = np.clip(np.rint(_safe_div(g + (dmin * m)[..., None], np.broadcast_to(step, g.shape))), 0, 15).astype(np.uint8)
    packed = np.zeros((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    q = q.reshape(-1, 4, 2, 32)  # per 64 weights: low nibbles hold the first 32, high the next 32
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16(d), _f16(dmin), packed, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """[B, 256] -> [B, 210] Q6_K blocks (128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, d)."""
    g = x.reshape(-1, 16, 16)  # [B, 16, 16]
    peak = np.take_along_axis(g, np.abs(g).argmax(axis=-1)[..., None], axis=-1)[..., 0]  # [B, 16], signed
    scale = peak / -32.0  # the largest magnitude lands on q = -32 exactly
    d = (np.abs(scale).max(axis=1, keepdims=True) / 127.0).astype(np.float16).astype(np.float32)  # [B, 1]
    sc = np.clip(np.rint(_safe_div(scale, d)), -127, 127).astype(np.int8)  # [B, 16]
    step = np.broadcast_to((d * sc)[..., None], g.shape)
    q = (np.clip(np.rint(_safe_div(g, step)), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # [B, half, part, l]
    lo = q & 15  # low nibbles: bytes l and l+32 of a half carry l, l+32 (low) and l+64, l+96 (high)
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(-1, 128)
    hi = q >> 4  # [B, 2, 4, 32]
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8), _f16(d)], axis=1)
