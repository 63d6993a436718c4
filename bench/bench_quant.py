"""Weight-only quantization benchmark (issue 8): quality on the conformance cases, decode speed.

Three parts, each printed as a table (``--part`` picks one):

- ``micro``: one linear layer at batch 1 (Qwen3-8B / MiniCPM-V 4.5 shapes), bf16, against a pure
  read of the same bytes in the same run: plain ``F.linear``, ``torch.mv``, the oneDNN-prepacked
  weight (what ``minicpmv.load`` uses for bf16 on CPU), the int8 kernels (oneDNN u8 x s8 with
  16-bit activations, the default on CPU; PyTorch's ``_weight_int8pack_mm``) and int4 (group
  32/64/128).
  Printed as GB/s of weight bytes and as speed-ups over ``F.linear``; plus a prefill-sized batch.
- ``quality``: every conformance case (2.0, 2.5, 2.6, 4.5, o2.6) (tiny random-weight checkpoints), greedy
  reference tokens fed back (teacher forcing) through the unquantized model and each quantized
  model, with bf16 and with float32 activations; top-1 agreement over all steps and the max
  |logit difference|. Then the same on trained weights: the bundled demo model's own greedy
  answers to questions of its independent evaluation set (plus how many answers each quantized copy repeats).
- ``speed``: a perf-size LLM (4.5 dims, or 2.6's with ``--dims 2.6``; ``--layers`` layers, random
  weights, text-only prompt of random embeddings) decoded with the real engine in bf16 (plain and
  prepacked), int8 and int4; tokens/s as ratios to prepacked bf16 (the default path) and to plain
  bf16, and each as a ratio to its memory-bandwidth ceiling (bytes streamed per token / read
  bandwidth measured in the run).
  Each variant is built from the same bf16 weights and measured in ``--rounds`` interleaved rounds
  (median step over all rounds): the machine is shared, compare numbers within one run only.

Examples:
  python bench/bench_quant.py                       # all parts (several minutes, ~6 GB at peak)
  python bench/bench_quant.py --part quality
  python bench/bench_quant.py --part speed --layers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _common import best_time, perf_config, read_bandwidth, streamed_bytes

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "data" / "conformance"
REAL_45 = ROOT / "tests" / "data" / "real-4.5" / "release" / "config.json"
QUALITY_FORMATS = [("int8", None, True), ("int8", None, False), ("int4", 32, True), ("int4", 64, True),
                   ("int4", 128, True), ("int4", 64, False)]


# ------------------------------------------------------------------------------------ micro


def micro(reps: int) -> None:
    from minicpmv.quant.linear import PackedLinear, QuantLinear, QuantSpec

    bw = read_bandwidth()
    print(f"\n== micro: one linear layer, batch 1, bf16, {torch.get_num_threads()} threads; "
          f"read bandwidth {bw / 1e9:.1f} GB/s")
    shapes = [("gate/up 4096->12288", 4096, 12288), ("down 12288->4096", 12288, 4096),
              ("lm_head 4096->151748", 4096, 151748)]
    for label, k, n in shapes:
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g).div_(k**0.5))
        w, x = lin.weight.detach(), torch.randn(1, k, generator=g).to(torch.bfloat16)
        nbytes = w.numel() * 2
        packed = PackedLinear(lin)
        cands: dict[str, Callable[[], Any]] = {
            "read (int8 amax of the same bytes)": lambda w=w: w.view(torch.int8).amax(),
            "F.linear (plain bf16)": lambda w=w, x=x: F.linear(x, w),
            "torch.mv": lambda w=w, x=x: torch.mv(w, x[0]),
            "oneDNN prepacked (load default)": lambda m=packed, x=x: m(x),
        }
        for fmt, gs in (("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)):
            q = QuantLinear.from_float(w, None, QuantSpec.parse(fmt, gs), dtype=torch.bfloat16)
            cands[f"{fmt}{'' if gs is None else f' g{gs}'} ({q.kind})"] = lambda q=q, x=x: q(x)
        old = QuantLinear.from_float(w, None, QuantSpec(8), dtype=torch.bfloat16, kind="int8")
        cands["int8 (int8: _weight_int8pack_mm)"] = lambda q=old, x=x: q(x)
        times = {name: best_time(fn, reps) for name, fn in cands.items()}
        base = times["F.linear (plain bf16)"]
        print(f"-- {label}: {nbytes / 1e6:.0f} MB of bf16 weights")
        for name, t in times.items():
            print(f"   {name:<38} {t * 1e3:8.2f} ms  {nbytes / t / 1e9:6.1f} GB/s-of-bf16  "
                  f"{base / t:5.2f}x F.linear")
        del cands, times
        gc.collect()
    _micro_prefill(reps)


def _micro_prefill(reps: int, rows: int = 512, k: int = 4096, n: int = 12288) -> None:
    """A prefill-sized batch (``rows`` positions) through the gate/up shape."""
    from minicpmv.quant.linear import PackedLinear, QuantLinear, QuantSpec

    lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    x = torch.randn(rows, k).to(torch.bfloat16)
    w, packed = lin.weight.detach(), PackedLinear(lin)
    cands: dict[str, Callable[[], Any]] = {"oneDNN prepacked bf16": lambda: packed(x)}
    for kind in ("int8_onednn", "int8"):
        q = QuantLinear.from_float(w, None, QuantSpec(8), dtype=torch.bfloat16, kind=kind)
        cands[f"int8 ({kind})"] = lambda q=q: q(x)
    times = {name: best_time(fn, max(2, reps // 3)) for name, fn in cands.items()}
    base = times["oneDNN prepacked bf16"]
    print(f"-- prefill: {rows} rows through gate/up {k}->{n}")
    for name, t in times.items():
        print(f"   {name:<38} {t * 1e3:8.2f} ms  {base / t:5.2f}x bf16")


# ------------------------------------------------------------------------------------ quality


QUALITY_VERSIONS = ("2.0", "2.5", "2.6", "4.5", "o2.6")


def _cases(version: str) -> list[Path]:
    """Every case folder of one version, in either vector format (safetensors or npz)."""
    return sorted(p for p in (CONF / version).iterdir() if (p / "inputs").is_dir() and (
        (p / "expected" / "tensors.safetensors").is_file() or (p / "expected" / "tensors.npz").is_file()))


def _teacher_forced(cm: Any, batch: Any, ref: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Logits [B, n, V] at each step of the reference ids ``ref`` [B, n] fed back after the prompt
    ``batch``, and each row's number of valid steps (up to and including its first end token)."""
    from minicpmv.engine.generate import prefill_positions

    with torch.inference_mode():
        b, t = batch.attention_mask.shape
        n = ref.shape[1]
        embeds = torch.cat([batch.inputs_embeds, cm.model.embed_tokens(ref[:, :-1])], dim=1)  # [B, T+n-1, H]
        mask = torch.cat([batch.attention_mask, torch.ones(b, n - 1, dtype=torch.long)], dim=1)
        logits = cm.model(embeds, prefill_positions(mask), mask, last_only=False)[:, t - 1 :]  # [B, n, V]
    eos = set(cm.runner.eos_ids)
    lengths = [next((i for i, tok in enumerate(row) if tok in eos), len(row) - 1) + 1 for row in ref.tolist()]
    return logits.float(), lengths


def _case_logits(cm: Any, case: Path) -> tuple[torch.Tensor, list[int]]:
    """Teacher-forced logits along a conformance case's recorded greedy ids."""
    from minicpmv.conformance import make_runner
    from minicpmv.engine.chat import normalise_msgs

    runner = make_runner(cm, case)
    conversations, _ = normalise_msgs(runner.msgs, getattr(runner, "image", None))
    inputs = cm.processor(conversations, **runner.proc_kwargs)
    with torch.inference_mode():
        batch = cm.runner.prepare(inputs)
    ref = torch.from_numpy(runner.t["greedy_ids"]).long()
    return _teacher_forced(cm, batch, ref.reshape(len(conversations), -1))  # npz cases store [n]


Logits = dict[str, tuple[torch.Tensor, list[int]]]


def _agreement(ref: Logits, got: Logits) -> tuple[int, int, float]:
    """(agreeing steps, steps, max |logit difference|) of ``got`` against ``ref`` (same keys)."""
    agree = total = 0
    worst = 0.0
    for key, (lr, lengths) in ref.items():
        lq = got[key][0]
        for row, n in enumerate(lengths):
            a, q = lr[row, :n], lq[row, :n]
            agree += int((a.argmax(-1) == q.argmax(-1)).sum())
            total += n
            worst = max(worst, float((a - q).abs().max()))
    return agree, total, worst


def _variants(ckpt: Path, dtype: str) -> list[tuple[str, Callable[[], Any]]]:
    import minicpmv

    out: list[tuple[str, Callable[[], Any]]] = []
    for fmt, gs, head in QUALITY_FORMATS:
        label = f"{fmt}{'' if gs is None else f' g{gs}'}{'' if head else ' (lm_head float)'}"
        out.append((label, lambda fmt=fmt, gs=gs, head=head: minicpmv.load(
            ckpt, dtype=dtype, quantize=fmt, group_size=gs) if head else _no_head(ckpt, dtype, fmt, gs)))
    return out


def quality(versions: tuple[str, ...] = QUALITY_VERSIONS, demo: bool = True) -> None:
    import minicpmv

    print("\n== quality: teacher-forced greedy reference steps, quantized vs unquantized at the same "
          "activation dtype (tiny random-weight checkpoints)")
    print(f"{'format':<34} {'version':<8} {'dtype':<9} {'cases':>5} {'steps':>6} {'top-1 agree':>12} "
          f"{'max|dlogit|':>12}")
    pooled: dict[tuple[str, str], list[float]] = {}  # (format, dtype) -> [agree, steps, worst]
    for version in versions:
        ckpt, cases = CONF / version / "_checkpoint", _cases(version)
        for dtype in ("bfloat16", "float32"):
            base = minicpmv.load(ckpt, dtype=dtype)
            ref = {c.name: _case_logits(base, c) for c in cases}
            margins = torch.cat([_margins(lb, lengths) for lb, lengths in ref.values()])
            print(f"-- {version} {dtype}: {100 * float((margins < 0.1).float().mean()):.0f}% of the steps have a "
                  f"top-2 logit margin < 0.1 (random weights: near ties), median margin {float(margins.median()):.3f}")
            variants = _variants(ckpt, dtype)
            if dtype == "bfloat16":
                variants.insert(0, ("fp32 (noise floor: bf16 vs fp32)",
                                    lambda ckpt=ckpt: minicpmv.load(ckpt, dtype="float32")))
            for label, make in variants:
                agree, total, worst = _agreement(ref, {c.name: _case_logits(make(), c) for c in cases})
                print(f"{label:<34} {version:<8} {dtype:<9} {len(cases):>5} {total:>6} "
                      f"{100 * agree / total:>11.2f}% {worst:>12.4f}")
                acc = pooled.setdefault((label, dtype), [0, 0, 0.0])
                acc[0], acc[1], acc[2] = acc[0] + agree, acc[1] + total, max(acc[2], worst)
    print(f"-- all {len(versions)} versions pooled ({', '.join(versions)})")
    for (label, dtype), (agree, total, worst) in pooled.items():
        print(f"{label:<34} {'all':<8} {dtype:<9} {'':>5} {int(total):>6} {100 * agree / total:>11.2f}% {worst:>12.4f}")
    if demo:
        demo_quality()


def _demo_prompts(n: int) -> list[list[dict[str, Any]]]:
    """About ``n`` pictures of the demo model's independent evaluation set (every family), each
    item's first question asked alone on its picture(s)."""
    from minicpmv.train.demo_eval import FAMILIES, build_items

    items = build_items(max(1, n // len(FAMILIES)), seed=11)
    return [[{"role": "user", "content": [*it.images, it.turns[0]]}] for it in items]


def demo_quality(scenes: int = 160) -> None:
    """The bundled demo model has trained (not random) weights: its own greedy answers to held-out
    evaluation questions, teacher-forced through each quantized copy, and the answers each copy gives."""
    import minicpmv
    from minicpmv import demo_model
    from minicpmv.engine.sampling import SamplingParams

    ckpt = demo_model.path()
    convs = _demo_prompts(scenes)
    print(f"\n== quality on trained weights: the bundled demo model, {len(convs)} questions of its independent "
          "evaluation set, teacher-forced along its own greedy answers")
    print(f"{'format':<34} {'dtype':<9} {'steps':>6} {'top-1 agree':>12} {'max|dlogit|':>12} {'same answer':>12}")
    for dtype in ("bfloat16", "float32"):
        base = minicpmv.load(ckpt, dtype=dtype)
        params = SamplingParams.from_official(base.version, sampling=False, max_new_tokens=8,
                                              overrides={"num_beams": 1, "repetition_penalty": 1.0})
        with torch.inference_mode():
            batches = [base.runner.prepare(base.processor([c])) for c in convs]
            ids = [torch.tensor([base.runner.generate_ids(b, params)[0]]) for b in batches]
        ref = {str(i): _teacher_forced(base, b, r) for i, (b, r) in enumerate(zip(batches, ids, strict=True))}
        margins = torch.cat([_margins(lb, lengths) for lb, lengths in ref.values()])
        print(f"-- {dtype}: median top-2 logit margin {float(margins.median()):.2f}; "
              f"{100 * float((margins < 0.1).float().mean()):.1f}% of the steps below 0.1")
        for label, make in _variants(ckpt, dtype):
            cm = make()
            with torch.inference_mode():
                mine = [cm.runner.prepare(cm.processor([c])) for c in convs]
                got = {str(i): _teacher_forced(cm, b, ids[i]) for i, b in enumerate(mine)}
                same = sum(cm.runner.generate_ids(b, params)[0] == ids[i][0].tolist() for i, b in enumerate(mine))
            agree, total, worst = _agreement(ref, got)
            print(f"{label:<34} {dtype:<9} {total:>6} {100 * agree / total:>11.2f}% {worst:>12.4f} "
                  f"{same:>7}/{len(convs)}")


def _margins(logits: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    top = torch.cat([logits[row, :n] for row, n in enumerate(lengths)]).topk(2, dim=-1).values  # [steps, 2]
    return top[:, 0] - top[:, 1]


def _no_head(ckpt: Path, dtype: str, fmt: str, gs: int | None) -> Any:
    """``load(quantize=...)`` quantizes lm_head too; this variant keeps it unquantized."""
    import minicpmv
    from minicpmv.quant.linear import quantize_model

    cm = minicpmv.load(ckpt, dtype=dtype)
    quantize_model(cm.model, fmt, gs, lm_head=False)
    return cm


# ------------------------------------------------------------------------------------ speed


def _perf_llm(layers: int, dims: str = "4.5") -> nn.Module:
    """The 4.5 (or 2.6: ``dims``) LLM at real width with ``layers`` layers, random bf16 weights
    (plain nn.Linear); the embedding table is a zero-stride view (decode reads one row; no memory)."""
    from minicpmv.loading import build_on_meta

    model = build_on_meta(perf_config(dims, layers, REAL_45))
    g = torch.Generator().manual_seed(0)
    llm = model.llm
    for name, p in list(llm.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = llm.get_submodule(mod_name)
        if name == "model.embed_tokens.weight":
            t = (torch.randn(1, p.shape[1], generator=g) * 0.02).to(torch.bfloat16).expand(*p.shape)
        elif p.dim() == 1:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(p.shape, generator=g, dtype=torch.bfloat16).div_(p.shape[1] ** 0.5)
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    for child in ("vpm", "resampler"):  # never run; drop the meta modules
        setattr(model, child, nn.Identity())
    return model.eval()


def _sets_for(variant: str) -> tuple[str, str]:
    """Variant name -> (decoder-layer weight set, lm_head weight set)."""
    if variant == "bf16 plain F.linear":
        return "plain", "plain"
    if variant == "bf16 prepacked":
        return "packed", "packed"
    fmt, _, rest = variant.partition(" ")
    layers = fmt + (f" {rest.split()[0]}" if rest.startswith("g") else "")
    return layers, ("packed" if "lm_head bf16" in variant else layers)


def _build_set(kind: str, packed: dict[str, nn.Module], names: list[str]) -> dict[str, nn.Module]:
    """Modules of weight set ``kind`` for ``names``, quantized from the prepacked bf16 layers."""
    from minicpmv.quant.linear import QuantLinear, QuantSpec

    fmt, _, gs = kind.partition(" ")
    spec = QuantSpec.parse(fmt, int(gs[1:]) if gs else None)
    out: dict[str, nn.Module] = {}
    for n in names:
        w = packed[n].weight.to_dense()
        out[n] = QuantLinear.from_float(w, None, spec, dtype=torch.bfloat16)
        del w
    return out


def _decode_steps(model: nn.Module, cache: Any, prompt: int, tokens: int) -> list[float]:
    """Seconds per decode step for ``tokens`` steps after the first ``prompt`` cached positions."""
    from minicpmv.engine.generate import generate_steps
    from minicpmv.engine.sampling import SamplingParams

    cache.crop(prompt)
    emb = model.embed_tokens(torch.zeros(1, 1, dtype=torch.long))  # [1, 1, H]
    params = SamplingParams(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1)
    steps = []
    with torch.inference_mode():
        it = generate_steps(model, emb, None, params, cache=cache)
        next(it)
        t = time.perf_counter()
        for _ in it:
            now = time.perf_counter()
            steps.append(now - t)
            t = now
    return steps


def _install(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    from minicpmv.quant.linear import replace_module

    for n, m in modules.items():
        replace_module(model, n, m)


def speed(layers: int, rounds: int, prompt: int, tokens: int, variants: list[str], dims: str = "4.5") -> None:
    """Two interleaved phases (plain vs prepacked bf16; then prepacked vs quantized), so that at
    most two full weight copies live at once; steps of every variant alternate round by round
    over one shared prompt cache, and each variant's median step time is reported."""
    from minicpmv.engine.generate import prefill_positions
    from minicpmv.engine.kv_cache import KVCache
    from minicpmv.quant.linear import PackedLinear

    model = _perf_llm(layers, dims)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = [n for n in names if n.endswith("lm_head")]
    body = [n for n in names if n not in head]
    sets: dict[str, dict[str, nn.Module]] = {"plain": {n: model.get_submodule(n) for n in names}}
    sets["packed"] = {n: PackedLinear(m) for n, m in sets["plain"].items()}
    g = torch.Generator().manual_seed(1)
    emb = (torch.randn(1, prompt, model.hidden_size, generator=g) * 0.02).to(torch.bfloat16)
    cache = KVCache.for_model(model, 1)
    _install(model, sets["packed"])
    with torch.inference_mode():
        mask = torch.ones(1, prompt, dtype=torch.long)
        model(emb, prefill_positions(mask), mask, cache=cache)
    steps: dict[str, list[float]] = {v: [] for v in variants}
    streamed: dict[str, int] = {}
    bws: list[float] = []
    phases = [[v for v in variants if v in ("bf16 plain F.linear", "bf16 prepacked")],
              [v for v in variants if v != "bf16 plain F.linear"]]
    for i, phase in enumerate(phases):
        if i == 1:
            del sets["plain"]
            gc.collect()
            for v in phase:
                for kind, subset in zip(_sets_for(v), (body, head), strict=True):
                    key = f"{kind}:{'head' if subset is head else 'body'}"
                    if kind not in ("plain", "packed") and key not in sets:
                        sets[key] = _build_set(kind, sets["packed"], subset)
        for _ in range(rounds):
            bws.append(read_bandwidth(reps=2))
            for v in phase:
                kb, kh = _sets_for(v)
                _install(model, {n: (sets[kb] if kb in sets else sets[f"{kb}:body"])[n] for n in body})
                _install(model, {n: (sets[kh] if kh in sets else sets[f"{kh}:head"])[n] for n in head})
                streamed[v] = streamed_bytes(model)
                steps[v] += _decode_steps(model, cache, prompt, tokens)
    bw = statistics.median(bws)
    print(f"\n== speed: decode, MiniCPM-V {dims} LLM dims, {layers} layers, random weights, {prompt}-token "
          f"text prompt, {torch.get_num_threads()} threads, {rounds} interleaved rounds x {tokens} tokens per "
          f"variant (median step); read bandwidth {bw / 1e9:.1f} GB/s (median of rounds)")
    rate = {v: 1.0 / statistics.median(steps[v]) for v in variants}
    ref, plain = rate.get("bf16 prepacked"), rate.get("bf16 plain F.linear")
    print(f"{'variant':<28} {'MB/token':>9} {'tok/s':>7} {'ceiling':>8} {'of ceil':>8} {'x bf16':>7} {'x plain':>8}")
    for v in variants:
        nbytes = streamed[v]
        ceiling = bw / nbytes
        rel = f"{rate[v] / ref:7.2f}" if ref else "      -"
        relp = f"{rate[v] / plain:8.2f}" if plain else "       -"
        print(f"{v:<28} {nbytes / 1e6:9.0f} {rate[v]:7.2f} {ceiling:8.2f} {rate[v] / ceiling:7.0%} {rel} {relp}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "micro", "quality", "speed"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4, help="speed: LLM layers at real width")
    ap.add_argument("--dims", choices=["4.5", "2.6"], default="4.5", help="speed: perf-size LLM of this release")
    ap.add_argument("--rounds", type=int, default=4, help="speed: interleaved rounds per variant")
    ap.add_argument("--prompt", type=int, default=512, help="speed: prompt positions before decoding")
    ap.add_argument("--tokens", type=int, default=8, help="speed: decoded tokens per variant and round")
    ap.add_argument("--versions", default=",".join(QUALITY_VERSIONS),
                    help="quality: conformance versions, comma-separated")
    ap.add_argument("--no-demo", action="store_true", help="quality: skip the trained demo model part")
    ap.add_argument("--reps", type=int, default=7, help="micro: timed repetitions")
    ap.add_argument("--variants", default="bf16 plain F.linear,bf16 prepacked,int8,int8 lm_head bf16,"
                    "int4 g128,int4 g128 lm_head bf16,int4 g32",
                    help="speed: comma-separated variants")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, python {sys.version.split()[0]}")
    if args.part in ("all", "micro"):
        micro(args.reps)
    if args.part in ("all", "quality"):
        quality(tuple(v.strip() for v in args.versions.split(",")), demo=not args.no_demo)
    if args.part in ("all", "speed"):
        speed(args.layers, args.rounds, args.prompt, args.tokens, [v.strip() for v in args.variants.split(",")],
              args.dims)
    return 0


if __name__ == "__main__":
    sys.exit(main())
