"""GGUF export and loading: exact round trips, the config/tokenizer rebuilt from llama.cpp's metadata,
block types against the gguf package's dequantization, the int4 mapping, and bad inputs."""

from __future__ import annotations

import ast
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from PIL import Image

import minicpmv
from minicpmv.errors import CheckpointError, InputError
from minicpmv.formats import gguf_names as names
from minicpmv.formats.gguf_quants import dequantize, int4_storage, int8_storage, quantize
from minicpmv.formats.gguf_read import GGUFCheckpoint, GGUFTensor, find_pair
from minicpmv.formats.gguf_write import export_gguf
from minicpmv.processing.tokenizer import Tokenizer
from minicpmv.quant.linear import QuantLinear, QuantSpec, dequantize_q6k, dequantize_weight, native_kernels_apply

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VERSIONS = ("2.5", "2.6", "4.5", "o2.6")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, bool], Path]:
    """(version, type, record_source) -> exported directory, made on first use."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[tuple[str, str, bool], Path] = {}

    class Lazy(dict):
        def __missing__(self, key: tuple[str, str, bool]) -> Path:
            v, fmt, record = key
            out = root / f"{v}-{fmt}-{int(record)}"
            export_gguf(CONF / v / "_checkpoint", out, fmt, record_source=record)
            self[key] = out
            return out

    return Lazy(made)


def _state(model: minicpmv.api.ChatModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.model.state_dict().items() if not k.startswith(("apm.", "audio_"))}


@pytest.mark.parametrize("version", VERSIONS)
def test_f32_export_loads_back_equal(exports: dict, version: str) -> None:
    src = _state(minicpmv.load(CONF / version / "_checkpoint", dtype="float32"))
    got = _state(minicpmv.load(exports[version, "f32", True], dtype="float32"))
    assert sorted(got) == sorted(src)
    assert [k for k in src if not torch.equal(src[k], got[k])] == []


def test_bf16_gguf_load_prepacks_the_vision_linears_too(exports: dict) -> None:
    """Loaded in bf16 on a CPU, the vision tower's and resampler's linears are prepacked like the
    LLM's (their prompt-size GEMMs take the faster bf16 path); with a float32 vision they are not."""
    from minicpmv.quant.linear import PackedLinear, can_prepack
    from minicpmv.quant.wide_gemm import prefill_linear

    cm = minicpmv.load(exports["2.6", "bf16", True], dtype="bfloat16")
    parts = (cm.model.vpm, cm.model.resampler)
    vision = [m for part in parts for m in part.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and all(isinstance(m, PackedLinear) == can_prepack(torch.bfloat16, "cpu") for m in vision)
    routed = prefill_linear if can_prepack(torch.bfloat16, "cpu") else F.linear
    assert cm.model.resampler.attn.project is routed  # the packed in_proj: the same prefill GEMM
    cm = minicpmv.load(exports["2.6", "bf16", True], dtype="bfloat16", vision_dtype="float32")
    assert not any(isinstance(m, PackedLinear) for m in cm.model.vpm.modules())
    assert cm.model.resampler.attn.project is F.linear


def test_bf16_export_keeps_the_language_model_exact(exports: dict) -> None:
    src = _state(minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32"))
    got = _state(minicpmv.load(exports["2.6", "bf16", True], dtype="float32"))
    llm = [k for k in src if k.startswith("llm.")]
    assert [k for k in llm if not torch.equal(src[k], got[k])] == []
    # the mmproj is F16 (as the official releases): bf16 values survive unless they underflow F16
    for k in src:
        if not k.startswith("llm."):
            torch.testing.assert_close(got[k], src[k], rtol=0, atol=6e-8)


@pytest.mark.parametrize("version", VERSIONS)
def test_metadata_only_files_give_the_same_logits(exports: dict, version: str) -> None:
    """Files without our minicpmv.* keys (what llama.cpp's converters write): config, tokenizer and
    preprocessor are rebuilt from the GGUF metadata and the model answers as the source."""
    image = Image.open(EXAMPLES / "shapes.png").convert("RGB")
    msgs = [{"role": "user", "content": [image, "What colour is the sky? 12345 ünïcödé"]}]
    ref = minicpmv.load(CONF / version / "_checkpoint", dtype="float32")
    got = minicpmv.load(exports[version, "f32", False], dtype="float32")
    kw = {"sampling": False, "num_beams": 1, "max_new_tokens": 6, "repetition_penalty": 1.0}
    assert got.chat(msgs, **kw) == ref.chat(msgs, **kw)
    a, b = ref.prepare([msgs]), got.prepare([msgs])
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.inputs_embeds, b.inputs_embeds)  # image features included
    pos = torch.arange(a.input_ids.shape[1])[None]
    with torch.no_grad():
        la = ref.model(a.inputs_embeds, pos, a.attention_mask, last_only=False)
        lb = got.model(b.inputs_embeds, pos, b.attention_mask, last_only=False)
    assert torch.equal(la, lb)


def _listed(value: object) -> list:
    return ast.literal_eval(value) if isinstance(value, str) else list(value)  # type: ignore[arg-type]


def _prompts(version: str) -> list[str]:
    out = ["", " hello  world\n\n\tx", "数字 12345 and 3.14159!", "<|im_start|>user\n<image>./</image>é ü", "a" * 50]
    for meta in sorted((CONF / version).glob("*/expected/meta.json")):
        data = json.loads(meta.read_text())
        for key in ("expanded_prompts", "chat_template_prompts"):
            if key in data:
                out += _listed(data[key])
    for f in sorted((CONF / version).glob("*/expected/chat_template_output.txt")):
        out.append(f.read_text(encoding="utf-8"))
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_tokenizer_rebuilt_from_gguf_metadata_gives_the_checkpoint_ids(exports: dict, version: str,
                                                                        tmp_path: Path) -> None:
    ckpt = GGUFCheckpoint(find_pair(exports[version, "f32", False]))
    ckpt.write_side_files(tmp_path)
    rebuilt, original = Tokenizer.from_dir(tmp_path), Tokenizer.from_dir(CONF / version / "_checkpoint")
    prompts = _prompts(version)
    assert len(prompts) > 6
    for text in prompts:
        assert rebuilt.encode(text) == original.encode(text), text
    ids = original.encode(prompts[-1])
    assert rebuilt.decode(ids) == original.decode(ids)
    assert rebuilt.chat_template == original.chat_template


def test_recorded_input_ids_of_a_case(exports: dict, tmp_path: Path) -> None:
    """The 2.6 case's official input ids, through the tokenizer rebuilt from GGUF metadata."""
    meta = json.loads((CONF / "2.6" / "single_448" / "expected" / "meta.json").read_text())
    prompt = _listed(meta["expanded_prompts"])[0]
    expected = _listed(meta["input_ids"])[0]
    GGUFCheckpoint(find_pair(exports["2.6", "f32", False])).write_side_files(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode(prompt) == expected


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k_m"])
def test_quantized_weights_equal_the_gguf_package_dequantization(exports: dict, fmt: str) -> None:
    """Q4_0 / Q4_K LLM matrices stay int4 and (where the native kernels run) Q8_0 / Q6_K ones stay
    grouped int8; every weight equals the ``gguf`` package's dequantization bit for bit."""
    out = exports["4.5", fmt, True]
    model = minicpmv.load(out, dtype="float32").model
    reader = GGUFReader(str(out / "model.gguf"))
    grouped = native_kernels_apply(QuantSpec(8, 32), "cpu") and native_kernels_apply(QuantSpec(6, 16), "cpu")
    kept = {4: 0, 6: 0, 8: 0}
    for t in reader.tensors:
        key = names.gguf_to_llm(t.name)
        ref = torch.from_numpy(dequantize(np.asarray(t.data), T(int(t.tensor_type))).reshape(
            tuple(int(n) for n in reversed(t.shape.tolist()))).copy())
        layer = model.get_submodule(key.rsplit(".", 1)[0])
        if isinstance(layer, QuantLinear):
            kept[layer.spec.bits] += 1
            expected = {T.Q4_0: (4, 32), T.Q4_K: (4, 32), T.Q8_0: (8, 32), T.Q6_K: (6, 16)}[T(int(t.tensor_type))]
            assert (layer.spec.bits, layer.spec.group_size) == expected, t.name
            assert layer.spec.bits == 4 or grouped
            got = dequantize_weight(layer.storage(), layer.spec, torch.float32)
        else:
            assert not (grouped and key.endswith("proj.weight") and t.tensor_type in (T.Q8_0, T.Q6_K)), t.name
            got = model.state_dict()[key]
        assert torch.equal(got, ref), t.name
    # q4_k_m: ffn_down (K=384) falls back, one attn_v is Q6_K
    assert kept[4] == {"q8_0": 0, "q4_0": 14, "q4_k_m": 11}[fmt]
    if grouped:  # q8_0: every linear; q4_0: the Q6_K output; q4_k_m: that, a Q6_K attn_v, a Q8_0 ffn_down fallback
        assert (kept[8], kept[6]) == {"q8_0": (15, 0), "q4_0": (0, 1), "q4_k_m": (1, 2)}[fmt]


def test_q8_0_int8_storage_and_q6k_blocks_are_the_block_dequantization() -> None:
    x = np.random.default_rng(2).standard_normal((24, 512)).astype(np.float32) * 0.05
    data = quantize(x, T.Q8_0)
    st = int8_storage(data, T.Q8_0, x.shape)
    assert st["qweight"].dtype == torch.int8 and st["scales"].shape == (24, 16)
    ref = torch.from_numpy(dequantize(data, T.Q8_0).reshape(x.shape))
    assert torch.equal((st["qweight"].float().view(24, 16, 32) * st["scales"][..., None]).view(24, 512), ref)
    data = quantize(x, T.Q6_K)  # the raw blocks the native kernel reads decode to the gguf package's weights
    ref = torch.from_numpy(dequantize(data, T.Q6_K).reshape(x.shape))
    assert torch.equal(dequantize_q6k(torch.from_numpy(np.ascontiguousarray(data.reshape(24, -1)))), ref)


@pytest.mark.parametrize("qtype, dtype", [(T.F32, torch.float32), (T.F16, torch.float16), (T.BF16, torch.bfloat16)])
def test_float_tensors_are_read_as_stored_with_the_values_of_the_float32_path(qtype: T, dtype: torch.dtype) -> None:
    """The loader takes F32 / F16 / BF16 tensors in their own type (no float32 detour): the values
    the gguf package decodes, the rotary row gather applied, and a Q8_0 tensor still widened."""
    x = np.random.default_rng(3).standard_normal((12, 64)).astype(np.float32) * 0.05
    x[0, :4] = [1e-40, -0.0, 3.0e38 if qtype != T.F16 else 6.0e4, -1.5]
    data = quantize(x, qtype)
    rows = np.array([3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10])
    ref = dequantize(data, qtype).reshape(x.shape)  # float32
    for gather in (None, rows):
        entry = GGUFTensor(data, qtype, x.shape, gather)
        got = entry.as_stored()
        assert got.dtype == dtype and got.shape == x.shape
        want = torch.from_numpy(ref if gather is None else ref[gather])
        assert torch.equal(got.float(), want) and torch.equal(entry.to_float(), want)
    small = x[1:]  # (Q8_0 of 3e38 would overflow its float16 scale)
    assert GGUFTensor(quantize(small, T.Q8_0), T.Q8_0, small.shape).as_stored().dtype == torch.float32


@pytest.mark.parametrize("qtype", [T.F32, T.BF16, T.Q6_K])
def test_tensors_read_off_a_read_only_map_are_copies(qtype: T, tmp_path: Path) -> None:
    """A tensor made from a file's read-only map (as ``GGUFReader`` maps it) is the loader's own
    copy: equal values, writable, sharing no memory with the map, made without a warning."""
    x = np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)
    path = tmp_path / "blocks.bin"
    data = quantize(x, qtype)
    data.tofile(path)
    mapped = np.memmap(path, dtype=data.dtype, mode="r", shape=data.shape)  # the reader's dtype and shape
    rows = np.array([1, 0, 3, 2, 5, 4, 7, 6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for gather in (None, rows):
            entry = GGUFTensor(mapped, qtype, x.shape, gather)
            got = entry.int8()["qweight"] if qtype == T.Q6_K else entry.as_stored()
            ref = data.reshape(8, -1) if qtype == T.Q6_K else dequantize(data, qtype).reshape(x.shape)
            ref = ref if gather is None else ref[gather]
            assert torch.equal(got if qtype == T.Q6_K else got.float(), torch.from_numpy(np.array(ref)))
            raw = got.view(torch.int16) if got.dtype == torch.bfloat16 else got
            assert not np.may_share_memory(raw.numpy(), mapped)
            raw.add_(1)  # writable memory of its own (writing into the map would crash)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K])
def test_int4_storage_is_the_block_dequantization(qtype: T) -> None:
    x = np.random.default_rng(1).standard_normal((48, 512)).astype(np.float32) * 0.05
    data = quantize(x, qtype)
    st = int4_storage(data, qtype, x.shape)
    ref = dequantize(data, qtype).reshape(x.shape)
    assert np.array_equal(dequantize_weight(st, QuantSpec(4, 32), torch.float32).numpy(), ref)
    broken = dict(st, zeros=st["zeros"] + 1e-3)
    assert not np.array_equal(dequantize_weight(broken, QuantSpec(4, 32), torch.float32).numpy(), ref)


@pytest.mark.parametrize("qtype,bound", [(T.Q4_K, 0.6), (T.Q6_K, 0.15), (T.Q4_0, 0.6), (T.Q8_0, 0.02)])
def test_quantizers_write_blocks_the_gguf_package_decodes(qtype: T, bound: float) -> None:
    x = np.random.default_rng(2).standard_normal((16, 768)).astype(np.float32)
    y = dequantize(quantize(x, qtype), qtype).reshape(x.shape)
    err = np.abs(y - x) / np.abs(x).max()
    assert err.max() < bound / 4 and err.mean() < bound / 16


def test_rotary_permutation_round_trips() -> None:
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(32, 3)
    p = names.permute_rotary(w, 4)
    assert not np.array_equal(p, w)
    assert np.array_equal(names.unpermute_rotary(p, 4), w)


def test_llama_file_is_permuted_like_llama_cpp(exports: dict) -> None:
    """2.5 (Llama 3): the file's attn_q rows are the checkpoint's in GGML's rotary order."""
    from safetensors import safe_open

    reader = GGUFReader(str(exports["2.5", "f32", True] / "model.gguf"))
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    with safe_open(str(CONF / "2.5" / "_checkpoint" / "model.safetensors"), "pt") as f:
        q = f.get_tensor("llm.model.layers.0.self_attn.q_proj.weight").float().numpy()
    assert np.array_equal(stored["blk.0.attn_q.weight"], names.permute_rotary(q, 4))
    assert not np.array_equal(stored["blk.0.attn_q.weight"], q)


def test_mmproj_carries_what_llama_cpp_reads(exports: dict) -> None:
    reader = GGUFReader(str(exports["2.6", "f16", False] / "mmproj.gguf"))
    fields = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("clip.")}
    assert fields["clip.minicpmv_version"] == 3 and fields["clip.projector_type"] == "resampler"
    assert fields["clip.vision.block_count"] == 2 and fields["clip.minicpmv_query_num"] == 64
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["v.patch_embd.weight"].tensor_type == T.F16
    assert {"resampler.pos_embed_k", "resampler.attn.q.weight", "resampler.proj.weight", "v.blk.1.ffn_down.weight",
            "v.post_ln.weight"} <= set(tensors)
    table = np.asarray(tensors["resampler.pos_embed_k"].data)
    assert np.array_equal(table, names.sincos_table(256))


def test_model_file_without_mmproj_is_refused(exports: dict) -> None:
    out = exports["2.6", "q8_0", True]
    with pytest.raises(CheckpointError, match="mmproj"):
        minicpmv.load(out / "model.gguf")
    with pytest.raises(CheckpointError, match="is an mmproj file"):
        minicpmv.load(out / "mmproj.gguf", mmproj=out / "mmproj.gguf")
    with pytest.raises(CheckpointError, match="not a GGUF"):
        minicpmv.load(out / "model.gguf", mmproj=out / "Modelfile")
    loaded = minicpmv.load(out / "model.gguf", mmproj=out / "mmproj.gguf", dtype="float32")
    assert loaded.version.name == "2.6"


def test_truncated_gguf_is_a_checkpoint_error(exports: dict, tmp_path: Path) -> None:
    out = exports["2.6", "q8_0", True]
    bad = tmp_path / "model.gguf"
    bad.write_bytes((out / "model.gguf").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read GGUF"):
        minicpmv.load(bad, mmproj=out / "mmproj.gguf")


def test_export_refuses_a_used_directory_and_unknown_types(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        export_gguf(CONF / "2.6" / "_checkpoint", tmp_path, "f16")
    assert (tmp_path / "x").read_text() == "keep"
    with pytest.raises(InputError, match="unknown GGUF type"):
        export_gguf(CONF / "2.6" / "_checkpoint", tmp_path / "y", "q3_k")


def test_modelfile_names_the_pair_and_the_stops(exports: dict) -> None:
    text = (exports["4.5", "q4_k_m", True] / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\nFROM ./mmproj.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER repeat_penalty 1.03" in text


def _tiny_40(root: Path) -> Path:
    """A MiniCPM-V 4.0-format checkpoint (Llama backbone, 2.6 pipeline): the tiny 2.6 weights under a
    4.0 config (q/k/v biases kept through ``attention_bias``); no official 4.0 vectors exist."""
    dst = root / "tiny-4.0"
    shutil.copytree(CONF / "2.6" / "_checkpoint", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(version=4.0, attention_bias=True)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_v40_llama_export_round_trips_with_permuted_biases(tmp_path: Path) -> None:
    src_dir = _tiny_40(tmp_path)
    src = minicpmv.load(src_dir, dtype="float32")
    assert src.version.name == "4.0" and src.config.text.family == "llama"
    export_gguf(src_dir, tmp_path / "f32", "f32", record_source=False)
    reader = GGUFReader(str(tmp_path / "f32" / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    bias = {t.name: np.asarray(t.data) for t in reader.tensors}["blk.0.attn_q.bias"]
    assert np.array_equal(bias, names.permute_rotary(src.model.state_dict()["llm.model.layers.0.self_attn.q_proj.bias"]
                                                     .numpy(), 4))
    got = minicpmv.load(tmp_path / "f32", dtype="float32")
    assert got.version.name == "4.0"
    a, b = _state(src), _state(got)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    msgs = [{"role": "user", "content": ["Hello there"]}]
    kw = {"sampling": False, "num_beams": 1, "max_new_tokens": 5, "repetition_penalty": 1.0}
    assert got.chat(msgs, **kw) == src.chat(msgs, **kw)


def test_v40_with_scaled_prompt_embeddings_is_refused(tmp_path: Path) -> None:
    src_dir = _tiny_40(tmp_path)
    cfg = json.loads((src_dir / "config.json").read_text())
    cfg["scale_emb"] = 12.0
    (src_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="scale_emb"):
        export_gguf(src_dir, tmp_path / "out", "f16")
    assert not (tmp_path / "out").exists()
