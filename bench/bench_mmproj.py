"""Image encoding: this package's vision tower + resampler against llama.cpp's mmproj, same image, same run.

The perf-size checkpoint (the real MiniCPM-V 4.5 config: SigLIP-400M tower and resampler, random
weights, ``--llm-layers`` LLM layers) is built once (cached beside bench_chat's) and exported with
``minicpmv export --gguf --type f16`` (the mmproj in F16, as llama.cpp's converter writes it). Then,
in ``--rounds`` interleaved rounds, each a fresh process:

* this package: ``minicpmv.load`` of the checkpoint directory, one chat turn on the image with one
  new token; the time spent in ``encode_features`` (vision tower + resampler, every slice) counts;
* llama.cpp: ``llama-mtmd-cli -m model.gguf --mmproj mmproj.gguf --image IMG -n 1 -t THREADS``
  (``LLAMA_MTMD`` names the already-built binary); the sum of its per-slice encoding times counts
  ("slice encoded in N ms", or "mtmd batch encoding done in N ms" in newer builds).

Prints seconds per round, medians, and the ratio llama.cpp / ours (the issue asks for >= 2).
The machine may be shared: compare within one run only.

    LLAMA_MTMD=/path/to/llama-mtmd-cli python bench/bench_mmproj.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_chat import DEFAULT_CACHE, REAL_45, Timed, test_image

# llama.cpp prints one of these per image chunk (a slice), by version
SLICE_LINE = re.compile(r"(?:slice encoded in|mtmd batch encoding done in) (\d+) ms")


def prepare(cache: Path, layers: int, size: str) -> tuple[Path, Path, Path]:
    """(checkpoint directory, GGUF directory, image path), built once."""
    from _checkpoints import build_checkpoint
    from minicpmv.formats.gguf_write import export_gguf

    ckpt = cache / f"mmproj-4.5-l{layers}"
    if not (ckpt / "config.json").exists():
        print(f"building {ckpt} ...", flush=True)
        build_checkpoint(REAL_45, layers, 0, ckpt)
    gguf = cache / f"mmproj-4.5-l{layers}-gguf"
    if not (gguf / "mmproj.gguf").exists():
        print(f"exporting {gguf} ...", flush=True)
        export_gguf(ckpt, gguf, "f16")
    image = cache / f"bench-image-{size}.png"
    if not image.exists():
        test_image(size).save(image)
    return ckpt, gguf, image


def ours_once(ckpt: Path, image: Path, threads: int) -> dict[str, Any]:
    """Vision + resampler seconds of one fresh load (run in a child process)."""
    import torch
    from PIL import Image

    import minicpmv

    torch.set_num_threads(threads)
    cm = minicpmv.load(ckpt, dtype="bfloat16")
    enc = Timed(cm.runner.encode_features)
    cm.runner.encode_features = enc  # instance attribute: timing only
    session = minicpmv.ChatSession(cm, sampling=False, num_beams=1, repetition_penalty=1.0)
    for _ in session.ask_tokens([Image.open(image).convert("RGB"), "Describe it."], max_new_tokens=1):
        pass
    return {"seconds": enc.seconds, "cpu_seconds": enc.cpu_seconds}


def llama_once(binary: str, gguf: Path, image: Path, threads: int) -> dict[str, Any]:
    """Summed slice-encoding seconds that llama-mtmd-cli reports for the image."""
    cmd = [binary, "-m", str(gguf / "model.gguf"), "--mmproj", str(gguf / "mmproj.gguf"), "--image", str(image),
           "-p", "Describe it.", "-n", "1", "-t", str(threads), "--temp", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    ms = [int(m) for m in SLICE_LINE.findall(done.stdout + done.stderr)]
    if done.returncode != 0 or not ms:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"llama-mtmd-cli failed (exit {done.returncode}): {' | '.join(tail) or 'no output'}")
    return {"seconds": sum(ms) / 1e3, "slices": len(ms)}


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def _child(ckpt: Path, image: Path, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--ours-once", str(ckpt), str(image), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llm-layers", type=int, default=1)
    ap.add_argument("--image-size", default="1344")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--ours-once", nargs=2, type=Path, metavar=("CKPT", "IMAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ours_once:
        print(json.dumps(ours_once(*args.ours_once, args.threads)))
        return 0
    binary = os.environ.get("LLAMA_MTMD")
    if binary and not os.access(binary, os.X_OK):
        print(f"bench_mmproj.py: LLAMA_MTMD={binary} is not an executable file (build llama-mtmd-cli first)")
        return 2
    try:
        return _run(args, binary)
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        print(f"bench_mmproj.py: {e}")
        return 1


def _run(args: argparse.Namespace, binary: str | None) -> int:
    import torch

    ckpt, gguf, image = prepare(args.cache_dir, args.llm_layers, args.image_size)
    print(f"{_cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads; torch {torch.__version__}; "
          f"python {platform.python_version()}; llama-mtmd-cli: {binary or 'not given (LLAMA_MTMD)'}; "
          f"image {args.image_size}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows: dict[str, list[float]] = {"ours": [], "llama.cpp": []}
    for r in range(args.rounds):
        o = _child(ckpt, image, args.threads)
        rows["ours"].append(o["seconds"])
        line = f"round {r + 1}: ours {o['seconds']:.2f} s (CPU {o['cpu_seconds']:.1f} s)"
        if binary:
            ll = llama_once(binary, gguf, image, args.threads)
            rows["llama.cpp"].append(ll["seconds"])
            line += f", llama.cpp {ll['seconds']:.2f} s ({ll['slices']} slices)"
        print(line, flush=True)
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    for k, v in rows.items():
        if v:
            print(f"{k:<10} median {med[k]:.2f} s [{min(v):.2f}-{max(v):.2f}]")
    if "llama.cpp" in med:
        print(f"llama.cpp / ours: {med['llama.cpp'] / med['ours']:.2f}x (issue 18 asks >= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
