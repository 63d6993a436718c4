"""``minicpmv inspect`` for every distribution format: the summary of ``loading/inspect.py`` plus
the format's name, its quantization settings and the size of its weight files.

For a GGUF release the configuration is the one the loader rebuilds from the metadata, and the
tensor types of each file are counted. This module does not load weights.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..loading.inspect import inspect_checkpoint
from .detect import detect_format
from .load import gguf_reader


def inspect_any(path: Path, mmproj: Path | None = None) -> dict[str, Any]:
    """A JSON-able summary of any supported checkpoint (directory, GGUF file + ``mmproj``, GGUF directory)."""
    fmt = detect_format(path)
    if fmt.kind != "gguf":
        info = inspect_checkpoint(path)
        files = [f for f in path.iterdir() if f.suffix == ".safetensors"]
        info.update(format=fmt.describe(), stored_gib=sum(f.stat().st_size for f in files) / 2**30)
        return info
    GGUFCheckpoint, find_pair = gguf_reader()
    ckpt = GGUFCheckpoint(find_pair(path, mmproj))
    info = inspect_checkpoint(ckpt.pair.model.parent, raw=ckpt.config())
    info["path"] = str(ckpt.pair.model)
    types = {role: dict(Counter(t.tensor_type.name for t in r.tensors))
             for role, r in (("model", ckpt.llm), ("mmproj", ckpt.proj))}
    sizes = [ckpt.pair.model.stat().st_size, ckpt.pair.mmproj.stat().st_size]
    info.update(format=f"{fmt.describe()}: {ckpt.pair.model.name} ({ckpt.arch}) + {ckpt.pair.mmproj.name}",
                has_weights=True, tensor_types=types, stored_gib=sum(sizes) / 2**30)
    return info
