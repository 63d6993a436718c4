"""Checkpoint resolution and strict safetensors loading."""

from .checkpoint import (
    build_on_meta,
    count_parameters,
    load_model,
    model_config,
    read_config,
    resolve_checkpoint,
)

__all__ = [
    "build_on_meta",
    "count_parameters",
    "load_model",
    "model_config",
    "read_config",
    "resolve_checkpoint",
]
