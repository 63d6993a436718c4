"""AWQ checkpoints (AutoAWQ's GEMM packing), unpacked into this package's int4 storage exactly.

A quantized layer ``X`` stores ``X.qweight`` int32 [K, N/8] and ``X.qzeros`` int32 [K/g, N/8]
(eight 4-bit values per int32, output columns in the interleaved order 0 2 4 6 1 3 5 7, lowest
nibble first) and ``X.scales`` float16 [K/g, N]; ``w[n, k] = (q - z) * s`` for group ``k // g``
(``g`` = ``group_size`` of ``quantization_config``). In ``quant/linear.py``'s storage that is
``qweight`` = q, ``scales`` = s and ``zeros`` = ``(8 - z) * s`` (exact in float32, so the weight
equals AutoAWQ's ``dequantize_gemm`` bit for bit once rounded to float16). Layers that are not
LLM linears, or whose group size the int4 kernels do not take, are dequantized instead. This
module reads tensors; it does not build models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..quant.linear import pack_nibbles
from ..quant.load_plan import open_handle

_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble i of an int32 holds column order^-1[i]
_PARTS = ("qweight", "qzeros", "scales")


def check_config(q: dict[str, Any]) -> int:
    """The group size of an AWQ ``quantization_config`` (GEMM, 4 bits, zero points)."""
    version = str(q.get("version", "gemm")).lower()
    if int(q.get("bits", q.get("w_bit", 4))) != 4 or version != "gemm" or not q.get("zero_point", True):
        raise ConfigError(f"config.json: AWQ settings {q} are not supported (4-bit GEMM with zero points is)")
    return int(q.get("group_size", q.get("q_group_size", 128)))


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R, 8C] values 0..15 in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    vals = ((packed.to(torch.int32)[:, :, None] >> shifts) & 15).to(torch.uint8)  # [R, C, 8]
    return vals[:, :, list(_REVERSE_ORDER)].reshape(packed.shape[0], -1)


def awq_storage(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors -> int4 storage [N, K/2] / [N, K/g] (``w = (q - 8) * scales + zeros``)."""
    q = _unpack(qweight).t().contiguous()  # [N, K]
    z = _unpack(qzeros).t().float()  # [N, G]
    s = scales.t().float()  # [N, G]
    return {"qweight": pack_nibbles(q), "scales": s.contiguous(), "zeros": ((8.0 - z) * s).contiguous()}


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float16 [N, K] weight (as ``awq.utils.packing_utils.dequantize_gemm``, transposed)."""
    q = _unpack(qweight).float()  # [K, N]
    g = q.shape[0] // scales.shape[0]
    z = _unpack(qzeros).float().repeat_interleave(g, dim=0)
    s = scales.float().repeat_interleave(g, dim=0)
    return ((q - z) * s).to(torch.float16).t().contiguous()


def awq_tensors(
    stored: dict[str, Path], group_size: int, int4_layers: set[str],
) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Callable[[], dict[str, torch.Tensor]]]]:
    """(float tensors by key, int4 storage by layer name) of an AWQ checkpoint; ``int4_layers``:
    the layers that may stay int4 (the rest are dequantized)."""
    handles: dict[Path, Any] = {}

    def get(key: str) -> torch.Tensor:
        return open_handle(handles, stored[key]).get_tensor(key)

    layers = sorted(k.removesuffix(".qweight") for k in stored if k.endswith(".qweight"))
    if not layers:
        raise CheckpointError("config.json records AWQ but no tensor is an AWQ qweight")
    floats: dict[str, Callable[[], torch.Tensor]] = {}
    int4: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    owned: set[str] = set()
    for name in layers:
        keys = [f"{name}.{p}" for p in _PARTS]
        missing = [k for k in keys if k not in stored]
        if missing:
            raise CheckpointError(f"AWQ layer {name!r} lacks {missing}")
        owned.update(keys)
        k = stored_rows(open_handle(handles, stored[keys[0]]).get_slice(keys[0]))
        groups = stored_rows(open_handle(handles, stored[keys[2]]).get_slice(keys[2]))
        if groups * group_size != k:
            raise CheckpointError(f"{name}.scales has {groups} groups for {k} inputs (group size "
                                  f"{k // max(groups, 1)}), config.json records group_size {group_size}")

        def parts(ks: tuple[str, ...] = tuple(keys)) -> list[torch.Tensor]:
            return [get(x) for x in ks]

        if name in int4_layers:
            int4[name] = (lambda p=parts: awq_storage(*p()))
        else:
            floats[f"{name}.weight"] = (lambda p=parts: dequantize_awq(*p()))
    for key in stored:
        if key not in owned:
            floats[key] = (lambda x=key: get(x))
    return floats, int4


def stored_rows(view: Any) -> int:
    return int(view.get_shape()[0])
