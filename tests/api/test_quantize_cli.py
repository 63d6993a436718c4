"""`minicpmv quantize` and loading quantized checkpoints: the written directory, the format
recorded in config.json, the round trip against quantize-on-load, and the errors for checkpoints
whose tensors disagree with their config or requests that cannot be honoured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minicpmv
from minicpmv.cli import main
from minicpmv.engine.session import ChatSession
from minicpmv.errors import CheckpointError, ConfigError, InputError
from minicpmv.quant.linear import PackedLinear, QuantLinear, can_prepack
from minicpmv.quant.wide_gemm import prefill_linear

from .conftest import CONF

CKPT = {v: CONF / v / "_checkpoint" for v in ("2.6", "4.5")}


def _quantize(tmp_path: Path, version: str, *args: str) -> Path:
    out = tmp_path / f"q{version}-{'-'.join(a.strip('-') for a in args)}"
    assert main(["quantize", "--model", str(CKPT[version]), "--output", str(out), *args]) == 0
    return out


def _logits(cm, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(2, 7, cm.model.hidden_size, generator=g) * 0.5).to(cm.model.dtype)
    with torch.inference_mode():
        return cm.model(emb, None, None, last_only=False)


@pytest.mark.parametrize("version, args, bits, gs", [
    ("2.6", ("--to", "int8"), 8, None),
    ("4.5", ("--to", "int4", "--group-size", "64"), 4, 64),
])
def test_quantize_round_trip_equals_quantize_on_load(tmp_path, capsys, version, args, bits, gs) -> None:
    out = _quantize(tmp_path, version, *args)
    assert "layers quantized" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "minicpmv-weight-only", "bits": bits, "group_size": gs,
                                          "modules": "llm linear + lm_head"}
    src = {p.name for p in CKPT[version].iterdir() if p.suffix != ".safetensors"}
    assert src <= {p.name for p in out.iterdir()}  # tokenizer, preprocessor, generation config copied
    saved = minicpmv.load(out, dtype="bfloat16")
    fly = minicpmv.load(CKPT[version], dtype="bfloat16", quantize=f"int{bits}", group_size=gs)
    q = [m for m in saved.model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 7 * saved.config.text.num_hidden_layers + 1 and all(m.spec.bits == bits for m in q)
    assert torch.equal(_logits(saved), _logits(fly))
    plain = minicpmv.load(CKPT[version], dtype="bfloat16")
    rel = (_logits(saved) - _logits(plain)).norm() / _logits(plain).norm()
    assert 0 < rel < (0.05 if bits == 8 else 0.3)
    assert minicpmv.load(out, dtype="bfloat16", quantize=f"int{bits}", group_size=gs) is not None  # same: fine


def test_no_lm_head_keeps_head_float_and_prepacks_it(tmp_path) -> None:
    out = _quantize(tmp_path, "2.6", "--to", "int8", "--no-lm-head")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules"] == "llm linear"
    cm = minicpmv.load(out, dtype="bfloat16")
    head = cm.model.llm.lm_head
    assert not isinstance(head, QuantLinear)
    assert isinstance(head, PackedLinear) == can_prepack(torch.bfloat16, "cpu")
    with torch.inference_mode():
        assert torch.isfinite(_logits(cm)).all()


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_mismatched_group_size_or_bits_raise_clear_errors(tmp_path) -> None:
    out = _quantize(tmp_path, "2.6", "--to", "int4", "--group-size", "32")
    _edit_config(out, group_size=128)
    with pytest.raises(CheckpointError, match="written with group size 32, config.json records group_size 128"):
        minicpmv.load(out)
    _edit_config(out, bits=8, group_size=None)
    with pytest.raises(CheckpointError, match="stored as U8 but config.json records int8"):
        minicpmv.load(out)
    _edit_config(out, quant_method="gptq")
    with pytest.raises(ConfigError, match="'gptq' is not supported"):
        minicpmv.load(out)


def test_load_rejects_bad_quantize_requests(tmp_path) -> None:
    with pytest.raises(InputError, match="unknown quantization 'int3'"):
        minicpmv.load(CKPT["2.6"], quantize="int3")
    with pytest.raises(InputError, match="group_size applies only"):
        minicpmv.load(CKPT["2.6"], group_size=64)
    out = _quantize(tmp_path, "2.6", "--to", "int8")
    with pytest.raises(InputError, match="already quantized"):
        minicpmv.load(out, quantize="int4")


def test_cli_refuses_bad_output_and_group_size(tmp_path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x.txt").write_text("keep me")
    assert main(["quantize", "--model", str(CKPT["2.6"]), "--to", "int8", "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "x.txt").read_text() == "keep me"
    bad = ["quantize", "--model", str(CKPT["2.6"]), "--to", "int8", "--group-size", "64",
           "--output", str(tmp_path / "o")]
    assert main(bad) == 2
    assert "int4 only" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_chat_batched_and_cached_equal_single_and_fresh(fmt: str) -> None:
    """The quantized kernels compute each row on its own: a batch gives every conversation the
    tokens it gets alone, and a follow-up turn on the kept KV cache equals a fresh run. (float32
    activations: in bf16 the unquantized model's padded attention already rounds differently.)"""
    from .test_chat import GREEDY, _convs

    cm = minicpmv.load(CKPT["2.6"], dtype="float32", quantize=fmt)
    kinds = {m.kind for m in cm.model.modules() if isinstance(m, QuantLinear)}
    assert kinds in {"int8": [{"int8c_native"}, {"int8_onednn"}], "int4": [{"int4_native"}, {"int4_cpu"}]}[fmt]
    convs = _convs("2.6")
    assert cm.chat(convs, **GREEDY) == [cm.chat(c, **GREEDY) for c in convs]
    session = ChatSession(cm, **GREEDY)
    session.ask(convs[0][0]["content"])
    second = session.ask("And what else?")
    assert second == cm.chat(session.history[:-1], **GREEDY)


@pytest.mark.parametrize("args", [("--to", "int8"), ("--to", "int4", "--group-size", "32")])
def test_inspect_describes_a_quantized_checkpoint(tmp_path, capsys, args) -> None:
    out = _quantize(tmp_path, "4.5", *args)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    quant = json.loads(capsys.readouterr().out)["quantization"]
    assert quant["bits"] == int(args[1][3:]) and quant["format"].startswith(args[1])
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert 0.97 * on_disk < quant["stored_gib"] * 2**30 <= on_disk  # the files add only their headers
    assert main(["inspect", str(out)]) == 0
    assert "quantized    " in capsys.readouterr().out
    assert main(["inspect", str(CKPT["4.5"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] is None


def test_bf16_load_prepacks_the_vision_and_resampler_linears() -> None:
    """Safetensors in bf16 on a CPU: the vision tower's and resampler's linears are prepacked like
    the LLM's, each by its own dtype (a float32 vision stays plain)."""
    cm = minicpmv.load(CKPT["2.6"], dtype="bfloat16")
    parts = (cm.model.vpm, cm.model.resampler)
    vision = [m for part in parts for m in part.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and all(isinstance(m, PackedLinear) == can_prepack(torch.bfloat16, "cpu") for m in vision)
    routed = prefill_linear if can_prepack(torch.bfloat16, "cpu") else F.linear
    assert cm.model.resampler.attn.project is routed  # the packed in_proj: the same prefill GEMM
    mixed = minicpmv.load(CKPT["2.6"], dtype="bfloat16", vision_dtype="float32")
    assert not any(isinstance(m, PackedLinear) for m in mixed.model.vpm.modules())
    assert mixed.model.resampler.attn.project is F.linear
    assert any(isinstance(m, PackedLinear) for m in mixed.model.llm.modules()) == can_prepack(torch.bfloat16, "cpu")


def _vision_features(cm) -> torch.Tensor:
    from PIL import Image

    pixels = torch.Generator().manual_seed(5)
    image = Image.fromarray((torch.rand(300, 420, 3, generator=pixels) * 255).to(torch.uint8).numpy())
    inputs = cm.processor([[{"role": "user", "content": [image, "x"]}]])
    with torch.inference_mode():
        return torch.cat([f.float() for f in cm.runner.encode_features(inputs)])


@pytest.mark.skipif(not can_prepack(torch.bfloat16, "cpu"), reason="oneDNN has no bf16 GEMM on this CPU")
@pytest.mark.parametrize("gemm", ["onednn", "fp32"])
@pytest.mark.parametrize("source", ["safetensors", "gguf"])
def test_vision_weights_are_blocked_for_the_prefill_gemm_that_wins(monkeypatch: pytest.MonkeyPatch, gemm: str,
                                                                    source: str) -> None:
    """Large weights are held in oneDNN's blocked layout where oneDNN's GEMM is the faster prefill
    GEMM (the float32 one: plain weights), the vision tower's and resampler's and, where the native
    blocked GEMV matches PyTorch's linear (every shape here), the LLM's. The features and the state
    dict are the plain ones."""
    from minicpmv.quant import linear as L
    from minicpmv.quant import wide_gemm

    path = CKPT["2.6"] if source == "safetensors" else CONF.parent / "formats" / "llamacpp-2.6"
    monkeypatch.setenv("MINICPMV_BF16_GEMM", gemm)
    wide_gemm.gemm_choice.cache_clear()
    try:
        monkeypatch.setattr(L, "BLOCKED_FROM_VALUES", 0)  # the tiny weights count as large
        cm = minicpmv.load(path, dtype="bfloat16")
        monkeypatch.setattr(L, "BLOCKED_FROM_VALUES", 2**62)  # none does: every weight plain
        plain = minicpmv.load(path, dtype="bfloat16")
    finally:
        wide_gemm.gemm_choice.cache_clear()
    vision = [m for p in (cm.model.vpm, cm.model.resampler) for m in p.modules() if isinstance(m, PackedLinear)]
    blocked = {m.weight.layout == torch._mkldnn for m in vision}
    expected = {gemm == "onednn" or not L._bf16_native(torch.device("cpu"))}
    assert vision and blocked == expected
    llm = [m for m in cm.model.llm.modules() if isinstance(m, PackedLinear)]
    assert llm and {m.weight.layout == torch._mkldnn for m in llm} == expected
    torch.testing.assert_close(_vision_features(cm), _vision_features(plain), rtol=2**-7, atol=2**-7)
    for a, b in zip(cm.model.vpm.state_dict().items(), plain.model.vpm.state_dict().items(), strict=True):
        assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_prepacked_and_quantized_models_can_be_cast_after_load() -> None:
    packed = minicpmv.load(CKPT["2.6"], dtype="bfloat16")
    if can_prepack(torch.bfloat16, "cpu"):
        assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    packed.model.float()
    assert torch.equal(_logits(packed), _logits(minicpmv.load(CKPT["2.6"], dtype="float32")))
    quant = minicpmv.load(CKPT["2.6"], dtype="bfloat16", quantize="int4", group_size=32)
    quant.model.float()
    assert _logits(quant).dtype == torch.float32
    assert isinstance(quant.chat([{"role": "user", "content": ["hello"]}], sampling=False, max_new_tokens=3), str)


# ---------------------------------------------------------------------------- issue 20


def test_quantized_files_follow_the_umask_and_leave_the_demo_card_behind(tmp_path) -> None:
    """Every written file gets the umask's mode (safetensors alone writes 0600), and the demo
    model's DEMO_CARD.json (figures of the bf16 weights) is not copied to the int8 copy."""
    import os
    import stat

    from minicpmv import demo_model

    out = tmp_path / "demo-int8"
    old = os.umask(0o027)
    try:
        assert main(["quantize", "--model", str(demo_model.path()), "--to", "int8", "--output", str(out)]) == 0
    finally:
        os.umask(old)
    assert (demo_model.path() / "DEMO_CARD.json").is_file() and not (out / "DEMO_CARD.json").exists()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


def test_full_disk_while_quantizing_leaves_nothing(tmp_path, capsys, monkeypatch) -> None:
    import errno

    from minicpmv.formats import quantized as writer

    def full_disk(tensors, path, **kw):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "save_safetensors", full_disk)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(CKPT["2.6"]), "--to", "int8", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
