"""Make the bitsandbytes and AWQ golden checkpoints of tests/data/formats/ with the real libraries.

Run once, in an environment with torch, bitsandbytes and autoawq (``pip install bitsandbytes`` and
``pip install --no-deps autoawq``: its GEMM packer and dequantizer are plain torch and need no
CUDA), from the repository root:

    python tests/data/formats/make_bnb_awq.py

For each case it takes a conformance checkpoint (tests/data/conformance/V/_checkpoint), quantizes
its linear layers with the library exactly as transformers / AutoAWQ save them, writes the
checkpoint (config.json with quantization_config, model.safetensors, the side files) and records
what the library computes: the sha256 of every dequantized weight, a few dequantized weights in
full, and the output of the library's own 4-bit linear layer on a fixed input. The tests compare
our readers against these recordings and never import bitsandbytes or awq.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[3]
OUT = Path(__file__).resolve().parent
SKIP = ("out_proj", "kv_proj", "lm_head")  # llm_int8_skip_modules of the official int4 releases
LINEAR = re.compile(r"(_proj|mlp\.fc[12])\.weight$")
FULL = ("llm.model.layers.0.self_attn.q_proj", "llm.model.layers.1.mlp.down_proj", "vpm.encoder.layers.0.mlp.fc1")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _start(version: str, name: str) -> tuple[Path, dict, dict]:
    """The output directory with the source's side files, the source config and state dict."""
    src = ROOT / "tests/data/conformance" / version / "_checkpoint"
    dst = OUT / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    return dst, json.loads((src / "config.json").read_text()), load_file(str(src / "model.safetensors"))


def make_bnb(version: str, quant_type: str, double: bool) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    name = f"bnb-{version}-{quant_type}"
    dst, config, sd = _start(version, name)
    out, digests, full, outputs = {}, {}, {}, {}
    gen = torch.Generator().manual_seed(0)
    for key, w in sorted(sd.items()):
        base = key.removesuffix(".weight")
        if not (LINEAR.search(key) and w.ndim == 2 and not base.endswith(SKIP)):
            out[key] = w
            continue
        w = w.to(torch.bfloat16)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type=quant_type,
                                        quant_storage=torch.uint8)
        out[key] = packed
        for sub, t in state.as_dict(packed=True).items():
            out[f"{key}.{sub}"] = t
        deq = F.dequantize_4bit(packed, state)  # the library's dequantization
        digests[key] = _digest(deq)
        if base in FULL:
            full[key] = deq
            x = torch.randn(3, w.shape[1], generator=gen).to(torch.bfloat16)
            outputs[f"{base}.x"] = x
            bias = sd.get(f"{base}.bias")
            bias = None if bias is None else bias.to(torch.bfloat16)
            outputs[f"{base}.y"] = bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias)  # the library's linear
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double,
        "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": list(SKIP),
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({**full, **outputs}, str(OUT / f"{name}.golden.safetensors"))
    (OUT / f"{name}.digests.json").write_text(json.dumps({"bitsandbytes": bnb.__version__, "torch": torch.__version__,
                                                          "sha256": digests}, indent=1) + "\n")
    print(name, len(digests), "layers")


def make_awq(version: str, group: int = 128) -> None:
    import awq
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    name = f"awq-{version}"
    dst, config, sd = _start(version, name)
    out, digests, full, outputs = {}, {}, {}, {}
    gen = torch.Generator().manual_seed(0)
    for key, w in sorted(sd.items()):
        base = key.removesuffix(".weight")
        if not (key.startswith("llm.model.layers.") and LINEAR.search(key)):
            out[key] = w
            continue
        w = w.to(torch.float16)
        n, k = w.shape
        wg = w.float().reshape(n, k // group, group)  # AutoAWQ's zero-point min/max fit, per group
        hi, lo = wg.amax(dim=-1), wg.amin(dim=-1)
        scales = ((hi - lo).clamp(min=1e-5) / 15).half()  # [N, G]
        zeros = (-torch.round(lo / scales.float())).clamp(0, 15)  # [N, G]
        linear = torch.nn.Linear(k, n, bias=base + ".bias" in sd, dtype=torch.float16)
        linear.weight.data = w
        if linear.bias is not None:
            linear.bias.data = sd[base + ".bias"].half()
        q = WQLinear_GEMM.from_linear(linear, 4, group, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
        for part in ("qweight", "qzeros", "scales"):
            out[f"{base}.{part}"] = getattr(q, part)
        deq = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, group).t().contiguous()  # [N, K] float16
        digests[key] = _digest(deq)
        if base in FULL:
            full[key] = deq
            x = torch.randn(3, k, generator=gen).half()
            outputs[f"{base}.x"] = x
            outputs[f"{base}.y"] = q(x[None])[0]  # the library's GEMM layer (dequantize + matmul on a CPU)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": ["vpm", "resampler"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({**full, **outputs}, str(OUT / f"{name}.golden.safetensors"))
    (OUT / f"{name}.digests.json").write_text(json.dumps({"autoawq": awq.__version__, "torch": torch.__version__,
                                                          "sha256": digests}, indent=1) + "\n")
    print(name, len(digests), "layers")


if __name__ == "__main__":
    make_bnb("2.6", "nf4", True)
    make_bnb("4.5", "fp4", False)
    make_awq("4.5")
    sys.exit(0)
