"""Batch captioning throughput: the local runner, and Ray Data with 1 and 2 model replicas,
side by side in one run; then an estimate of the time and cost of captioning 1 M images on N
GPUs from measured per-replica rates.

Each mode captions the same generated images (random pixels, a few sizes) with the tiny 2.6
checkpoint (float32, greedy, ``--max-new-tokens`` tokens), first a short warm-up job (worker
processes start, imports), then the measured job. Printed per mode: the measured job's wall time
(model loading and Ray actor start-up included, as a user sees it), when its first row arrived,
rows per second over the whole job, generated tokens per second, the ratio of rows per second
to the local runner and to one Ray replica, and the rate once rows flow (rows after the first
over the time from the first to the last; Ray hands results back a block at a time, so this is
coarse for short jobs). A replica gets ``--cpus-per-replica`` CPUs and
as many torch threads; the local runner uses ``--threads`` threads.

The 1 M image estimate does not come from this machine: the per-replica GPU rate is the
measured figure of the project's ``shared/anchors/performance.md`` (one H200, real-size MiniCPM-V 2.6,
random bf16 weights, torch 2.11 cu130, this package at 2062c13: 16 concurrent streams with
images decode 149-201 generated tok/s in total; time to first token of one 1344x1344 image
0.19-0.24 s). With ``--caption-tokens`` tokens per caption a GPU replica captions
149/T..201/T images per second. Assumptions, printed with the result: replicas scale linearly
(data parallel, no shared state; the CPU 1 -> 2 replica ratio printed beside it shows scaling
only where each replica has an idle core of its own, which a shared 2-core machine has not),
preprocessing keeps up (its per-image CPU time is measured here), and ``--gpu-hour-usd`` is a
price you supply (the default is an assumption, not a quote).

Examples:
  python bench/bench_batch.py                       # 96 images, 32 tokens: a few minutes on 2 cores
  python bench/bench_batch.py --images 96 --caption-tokens 80 --gpu-hour-usd 4.0 --gpus 8 64 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "conformance" / "2.6" / "_checkpoint"
ANCHOR = "shared/anchors/performance.md (H200, real-size 2.6, minicpmv 2062c13, 16 streams with images)"
GPU_TOKS = (149.0, 201.0)  # generated tok/s per GPU replica, measured (see ANCHOR)


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    sizes = [(224, 224), (320, 240), (448, 336), (640, 480)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.png")


class TimedSink:
    """A ChunkSink stand-in that records when each record arrives (nothing is written)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens = 0
        self.errors = 0
        self.chunk_seconds = 1.0

    def add(self, rec: dict) -> None:
        self.times.append(time.perf_counter())
        self.tokens += rec.get("completion_tokens") or 0
        self.errors += rec.get("error") is not None

    def tick(self) -> None:
        pass


def run_mode(args: argparse.Namespace, folder: Path, replicas: int | None, limit: int | None = None) -> dict:
    from minicpmv.batch.inputs import discover
    from minicpmv.batch.job import BatchJob, RayOptions

    ray = None if replicas is None else RayOptions(replicas=replicas, cpus_per_replica=args.cpus_per_replica,
                                                   rows_per_call=args.rows_per_call)
    job = BatchJob(model=str(args.model), input=str(folder), output="unused.jsonl", dtype=args.dtype,
                   defaults={"temperature": 0.0, "max_new_tokens": args.max_new_tokens}, progress=False,
                   max_batch_size=args.max_batch_size, ray=ray)
    rows = discover(folder).rows[:limit]
    sink = TimedSink()
    start = time.perf_counter()
    if replicas is None:
        import torch

        from minicpmv.batch.local import run_local

        torch.set_num_threads(args.threads)
        run_local(job, rows, sink)  # type: ignore[arg-type]
    else:
        from minicpmv.batch.ray_data import run_ray

        run_ray(job, rows, sink)  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    t = sink.times
    return {"mode": "local" if replicas is None else f"ray x{replicas}", "rows": len(t), "errors": sink.errors,
            "wall_s": wall, "first_s": t[0] - start, "rows_s": len(t) / wall, "tok_s": sink.tokens / wall,
            "after_first_rows_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan")}


def measure(args: argparse.Namespace, folder: Path, replicas: int | None) -> dict:
    run_mode(args, folder, replicas, limit=args.warmup)
    return run_mode(args, folder, replicas)


def preprocess_seconds(model: Path, n: int = 8) -> float:
    """CPU seconds to read + preprocess one 1344x1344 image with this checkpoint's processor."""
    from minicpmv.batch.inputs import Row
    from minicpmv.batch.prepare import Preparer, load_processor

    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(1)
        path = Path(d) / "big.png"
        Image.fromarray(rng.integers(0, 255, (1344, 1344, 3), dtype=np.uint8)).save(path)
        prep = Preparer(load_processor(model), {})
        row = Row("big", "Describe this image.", ("image", str(path)))
        prep(row)
        start = time.process_time()
        for _ in range(n):
            prep(row)
        return (time.process_time() - start) / n


def estimate(args: argparse.Namespace, cpu_ratio: float, prep_s: float) -> list[str]:
    lo, hi = (x / args.caption_tokens for x in GPU_TOKS)  # images/s per GPU replica
    lines = [
        f"Estimate: 1,000,000 images, {args.caption_tokens}-token captions, one replica per GPU",
        f"  per-GPU rate {lo:.2f}-{hi:.2f} images/s = {GPU_TOKS[0]:.0f}-{GPU_TOKS[1]:.0f} tok/s / "
        f"{args.caption_tokens} tokens (measured: {ANCHOR})",
        f"  GPU time {1e6 / hi / 3600:.0f}-{1e6 / lo / 3600:.0f} GPU-hours; at ${args.gpu_hour_usd:.2f} per GPU-hour "
        f"(assumed price) ${1e6 / hi / 3600 * args.gpu_hour_usd:,.0f}-${1e6 / lo / 3600 * args.gpu_hour_usd:,.0f}",
    ]
    for n in args.gpus:
        lines.append(f"  {n:>4} GPUs: {1e6 / (hi * n) / 3600:.1f}-{1e6 / (lo * n) / 3600:.1f} h wall, "
                     f"assuming linear scaling (replicas share nothing)")
    lines.append(f"  1 -> 2 replicas measured here on CPU: x{cpu_ratio:.2f} (load average {os.getloadavg()[0]:.1f} "
                 f"on {os.cpu_count()} CPUs: scaling shows only where each replica has its own idle device)")
    lines.append(f"  preprocessing: {prep_s * 1000:.0f} ms CPU per 1344x1344 image (measured here) -> "
                 f"{hi * prep_s:.2f} CPU cores per GPU keep up")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=TINY)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--warmup", type=int, default=8, help="rows of the warm-up job before each measured one")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--rows-per-call", type=int, default=8)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the local runner")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    p.add_argument("--caption-tokens", type=int, default=100, help="tokens per caption in the 1 M estimate")
    p.add_argument("--gpu-hour-usd", type=float, default=3.50, help="assumed price of one GPU-hour")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import ray
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; Python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"ray {ray.__version__}", flush=True)
    print(f"model {args.model} ({args.dtype}), {args.images} images, greedy, {args.max_new_tokens} new tokens, "
          f"batch {args.max_batch_size}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        make_images(folder, args.images)
        results.append(measure(args, folder, None))
        ray.init(num_cpus=args.ray_cpus, object_store_memory=400 * 2**20, include_dashboard=False,
                 log_to_driver=False)
        try:
            for replicas in (1, 2):
                results.append(measure(args, folder, replicas))
        finally:
            ray.shutdown()
    local, one = results[0]["rows_s"], results[1]["rows_s"]
    print(f"\n{'mode':<9} {'rows':>5} {'wall s':>7} {'first row s':>12} {'rows/s':>7} {'tok/s':>7} "
          f"{'vs local':>9} {'vs ray x1':>9} {'rows/s after the first':>23}")
    for r in results:
        print(f"{r['mode']:<9} {r['rows']:>5} {r['wall_s']:>7.1f} {r['first_s']:>12.1f} {r['rows_s']:>7.2f} "
              f"{r['tok_s']:>7.0f} {r['rows_s'] / local:>8.2f}x {r['rows_s'] / one:>8.2f}x "
              f"{r['after_first_rows_s']:>23.2f}")
    ratio = results[2]["rows_s"] / one
    prep_s = preprocess_seconds(args.model)
    print()
    for line in estimate(args, ratio, prep_s):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratio_2_vs_1": ratio, "prep_s": prep_s}, indent=2))


if __name__ == "__main__":
    main()
