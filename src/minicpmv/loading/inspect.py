"""Describe a checkpoint from its config alone: version, parameter counts, memory estimate.

The model is built on the meta device, so this works for real-size configs without weights and
allocates no tensor memory. It does not load weights or tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ModelConfig
from .checkpoint import count_parameters, read_config

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """A JSON-able summary of the checkpoint at ``path`` (a directory with config.json)."""
    raw, spec = read_config(path)
    cfg = ModelConfig.from_hf_dict(raw, **spec.config_kwargs())
    counts = count_parameters(cfg)
    total = counts["total"]
    has_weights = any(path.glob("*.safetensors"))
    return {
        "path": str(path),
        "version": spec.name,
        "title": spec.title,
        "vision_tower": cfg.vision_tower,
        "audio": cfg.audio is not None,
        "tts_weights": cfg.tts,
        "llm_family": spec.llm_family,
        "dtype": cfg.torch_dtype,
        "parameters": counts,
        "memory_gib": {k: total * b / 2**30 for k, b in _BYTES.items()},
        "has_weights": has_weights,
        "llm_layers": cfg.text.num_hidden_layers,
        "vision_layers": cfg.vision_layers_used,
        "query_num": cfg.query_num,
        "unverified": spec.unverified,
    }
