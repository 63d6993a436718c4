"""Command-line flags of ``minicpmv batch`` and of ``minicpmv serve --ray``, and their handlers.

Importing this module is cheap (no torch, no Ray): ``cli.py`` adds the flags at start-up and
the handlers import the runners only when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """``minicpmv batch`` flags besides --model/--dtype/--device."""
    p.add_argument("--input", "-i", required=True,
                   help="a folder (recursive: images and videos), a quoted glob ('data/**/*.jpg'), "
                        "or a .jsonl/.csv/.parquet table with id, image|video, prompt and optional settings")
    p.add_argument("--output", "-o", required=True,
                   help="results: .jsonl or .parquet; rows already in it are skipped (resume)")
    p.add_argument("--prompt", default=None,
                   help="prompt of rows that have none (default: 'Describe this image.' / 'Describe this video.')")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--think", action="store_true", help="thinking mode (4.5): reasoning goes to its own field")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: the official sampling preset)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of every sampled row (reproducible sampling)")
    p.add_argument("--max-slice-nums", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together per model (default 8)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per row, prompt + answer (default min(model context, 4096))")
    p.add_argument("--no-batch-invariance", action="store_true",
                   help="faster decoding whose last bits may depend on the other rows in the batch")
    p.add_argument("--workers", type=int, default=2, help="local: threads that read and preprocess rows")
    p.add_argument("--chunk-rows", type=int, default=64, help="rows per atomic write of the output")
    p.add_argument("--chunk-seconds", type=float, default=10.0, help="write finished rows at least this often")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray (needs the [scale] extra)")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on Ray Data: a cluster ADDRESS ('auto': the one `ray start` runs here), "
                          "or nothing for a local Ray instance")
    _add_replica_arguments(ray)
    ray.add_argument("--cpu-workers", type=int, default=1, help="Ray actors that read, decode and preprocess")
    ray.add_argument("--rows-per-call", type=int, default=None,
                     help="rows handed to a replica at a time (default 2 x --max-batch-size)")


def _add_replica_arguments(p: Any) -> None:
    p.add_argument("--replicas", type=int, default=None, help="model replicas (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica reserves (default 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    p.add_argument("--ray-num-cpus", type=int, default=None,
                   help="CPUs a local Ray instance offers (default: the machine's; ignored with an ADDRESS)")
    p.add_argument("--ray-object-store-mb", type=int, default=None,
                   help="object store of a local Ray instance (default: Ray's; ignored with an ADDRESS)")


def add_ray_serve_arguments(p: argparse.ArgumentParser) -> None:
    """``minicpmv serve --ray ...`` flags."""
    ray = p.add_argument_group("Ray Serve (needs the [scale] extra)")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="serve through Ray Serve with several replicas: a cluster ADDRESS ('auto': the one "
                          "`ray start` runs here), or nothing for a local Ray instance")
    _add_replica_arguments(ray)
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling: requests per replica to aim for (default --max-batch-size)")


def job_from_args(args: argparse.Namespace) -> Any:
    from .job import BatchJob, RayOptions

    defaults: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens, "temperature": 0.0 if args.greedy else args.temperature,
        "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
        "seed": args.seed, "enable_thinking": True if args.think else None, "system_prompt": args.system,
        "max_slice_nums": args.max_slice_nums,
    }
    ray = None
    if args.ray is not None:
        ray = RayOptions(address=args.ray or None, replicas=args.replicas or 1,
                         gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                         cpu_workers=args.cpu_workers, rows_per_call=args.rows_per_call,
                         num_cpus=args.ray_num_cpus, object_store_mb=args.ray_object_store_mb)
    elif args.replicas is not None:
        from ..errors import InputError

        raise InputError("--replicas needs --ray (the local runner has one model)")
    return BatchJob(
        model=args.model, input=args.input, output=args.output, prompt=args.prompt,
        defaults={k: v for k, v in defaults.items() if v is not None}, dtype=args.dtype, device=args.device,
        max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
        batch_invariant=not args.no_batch_invariance, workers=args.workers, chunk_rows=args.chunk_rows,
        chunk_seconds=args.chunk_seconds, progress=not args.no_progress, ray=ray,
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM (a service manager, ``kill``) unwinds like Ctrl-C: finished rows are
    written and a Ray instance this process started is shut down."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_batch(args: argparse.Namespace) -> int:
    from .runner import run_batch

    with _sigterm_as_interrupt():
        summary = run_batch(job_from_args(args))
    print(summary.line(), file=sys.stderr)
    return 0


def cmd_serve_ray(args: argparse.Namespace, config: Any) -> int:
    from .ray_serve import ServeScale, run_serve

    scale = ServeScale(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       target_ongoing_requests=args.target_ongoing_requests,
                       gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)
    with _sigterm_as_interrupt():
        run_serve(config, scale, host=args.host, port=args.port, address=args.ray or None,
                  num_cpus=args.ray_num_cpus, object_store_mb=args.ray_object_store_mb)
    return 0
