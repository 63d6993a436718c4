"""How fast a GGUF file's float tensors come off its map: the loader's copy against numpy's.

``GGUFTensor.as_stored`` (what ``minicpmv.load`` calls for every F32 / F16 / BF16 tensor of a
GGUF release) copies each tensor off the file's read-only map with torch's copy; until
2026-12-07 it used numpy's (``np.array(view, copy=True)``). This times both on the same file, every
tensor read and kept (as a load keeps them), each in a fresh process, alternating which goes first
in each round, and prints seconds, GB/s and the ratio per round and their median. The file:
``--file`` (any GGUF), else the perf-size 2.6 language model (``--layers`` layers) written at bf16
by ``bench_formats``' writer into ``--workdir``. Run it twice and the file is in the page cache
both times (the first read of a cold file measures the disk instead).

    python bench/bench_gguf_read.py --layers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_formats import _positive

# the two ways, as they are called in the child process
WAYS = ("loader", "numpy")


def read_all(path: Path, way: str) -> dict[str, float]:
    """Seconds and bytes to read every float tensor of ``path`` and keep it, one ``way``."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    from minicpmv.formats.gguf_read import _AS_STORED, GGUFTensor, _shape

    entries = [GGUFTensor(np.asarray(t.data), T(int(t.tensor_type)), _shape(t)) for t in GGUFReader(str(path)).tensors]
    entries = [e for e in entries if e.qtype in _AS_STORED]
    kept, t = [], time.perf_counter()
    for e in entries:
        if way == "loader":
            kept.append(e.as_stored())
        else:  # the copy the loader made before
            kept.append(torch.from_numpy(np.array(np.asarray(e.data).view(_AS_STORED[e.qtype][1]), copy=True)))
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "bytes": float(sum(x.numel() * x.element_size() for x in kept))}


def _fresh(path: Path, way: str, threads: int) -> dict[str, float]:
    code = (f"import sys, json, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"torch.set_num_threads({threads}); import bench_gguf_read as b; "
            f"print(json.dumps(b.read_all(b.Path({str(path)!r}), {way!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"bench_gguf_read: reading {path} ({way}) failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _file(args: argparse.Namespace, tmp: str) -> Path:
    if args.file is not None:
        from minicpmv.formats.gguf_read import is_gguf

        path = Path(args.file)
        if not path.is_file():
            raise SystemExit(f"bench_gguf_read: no such file: {path}")
        if not is_gguf(path):
            raise SystemExit(f"bench_gguf_read: {path} is not a GGUF file (no GGUF magic)")
        return path
    from bench_formats import _random_llm, write_gguf

    path = Path(tmp) / "bf16.gguf"
    write_gguf(_random_llm("2.6", args.layers), "2.6", "bf16", path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=None, help="a GGUF file (default: the perf-size 2.6 LLM at bf16)")
    ap.add_argument("--layers", type=_positive, default=4)
    ap.add_argument("--rounds", type=_positive, default=3)
    ap.add_argument("--threads", type=_positive, default=2)
    ap.add_argument("--workdir", default=None, help="where the written file goes (default: a temp dir)")
    args = ap.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = _file(args, tmp)
        _fresh(path, "numpy", args.threads)  # the file into the page cache
        ratios = []
        for r in range(args.rounds):
            got = {w: _fresh(path, w, args.threads) for w in (WAYS if r % 2 == 0 else WAYS[::-1])}
            ratios.append(got["numpy"]["seconds"] / got["loader"]["seconds"])
            print(f"round {r + 1}: " + "; ".join(
                f"{w} {v['seconds']:.2f} s ({v['bytes'] / v['seconds'] / 1e9:.2f} GB/s)" for w, v in got.items())
                + f"; numpy / loader {ratios[-1]:.2f}x", flush=True)
    print(f"{path.name}: {got['loader']['bytes'] / 1e9:.2f} GB of float tensors; "
          f"the loader's copy {statistics.median(ratios):.2f}x as fast as numpy's (median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
