"""Describe a checkpoint from its config alone: version, parameter counts, memory estimate, and
the weight format of a quantized checkpoint (``minicpmv quantize``) with its size as stored.

The model is built on the meta device, so this works for real-size configs without weights and
allocates no tensor memory. It does not load weights or tokenizers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..modeling.vlm import MiniCPMV
from ..quant.linear import QUANT_METHOD, QuantSpec, quant_targets, storage_shapes
from ..versions import detect_version
from .checkpoint import build_on_meta, count_parameters, read_config

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def inspect_checkpoint(path: Path, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able summary of the checkpoint at ``path`` (a directory with config.json, or ``raw``:
    that config's content, for formats that keep it elsewhere)."""
    if raw is None:
        raw, spec = read_config(path)
    else:
        spec = detect_version(raw)
    cfg = ModelConfig.from_hf_dict(raw, **spec.config_kwargs())
    model = build_on_meta(cfg)
    counts = count_parameters(model)
    total = counts["total"]
    has_weights = any(path.glob("*.safetensors"))
    quant = raw.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") != QUANT_METHOD:
        quant = None  # another library's format: described by formats/inspect.py
    info = {
        "path": str(path),
        "version": spec.name,
        "title": spec.title,
        "vision_tower": cfg.vision_tower,
        "audio": cfg.audio is not None,
        "tts_weights": cfg.tts is not None,
        "llm_family": spec.llm_family,
        "dtype": cfg.torch_dtype,
        "parameters": counts,
        "memory_gib": {k: total * b / 2**30 for k, b in _BYTES.items()},
        "has_weights": has_weights,
        "llm_layers": cfg.text.num_hidden_layers,
        "vision_layers": cfg.vision_layers_used,
        "query_num": cfg.query_num,
        "unverified": spec.unverified,
        "quantization": None,
    }
    if quant is not None:
        fbytes = _BYTES.get(str(cfg.torch_dtype).removeprefix("torch."), 2)
        info["quantization"] = _quantized(model, QuantSpec.from_config(quant), total, fbytes)
    return info


def _quantized(model: MiniCPMV, spec: QuantSpec, total: int, fbytes: int) -> dict[str, Any]:
    """The format and the size of a quantized checkpoint as ``minicpmv quantize`` writes it: scales
    and zeros in float32, the other ``total - quantized`` parameters at ``fbytes`` bytes each."""
    stored = quantized = 0
    for name in quant_targets(model, spec):
        weight = model.get_submodule(name).weight  # [N, K] on the meta device
        quantized += weight.numel()
        for shape, dtype in storage_shapes(spec, *weight.shape).values():
            stored += math.prod(shape) * (dtype.itemsize if dtype is not None else 4)
    rest = total - quantized  # biases included: kept as floats
    return {"format": spec.describe(), "bits": spec.bits, "group_size": spec.group_size,
            "quantized_parameters": quantized, "stored_gib": (stored + rest * fbytes) / 2**30}
