"""Random-weight checkpoint directories for the benchmarks.

``build_checkpoint`` writes what ``minicpmv.load`` reads from a real release: ``config.json`` (a
real config, optionally with fewer LLM layers), deterministic random bf16 weights as sharded
safetensors with an index, and the tokenizer / preprocessor files of a side-file directory. The
weights are made on ``device`` (a GPU makes a 16 GB checkpoint in seconds) one shard at a time,
so host memory holds at most one shard. Each tensor has its own generator seeded from its name,
so the order of tensors does not matter; the same device gives the same bytes every time.

This module runs no model; importing it does not import torch.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

SHARD_BYTES = 1 << 30


def init_tensor(name: str, shape: tuple[int, ...], seed: int, device: str = "cpu") -> Any:
    """Deterministic bf16 weights with O(1) activations: matrices N(0, 1/fan_in), norm weights 1,
    other vectors (biases) 0."""
    import torch

    if len(shape) == 1:
        one = "norm" in name or name.split(".")[-2].startswith("ln_")
        return torch.full(shape, 1.0 if one else 0.0, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    return torch.randn(shape, generator=g, dtype=torch.bfloat16, device=device).mul_(fan_in**-0.5)


def tensor_shapes(raw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of this config.json stores (tied weights once)."""
    from minicpmv.config import ModelConfig
    from minicpmv.loading.checkpoint import build_on_meta
    from minicpmv.versions import detect_version

    spec = detect_version(raw)
    model = build_on_meta(ModelConfig.from_hf_dict(raw, **spec.config_kwargs()))
    seen: set[int] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            shapes[name] = tuple(t.shape)
    return shapes


def build_checkpoint(
    config: Path | dict[str, Any], layers: int | None, seed: int, out: Path, *,
    side_files: Path | None = None, device: str = "cpu", shard_bytes: int = SHARD_BYTES,
) -> int:
    """Write a checkpoint directory ``out`` (atomically: built beside it, then renamed); return its
    weight bytes. ``config``: a config.json path (side files default to its directory) or a dict."""
    from safetensors.torch import save_file

    from minicpmv.loading.checkpoint import INDEX_FILE

    raw = json.loads(config.read_text()) if isinstance(config, Path) else dict(config)
    side = side_files if side_files is not None else (config.parent if isinstance(config, Path) else None)
    if layers:
        raw["num_hidden_layers"] = layers
    shapes = tensor_shapes(raw)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = _numel(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if side is not None:
        for f in side.iterdir():
            if f.is_file() and f.name != "config.json" and "safetensors" not in f.name:
                shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: init_tensor(n, shapes[n], seed, device).cpu() for n in names}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    total = sum(_numel(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
