"""bitsandbytes 4-bit checkpoints (the MiniCPM-V "int4" releases), dequantized without bitsandbytes.

transformers saves a 4-bit layer's weight ``X.weight`` as packed uint8 codes (two per byte, the
first in the high nibble) with its quantization state beside it: ``X.weight.absmax`` (float32,
or uint8 codes when double quantization is on, with ``X.weight.nested_absmax`` /
``X.weight.nested_quant_map`` and an offset), ``X.weight.quant_map`` (the 16 nf4 / fp4 values)
and ``X.weight.quant_state.bitsandbytes__nf4`` (``__fp4``): JSON bytes with the block size,
original dtype and shape. ``config.json``'s ``quantization_config`` (``quant_method:
"bitsandbytes"``, ``load_in_4bit``) says the checkpoint is one.

Dequantization follows bitsandbytes' CPU kernels operation by operation (float32 products,
``absmax = nested_map[code] * nested_absmax[block] + offset``, then ``map[code] * absmax[block]``
rounded once to the stored dtype), so the weights equal ``bitsandbytes.functional.dequantize_4bit``
bit for bit (checked against recordings made by bitsandbytes). nf4 / fp4 values are not evenly
spaced, so they do not map onto this package's int4 layout without a second rounding; the loader
keeps the exact weights (see README for the measured choice). This module reads tensors; it
does not build models.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..quant.load_plan import open_handle

STATE_PREFIX = ".quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_config(q: dict[str, Any]) -> str:
    """The 4-bit type recorded in ``quantization_config`` (nf4 / fp4); ConfigError for 8-bit."""
    if q.get("load_in_8bit"):
        raise ConfigError("config.json: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; "
                          "load the bf16 release, optionally with quantize='int8'")
    kind = str(q.get("bnb_4bit_quant_type", "fp4"))
    if not q.get("load_in_4bit", True) or kind not in ("nf4", "fp4"):
        raise ConfigError(f"config.json: unsupported bitsandbytes settings {q}")
    return kind


def dequantize_4bit(parts: dict[str, torch.Tensor], state: dict[str, Any]) -> torch.Tensor:
    """The packed weight (``parts["weight"]``) and its state tensors -> the weight in its stored dtype."""
    absmax = parts["absmax"]
    if "nested_blocksize" in state:  # double quantization: absmax itself is 8-bit blockwise
        codes = absmax.reshape(-1).long()
        block = torch.arange(codes.numel()) // int(state["nested_blocksize"])
        absmax = parts["nested_quant_map"].float()[codes] * parts["nested_absmax"].float()[block]  # [nb]
        absmax = absmax + torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    absmax = absmax.float().reshape(-1)
    shape = [int(s) for s in state["shape"]]
    n = 1
    for s in shape:
        n *= s
    packed = parts["weight"].reshape(-1).view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:n].long()  # [n]
    values = parts["quant_map"].float()[codes]  # [n] float32
    block = torch.arange(n) // int(state["blocksize"])
    out = values * absmax[block]  # float32, as the kernels compute
    dtype = _DTYPES.get(str(state.get("dtype")).removeprefix("torch."))
    if dtype is None:
        raise CheckpointError(f"bitsandbytes quant state has an unknown dtype {state.get('dtype')!r}")
    return out.reshape(shape).to(dtype)


def read_state(t: torch.Tensor) -> dict[str, Any]:
    """The JSON quant state stored as uint8 bytes."""
    try:
        return json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable bitsandbytes quant state: {e}") from e


def bnb_tensors(stored: dict[str, Path], kind: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Official key -> a function giving its float tensor (4-bit weights dequantized)."""
    handles: dict[Path, Any] = {}

    def get(key: str) -> torch.Tensor:
        return open_handle(handles, stored[key]).get_tensor(key)

    states = {k.split(STATE_PREFIX)[0]: k for k in stored if STATE_PREFIX in k}
    if not states:
        raise CheckpointError("config.json records bitsandbytes 4-bit but no tensor has a 4-bit quant state")
    wrong = sorted({k.rsplit("__", 1)[1] for k in states.values()} - {kind})
    if wrong:
        raise CheckpointError(f"config.json records bnb_4bit_quant_type {kind!r} but the checkpoint holds {wrong}")
    owned = set(states.values())
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for weight, state_key in states.items():
        keys = {p: f"{weight}.{p}" for p in _PARTS if f"{weight}.{p}" in stored}
        if weight not in stored or "absmax" not in keys or "quant_map" not in keys:
            raise CheckpointError(f"4-bit weight {weight!r} lacks its packed data, absmax or quant_map")
        owned.update(keys.values())

        def make(w: str = weight, s: str = state_key, ks: dict[str, str] = keys) -> torch.Tensor:
            parts = {p: get(k) for p, k in ks.items()} | {"weight": get(w)}
            return dequantize_4bit(parts, read_state(get(s)))

        out[weight] = make
    for key in stored:
        if key not in owned and key not in out:
            out[key] = (lambda k=key: get(k))
    return out


def has_bitsandbytes() -> bool:
    """Whether the bitsandbytes package is importable (its 4-bit layers then run the release as is)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def bnb_layers(
    stored: dict[str, Path], dtype: torch.dtype, device: torch.device, names: set[str],
) -> dict[str, Callable[[], torch.nn.Module]]:
    """Layer name -> a function building ``bitsandbytes.nn.Linear4bit`` from the stored packed weight
    and quant state (bitsandbytes' own ``Params4bit.from_prequantized``), for the 4-bit layers in
    ``names``. The layer's bias stays a float tensor of the checkpoint."""
    import bitsandbytes as bnb_lib

    handles: dict[Path, Any] = {}

    def get(key: str) -> torch.Tensor:
        return open_handle(handles, stored[key]).get_tensor(key)

    out: dict[str, Callable[[], torch.nn.Module]] = {}
    for state_key in (k for k in stored if STATE_PREFIX in k):
        weight = state_key.split(STATE_PREFIX)[0]
        name = weight.removesuffix(".weight")
        if name not in names:
            continue

        def make(w: str = weight, s: str = state_key) -> torch.nn.Module:
            state = read_state(get(s))
            shape = [int(x) for x in state["shape"]]
            stats = {k[len(w) + 1:]: get(k) for k in stored if k.startswith(f"{w}.")}
            layer = bnb_lib.nn.Linear4bit(shape[1], shape[0], bias=f"{w[:-7]}.bias" in stored, compute_dtype=dtype,
                                          quant_type=state["quant_type"], device="meta")
            layer.weight = bnb_lib.nn.Params4bit.from_prequantized(get(w), stats, device=device, module=layer)
            return layer

        out[name] = make
    return out
