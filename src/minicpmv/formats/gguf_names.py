"""Tensor names and metadata keys of llama.cpp's MiniCPM-V GGUF pair, both ways.

The language model file is what ``convert_hf_to_gguf.py`` writes for the LLM part that
``minicpmv-surgery.py`` splits off (architectures ``qwen2``, ``qwen3``, ``llama``); the ``mmproj``
file is what ``minicpmv-convert-image-encoder-to-gguf.py`` writes for the vision tower (``v.*``)
and the resampler (``resampler.*``). Facts carried over from those scripts: llama's q/k rows are
permuted into GGML's rotary layout, the resampler's packed ``in_proj`` is split into q/k/v, its
``proj`` is stored transposed, SigLIP's ``mlp.fc1`` is named ``ffn_down`` and ``fc2`` ``ffn_up``,
and ``clip.minicpmv_version`` numbers the releases. This module holds names and pure tensor
rearrangements only; it does not read or write files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError

# our release name <-> clip.minicpmv_version (llama.cpp's numbering)
MMPROJ_VERSIONS = {"2.5": 2, "2.6": 3, "o2.6": 4, "4.0": 5, "4.5": 6}
VERSION_OF_MMPROJ = {v: k for k, v in MMPROJ_VERSIONS.items()}
# our backbone family -> general.architecture of the language-model file
LLM_ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}
FAMILY_OF_ARCH = {v: k for k, v in LLM_ARCHS.items()}
INT4_GROUP = 32  # GGML Q4_0 / Q4_K groups: what they become in quant/linear.py's int4 storage
POS_EMBED_GRID = 70  # resampler.pos_embed_k: the 70x70 sin/cos table the converter writes (unused by us)
OUR_CONFIG_KEY = "minicpmv.config_json"  # our exports: the source config.json, for an exact round trip
OUR_PREPROCESSOR_KEY = "minicpmv.preprocessor_config_json"

_LLM_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LLM_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_VISION_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up",  # sic: the converter's names
}
_VISION_GLOBAL = {
    "embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
    "post_layernorm": "v.post_ln",
}
_RESAMPLER = {"kv_proj": "kv", "attn.out_proj": "attn.out", "ln_q": "ln_q", "ln_kv": "ln_kv", "ln_post": "ln_post"}
_LAYER_KEY = re.compile(r"^(?P<stem>.*)\.layers\.(?P<i>\d+)\.(?P<mod>.+)\.(?P<leaf>weight|bias)$")
_BLK = re.compile(r"^(?P<pre>v\.)?blk\.(?P<i>\d+)\.(?P<mod>[a-z_0-9]+)\.(?P<leaf>weight|bias)$")


@dataclass(frozen=True)
class _Part:
    """One model part's naming: our prefix and layer stem, GGUF's block prefix, the tables."""

    ours: str  # "llm." / "vpm."
    stem: str  # "model" / "encoder": the parent of ``layers``
    theirs: str  # "" / "v.": before ``blk.``
    layer: dict[str, str]
    glob: dict[str, str]
    what: str

    def to_gguf(self, key: str) -> str:
        inner = key.removeprefix(self.ours)
        m = _LAYER_KEY.match(inner)
        if m and m["stem"] == self.stem and m["mod"] in self.layer:
            return f"{self.theirs}blk.{m['i']}.{self.layer[m['mod']]}.{m['leaf']}"
        stem, _, leaf = inner.rpartition(".")
        if stem in self.glob:
            return f"{self.glob[stem]}.{leaf}"
        raise CheckpointError(f"no GGUF name for the {self.what} tensor {key!r}")

    def from_gguf(self, name: str) -> str:
        m = _BLK.match(name)
        if m and (m["pre"] or "") == self.theirs:
            mod = {v: k for k, v in self.layer.items()}.get(m["mod"])
            if mod:
                return f"{self.ours}{self.stem}.layers.{m['i']}.{mod}.{m['leaf']}"
        stem, _, leaf = name.rpartition(".")
        glob = {v: k for k, v in self.glob.items()}.get(stem)
        if glob:
            return f"{self.ours}{glob}.{leaf}"
        raise CheckpointError(f"the {self.what} GGUF holds a tensor {name!r} that MiniCPM-V does not have")


_LLM = _Part("llm.", "model", "", _LLM_LAYER, _LLM_GLOBAL, "language-model")
_VISION = _Part("vpm.", "encoder", "v.", _VISION_LAYER, _VISION_GLOBAL, "vision")


def llm_to_gguf(key: str) -> str:
    """``llm.model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (CheckpointError if unknown)."""
    return _LLM.to_gguf(key)


def gguf_to_llm(name: str) -> str:
    """Inverse of ``llm_to_gguf``."""
    return _LLM.from_gguf(name)


def vision_to_gguf(key: str) -> str:
    """``vpm.encoder.layers.0.mlp.fc1.weight`` -> ``v.blk.0.ffn_down.weight`` (vision tower only)."""
    return _VISION.to_gguf(key)


def gguf_to_vision(name: str) -> str:
    """Inverse of ``vision_to_gguf``."""
    return _VISION.from_gguf(name)


def resampler_to_gguf(key: str, t: np.ndarray) -> dict[str, np.ndarray]:
    """One official ``resampler.*`` tensor -> the mmproj tensors the converter makes of it."""
    inner = key.removeprefix("resampler.")
    if inner in ("query", "pos_embed"):
        return {key: t}
    if inner == "proj":
        return {"resampler.proj.weight": np.ascontiguousarray(t.T)}
    if inner.startswith("attn.in_proj_"):
        leaf = inner.removeprefix("attn.in_proj_")
        q, k, v = np.split(t, 3, axis=0)
        return {f"resampler.attn.{n}.{leaf}": x for n, x in zip("qkv", (q, k, v), strict=True)}
    stem, _, leaf = inner.rpartition(".")
    if stem in _RESAMPLER:
        return {f"resampler.{_RESAMPLER[stem]}.{leaf}": t}
    raise CheckpointError(f"no GGUF name for the resampler tensor {key!r}")


def resampler_from_gguf(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The mmproj's ``resampler.*`` tensors -> official keys (q/k/v joined, ``proj`` transposed back;
    the computed ``pos_embed_k`` table is dropped: the model computes its own)."""
    out: dict[str, np.ndarray] = {}
    back = {v: k for k, v in _RESAMPLER.items()}
    for name, t in tensors.items():
        inner = name.removeprefix("resampler.")
        if inner in ("query", "pos_embed"):
            out[name] = t
        elif inner == "pos_embed_k":
            continue
        elif inner == "proj.weight":
            out["resampler.proj"] = np.ascontiguousarray(t.T)
        elif inner.startswith("attn.") and inner.split(".")[1] in "qkv" and len(inner.split(".")) == 3:
            continue  # joined below
        else:
            stem, _, leaf = inner.rpartition(".")
            if stem not in back:
                raise CheckpointError(f"the mmproj GGUF holds a tensor {name!r} that MiniCPM-V does not have")
            out[f"resampler.{back[stem]}.{leaf}"] = t
    for leaf in ("weight", "bias"):
        parts = [tensors.get(f"resampler.attn.{n}.{leaf}") for n in "qkv"]
        if all(p is not None for p in parts):
            out[f"resampler.attn.in_proj_{leaf}"] = np.concatenate(parts, axis=0)  # type: ignore[arg-type]
        elif any(p is not None for p in parts):
            raise CheckpointError(f"the mmproj GGUF has only some of resampler.attn.q/k/v.{leaf}")
    return out


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF llama q/k rows (rotate-half halves) -> GGML's interleaved pairs, per head ([N, ...])."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``permute_rotary``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sincos_table(dim: int, grid: int = POS_EMBED_GRID) -> np.ndarray:
    """The [grid*grid, dim] 2-D sin/cos table the converter stores as ``resampler.pos_embed_k``
    (w coordinate in the first half, h in the second; float32 numpy math as in the converter)."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))  # [d/2]
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # [M, d/2]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(gw, dim // 2), one(gh, dim // 2)], axis=1).astype(np.float32)
