"""Chat benchmark: one 1344x1344 image (~10 slices), a short question, then a follow-up.

Builds a MiniCPM-V model with random weights from a config.json given on the command line (so
it runs at real layer sizes without the official weights; ``--llm-layers`` keeps it shallow),
pairs it with a tokenizer directory, and prints preprocessing time, vision+resampler time,
time to first token, decode tokens/s, second-turn time to first token and peak RSS.

Examples:
  python bench/bench_chat.py                                   # tiny conformance model (seconds)
  python bench/bench_chat.py --config tests/data/real-4.5/release/config.json \
      --tokenizer tests/data/real-4.5/release --llm-layers 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minicpmv.api import parse_dtype
from minicpmv.config import ModelConfig
from minicpmv.engine.chat import ChatModel
from minicpmv.engine.session import ChatSession
from minicpmv.modeling.vlm import MiniCPMV
from minicpmv.processing.processor import Processor
from minicpmv.versions import detect_version

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "conformance" / "2.6" / "_checkpoint"


def random_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights with O(1) activations (norm weights 1, biases 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name or name.endswith(".weight") else 0.0)
            else:
                fan_in = p.shape[-1] if p.dim() == 2 else int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype).div_(fan_in**0.5))


def build(config_path: Path, tokenizer_dir: Path, layers: int | None, dtype: torch.dtype) -> ChatModel:
    raw = json.loads(config_path.read_text())
    spec = detect_version(raw)
    cfg = ModelConfig.from_hf_dict(raw, family=spec.llm_family, temporal=spec.temporal_resampler)
    if layers:
        cfg = cfg.with_text_layers(layers)
    with torch.device("meta"):
        model = MiniCPMV(cfg)
    model = model.to(dtype).to_empty(device="cpu")  # allocate directly in the target dtype
    random_init(model)
    model.eval()
    return ChatModel(model, Processor.from_dir(tokenizer_dir, spec), spec, cfg)


def test_image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1)
    noise = rng.integers(0, 40, size=(size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def timed_turn(session: ChatSession, content: list, n_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s over the rest, tokens generated)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in session.ask_tokens(content, max_new_tokens=n_tokens, min_new_tokens=n_tokens):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    rate = (n - 1) / (end - first) if n > 1 else float("nan")
    return first - t0, rate, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=TINY / "config.json")
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the config's directory")
    ap.add_argument("--llm-layers", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=1344)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    cm = build(args.config, args.tokenizer or args.config.parent, args.llm_layers, parse_dtype(args.dtype))
    build_s = time.perf_counter() - t
    image = test_image(args.image_size)
    question = [image, "Describe this image in detail."]
    greedy = dict(sampling=False, num_beams=1, repetition_penalty=1.0)

    # Component timings on the same input (separate from the session, so nothing is cached).
    t = time.perf_counter()
    inputs = cm.processor([[{"role": "user", "content": question}]])
    pre_s = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter()
        cm.encode_features(inputs)
        vis_s = time.perf_counter() - t

    session = ChatSession(cm, **greedy)
    ttft1, rate1, n1 = timed_turn(session, question, args.new_tokens)
    ttft2, rate2, n2 = timed_turn(session, ["And what is in the top left corner?"], args.new_tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB

    params = sum(p.numel() for p in cm.model.parameters())
    slices = sum(len(p) for p in inputs.pixel_values)
    print(f"model: MiniCPM-V {cm.version.name}, {params / 1e9:.3f} G params, {args.dtype}, "
          f"{cm.config.text.num_hidden_layers} LLM layers, {args.threads} threads (build {build_s:.1f} s)")
    print(f"input: {args.image_size}x{args.image_size} image, {slices} slices, "
          f"{len(inputs.input_ids[0])} prompt tokens")
    print(f"preprocessing            {pre_s:8.3f} s")
    print(f"vision + resampler       {vis_s:8.3f} s")
    print(f"time to first token      {ttft1:8.3f} s")
    print(f"decode                   {rate1:8.2f} tokens/s ({n1} tokens, image in context)")
    print(f"second turn first token  {ttft2:8.3f} s (prefilled {session.last_prefill_tokens} new tokens)")
    print(f"second turn decode       {rate2:8.2f} tokens/s ({n2} tokens)")
    print(f"peak RSS                 {peak:8.2f} GiB (parameters {params * cm.model.dtype.itemsize / 2**30:.2f} GiB)")
    print(f"ratio second/first TTFT  {ttft2 / ttft1:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
