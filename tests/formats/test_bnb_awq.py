"""bitsandbytes 4-bit and AWQ checkpoints against what the libraries themselves computed
(tests/data/formats/make_bnb_awq.py): every dequantized weight bit for bit, the libraries' 4-bit
linear outputs, loading through ``minicpmv.load``, and checkpoints that disagree with their config."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minicpmv
from minicpmv.errors import CheckpointError, ConfigError
from minicpmv.formats import awq, bnb
from minicpmv.loading.checkpoint import weight_files
from minicpmv.quant.linear import QuantLinear, QuantSpec, dequantize_weight

DATA = Path(__file__).resolve().parents[1] / "data" / "formats"
BNB = {"bnb-2.6-nf4": "nf4", "bnb-4.5-fp4": "fp4"}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _recorded(name: str) -> dict[str, str]:
    return json.loads((DATA / f"{name}.digests.json").read_text())["sha256"]


@pytest.mark.parametrize("name", sorted(BNB))
def test_bnb_dequantization_is_bit_exact(name: str) -> None:
    tensors = bnb.bnb_tensors(weight_files(DATA / name), BNB[name])
    recorded = _recorded(name)
    assert len(recorded) == 24
    assert {k: _digest(tensors[k]()) for k in recorded} == recorded
    golden = load_file(str(DATA / f"{name}.golden.safetensors"))
    for key, t in golden.items():
        if key.endswith(".weight"):
            assert torch.equal(tensors[key](), t)


@pytest.mark.parametrize("name", sorted(BNB))
def test_bnb_model_layers_equal_the_library_4bit_linear(name: str) -> None:
    model = minicpmv.load(DATA / name, dtype="bfloat16").model
    golden = load_file(str(DATA / f"{name}.golden.safetensors"))
    bases = [k.removesuffix(".x") for k in golden if k.endswith(".x")]
    assert len(bases) == 3
    for base in bases:
        with torch.no_grad():
            y = model.get_submodule(base)(golden[f"{base}.x"])
        assert torch.equal(y, golden[f"{base}.y"]), base


def test_bnb_double_quantization_uses_the_offset() -> None:
    parts = {p: load_file(str(DATA / "bnb-2.6-nf4" / "model.safetensors")) for p in ["x"]}["x"]
    key = "llm.model.layers.0.self_attn.q_proj.weight"
    state = bnb.read_state(parts[f"{key}.quant_state.bitsandbytes__nf4"])
    tensors = {p: parts[f"{key}.{p}"] for p in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
    good = bnb.dequantize_4bit({**tensors, "weight": parts[key]}, state)
    broken = bnb.dequantize_4bit({**tensors, "weight": parts[key]}, {**state, "nested_offset": 0.0})
    assert _digest(good) == _recorded("bnb-2.6-nf4")[key]
    assert _digest(broken) != _recorded("bnb-2.6-nf4")[key]


def test_bnb_checkpoint_that_disagrees_with_its_config(tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    shutil.copytree(DATA / "bnb-2.6-nf4", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bnb_4bit_quant_type 'fp4' but the checkpoint holds"):
        minicpmv.load(dst)
    cfg["quantization_config"].update(load_in_8bit=True, load_in_4bit=False)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="8-bit"):
        minicpmv.load(dst)


def test_bnb_missing_absmax_is_named(tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    shutil.copytree(DATA / "bnb-2.6-nf4", dst)
    sd = load_file(str(dst / "model.safetensors"))
    del sd["llm.model.layers.0.mlp.up_proj.weight.absmax"]
    save_file(sd, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match="up_proj.weight' lacks"):
        minicpmv.load(dst)


def test_awq_unpacks_bit_exactly_both_ways() -> None:
    stored = weight_files(DATA / "awq-4.5")
    recorded = _recorded("awq-4.5")
    floats, _ = awq.awq_tensors(stored, 128, set())
    assert {k: _digest(floats[k]()) for k in recorded} == recorded
    layers = {k.removesuffix(".weight") for k in recorded}
    _, int4 = awq.awq_tensors(stored, 128, layers)
    spec = QuantSpec(4, 128)
    got = {f"{n}.weight": _digest(dequantize_weight(make(), spec, torch.float16)) for n, make in int4.items()}
    assert got == recorded


def test_awq_model_runs_int4_close_to_the_library_layer() -> None:
    model = minicpmv.load(DATA / "awq-4.5", dtype="bfloat16").model
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and all(model.get_submodule(n).spec.group_size == 128 for n in quantized)
    golden = load_file(str(DATA / "awq-4.5.golden.safetensors"))
    for base in [k.removesuffix(".x") for k in golden if k.endswith(".x")]:
        with torch.no_grad():
            y = model.get_submodule(base)(golden[f"{base}.x"].to(torch.bfloat16)).float()
        ref = golden[f"{base}.y"].float()  # AutoAWQ: float16 activations and scales
        assert (y - ref).abs().max() <= 0.01 * ref.abs().max()


def test_awq_group_size_that_disagrees_with_the_tensors(tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    shutil.copytree(DATA / "awq-4.5", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="group size 128.*records group_size 64"):
        minicpmv.load(dst)
    cfg["quantization_config"]["version"] = "gemv"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not supported"):
        minicpmv.load(dst)


def test_requantizing_a_dequantized_release_on_load() -> None:
    """quantize= applies to the float layers of a bitsandbytes release like to the bf16 one."""
    model = minicpmv.load(DATA / "bnb-2.6-nf4", dtype="bfloat16", quantize="int8").model
    kinds = {type(m).__name__ for n, m in model.llm.named_modules() if n.endswith(("q_proj", "down_proj"))}
    assert kinds == {"QuantLinear"}
