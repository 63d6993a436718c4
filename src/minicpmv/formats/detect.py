"""What a checkpoint path holds, from recorded metadata only (never from file names).

A directory with config.json is a safetensors checkpoint; its ``quantization_config.quant_method``
says which: none (the float release), ``minicpmv-weight-only`` (``minicpmv quantize``),
``bitsandbytes`` (the "int4" releases) or ``awq``. A file that starts with the GGUF magic, or a
directory of such files, is a llama.cpp GGUF release. This module reads only small headers and
config.json; it does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import read_json_object
from ..errors import CheckpointError

KINDS = {
    "safetensors": "safetensors (float)",
    "minicpmv-weight-only": "minicpmv weight-only int8/int4 (safetensors)",
    "bitsandbytes": "bitsandbytes 4-bit (safetensors)",
    "awq": "AWQ int4 GEMM (safetensors)",
    "gguf": "GGUF (llama.cpp)",
}


@dataclass(frozen=True)
class Format:
    kind: str  # a key of KINDS
    detail: str = ""

    def describe(self) -> str:
        return KINDS[self.kind] + (f": {self.detail}" if self.detail else "")


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def detect_format(path: Path) -> Format:
    """The format of a local checkpoint file or directory (CheckpointError if none applies)."""
    if path.is_file():
        if _magic(path) == b"GGUF":
            return Format("gguf")
        raise CheckpointError(f"{path} is a file but not a GGUF file; pass a checkpoint directory or a .gguf file")
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    raw = read_json_object(path / "config.json")
    if raw is None:
        if any(_magic(p) == b"GGUF" for p in path.glob("*.gguf")):
            return Format("gguf")
        raise CheckpointError(f"{path} has neither config.json nor GGUF files")
    q = raw.get("quantization_config")
    if q is None:
        return Format("safetensors")
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method == "bitsandbytes":
        bits = "8-bit" if q.get("load_in_8bit") else str(q.get("bnb_4bit_quant_type", "fp4"))
        double = ", double quantization" if q.get("bnb_4bit_use_double_quant") else ""
        return Format("bitsandbytes", f"{bits}{double}")
    if method == "awq":
        return Format("awq", f"{q.get('bits', 4)}-bit, group size {q.get('group_size', 128)}")
    return Format("minicpmv-weight-only" if method == "minicpmv-weight-only" else "safetensors")
