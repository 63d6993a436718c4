"""bf16 linear layers over many rows (a prompt's prefill) on a CPU: the faster of two GEMMs.

oneDNN runs a bf16 GEMM on AMX tiles where the CPU has them, several times faster than float32.
Without AMX it uses AVX-512 bf16 dot products, which some CPUs issue at half the rate of float32
FMAs: on an Intel Sapphire Rapids VM with oneDNN kept off AMX, its bf16 GEMMs ran at 115-160
GFLOP/s on two cores where MKL's float32 ones ran at 175-235. ``prefill_linear`` then
widens the bf16 weight to float32 one block of rows at a time (the block stays in cache while
MKL multiplies it), so the weights are stored once, in bf16, and still read once per call.

Which GEMM runs is decided once per machine by timing both on a small problem (``gemm_choice``,
0.2-0.6 s, remembered in the kernel cache keyed by CPU, PyTorch version and thread count, so a
later process's first prompt does not pay it again; deleting the file measures again, and
``MINICPMV_BF16_GEMM=onednn`` or ``fp32`` forces one). Both multiply the same bf16 values
exactly, sum in float32 and round once to bf16: results differ only in the order of the float32
sums. Decoding steps (a few rows) do not come here: they use the native
GEMV of ``quant/native.py``. Does not pack or store weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .native import cache_dir, cpu_signature, write_atomically

log = logging.getLogger(__name__)

RowsOf = Callable[[int, int], torch.Tensor]  # (first, end) -> weight rows first..end-1

CHOICES = ("onednn", "fp32")
BLOCK_FLOATS = 4 << 20  # float32 weight values widened per block (16 MiB: stays in a 32 MiB L3) ...
MIN_BLOCK_ROWS = 256  # ... but no thinner than this (thin blocks slowed MKL: 55 rows of 18,944 by 1.5x)
MIN_MACS = 1 << 27  # smaller products (multiply-adds) stay on F.linear: a few ms either way
ROW_CHUNK = 4096  # activation rows per pass (the weight is widened again for each)
FP32_MARGIN = 0.95  # float32 must take under this fraction of oneDNN's time to be chosen


def widened_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for bf16 ``x`` [..., K] and ``w`` [N, K], multiplied in float32
    (MKL) with ``w`` widened a block of rows at a time; the result is bf16 [..., N]."""
    return _widened(x, w.shape[0], lambda first, end: w[first:end], bias)


def _widened(x: torch.Tensor, n_out: int, rows_of: RowsOf, bias: torch.Tensor | None) -> torch.Tensor:
    k = x.shape[-1]
    rows = x.numel() // k
    x2 = x.reshape(rows, k)  # [rows, K]
    y = torch.empty(rows, n_out, dtype=x.dtype)  # [rows, N]
    step = balanced_step(n_out, max(MIN_BLOCK_ROWS, BLOCK_FLOATS // k))
    block = torch.empty(min(step, n_out), k)  # [step, K] float32
    for r0 in range(0, rows, ROW_CHUNK):  # bounds the float32 product (a long prompt's MLP: GBs)
        xf = x2[r0 : r0 + ROW_CHUNK].float()  # [m, K]
        out = torch.empty(xf.shape[0], n_out)  # [m, N]: MKL writes each block's columns in place
        for s in range(0, n_out, step):
            e = min(n_out, s + step)
            wide = block[: e - s]
            wide.copy_(rows_of(s, e))  # [e-s, K] bf16 -> float32, exact
            torch.mm(xf, wide.t(), out=out[:, s:e])  # [m, e-s]
        if bias is not None:
            out += bias.float()  # before the one rounding to bf16, as a fused GEMM adds it
        y[r0 : r0 + ROW_CHUNK] = out  # rounded to bf16 once
    return y.reshape(*x.shape[:-1], n_out)


def balanced_step(n: int, most: int) -> int:
    """Rows per block when ``n`` rows go in blocks of at most ``most``: as many blocks as that
    needs, of equal size rounded up to 16 rows (a thin last block ran MKL ~10% slower: the
    vision MLP's 1,152 rows in 974 + 178)."""
    if n <= most:
        return n
    per = -(-n // -(-n // most))  # ceil(n / number of blocks)
    return min(n, (per + 15) // 16 * 16)


def _best_times(fns: list[Callable[[], object]], rounds: int = 3) -> list[float]:
    """Each function's fastest run over ``rounds`` alternations (after one warm-up each): a busy
    moment of a shared host then costs every candidate alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


@functools.cache
def gemm_choice() -> str:
    """"onednn" or "fp32": the GEMM ``prefill_linear`` uses for bf16 in this process (forced by
    the environment, else remembered for this machine, else measured now and remembered)."""
    forced = os.environ.get("MINICPMV_BF16_GEMM", "").strip().lower()
    if forced:
        if forced not in CHOICES:
            raise ConfigError(f"MINICPMV_BF16_GEMM={forced!r}: expected one of {', '.join(CHOICES)}")
        return forced
    key = _machine_key()
    remembered = _remembered().get(key)
    if remembered in CHOICES:
        return str(remembered)
    choice = _measured_choice()
    _remember(key, choice)
    return choice


def _measured_choice() -> str:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3584, generator=g).bfloat16()  # a layer's width: small probes favour oneDNN
    w = torch.randn(4096, 3584, generator=g).bfloat16()
    onednn, fp32 = _best_times([lambda: F.linear(x, w), lambda: widened_linear(x, w, None)])
    choice = "fp32" if fp32 < FP32_MARGIN * onednn else "onednn"
    log.info("bf16 prefill GEMM: %s (oneDNN bf16 %.1f ms, float32 %.1f ms on a 256x3584x4096 probe)",
             choice, onednn * 1e3, fp32 * 1e3)
    return choice


def _choices_file() -> Path:
    return cache_dir() / "bf16_gemm_choice.json"


def _machine_key() -> str:
    """What the measured choice depends on: the CPU, PyTorch (its oneDNN and MKL) and the threads."""
    parts = (cpu_signature(), torch.__version__, str(torch.get_num_threads()))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _remembered() -> dict[str, str]:
    try:
        data = json.loads(_choices_file().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again (and rewrite it)
    return data if isinstance(data, dict) else {}


def _remember(key: str, choice: str) -> None:
    """Add this machine's choice to the file, atomically (a failure only costs a later probe)."""
    path = _choices_file()
    choices = {**_remembered(), key: choice}
    try:
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(choices)))
    except OSError as e:
        log.info("could not remember the bf16 GEMM choice in %s: %s", path, e)


def prefill_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` over many rows: for bf16 CPU tensors through the GEMM
    ``gemm_choice`` picked, for anything else ``F.linear`` itself."""
    if w.dtype != torch.bfloat16 or (torch.is_grad_enabled() and w.requires_grad):
        return F.linear(x, w, bias)
    return prefill_linear_rows(x, w.shape[0], lambda first, end: w[first:end], bias)


def prefill_linear_rows(x: torch.Tensor, n_out: int, rows_of: RowsOf, bias: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """``prefill_linear`` of a bf16 weight [n_out, K] that ``rows_of(first, end)`` gives a block of
    rows at a time (dequantized, say): the float32 path never holds the whole weight."""
    tracked = torch.is_grad_enabled() and x.requires_grad  # autograd cannot follow the blocks' out=
    small = x.numel() * n_out < MIN_MACS  # not worth the probe (the demo model never pays for it)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not (tracked or small) and gemm_choice() == "fp32":
        return _widened(x, n_out, rows_of, bias)
    return F.linear(x, rows_of(0, n_out), bias)
