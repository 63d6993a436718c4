"""Decode and prefill speed of the GGUF types, this package against llama.cpp, same shapes, same run.

The perf-size MiniCPM-V 2.6 language model (``--dims``; the real Qwen2-7B widths and vocabulary,
``--layers`` layers, random weights) is written as GGUF by ``minicpmv export``'s writer at bf16,
q8_0 and q4_0. For each file, in ``--rounds`` interleaved rounds:

* this package: the file loaded as ``minicpmv.load`` loads a GGUF (bf16: the native bf16 GEMV, or
  prepacked oneDNN; Q8_0: grouped int8 and Q6_K: its blocks, on the native kernels, exactly, else
  dequantized to bf16; also requantized to int8 with ``quantize="int8"``; Q4_0: int4 group 32, the
  weights exact, multiplied at decode with Q8_0 activation blocks as llama.cpp multiplies them),
  ``--prompt`` prompt positions prefilled (timed after a warm-up prefill, as llama-bench times its
  prefill; the first prefill of the process is printed too), then ``--tokens`` decode steps with the engine;
* llama.cpp: ``llama-bench -m FILE -p PROMPT -n TOKENS -d PROMPT -t THREADS -r REPS`` (prefill of
  the prompt, decode after a prompt of the same depth), when ``LLAMA_BENCH`` names an already-built
  binary.

``--reps`` (default 1) times that many prefills and decodes on both sides after the warm-up and
takes their mean, as llama-bench's ``-r`` does (its own default is 5): with 1, a host that is
still busy right after our process wrote its weights (a VM's steal time, seen in the first
seconds after a load) weighs on the one timed prefill.

Each of our runs is a fresh process (as a user's is; llama-bench's are too). Prints tok/s per
round and the range over rounds, and our/llama.cpp ratios: each round's ratio (the two ran back
to back, ours first in rounds 1, 3, ..., llama.cpp first in rounds 2, 4, ..., so that a drift of
the host favours neither), then their median; a virtual machine's memory bandwidth can move by
half within minutes, so the ratio of two medians taken at different moments says less. Compare
within one run only.
Needs ~14 GB free disk/RAM (4 layers).

    LLAMA_BENCH=/path/to/llama-bench python bench/bench_formats.py --layers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from _common import perf_config, read_bandwidth

ROOT = Path(__file__).resolve().parents[1]
REAL_45 = ROOT / "tests" / "data" / "real-4.5" / "release" / "config.json"
TYPES = ("bf16", "q8_0", "q4_0")


def _random_llm(dims: str, layers: int) -> nn.Module:
    """The perf-size LLM with random bf16 weights (the embedding table random too: it is written)."""
    from minicpmv.loading import build_on_meta

    model = build_on_meta(perf_config(dims, layers, REAL_45))
    g = torch.Generator().manual_seed(0)
    for name, p in list(model.llm.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        t = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=g).div_(p.shape[-1] ** 0.5)
        model.llm.get_submodule(mod_name)._parameters[attr] = nn.Parameter(t.to(torch.bfloat16), requires_grad=False)
    model.vpm, model.resampler = nn.Identity(), nn.Identity()
    return model


def write_gguf(model: nn.Module, dims: str, fmt: str, path: Path) -> None:
    """The language-model GGUF of ``model`` as ``minicpmv export --gguf --type fmt`` writes it (the
    real 4.5 tokenizer stands in for the vocabulary: only its size matters here)."""
    from minicpmv.formats import gguf_write as gw
    from minicpmv.processing.tokenizer import Tokenizer
    from minicpmv.versions import get_version

    cfg = perf_config(dims, model.llm.config.num_hidden_layers, REAL_45)
    state = {f"llm.{k}": v for k, v in model.llm.state_dict().items()}
    tok = Tokenizer.from_dir(REAL_45.parent)
    plan = gw._llm_plan(cfg, fmt, list(state), lambda k: state[k].float().numpy())
    arch = gw.names.LLM_ARCHS[cfg.text.family]
    gw._write(path, arch, plan, lambda w: gw._llm_metadata(w, cfg, None, fmt, tok, get_version(cfg.version)))


def load_ours(model: nn.Module, path: Path, requantize: str | None) -> None:
    """Fill ``model.llm``'s linears from the GGUF file as the loader does (int4 storage, or float
    then prepacked / requantized)."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    from minicpmv.formats import gguf_names as names
    from minicpmv.formats.gguf_read import GGUFTensor, _shape
    from minicpmv.formats.load import gguf_keeps_int8
    from minicpmv.quant.linear import PackedLinear, QuantLinear, QuantSpec, replace_module

    keep_int8 = not requantize and gguf_keeps_int8("cpu")  # requantized: Q8_0 goes through the float path

    entries = {names.gguf_to_llm(t.name): GGUFTensor(np.asarray(t.data), T(int(t.tensor_type)), _shape(t))
               for t in GGUFReader(str(path)).tensors}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, nn.Linear) or f"{name}.weight" not in entries:
            continue
        entry, bias_entry = entries[f"{name}.weight"], entries.get(f"{name}.bias")
        bias = None if bias_entry is None else bias_entry.to_float().to(torch.bfloat16)
        kept = entry.kept_quantized(keep_int8)  # as the loader decides
        if kept is not None:
            st = kept()
            spec = QuantSpec.of_storage(st, layer.in_features)
            new: nn.Module = QuantLinear(layer.in_features, layer.out_features, spec,
                                         bias=bias is not None, dtype=torch.bfloat16, device="meta")
            new.set_storage(st, bias, device="cpu")
            new.prepare()
        elif requantize:
            new = QuantLinear.from_float(entry.to_float(), bias, QuantSpec.parse(requantize), dtype=torch.bfloat16)
        else:
            lin = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, dtype=torch.bfloat16)
            lin.weight = nn.Parameter(entry.as_stored().to(torch.bfloat16), requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias, requires_grad=False)
            new = PackedLinear(lin)
        replace_module(model, name, new)
    gc.collect()


def ours(model: nn.Module, prompt: int, tokens: int, reps: int = 1) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, first prefill tok/s) of the engine on ``model.llm``. Like
    llama-bench, which runs a warm-up before it measures, the timed prefills come after one (the
    first, into a throwaway cache, pays one-time costs: oneDNN's kernel creation, and on a
    machine's first run the GEMM probe of ``quant/wide_gemm.py``; its rate is the third value).
    ``reps`` repetitions as llama-bench's ``-r``: the mean of the prefill rates, then of the decode
    rates, each decode after a prompt of the same length in a new cache."""
    from minicpmv.engine.generate import generate_steps, prefill_positions
    from minicpmv.engine.kv_cache import KVCache
    from minicpmv.engine.sampling import SamplingParams

    llm = model.llm
    g = torch.Generator().manual_seed(1)
    emb = (torch.randn(1, prompt, llm.config.hidden_size, generator=g) * 0.02).to(torch.bfloat16)
    mask = torch.ones(1, prompt, dtype=torch.long)
    params = SamplingParams(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1)
    pps, tgs = [], []
    with torch.inference_mode():
        t = time.perf_counter()
        model(emb, prefill_positions(mask), mask, cache=KVCache.for_model(model, 1))  # the warm-up
        first = prompt / (time.perf_counter() - t)
        for _ in range(reps):
            cache = KVCache.for_model(model, 1)
            t = time.perf_counter()
            model(emb, prefill_positions(mask), mask, cache=cache)
            pps.append(prompt / (time.perf_counter() - t))
        for r in range(reps):
            if r:  # llama-bench's -d: a prompt of the same depth before each timed decode
                cache = KVCache.for_model(model, 1)
                model(emb, prefill_positions(mask), mask, cache=cache)
            step = model.embed_tokens(torch.zeros(1, 1, dtype=torch.long))
            it = generate_steps(model, step, None, params, cache=cache)
            next(it)
            t = time.perf_counter()
            for _ in it:
                pass
            tgs.append(tokens / (time.perf_counter() - t))
    return statistics.mean(pps), statistics.mean(tgs), first


def theirs(binary: str, path: Path, prompt: int, tokens: int, threads: int, reps: int = 1) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) reported by llama-bench for ``path`` (``-r reps``: the mean)."""
    cmd = [binary, "-m", str(path), "-p", str(prompt), "-n", "0", "-t", str(threads), "-r", str(reps), "-o", "json"]
    pp = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)[0]["avg_ts"]
    cmd = [binary, "-m", str(path), "-p", "0", "-n", str(tokens), "-d", str(prompt), "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    tg = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)[0]["avg_ts"]
    return float(pp), float(tg)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", choices=["2.6", "4.5"], default="2.6")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=_positive, default=1,
                    help="timed repetitions per round on both sides, their mean (llama-bench's -r)")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--workdir", default=None, help="where the GGUF files go (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    binary = os.environ.get("LLAMA_BENCH")
    types = [t.strip() for t in args.types.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, python {sys.version.split()[0]}, "
          f"llama-bench: {binary or 'not given (LLAMA_BENCH)'}; read bandwidth {read_bandwidth(reps=2) / 1e9:.1f} GB/s")
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        base = _random_llm(args.dims, args.layers)
        files = {}
        for fmt in types:
            files[fmt] = Path(tmp) / f"{fmt}.gguf"
            write_gguf(base, args.dims, fmt, files[fmt])
            print(f"wrote {fmt}: {files[fmt].stat().st_size / 2**30:.2f} GiB", flush=True)
        del base
        gc.collect()
        # the int8 requantization right after Q8_0's pair, the llama.cpp run it is compared with
        variants = [v for f in types for v in [(f, None)] + ([(f, "int8")] if f == "q8_0" else [])]
        rows: dict[str, list[tuple[float, ...]]] = {}
        for r in range(args.rounds):
            for fmt, requant in variants:
                name = f"ours {fmt}" + (f" -> {requant}" if requant else "")
                runs = [(name, functools.partial(_ours_fresh, args, files[fmt], requant))]
                if binary and requant is None:
                    runs.append((f"llama.cpp {fmt}", functools.partial(
                        theirs, binary, files[fmt], args.prompt, args.tokens, args.threads, args.reps)))
                for who, run in runs[::-1] if r % 2 else runs:  # even rounds llama.cpp first: drift favours neither
                    rows.setdefault(who, []).append(run())
            done = "; ".join(f"{k} {v[-1][1]:.1f}" for k, v in rows.items())
            print(f"round {r + 1} decode tok/s: {done}", flush=True)
    _report(rows, args)
    return 0


def _ours_fresh(args: Any, path: Path, requant: str | None) -> tuple[float, ...]:
    """``ours`` in a fresh process, as a user's run starts: the memory this process churned while
    writing the files (and the other variants) does not decide whether the weights get 2 MB pages."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch, bench_formats as b; "
            f"torch.set_num_threads({args.threads}); m = b._skeleton({args.dims!r}, {args.layers}); "
            f"b.load_ours(m, b.Path({str(path)!r}), {requant!r}); "
            f"print(*b.ours(m, {args.prompt}, {args.tokens}, {args.reps}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[-3]), float(out[-2]), float(out[-1])


def _skeleton(dims: str, layers: int) -> nn.Module:
    """The perf-size LLM with small placeholder weights where the file fills the linears: norms and
    the embedding table (a zero-stride view) only."""
    from minicpmv.loading import build_on_meta

    model = build_on_meta(perf_config(dims, layers, REAL_45))
    for name, p in list(model.llm.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = model.llm.get_submodule(mod_name)
        if name == "model.embed_tokens.weight":
            t = torch.full((1, p.shape[1]), 0.01, dtype=torch.bfloat16).expand(*p.shape)
        elif p.dim() == 1:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            continue  # filled from the file
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    model.vpm, model.resampler = nn.Identity(), nn.Identity()
    return model.eval()


def _report(rows: dict[str, list[tuple[float, ...]]], args: Any) -> None:
    print(f"\n== {args.dims} LLM dims, {args.layers} layers, prompt {args.prompt}, {args.tokens} decode tokens, "
          f"{args.threads} threads, {args.rounds} interleaved rounds (median [min-max])")
    print("prefill: after a warm-up prefill, as llama-bench measures it; ours' first prefill of the process "
          "in the last column")
    print(f"{'variant':<22} {'prefill tok/s':>24} {'decode tok/s':>24} {'x llama.cpp (pp / tg)':>22} "
          f"{'first prefill':>14}")
    for name, vals in rows.items():
        pp, tg = [v[0] for v in vals], [v[1] for v in vals]
        fmt = name.split()[1]
        ref = rows.get(f"llama.cpp {fmt}") if name.startswith("ours") else None
        ratio = ""
        if ref:  # per round (ours and llama.cpp back to back, the host's speed alike), then the median
            ratio = (f"{statistics.median(o[0] / t[0] for o, t in zip(vals, ref, strict=True)):.2f} / "
                     f"{statistics.median(o[1] / t[1] for o, t in zip(vals, ref, strict=True)):.2f}")
        first = f"{statistics.median([v[2] for v in vals]):14.1f}" if len(vals[0]) > 2 else ""
        print(f"{name:<22} {statistics.median(pp):8.1f} [{min(pp):6.1f}-{max(pp):6.1f}] "
              f"{statistics.median(tg):8.2f} [{min(tg):6.2f}-{max(tg):6.2f}] {ratio:>22} {first}")


if __name__ == "__main__":
    sys.exit(main())
