"""Strict safetensors loading of MiniCPM-V checkpoints, checkpoint resolution and meta-device
parameter counting (spec §3)."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpmv.config import ModelConfig
from minicpmv.errors import (
    CheckpointError,
    MissingWeightsError,
    OfflineError,
    ShapeMismatchError,
    UnexpectedWeightsError,
    UnknownVersionError,
    UnsafeCheckpointError,
)
from minicpmv.loading import (
    build_on_meta,
    count_parameters,
    load_model,
    read_config,
    resolve_checkpoint,
)
from minicpmv.versions import get_version

WEIGHTS = "model.safetensors"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / WEIGHTS))


def _rewrite(path: Path, sd: dict[str, torch.Tensor]) -> None:
    save_file(sd, str(path / WEIGHTS), metadata={"format": "pt"})


# --- successful loads --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_load_float32_equals_checkpoint_values(ckpt_copy, version) -> None:
    path = ckpt_copy(version)
    model = load_model(path, dtype=torch.float32)
    sd = _weights(path)
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, t in sd.items():
        assert torch.equal(got[k], t.float()), k
    tensors = [*model.parameters(), *model.buffers()]
    assert all(not t.is_meta and t.device.type == "cpu" for t in tensors)
    assert not model.training
    # derived tables (RoPE) are usable on the real device right away
    with torch.no_grad():
        logits = model(model.embed_tokens(torch.tensor([[1, 2, 3]])), None, None)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_load_dtypes(ckpt_copy, dtype) -> None:
    path = ckpt_copy("4.5")
    model = load_model(path, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.dtype == dtype
    src = _weights(path)["llm.model.layers.0.self_attn.q_norm.weight"]
    assert torch.equal(model.llm.model.layers[0].self_attn.q_norm.weight.float(), src.float())
    with torch.no_grad():
        out = model(model.embed_tokens(torch.tensor([[5, 6, 7]])), None, None)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sharded_checkpoint_equals_single_file(ckpt_copy, tmp_path) -> None:
    src = ckpt_copy("2.6")
    single = load_model(src, dtype=torch.float32)
    path = tmp_path / "sharded"
    path.mkdir()
    for f in src.iterdir():
        if f.name != WEIGHTS:
            (path / f.name).write_bytes(f.read_bytes())
    sd = _weights(src)
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}), encoding="utf-8"
    )
    sharded = load_model(path, dtype=torch.float32)
    a, b = single.state_dict(), sharded.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_checkpoint_without_lm_head(ckpt_copy) -> None:
    path = ckpt_copy("4.5")
    cfg_file = path / "config.json"
    raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    raw["tie_word_embeddings"] = True
    cfg_file.write_text(json.dumps(raw), encoding="utf-8")
    sd = _weights(path)
    del sd["llm.lm_head.weight"]
    _rewrite(path, sd)
    model = load_model(path, dtype=torch.float32)
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    assert torch.equal(model.llm.lm_head.weight, sd["llm.model.embed_tokens.weight"].float())


# --- strictness --------------------------------------------------------------------------------


def test_missing_key_raises(ckpt_copy) -> None:
    path = ckpt_copy("2.6")
    sd = _weights(path)
    del sd["llm.model.layers.1.self_attn.k_proj.bias"]
    _rewrite(path, sd)
    with pytest.raises(MissingWeightsError, match=r"llm\.model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(path, dtype=torch.float32)


def test_many_missing_keys_are_truncated(ckpt_copy) -> None:
    path = ckpt_copy("2.6")
    sd = {k: v for k, v in _weights(path).items() if not k.startswith("vpm.")}
    _rewrite(path, sd)
    with pytest.raises(MissingWeightsError, match=r"^37 parameter\(s\).*\(17 more\)"):
        load_model(path)


def test_unexpected_key_raises(ckpt_copy) -> None:
    path = ckpt_copy("4.5")
    sd = _weights(path)
    sd["llm.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256, dtype=torch.bfloat16)
    _rewrite(path, sd)
    with pytest.raises(UnexpectedWeightsError, match=r"q_proj\.bias"):
        load_model(path)


def test_shape_mismatch_names_key_and_shapes(ckpt_copy) -> None:
    path = ckpt_copy("2.6")
    sd = _weights(path)
    sd["resampler.query"] = sd["resampler.query"][:63].clone()
    _rewrite(path, sd)
    with pytest.raises(ShapeMismatchError, match=r"'resampler\.query'.*\[63, 256\].*\[64, 256\]"):
        load_model(path)


def test_index_naming_missing_shard(ckpt_copy) -> None:
    path = ckpt_copy("2.6")
    keys = list(_weights(path))
    shard2 = "model-00002-of-00002.safetensors"
    weight_map = {k: (WEIGHTS if i % 2 else shard2) for i, k in enumerate(keys)}
    index = json.dumps({"weight_map": weight_map})
    (path / "model.safetensors.index.json").write_text(index, encoding="utf-8")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(path)


def test_truncated_safetensors(ckpt_copy) -> None:
    path = ckpt_copy("2.6")
    f = path / WEIGHTS
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(path)


def test_garbage_safetensors_header(ckpt_copy) -> None:
    path = ckpt_copy("4.5")
    (path / WEIGHTS).write_bytes(b"\xff" * 8 + b"not a header at all" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(path)


class _Trap:
    """Unpickling this object creates a marker file (proves the loader never unpickles)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickle_only_checkpoint_is_refused(ckpt_copy, tmp_path) -> None:
    path = ckpt_copy("2.6", with_weights=False)
    marker = tmp_path / "unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_model(path)
    assert not marker.exists()


def test_no_weights_at_all(ckpt_copy) -> None:
    path = ckpt_copy("2.6", with_weights=False)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(path)


def test_python_files_are_never_imported(ckpt_copy, tmp_path, caplog) -> None:
    path = ckpt_copy("4.5")
    marker = tmp_path / "imported"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n"
    for name in ("modeling_minicpmv.py", "configuration_minicpm.py", "__init__.py"):
        (path / name).write_text(code, encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="minicpmv.loading.checkpoint"):
        load_model(path, dtype=torch.float32)
    assert not marker.exists()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("modeling_minicpmv.py" in m and "ignor" in m for m in messages)


# --- resolution and config ---------------------------------------------------------------------


def test_resolve_local_directory(ckpt_copy) -> None:
    path = ckpt_copy("2.6")
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(str(path)) == path
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(path / "config.json")
    with pytest.raises(CheckpointError, match="neither an existing directory"):
        resolve_checkpoint(str(path / "no" / "such" / "dir"))


def test_resolve_repo_id_offline(monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # a relative "org/name" must not exist locally
    with pytest.raises(OfflineError, match="minicpmv-test-nonexistent/repo-zz"):
        resolve_checkpoint("minicpmv-test-nonexistent/repo-zz")


def test_read_config(ckpt_copy, tmp_path) -> None:
    raw, spec = read_config(ckpt_copy("4.5"))
    assert spec is get_version("4.5") and raw["hidden_size"] == 256
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}), encoding="utf-8")
    with pytest.raises(UnknownVersionError, match="no 'version' field"):
        read_config(tmp_path)
    assert read_config(tmp_path, version="2.6")[1] is get_version("2.6")


# --- meta device and parameter counts ----------------------------------------------------------


def _real45_config(data_dir: Path) -> tuple[dict, ModelConfig]:
    raw = json.loads((data_dir / "real-4.5" / "release" / "config.json").read_text(encoding="utf-8"))
    spec = get_version(raw["version"])
    return raw, ModelConfig.from_hf_dict(raw, family=spec.llm_family, temporal=spec.temporal_resampler)


def _expected_counts(raw: dict, *, qkv_bias: bool, qk_norm: bool) -> dict[str, int]:
    """Spec §3 key table, evaluated with the config's dimensions."""
    h, n_layers = raw["hidden_size"], raw["num_hidden_layers"]
    i_size, vocab = raw["intermediate_size"], raw["vocab_size"]
    nh, nkv = raw["num_attention_heads"], raw["num_key_value_heads"]
    hd = raw.get("head_dim") or h // nh
    layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 2 * h + 3 * h * i_size
    layer += (nh * hd + 2 * nkv * hd) if qkv_bias else 0
    layer += 2 * hd if qk_norm else 0
    llm = 2 * vocab * h + n_layers * layer + h
    v = raw["vision_config"]
    dv, iv, p, lv = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["num_hidden_layers"]
    npos = (v["image_size"] // p) ** 2
    vlayer = 4 * (dv * dv + dv) + 4 * dv + (iv * dv + iv) + (dv * iv + dv)
    vpm = dv * 3 * p * p + dv + npos * dv + lv * vlayer + 2 * dv
    d, q = h, raw["query_num"]
    resampler = q * d + d * dv + (3 * d * d + 3 * d) + (d * d + d) + 6 * d + d * d
    return {"llm": llm, "vpm": vpm, "resampler": resampler, "total": llm + vpm + resampler}


def test_real_45_parameter_count_on_meta(data_dir) -> None:
    raw, cfg = _real45_config(data_dir)
    counts = count_parameters(cfg)
    assert counts == _expected_counts(raw, qkv_bias=False, qk_norm=True)
    assert 8.6e9 < counts["total"] < 8.8e9
    model = build_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert len(model.state_dict()) == 849  # spec §3: keys of the released 4.5 checkpoint


def test_26_dimensions_key_count_on_meta(data_dir) -> None:
    raw, _ = _real45_config(data_dir)
    raw = {k: v for k, v in raw.items() if k not in ("head_dim", "attention_bias")}
    raw.update(version=2.6, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=151666)
    spec = get_version("2.6")
    cfg = ModelConfig.from_hf_dict(raw, family=spec.llm_family, temporal=spec.temporal_resampler)
    assert count_parameters(cfg) == _expected_counts(raw, qkv_bias=True, qk_norm=False)
    assert len(build_on_meta(cfg).state_dict()) == 789  # spec §3


def test_tiny_count_matches_loaded_model(ckpt_copy) -> None:
    path = ckpt_copy("2.6")
    model = load_model(path, dtype=torch.float32)
    counts = count_parameters(model.config)
    assert counts["total"] == sum(t.numel() for t in _weights(path).values())
    assert counts["vpm"] == sum(p.numel() for p in model.vpm.parameters())
    assert os.path.isdir(path)


def test_copy_side_files_keeps_data_and_drops_weights_indexes_and_code(tmp_path) -> None:
    from minicpmv.loading.checkpoint import copy_side_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    keep = ["config.json", "generation_config.json", "tokenizer.json", "preprocessor_config.json", "vocab.txt"]
    drop = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "modeling_minicpmv.py", "optimizer.pt"]
    for name in keep + drop:
        (src / name).write_text(name)
    (src / "sub").mkdir()
    assert copy_side_files(src, dst, skip=["config.json"]) == sorted(set(keep) - {"config.json"})
    assert sorted(p.name for p in dst.iterdir()) == sorted(set(keep) - {"config.json"})
    assert (dst / "tokenizer.json").read_text() == "tokenizer.json"


# --- shard names stay inside the checkpoint folder (issue 20) ----------------------------------


@pytest.mark.parametrize("where", ["parent", "absolute", "nested-dotdot"])
def test_index_shards_outside_the_folder_are_refused(ckpt_copy, tmp_path, where) -> None:
    """An index may only name files inside its own folder: a shard reached through ``..`` or an
    absolute path is refused before it is opened (even when the file exists and is valid)."""
    path = ckpt_copy("2.6")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (path / WEIGHTS).rename(outside / WEIGHTS)
    name = {"parent": f"../elsewhere/{WEIGHTS}", "absolute": str(outside / WEIGHTS),
            "nested-dotdot": f"sub/../../elsewhere/{WEIGHTS}"}[where]
    keys = list(load_file(str(outside / WEIGHTS)))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_model(path)


def test_index_shard_symlinked_like_the_hub_cache_is_allowed(ckpt_copy, tmp_path) -> None:
    """The Hugging Face cache links snapshot files to ../../blobs/<hash>: the check is on the
    names the index lists, not on where their links point."""
    path = ckpt_copy("2.6")
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    (path / WEIGHTS).rename(blob)
    os.symlink(blob, path / "model-00001-of-00001.safetensors")
    keys = list(load_file(str(blob)))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    assert load_model(path, dtype=torch.float32) is not None


def test_index_shard_in_a_subfolder_is_allowed(ckpt_copy) -> None:
    path = ckpt_copy("2.6")
    (path / "weights").mkdir()
    (path / WEIGHTS).rename(path / "weights" / WEIGHTS)
    keys = list(load_file(str(path / "weights" / WEIGHTS)))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f"weights/{WEIGHTS}" for k in keys}}))
    assert load_model(path, dtype=torch.float32) is not None


def test_copy_side_files_never_copies_the_demo_card(tmp_path) -> None:
    """DEMO_CARD.json holds the figures of the bundled demo weights; a quantized or fine-tuned
    copy has other weights, so the card must not travel with them."""
    from minicpmv.loading.checkpoint import copy_side_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("config.json", "DEMO_CARD.json"):
        (src / name).write_text("{}")
    assert copy_side_files(src, dst) == ["config.json"]
    assert not (dst / "DEMO_CARD.json").exists()


# --- straight-to-device reads (the GPU path, exercised on the CPU) ------------------------------


@pytest.fixture()
def direct_reads(monkeypatch):
    """Send CPU tensors through the path a GPU load takes (a safetensors handle opened for the
    target device, tensors converted after the read, several in flight) and count its reads."""
    from minicpmv.loading import checkpoint

    seen: list[str] = []
    real = checkpoint._read_direct

    def counting(f, keys, dtype_of, device_of):
        seen.extend(keys)
        return real(f, keys, dtype_of, device_of)

    monkeypatch.setattr(checkpoint, "_goes_direct", lambda device: True)
    monkeypatch.setattr(checkpoint, "_read_direct", counting)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_reads_equal_the_default_path(ckpt_copy, direct_reads, monkeypatch, dtype) -> None:
    path = ckpt_copy("4.5")
    model = load_model(path, dtype=dtype, vision_dtype=torch.float32)
    sd = model.state_dict()
    assert len(direct_reads) == len(sd)  # every tensor went the direct way
    monkeypatch.undo()
    ref = load_model(path, dtype=dtype, vision_dtype=torch.float32).state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


def test_direct_reads_stay_strict(ckpt_copy, direct_reads) -> None:
    path = ckpt_copy("2.6")
    sd = _weights(path)
    del sd["llm.model.layers.1.self_attn.k_proj.bias"]
    sd["resampler.query"] = sd["resampler.query"][:63].clone()
    _rewrite(path, sd)
    with pytest.raises(MissingWeightsError, match=r"k_proj\.bias"):
        load_model(path)
    sd["llm.model.layers.1.self_attn.k_proj.bias"] = torch.zeros(128, dtype=torch.bfloat16)
    _rewrite(path, sd)
    with pytest.raises(ShapeMismatchError, match=r"resampler\.query"):
        load_model(path)
    assert not direct_reads  # both errors came before a tensor was read
    f = path / WEIGHTS
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(path)
