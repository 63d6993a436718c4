"""Server throughput: continuous batching against sequential processing, side by side.

Starts ``minicpmv serve`` (a subprocess on 127.0.0.1, one per mode) and drives it with 1, 4 and
16 concurrent HTTP clients, each sending the same number of greedy chat requests (a short text
prompt, optionally with a small image; ``min_tokens = max_tokens`` so every answer has exactly
``--max-tokens`` tokens). Modes:

* ``sequential``: ``--max-batch-size 1``: one request at a time, the rest queue (what a
  one-request-at-a-time server does);
* ``batched``: continuous batching with the default batch-invariant decoding;
* ``batched-fast``: continuous batching with ``--no-batch-invariance``.

Prints requests/s and generated tokens/s per mode and client count, and each mode's speed-up
over ``sequential`` at the same client count (all measured in this one run).

Examples:
  python bench/bench_serve.py                          # tiny 4.5 checkpoint, about a minute
  python bench/bench_serve.py --model DIR --dtype bfloat16 --max-tokens 64 --image
  python bench/bench_serve.py --src OTHER/src --json out.json   # serve another source tree's code
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "conformance" / "4.5" / "_checkpoint"
MODES = {
    "sequential": ["--max-batch-size", "1"],
    "batched": ["--max-batch-size", "16"],
    "batched-fast": ["--max-batch-size", "16", "--no-batch-invariance"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "minicpmv.cli", "serve", "--model", str(args.model), "--dtype", args.dtype,
           "--port", str(port), "--served-model-name", "bench", "--max-model-len", str(args.max_model_len),
           "--max-queue", "256", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(args.src)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"server failed to start:\n{proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become healthy in 120 s")


def _body(args: argparse.Namespace, client: int, i: int, image_url: str | None) -> dict:
    content: list[dict] = [{"type": "text", "text": f"Client {client} asks question {i}: describe it."}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": args.max_tokens, "min_tokens": args.max_tokens}


async def run_clients(
    url: str, args: argparse.Namespace, clients: int, image_url: str | None
) -> tuple[float, int, int]:
    """(seconds, requests, completion tokens) for ``clients`` concurrent clients."""
    async def one(c: int, http: httpx.AsyncClient) -> int:
        tokens = 0
        for i in range(args.requests):
            r = await http.post(f"{url}/v1/chat/completions", json=_body(args, c, i, image_url))
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
        return tokens

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await one(0, http)  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(c, http) for c in range(clients)))
        return time.perf_counter() - start, clients * args.requests, sum(counts)


def _image_url() -> str:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=TINY)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--image", action="store_true", help="add a 224x224 image to every request")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--src", type=Path, default=ROOT / "src", help="source tree the servers run (default: this one)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args()
    image_url = _image_url() if args.image else None
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for mode in args.modes:
        proc, url = start_server(args, MODES[mode])
        try:
            for c in args.clients:
                secs, reqs, toks = asyncio.run(run_clients(url, args, c, image_url))
                results[(mode, c)] = (reqs / secs, toks / secs)
                print(f"  {mode:<13} {c:>3} clients: {reqs / secs:7.2f} req/s {toks / secs:9.1f} tok/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\nmodel {args.model.name}, {args.dtype}, {args.max_tokens} tokens per answer, {args.requests} "
          f"requests per client{', with a 224x224 image' if args.image else ''}; torch threads per server "
          f"default; host cores {os.cpu_count()}")
    print(f"{'clients':>7} | " + " | ".join(f"{m:>24}" for m in args.modes))
    for c in args.clients:
        cells = []
        base = results.get(("sequential", c))
        for m in args.modes:
            rps, tps = results[(m, c)]
            ratio = f" x{tps / base[1]:.2f}" if base and m != "sequential" else ""
            cells.append(f"{tps:8.1f} tok/s {rps:5.1f} r/s{ratio}".rjust(24))
        print(f"{c:>7} | " + " | ".join(cells))
    if args.json:
        figures = {f"{m}_{c}c_tok_s": tps for (m, c), (_, tps) in results.items()}
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
