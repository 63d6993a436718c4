"""Training state on disk without pickle: optimizer, scheduler and RNG state as JSON + safetensors.

``save_tree(tree, folder, name)`` writes a nested structure of dicts, lists, tuples, numbers,
strings, None, torch tensors and numpy arrays as ``name.json`` (the structure, with tensors
replaced by references) and ``name.safetensors`` (the tensors). ``load_tree`` reads them back
exactly: int dict keys, tuples, dtypes and shapes included. Loading reads JSON and safetensors
only, so a checkpoint folder copied from elsewhere cannot run code (the package's
safetensors-only rule; ``torch.load`` of a pickle could). ``rng_state`` / ``set_rng_state``
capture and restore the torch, CUDA, Python and numpy generators in this form.

This module does not decide what a checkpoint holds or when it is written (``trainer.py``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError
from ..loading.checkpoint import save_safetensors

FORMAT = "minicpmv-tree-1"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``obj``; tensors and arrays go to ``tensors`` under a numbered key."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"$ndarray": key}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"$items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} object in training state (no pickle)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$ndarray" in obj:
        return tensors[obj["$ndarray"]].numpy()
    if "$tuple" in obj:
        return tuple(_decode(x, tensors) for x in obj["$tuple"])
    if "$items" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$items"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(tree: Any, folder: Path, name: str) -> None:
    """Write ``tree`` as ``folder/name.json`` + ``folder/name.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "tree": _encode(tree, tensors)}
    save_safetensors(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(doc), encoding="utf-8")


def load_tree(folder: Path, name: str) -> Any:
    """The structure ``save_tree`` wrote (CheckpointError when a file is missing or damaged)."""
    meta, blob = folder / f"{name}.json", folder / f"{name}.safetensors"
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read training state {meta}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{meta} is not training state written by minicpmv (format {FORMAT})")
    try:
        tensors = load_file(str(blob))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read training state {blob}: {e} (truncated or corrupted?)") from e
    try:
        return _decode(doc["tree"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta} does not match {blob.name}: {e}") from e


def rng_state() -> dict[str, Any]:
    """The torch, CUDA (when present), Python and numpy generator states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
