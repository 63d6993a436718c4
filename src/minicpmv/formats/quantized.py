"""``minicpmv quantize``: write a quantized checkpoint directory from a float one.

The LLM's linear layers are stored in the portable format of ``quant/linear.py`` and
``quantization_config`` is added to config.json; every other tensor and side file is copied as it
is. One tensor is held in memory at a time (plus the shard being filled); the directory appears
only when complete. This module does not load models for inference (``loading/checkpoint.py`` does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import InputError
from ..loading.checkpoint import (
    INDEX_FILE,
    build_on_meta,
    copy_side_files,
    new_output_folder,
    read_config,
    resolve_checkpoint,
    save_safetensors,
    weight_files,
)
from ..quant.linear import QuantSpec, check_quantizable, quant_targets, quantize_weight
from ..quant.load_plan import open_handle

log = logging.getLogger(__name__)


def quantize_checkpoint(
    src: str | Path, out: str | Path, fmt: str, *, group_size: int | None = None, lm_head: bool = True,
    revision: str | None = None,
) -> dict[str, Any]:
    """``minicpmv quantize``: quantize a float checkpoint (directory or hub repo id) into ``out``."""
    spec = QuantSpec.parse(fmt, group_size, lm_head=lm_head)
    path = resolve_checkpoint(str(src), revision=revision)
    raw, version = read_config(path)
    cfg = ModelConfig.from_hf_dict(raw, **version.config_kwargs())
    return write_quantized_checkpoint(path, Path(out), spec, cfg=cfg, raw_config=raw, stored=weight_files(path))


def write_quantized_checkpoint(
    src: Path, out: Path, spec: QuantSpec, *, cfg: ModelConfig, raw_config: dict[str, Any],
    stored: dict[str, Path], shard_bytes: int = 2 << 30,
) -> dict[str, Any]:
    """Write ``out``: config.json with ``quantization_config``, sharded safetensors (quantized LLM
    linear layers as storage tensors, every other tensor as stored) + index, and every other data
    file of ``src`` (tokenizer, preprocessor, generation config). One tensor in memory at a time
    (plus the shard being filled). Returns a summary (counts, bytes)."""
    if cfg.quantization is not None:
        raise InputError(f"{src} is already quantized ({QuantSpec.from_config(cfg.quantization).describe()})")
    model = build_on_meta(cfg)
    targets = quant_targets(model, spec)
    for name in targets:
        check_quantizable(name, model.get_submodule(name).in_features, spec)
    if spec.lm_head and not any(name.endswith("lm_head") for name in targets):  # tied: stays float
        spec = dataclasses.replace(spec, lm_head=False)
    weights = {f"{name}.weight" for name in targets}
    with new_output_folder(out) as tmp:  # written in full or not at all; never over an existing model
        writer = _write(tmp, src, stored, weights, spec, raw_config, shard_bytes)
    log.info("wrote %s: %d layers quantized (%s), %d bytes", out, len(targets), spec.describe(), writer.total)
    return {"layers": len(targets), "bytes": writer.total, "shards": max(writer.count, 1), "spec": spec.describe()}


def _write(tmp: Path, src: Path, stored: dict[str, Path], weights: set[str], spec: QuantSpec,
           raw_config: dict[str, Any], shard_bytes: int) -> _ShardWriter:
    writer = _ShardWriter(tmp, shard_bytes, save_safetensors)
    handles: dict[Path, Any] = {}
    for key in sorted(stored):
        f = stored[key]
        t = open_handle(handles, f).get_tensor(key)
        if key in weights:
            base = key.removesuffix(".weight")
            for part, q in quantize_weight(t, spec).items():
                writer.add(f"{base}.{part}", q.contiguous())
        else:
            writer.add(key, t)
    n_shards = writer.close()
    files = sorted(p.name for p in tmp.glob("*.safetensors"))
    if n_shards > 1:
        renamed = {}
        for i, name in enumerate(files):
            new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            (tmp / name).rename(tmp / new)
            renamed[name] = new
        index = {"metadata": {"total_size": writer.total},
                 "weight_map": {k: renamed[v] for k, v in writer.where.items()}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    else:
        (tmp / files[0]).rename(tmp / "model.safetensors")
    copy_side_files(src, tmp, skip=["config.json"])
    config = {**raw_config, "quantization_config": spec.to_config()}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return writer


class _ShardWriter:
    """Collects tensors into safetensors shards of at most ``limit`` bytes (one big tensor alone)."""

    def __init__(self, folder: Path, limit: int, save: Callable[..., None]) -> None:
        self.folder, self.limit, self.save = folder, limit, save
        self.current: dict[str, torch.Tensor] = {}
        self.size = self.total = self.count = 0
        self.where: dict[str, str] = {}

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.current and self.size + n > self.limit:
            self.flush()
        self.current[key] = t
        self.size += n
        self.total += n

    def flush(self) -> None:
        if not self.current:
            return
        name = f"shard-{self.count:05d}.safetensors"
        self.save(self.current, self.folder / name, metadata={"format": "pt"})
        self.where.update({k: name for k in self.current})
        self.count += 1
        self.current, self.size = {}, 0

    def close(self) -> int:
        self.flush()
        return self.count
