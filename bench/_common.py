"""Measurement helpers shared by the benchmarks: best-of timing, the read-bandwidth and matmul
ceilings, bytes a decode step streams, and peak RSS from /proc.

Importing this module does not import torch (the video memory bench measures RSS growth from a
small baseline); the functions that need it import it themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def best_time(fn: Callable[[], Any], reps: int) -> float:
    """Best wall time of ``reps`` calls of ``fn``, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best read bandwidth (bytes/s) of full reductions (sum of a bf16 buffer, sum and max of the
    same bytes as fp32) over a buffer much larger than the caches."""
    import torch

    buf = torch.ones(nbytes // 2, dtype=torch.bfloat16)  # touched: every page is resident
    as32 = buf.view(torch.float32)
    return nbytes / min(best_time(fn, reps) for fn in (buf.sum, as32.sum, as32.amax))


def matmul_peak(dtype: Any, n: int = 4096, reps: int = 3) -> float:
    """Best FLOP/s of an n x n x n matmul at ``dtype``."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_time(lambda: a @ b, reps)


def streamed_bytes(model: Any) -> int:
    """Bytes one decode step reads: every LLM tensor except the embedding table, plus lm_head."""
    llm = model.llm
    embed = llm.model.embed_tokens.weight
    total = sum(t.nbytes for t in [*llm.parameters(), *llm.buffers()] if t is not embed)
    head = getattr(llm, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is embed:
        total += embed.nbytes  # tied: the table is read once per token as lm_head
    return total


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# MiniCPM-V 2.6's LLM (Qwen2-7B) over the real 4.5 config: what differs between the perf-size LLMs
DIMS_26 = {"version": 2.6, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 151666, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
           "rms_norm_eps": 1e-06}


def perf_config(dims: str, layers: int, real_45: Any) -> Any:
    """ModelConfig of the perf-size model: the real 4.5 config (``dims="4.5"``) or the same vision
    stack with MiniCPM-V 2.6's Qwen2-7B LLM (``"2.6"``), with ``layers`` LLM layers."""
    import json

    from minicpmv.config import ModelConfig
    from minicpmv.versions import detect_version

    raw = json.loads(real_45.read_text())
    if dims == "2.6":
        raw = {k: v for k, v in raw.items() if k not in ("head_dim", "batch_3d_resampler", "attention_bias")} | DIMS_26
    raw["num_hidden_layers"] = layers
    return ModelConfig.from_hf_dict(raw, **detect_version(raw).config_kwargs())
