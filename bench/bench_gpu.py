"""GPU benchmark (issue 16): a real-size MiniCPM-V checkpoint on one CUDA device, eager against
compiled decoding, side by side in one run, with the device's copy bandwidth as the ceiling.

For each version (2.6: SigLIP-400M + Qwen2-7B dims; 4.5: the release config, SigLIP-400M +
Qwen3-8B; all LLM layers) it builds a random-weight checkpoint directory on the GPU (sharded bf16
safetensors + index, tokenizer and preprocessor files; cached), then for each decode mode
(``--modes``: eager, compiled = ``load(compile=True)``, i.e. torch.compile "reduce-overhead" with
CUDA graphs; static = static shapes without compiling) measures in this one process:

- load: ``minicpmv.load`` from the page cache (the files are read once before, untimed);
- one 1344x1344 image (10 slices): preprocessing, vision + resampler, time to first token, decode
  tokens/s with the image in context (all tokens, and steady state after the first 8), as a
  ratio of the decode ceiling = copy bandwidth / bytes read per token;
- second-turn time to first token, over several follow-up turns (min / median / max);
- throughput of 1/4/16/64 concurrent conversations, each with its own image and 128 new tokens,
  through the server's engine (``BatchEngine``, batch-invariant mode; the largest count also in
  the fast mode), as a multiple of the single-conversation rate, and whether the first
  conversation's tokens and logits are bit-identical alone and in every batch;
- peak GPU memory (``max_memory_allocated``) against parameter bytes + KV cache bytes;
- the device, driver and software versions.

Without CUDA it refuses (exit 2). ``--tiny --device cpu`` runs every step on the tiny
conformance checkpoints on the CPU (a smoke test of this script: tests/test_bench_gpu.py).

Examples:
  python bench/bench_gpu.py --versions 2.6 --json results-gpu.json
  python bench/bench_gpu.py --versions 2.6 4.5 --modes eager compiled --concurrency 1 4 16 64
  python bench/bench_gpu.py --tiny --device cpu --modes eager static --concurrency 1 2 --new-tokens 4
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _checkpoints import build_checkpoint
from _common import read_bandwidth, streamed_bytes
from bench_chat import Timed, test_image, vision_flops

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "data" / "conformance"
REAL_45 = ROOT / "tests" / "data" / "real-4.5" / "release"
DEFAULT_CACHE = Path.home() / ".cache" / "minicpmv" / "bench-gpu"
BUILD_FORMAT = 1  # bump when the generated checkpoint changes
MODES = {"eager": False, "static": "static", "compiled": True}
QUESTION = "Describe this image in detail."
FOLLOW_UPS = ["And what is in the top left corner?", "Which colours dominate?", "Is there any text?",
              "What is in the centre?", "Describe the bottom edge.", "How many objects are there?"]
TARGETS = {  # issue 16 acceptance (H200 class GPU, real-size 2.6, bf16)
    "decode_tok_s": 200.0, "decode_ceiling_ratio": 0.65, "ttft_s": 0.10, "second_ttft_s": 0.05,
    "x16": 10.0, "x64": 25.0, "load_s": 6.0, "memory_ratio": 1.15,
}
OFFICIAL_26 = {  # the measurement of the official 2.6 code on one H200 (not re-run here)
    "load_s": 6.2, "ttft_s": 0.25, "decode_tok_s": 48.0, "second_ttft_s": 0.21, "tok_s_16": 167.0,
    "peak_memory_GiB": 26.4,
}
REAL_26 = {  # MiniCPM-V 2.6 dimensions (spec: Qwen2-7B + SigLIP-400M); the layout keys come from the tiny 2.6 config
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "vocab_size": 151666, "max_position_embeddings": 32768, "max_window_layers": 28,
    "rope_theta": 1000000.0,
    "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}


class Refused(Exception):
    """The run cannot happen here (no CUDA, a real-size model on a CPU)."""


# ------------------------------------------------------------------------- device and ceilings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncTimed(Timed):
    """``Timed`` that waits for the device before reading the clock."""

    def __init__(self, fn: Callable[..., Any], device: torch.device) -> None:
        super().__init__(fn)
        self.device = device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            out = self.fn(*args, **kwargs)
            sync(self.device)
            return out
        finally:
            self.seconds += time.perf_counter() - t


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Best device-to-device copy rate, bytes read + written per second (the decode ceiling's
    numerator, as in the issue); on a CPU the read bandwidth of a full reduction."""
    if device.type != "cuda":
        return read_bandwidth(nbytes=min(nbytes, 1 << 30))
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    dst.copy_(src)
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def device_info(device: torch.device) -> dict[str, Any]:
    """Device, driver and software versions."""
    import safetensors
    import tokenizers

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__,
                            "machine": platform.machine(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_GiB=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown"
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown"
    else:
        info["name"] = platform.processor() or "cpu"
    return info


# ------------------------------------------------------------------------- checkpoints


def version_source(version: str, tiny: bool) -> tuple[dict[str, Any], Path]:
    """(config.json content, directory of the tokenizer / preprocessor files) of a version."""
    if tiny:
        d = CONF / version / "_checkpoint"
        return json.loads((d / "config.json").read_text()), d
    if version == "2.6":
        d = CONF / "2.6" / "_checkpoint"
        return {**json.loads((d / "config.json").read_text()), **REAL_26}, d
    if version == "4.5":
        return json.loads((REAL_45 / "config.json").read_text()), REAL_45
    raise Refused(f"no real-size layout for version {version!r} (use 2.6 or 4.5)")


def ensure_checkpoint(version: str, args: argparse.Namespace, device: torch.device) -> tuple[Path, float | None]:
    """The cached checkpoint directory of a version (built on ``device`` when missing) and its build time."""
    kind = "tiny" if args.tiny else "full"
    out = args.cache_dir / f"{kind}-{version}-s{args.seed}-f{BUILD_FORMAT}"
    if (out / "config.json").is_file():
        return out, None
    raw, side = version_source(version, args.tiny)
    t = time.perf_counter()
    build_checkpoint(raw, None, args.seed, out, side_files=side, device=str(device), shard_bytes=2 << 30)
    return out, time.perf_counter() - t


def read_files(path: Path) -> float:
    """Read every weight file once (into the page cache); seconds taken."""
    t = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t


# ------------------------------------------------------------------------- single conversation


def timed_turn(session: Any, content: Any, n: int, device: torch.device) -> dict[str, float]:
    """Time to first token, decode rate over all later tokens and over those after the 8th."""
    sync(device)
    t0 = time.perf_counter()
    stamps = []
    for _ in session.ask_tokens(content, max_new_tokens=n, min_new_tokens=n):
        stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("the model generated no token")
    out = {"ttft_s": stamps[0] - t0, "tokens": len(stamps)}
    out["decode_tok_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    k = min(8, len(stamps) - 2)
    steady = len(stamps) > 2 and k >= 0
    out["steady_tok_s"] = (len(stamps) - 1 - k) / (stamps[-1] - stamps[k]) if steady else float("nan")
    return out


def single_stream(cm: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Warm-ups, then one image turn and several follow-up turns of one session."""
    import minicpmv

    greedy = dict(sampling=False, num_beams=1, repetition_penalty=1.0)
    warm = minicpmv.ChatSession(cm, **greedy)  # compiles / records the one-row decode step
    timed_turn(warm, "Hello!", args.warmup_tokens, device)
    timed_turn(warm, [test_image(args.image_size, seed=99), "What is it?"], args.warmup_tokens, device)
    proc = SyncTimed(cm.runner.processor, device)
    enc = SyncTimed(cm.runner.encode_features, device)
    cm.runner.processor, cm.runner.encode_features = proc, enc  # instance attributes: timing only
    try:
        session = minicpmv.ChatSession(cm, **greedy)
        first = timed_turn(session, [test_image(args.image_size), QUESTION], args.new_tokens, device)
        r: dict[str, Any] = {**first, "preprocess_s": proc.seconds, "vision_resampler_s": enc.seconds,
                             "prompt_tokens": session.last_prefill_tokens}
        r["prefill_s"] = r["ttft_s"] - r["preprocess_s"] - r["vision_resampler_s"]
        seconds = []
        for q in (FOLLOW_UPS * args.second_turns)[: args.second_turns]:
            proc.seconds = 0.0
            turn = timed_turn(session, [q], args.second_tokens, device)
            seconds.append((turn["ttft_s"], proc.seconds, session.last_prefill_tokens))
    finally:
        cm.runner.processor, cm.runner.encode_features = proc.fn, enc.fn
    r["second_ttft_all_s"] = [s[0] for s in seconds]
    r["second_ttft_s"] = statistics.median(r["second_ttft_all_s"])
    r["second_preprocess_s"] = statistics.median(s[1] for s in seconds)
    r["second_prefill_tokens"] = [s[2] for s in seconds]
    r["kv_B"] = cache_bytes(session._cache)
    inputs = cm.processor([[{"role": "user", "content": [test_image(args.image_size), "x"]}]])
    sizes = [tuple(s) for s in inputs.tgt_sizes[0]]
    r["slices"], r["vision_flops"] = len(sizes), vision_flops(cm.config, sizes)
    return r


def cache_bytes(cache: Any) -> int:
    """Bytes of a KV cache's buffers."""
    bufs = getattr(cache, "_kbuf", None) or getattr(cache, "k", [])
    vals = getattr(cache, "_vbuf", None) or getattr(cache, "v", [])
    return sum(t.nbytes for t in [*bufs, *vals] if t is not None)


# ------------------------------------------------------------------------- concurrent conversations


def _requests(cm: Any, count: int, args: argparse.Namespace, new_tokens: int) -> list[Any]:
    """``count`` conversations, each with its own image (conversation 0 is the same in every batch)."""
    from minicpmv.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return [(cm.processor([[{"role": "user", "content": [test_image(args.image_size, seed=i), QUESTION]}]]), params)
            for i in range(count)]


def _serve(engine: Any, requests: list[Any], device: torch.device) -> tuple[float, list[list[int]], list[Any]]:
    """Run the requests through the engine in this thread: (seconds, tokens of each, logits of the first)."""
    from minicpmv.engine.batch import BatchRequest

    tokens: list[list[int]] = [[] for _ in requests]
    logits: list[Any] = []

    def sink(i: int) -> Callable[[Any], None]:
        def on_event(event: Any) -> None:
            if event.error is not None:
                raise RuntimeError(f"request {i} failed: {event.error}")
            if event.token_id is not None:
                tokens[i].append(event.token_id)
                if event.logits is not None:
                    logits.append(event.logits.cpu())
        return on_event

    sync(device)
    t = time.perf_counter()
    for i, (inputs, params) in enumerate(requests):
        engine.submit(BatchRequest(inputs, params, sink(i), want_logits=i == 0))
    engine.run_until_idle()
    sync(device)
    return time.perf_counter() - t, tokens, logits


def concurrency(cm: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Throughput at each count in the batch-invariant engine (the largest also in the fast mode),
    and whether conversation 0 gives the same tokens and logits in every batch."""
    from minicpmv.engine.batch import BatchEngine

    top = max(args.concurrency)
    r: dict[str, Any] = {}
    ref: tuple[list[int], list[Any]] | None = None
    for invariant in (True, False):
        counts = args.concurrency if invariant else [top]
        engine = BatchEngine(cm, max_batch_size=top, max_model_len=args.max_model_len, batch_invariant=invariant,
                             max_queue=top)
        for c in counts:
            _serve(engine, _requests(cm, c, args, args.warmup_tokens), device)  # compile / record this count's steps
            work = _requests(cm, c, args, args.new_tokens)
            steps0 = engine.stats.steps
            seconds, tokens, logits = _serve(engine, work, device)
            key = f"{'exact' if invariant else 'fast'}_{c}"
            r[key] = {"seconds": seconds, "tok_s": sum(map(len, tokens)) / seconds,
                      "steps": engine.stats.steps - steps0, "row_step": engine.row_step}
            if invariant:
                if ref is None:
                    ref = (tokens[0], logits)
                same = tokens[0] == ref[0] and all(torch.equal(a, b) for a, b in zip(logits, ref[1], strict=True))
                r[key]["first_bit_identical"] = same
        r["kv_B" if invariant else "kv_fast_B"] = cache_bytes(engine._cache)
        del engine
        gc.collect()
    return r


# ------------------------------------------------------------------------- one mode, one version


def run_mode(path: Path, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Load in ``mode`` and measure everything; the model is freed afterwards."""
    import minicpmv

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    cm = minicpmv.load(path, dtype=args.dtype, device=str(device), compile=MODES[mode])
    sync(device)
    r: dict[str, Any] = {"load_s": time.perf_counter() - t}
    model = cm.model
    r["param_B"] = sum(x.nbytes for x in [*model.parameters(), *model.buffers()])
    r["streamed_B_per_token"] = streamed_bytes(model)
    r["model"] = f"MiniCPM-V {cm.version.name}, {cm.config.text.num_hidden_layers} LLM layers, " \
                 f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} G params"
    r.update(_guarded("single", lambda: single_stream(cm, args, device)))
    if device.type == "cuda":
        r["peak_single_B"] = torch.cuda.max_memory_allocated(device)
    r.update(_guarded("concurrency", lambda: {"concurrency": concurrency(cm, args, device)}))
    if device.type == "cuda":
        r["peak_B"] = torch.cuda.max_memory_allocated(device)
    return r


def _guarded(what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one phase; a failure is recorded and reported instead of ending the run (device time is short)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the other phases still give numbers
        import traceback

        traceback.print_exc()
        return {f"{what}_error": f"{type(e).__name__}: {e}"}


def derive(r: dict[str, Any], bandwidth: float) -> dict[str, Any]:
    """Ratios of one mode's numbers to their ceilings and targets."""
    if "decode_tok_s" in r:
        r["decode_ceiling_tok_s"] = bandwidth / r["streamed_B_per_token"]
        r["decode_ceiling_ratio"] = r["decode_tok_s"] / r["decode_ceiling_tok_s"]
        r["steady_ceiling_ratio"] = r["steady_tok_s"] / r["decode_ceiling_tok_s"]
    if "peak_single_B" in r and "kv_B" in r:
        r["memory_ratio"] = (r["peak_single_B"] - r["kv_B"]) / r["param_B"]
    conc = r.get("concurrency", {})
    one = conc.get(f"exact_{min((int(k.split('_')[1]) for k in conc if k.startswith('exact_')), default=0)}")
    for v in conc.values():
        if isinstance(v, dict) and one:
            v["x_single"] = v["tok_s"] / one["tok_s"]
    return r


# ------------------------------------------------------------------------- report


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "tok/s":
        return f"{value:.1f} tok/s"
    if unit == "%":
        return f"{value:.0%}"
    if unit == "GiB":
        return f"{value / 2**30:.2f} GiB"
    if unit == "x":
        return f"{value:.2f} x"
    return str(value)


def _rows(runs: dict[str, dict[str, Any]], counts: list[int]) -> list[tuple[str, str, Callable[[dict], Any], str]]:
    """(label, unit, getter, target note) of every report row."""
    t = TARGETS
    rows = [
        ("load", "s", lambda r: r.get("load_s"), f"<= {t['load_s']} s (official {OFFICIAL_26['load_s']} s)"),
        ("preprocessing", "s", lambda r: r.get("preprocess_s"), ""),
        ("vision + resampler", "s", lambda r: r.get("vision_resampler_s"), ""),
        ("prefill", "s", lambda r: r.get("prefill_s"), ""),
        ("time to first token", "s", lambda r: r.get("ttft_s"),
         f"<= {t['ttft_s']} s (official {OFFICIAL_26['ttft_s']})"),
        ("decode, image in ctx", "tok/s", lambda r: r.get("decode_tok_s"), f">= {t['decode_tok_s']:.0f} (official 48)"),
        ("  of copy ceiling", "%", lambda r: r.get("decode_ceiling_ratio"), f">= {t['decode_ceiling_ratio']:.0%}"),
        ("  steady (after 8)", "tok/s", lambda r: r.get("steady_tok_s"), ""),
        ("second-turn TTFT", "s", lambda r: r.get("second_ttft_s"), f"<= {t['second_ttft_s']} s (median)"),
        ("  min / max", "", lambda r: _span(r.get("second_ttft_all_s")), "stable across turns"),
    ]
    for c in counts:
        note = {16: f">= {t['x16']:.0f} x single", 64: f">= {t['x64']:.0f} x single"}.get(c, "")
        rows.append((f"{c} conversations", "tok/s", _conc(f"exact_{c}", "tok_s"), note))
        rows.append(("  x single, bit-identical", "", _conc_note(f"exact_{c}"), ""))
    top = max(counts)
    rows.append((f"{top} conv., fast mode", "tok/s", _conc(f"fast_{top}", "tok_s"), ""))
    rows.append(("peak GPU memory", "GiB", lambda r: r.get("peak_B"), f"official {OFFICIAL_26['peak_memory_GiB']} GiB"))
    rows.append(("  (peak 1 conv - KV)/params", "x", lambda r: r.get("memory_ratio"), f"<= {t['memory_ratio']} x"))
    return rows


def _span(values: list[float] | None) -> str:
    return "-" if not values else f"{min(values):.3f} / {max(values):.3f} s"


def _conc(key: str, field: str) -> Callable[[dict], Any]:
    return lambda r: r.get("concurrency", {}).get(key, {}).get(field)


def _conc_note(key: str) -> Callable[[dict], Any]:
    def get(r: dict) -> str:
        v = r.get("concurrency", {}).get(key)
        return "-" if not v else f"{v.get('x_single', float('nan')):.1f} x, {v.get('first_bit_identical')}"
    return get


def report(version: str, runs: dict[str, dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    """One version's table: a column per decode mode, compiled / eager where both ran."""
    modes = list(runs)
    first = runs[modes[0]]
    lines = [f"== {first.get('model', version)}, {args.dtype}, {args.image_size} image "
             f"({first.get('slices', '?')} slices, {first.get('prompt_tokens', '?')} prompt tokens), "
             f"{args.new_tokens} new tokens",
             f"   copy bandwidth {env['bandwidth_Bps'] / 1e12:.3f} TB/s (read + write); "
             f"{first['streamed_B_per_token'] / 1e9:.2f} GB read per token -> decode ceiling "
             f"{env['bandwidth_Bps'] / first['streamed_B_per_token']:.0f} tok/s",
             f"{'figure':<30}" + "".join(f"{m:>18}" for m in modes)
             + ("   compiled/eager" if {"eager", "compiled"} <= set(runs) else "") + "   target"]
    for label, unit, get, note in _rows(runs, args.concurrency):
        vals = [get(runs[m]) for m in modes]
        cells = "".join(f"{_fmt(v, unit) if unit else (v or '-'):>18}" for v in vals)
        ratio = ""
        if {"eager", "compiled"} <= set(runs) and unit in ("s", "tok/s"):
            e, c = get(runs["eager"]), get(runs["compiled"])
            both = isinstance(e, (int, float)) and isinstance(c, (int, float)) and e
            ratio = f"{c / e:>16.2f}" if both else f"{'-':>16}"
        elif {"eager", "compiled"} <= set(runs):
            ratio = " " * 16
        lines.append(f"{label:<30}{cells}{ratio}   {note}")
    errors = [f"   {m}: {k} = {v}" for m in modes for k, v in runs[m].items() if k.endswith("_error")]
    return "\n".join(lines + (["errors:", *errors] if errors else []))


# ------------------------------------------------------------------------- main


def check_device(args: argparse.Namespace) -> torch.device:
    """The device to run on, or ``Refused`` with the reason."""
    if args.device is None:
        if not torch.cuda.is_available():
            raise Refused(f"bench_gpu.py measures a CUDA device and none is visible (torch {torch.__version__}, "
                          f"cuda {torch.version.cuda}); for a CPU smoke run use --tiny --device cpu")
        return torch.device("cuda", 0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Refused(f"--device {args.device}: CUDA is not available here")
    if device.type != "cuda" and not args.tiny:
        raise Refused("a real-size model is measured on a CUDA device only (bench_chat.py measures CPUs); "
                      "add --tiny for a smoke run of this script")
    return device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", nargs="+", default=["2.6"], choices=["2.6", "4.5"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=list(MODES))
    ap.add_argument("--device", default=None, help="default cuda:0; cpu only with --tiny")
    ap.add_argument("--tiny", action="store_true", help="the tiny conformance checkpoints (smoke run)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where checkpoints are built and kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", default="1344", help='"1344" (square) or "1920x1080"')
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--second-turns", type=int, default=5)
    ap.add_argument("--second-tokens", type=int, default=8)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--max-model-len", type=int, default=1024, help="engine context per conversation")
    ap.add_argument("--json", default=None, metavar="PATH", help="write every number as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = check_device(args)
    except Refused as e:
        print(f"bench_gpu.py: {e}", file=sys.stderr)
        return 2
    env = {**device_info(device), "bandwidth_Bps": copy_bandwidth(device)}
    print(f"device: {env.get('name')} ({device}), driver {env.get('driver', '-')}, torch {env['torch']}, "
          f"cuda {env.get('cuda', '-')}, python {env['python']}", flush=True)
    results: dict[str, Any] = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "versions": {}}
    for version in args.versions:
        path, built = ensure_checkpoint(version, args, device)
        runs: dict[str, Any] = {}
        results["versions"][version] = {"checkpoint": str(path), "build_s": built, "read_files_s": read_files(path),
                                        "runs": runs}
        print(f"{version}: checkpoint {path} (built in {built or 0:.0f} s)", flush=True)
        for mode in args.modes:
            runs[mode] = derive(run_mode(path, mode, args, device), env["bandwidth_Bps"])
            if args.json:  # after every mode: a run cut short still leaves its numbers
                Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(report(version, runs, env, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
