"""``minicpmv export --gguf``: write the GGUF pair llama.cpp's multimodal tools load, and a Modelfile.

``OUT/model.gguf`` holds the language model as ``convert_hf_to_gguf.py`` writes it (tensor names,
``{arch}.*`` hyper-parameters, llama's rotary row permutation, the byte-level BPE tokenizer as
``tokenizer.ggml.*``, the chat template); ``OUT/mmproj.gguf`` holds the vision tower and resampler
as ``minicpmv-convert-image-encoder-to-gguf.py`` writes them (``clip.*`` keys, ``clip.minicpmv_version``,
the 70x70 ``resampler.pos_embed_k`` table llama.cpp reads). Both also carry the source
``config.json`` / ``preprocessor_config.json`` under ``minicpmv.*`` keys so that our loader gets
the exact source configuration back. ``OUT/Modelfile`` points Ollama at the pair with the chat
template and the release's sampling preset.

Types (``--type``): f32, f16, bf16, q8_0, q4_0, q4_k_m for the language model's matrices (1-D
tensors stay F32; q4_0 / q4_k_m store ``output`` as Q6_K and q4_k_m some ``attn_v`` / ``ffn_down``
as Q6_K, llama-quantize's rules; a matrix whose row length does not fit the block size falls back
like llama-quantize does). The mmproj is F32 for ``f32`` and F16 otherwise (the patch embedding
always F16 except for ``f32``), as the official releases ship it. Tensors are streamed: one at a
time in memory. This module reads float safetensors checkpoints only; it does not load models.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, LlamaFileType, TokenType
from gguf import quants as gq

from ..config import ModelConfig, read_json_object
from ..errors import InputError
from ..loading.checkpoint import read_config, resolve_checkpoint, weight_files
from ..processing.tokenizer import Tokenizer
from ..quant.load_plan import open_handle
from ..versions import VersionSpec
from . import gguf_names as names
from .gguf_quants import quantize

log = logging.getLogger(__name__)

TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K}
_FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
               "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
               "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0, T.Q4_0: T.F16, T.Q8_0: T.F16, T.Q5_0: T.F16}
_PRE_NAMES = {
    r"\p{N}| ?[^\s\p{L}\p{N}]+": "qwen2",
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+": "llama-bpe",
}
_ROTARY = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")
_LOOKS_SPECIAL = re.compile(r"^<.*>$|^<\|.*\|>$|^\[.*\]$")


@dataclass
class _Planned:
    name: str
    qtype: T
    shape: tuple[int, ...]  # row-major float shape
    make: Callable[[], np.ndarray]  # float32 data in that shape


def export_gguf(
    src: str | Path, out: str | Path, fmt: str = "f16", *, revision: str | None = None, record_source: bool = True,
) -> dict[str, Any]:
    """Write ``out/model.gguf``, ``out/mmproj.gguf`` and ``out/Modelfile`` from a float checkpoint.
    ``record_source=False`` leaves out the ``minicpmv.*`` keys (the files then hold exactly what
    llama.cpp's converters write, and our loader rebuilds the configuration from their metadata)."""
    if fmt not in TYPES:
        raise InputError(f"unknown GGUF type {fmt!r}; use one of {sorted(TYPES)}")
    path = resolve_checkpoint(str(src), revision=revision)
    raw, spec = read_config(path)
    cfg = ModelConfig.from_hf_dict(raw, **spec.config_kwargs())
    _check_exportable(cfg, spec)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output directory {out} exists and is not empty")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stored = weight_files(path)
    handles: dict[Path, Any] = {}

    def read(key: str) -> np.ndarray:
        return open_handle(handles, stored[key]).get_tensor(key).to(torch.float32).numpy()

    tokenizer = Tokenizer.from_dir(path)
    llm = _llm_plan(cfg, fmt, [k for k in stored if k.startswith("llm.")], read)
    _write(tmp / "model.gguf", names.LLM_ARCHS[cfg.text.family], llm,
           lambda w: _llm_metadata(w, cfg, raw if record_source else None, fmt, tokenizer, spec))
    pre = read_json_object(path / "preprocessor_config.json") or {}
    proj = _mmproj_plan(cfg, fmt, [k for k in stored if k.startswith(("vpm.", "resampler."))], read)
    _write(tmp / "mmproj.gguf", "clip", proj, lambda w: _mmproj_metadata(w, cfg, spec, fmt, pre, record_source))
    (tmp / "Modelfile").write_text(modelfile(spec, tokenizer), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    sizes = {f.name: f.stat().st_size for f in out.iterdir()}
    log.info("wrote %s (%s): %s", out, fmt, sizes)
    return {"type": fmt, "files": sizes, "version": spec.name}


def _check_exportable(cfg: ModelConfig, spec: VersionSpec) -> None:
    if spec.name not in names.MMPROJ_VERSIONS:
        raise InputError(f"GGUF export covers releases {sorted(names.MMPROJ_VERSIONS)}; this checkpoint is {spec.name}")
    if cfg.text.family not in names.LLM_ARCHS:
        raise InputError(f"no llama.cpp architecture for the {cfg.text.family} backbone")
    if cfg.text.scale_emb not in (None, 1.0):
        raise InputError(
            f"this {spec.name} checkpoint scales prompt embeddings (scale_emb={cfg.text.scale_emb}); llama.cpp's "
            f"{names.LLM_ARCHS[cfg.text.family]} architecture cannot, so a GGUF of it would answer differently"
        )


def _llm_type(name: str, fmt: str, layer: int | None, n_layers: int) -> T:
    base = TYPES[fmt]
    if base in (T.F32, T.F16, T.BF16, T.Q8_0):
        return base
    if name == "output.weight":
        return T.Q6_K
    if fmt == "q4_k_m" and layer is not None and re.search(r"\.(attn_v|ffn_down)\.weight$", name):
        more = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
        return T.Q6_K if more else T.Q4_K
    return base


def _fit(qtype: T, shape: tuple[int, ...]) -> T:
    """``qtype``, or llama-quantize's fallback when the row length is not a multiple of its block."""
    while qtype in _FALLBACK and shape[-1] % gq.GGML_QUANT_SIZES[qtype][0]:
        qtype = _FALLBACK[qtype]
    return qtype


def _llm_plan(cfg: ModelConfig, fmt: str, keys: list[str], read: Callable[[str], np.ndarray]) -> list[_Planned]:
    text = cfg.text
    plan = []
    for key in sorted(keys, key=_natural):
        name = names.llm_to_gguf(key)
        layer = int(m[1]) if (m := re.match(r"blk\.(\d+)\.", name)) else None
        heads = 0
        if text.family == "llama" and key.endswith(_ROTARY):  # weights and biases, as convert_hf_to_gguf
            heads = text.num_attention_heads if "q_proj" in key else text.num_key_value_heads

        def make(k: str = key, h: int = heads) -> np.ndarray:
            return names.permute_rotary(read(k), h) if h else read(k)

        shape = _shape_of(key, read)
        qtype = T.F32 if len(shape) == 1 else _fit(_llm_type(name, fmt, layer, text.num_hidden_layers), shape)
        plan.append(_Planned(name, qtype, shape, make))
    return plan


def _mmproj_plan(cfg: ModelConfig, fmt: str, keys: list[str], read: Callable[[str], np.ndarray]) -> list[_Planned]:
    half = T.F32 if fmt == "f32" else T.F16
    plan = []
    for key in sorted(keys, key=_natural):
        if key.startswith("vpm."):
            arr = None
            items = {names.vision_to_gguf(key): (lambda k=key: read(k))}
            shapes = {next(iter(items)): _shape_of(key, read)}
        else:
            arr = read(key)
            parts = names.resampler_to_gguf(key, arr)
            items = {n: (lambda a=a: a) for n, a in parts.items()}
            shapes = {n: tuple(a.shape) for n, a in parts.items()}
        for name, make in items.items():
            shape = shapes[name]
            qtype = half if (name.endswith(".weight") and len(shape) >= 2) else T.F32
            plan.append(_Planned(name, qtype, shape, make))
    table = names.sincos_table(cfg.text.hidden_size)
    plan.append(_Planned("resampler.pos_embed_k", T.F32, tuple(table.shape), lambda: table))
    return plan


def _shape_of(key: str, read: Callable[[str], np.ndarray]) -> tuple[int, ...]:
    return tuple(read(key).shape)  # reads the tensor once more; the files are memory-mapped


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _write(path: Path, arch: str, plan: list[_Planned], metadata: Callable[[GGUFWriter], None]) -> None:
    w = GGUFWriter(str(path), arch=arch)
    metadata(w)
    for p in plan:
        byte_shape = gq.quant_shape_to_byte_shape(p.shape, p.qtype) if p.qtype not in (T.F32, T.F16) else p.shape
        dtype = {T.F32: np.float32, T.F16: np.float16}.get(p.qtype, np.uint8)
        nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(p.name, byte_shape, np.dtype(dtype), nbytes, raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in plan:
        w.write_tensor_data(np.ascontiguousarray(quantize(p.make(), p.qtype)))
    w.close()


def _llm_metadata(
    w: GGUFWriter, cfg: ModelConfig, raw: dict[str, Any] | None, fmt: str, tok: Any, spec: VersionSpec,
) -> None:
    text = cfg.text
    w.add_name(str((raw or {}).get("_name_or_path") or f"MiniCPM-V {spec.name}"))
    w.add_file_type(int(_FILE_TYPES[fmt]))
    w.add_context_length(text.max_position_embeddings)
    w.add_embedding_length(text.hidden_size)
    w.add_block_count(text.num_hidden_layers)
    w.add_feed_forward_length(text.intermediate_size)
    w.add_head_count(text.num_attention_heads)
    w.add_head_count_kv(text.num_key_value_heads)
    w.add_rope_freq_base(float(text.rope_theta))
    w.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    if text.family == "qwen3" or text.head_dim != text.hidden_size // text.num_attention_heads:
        w.add_key_length(text.head_dim)
        w.add_value_length(text.head_dim)
    if text.family == "llama":
        w.add_vocab_size(text.vocab_size)
        w.add_rope_dimension_count(text.head_dim)
    _tokenizer_metadata(w, tok, text.vocab_size)
    if raw is None:
        return
    if cfg.audio is not None or cfg.tts:  # the GGUF pair holds the vision and language parts only
        raw = {**raw, "init_audio": False, "init_tts": False}
    w.add_string(names.OUR_CONFIG_KEY, json.dumps(raw, ensure_ascii=False))


def _tokenizer_metadata(w: GGUFWriter, tok: Any, vocab_size: int) -> None:
    backend = getattr(tok, "_tok", None)  # the tokenizers.Tokenizer behind ours
    if backend is None or not hasattr(backend, "to_str"):
        raise InputError("GGUF export needs a byte-level BPE tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise InputError(f"GGUF export needs a BPE tokenizer, this one is {spec['model']['type']}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(spec))
    vocab = backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            t = added[i]
            tokens.append(t.content)
            types.append(TokenType.CONTROL if t.special or _LOOKS_SPECIAL.match(t.content) else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                      ("unk", w.add_unk_token_id)):
        tid = getattr(tok, f"{name}_token_id", None)
        if tid is not None:
            add(int(tid))
    w.add_add_bos_token(bool(_adds_bos(spec)))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _pre_name(spec: dict[str, Any]) -> str:
    text = json.dumps(spec.get("pre_tokenizer"))
    for fragment, name in _PRE_NAMES.items():
        if json.dumps(fragment)[1:-1] in text:
            return name
    raise InputError("GGUF export: the tokenizer's pre-tokenizer is neither Qwen2's nor Llama 3's split")


def _adds_bos(spec: dict[str, Any]) -> bool:
    return "TemplateProcessing" in json.dumps(spec.get("post_processor"))


def _mmproj_metadata(
    w: GGUFWriter, cfg: ModelConfig, spec: VersionSpec, fmt: str, pre: dict[str, Any], record_source: bool,
) -> None:
    v = cfg.vision
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_minicpmv_projector", True)
    w.add_file_type(0 if fmt == "f32" else 1)
    w.add_description("image encoder for MiniCPM-V")
    w.add_string("clip.projector_type", "resampler")
    w.add_int32("clip.minicpmv_version", names.MMPROJ_VERSIONS[spec.name])
    w.add_uint32("clip.vision.image_size", cfg.slice.scale_resolution)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.projection_dim", 0)
    w.add_uint32("clip.vision.attention.head_count", v.num_attention_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(v.layer_norm_eps))
    w.add_uint32("clip.vision.block_count", cfg.vision_layers_used)
    w.add_uint32("clip.minicpmv_query_num", cfg.query_num)
    w.add_array("clip.vision.image_mean", [float(x) for x in pre.get("norm_mean", [0.5] * 3)])
    w.add_array("clip.vision.image_std", [float(x) for x in pre.get("norm_std", [0.5] * 3)])
    w.add_bool("clip.use_gelu", True)
    if pre and record_source:
        w.add_string(names.OUR_PREPROCESSOR_KEY, json.dumps(pre, ensure_ascii=False))


def modelfile(spec: VersionSpec, tok: Any) -> str:
    """An Ollama Modelfile for ``model.gguf`` + ``mmproj.gguf`` in the same directory."""
    preset = dict(spec.sampling_preset)
    llama3 = spec.llm_family == "llama" and "start_header_id" in (tok.chat_template or "")
    if llama3:
        template = ('{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
                    '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
    else:
        template = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ range .Messages }}'
                    '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
    lines = ["FROM ./model.gguf", "FROM ./mmproj.gguf", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{t}"' for t in spec.terminators]
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("repetition_penalty", "repeat_penalty")):
        if ours in preset:
            lines.append(f"PARAMETER {theirs} {preset[ours]}")
    return "\n".join(lines) + "\n"
