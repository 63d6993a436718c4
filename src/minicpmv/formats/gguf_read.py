"""Read llama.cpp's MiniCPM-V GGUF pair: the official config, tokenizer files and tensors back.

``find_pair`` takes a directory (its ``*.gguf`` files are told apart by ``general.architecture``:
``clip`` is the ``mmproj``) or a language-model file plus its ``mmproj`` file. ``GGUFCheckpoint``
then gives:

* ``config()``: the official config.json fields, rebuilt from the metadata (LLM sizes from the
  ``{arch}.*`` keys, vision sizes and the release from ``clip.*``), or the config.json that our
  own export stored verbatim (``minicpmv.config_json``);
* ``write_side_files(dir)``: ``tokenizer.json`` rebuilt with the ``tokenizers`` library from
  ``tokenizer.ggml.*`` (byte-level BPE: tokens, merges, token types; the split regex named by
  ``tokenizer.ggml.pre``), ``tokenizer_config.json`` (special tokens, chat template) and
  ``preprocessor_config.json`` (normalisation from ``clip.vision.image_mean/std``);
* ``tensors()``: every official key with a ``GGUFTensor`` that dequantizes (``gguf`` package) or,
  for Q4_0 / Q4_K language-model linears, gives int4 storage (``gguf_quants.int4_storage``).

Files are memory-mapped by ``gguf.GGUFReader``; nothing here builds a model (``load.py`` does).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

from ..errors import CheckpointError, TokenizerError
from . import gguf_names as names
from .gguf_names import INT4_GROUP
from .gguf_quants import INT4_EXACT, INT8_EXACT, dequantize, int4_storage, int8_storage

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER = 1, 3, 4
# float types read as stored: torch dtype and the numpy view of the file's bytes
_AS_STORED = {T.F32: (torch.float32, np.float32), T.F16: (torch.float16, np.float16),
              T.BF16: (torch.bfloat16, np.int16)}
# tokenizer.ggml.pre -> (split regex, NFC normalizer, clean_up_tokenization_spaces)
_PRE = {
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+", True, False),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+", False, True),
}
_CONFIG_VERSION = {"2.5": "2.5", "2.6": 2.6, "o2.6": 2.6, "4.0": 4.0, "4.5": 4.5}
_DEFAULT_MAX_SLICES = 9


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _reader(path: Path) -> GGUFReader:
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e} (truncated or not a GGUF file?)") from e


def _field(r: GGUFReader, key: str, default: Any = None) -> Any:
    f = r.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(x: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(f"{float(x):.7g}")


def _arch(r: GGUFReader) -> str:
    return str(_field(r, "general.architecture", ""))


@dataclass(frozen=True)
class GGUFPair:
    """The two files of a release, with the readers ``find_pair`` opened to tell them apart:
    parsing a file's metadata (the tokenizer's arrays) takes seconds, so it is done once."""

    model: Path
    mmproj: Path
    opened: dict[Path, GGUFReader] = field(default_factory=dict, compare=False, repr=False)

    def reader(self, path: Path) -> GGUFReader:
        """``path``'s reader: the one already opened, else a new one."""
        return self.opened[path] if path in self.opened else _reader(path)


def find_pair(path: Path, mmproj: Path | None = None) -> GGUFPair:
    """The language-model and mmproj files of a GGUF release (a directory, or a file + ``mmproj``)."""
    opened: dict[Path, GGUFReader] = {}

    def arch(p: Path) -> str:
        if p not in opened:
            opened[p] = _reader(p)
        return _arch(opened[p])

    def pair(model: Path, proj: Path) -> GGUFPair:
        return GGUFPair(model, proj, {p: opened[p] for p in (model, proj) if p in opened})

    if path.is_dir():
        files = sorted(p for p in path.glob("*.gguf") if is_gguf(p))
        clip = [p for p in files if arch(p) == "clip"]
        llm = [p for p in files if p not in clip]
        if len(llm) != 1 or (mmproj is None and len(clip) != 1):
            raise CheckpointError(
                f"{path} should hold one language-model GGUF and one mmproj GGUF, found "
                f"{[p.name for p in llm]} and mmproj {[p.name for p in clip]}; pass --model FILE --mmproj FILE"
            )
        return pair(llm[0], mmproj or clip[0])
    if mmproj is None:
        raise CheckpointError(
            f"{path} is a GGUF language model; MiniCPM-V also needs its vision part: pass the mmproj file "
            "(--mmproj / mmproj=), or a directory holding both"
        )
    for p in (path, mmproj):
        if not is_gguf(p):
            raise CheckpointError(f"{p} is not a GGUF file (no GGUF magic)")
    if arch(mmproj) != "clip":
        raise CheckpointError(f"{mmproj} is not an mmproj file (general.architecture is not 'clip')")
    if arch(path) == "clip":
        raise CheckpointError(f"{path} is an mmproj file; pass the language-model GGUF as the model")
    return pair(path, mmproj)


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file in the official key's layout (``rows``: a row gather that undoes
    llama's rotary permutation)."""

    data: np.ndarray
    qtype: T
    shape: tuple[int, ...]
    rows: np.ndarray | None = None

    def to_float(self) -> torch.Tensor:
        """The tensor as float32 (``as_stored`` widened: exact)."""
        return self.as_stored().float()

    def as_stored(self) -> torch.Tensor:
        """F32, F16 and BF16 tensors in their own type, copied off the map without a conversion
        (decoding a BF16 file through float32 was ~50x slower and doubled the memory at its peak);
        quantized types dequantized to float32 (the ``gguf`` package's reference). Casting either
        to the model's dtype rounds alike: widening to float32 is exact."""
        stored = _AS_STORED.get(self.qtype)
        if stored is None:  # the decoded array is this call's own: gathered, not copied again
            return self._gathered(torch.from_numpy(dequantize(self.data, self.qtype).reshape(self.shape)))
        dtype, view = stored
        t = copied_off_map(np.asarray(self.data).view(view).reshape(self.shape), self.rows)
        return t.view(dtype) if dtype is torch.bfloat16 else t

    def _gathered(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` with its rows gathered where llama's rotary permutation is undone."""
        return t if self.rows is None else t[torch.from_numpy(self.rows)]

    def int4(self) -> dict[str, torch.Tensor] | None:
        """int4 group-32 storage for Q4_0 / Q4_K matrices, else None."""
        if not self.int4_exact:
            return None
        st = int4_storage(self.data, self.qtype, self.shape)  # type: ignore[arg-type]
        return {k: self._gathered(v) for k, v in st.items()}

    @property
    def int4_exact(self) -> bool:
        """Whether ``int4()`` holds this tensor (Q4_0 / Q4_K matrices), without decoding it."""
        return self.qtype in INT4_EXACT and len(self.shape) == 2 and self.shape[1] % INT4_GROUP == 0

    def kept_quantized(self, keep_int8: bool) -> Callable[[], dict[str, torch.Tensor]] | None:
        """The storage maker a linear layer keeps this tensor in (``int4``, or ``int8`` for Q8_0 /
        Q6_K when ``keep_int8``), or None: dequantize it. Decides without decoding."""
        if self.int4_exact:
            return self.int4  # type: ignore[return-value]
        return self.int8 if keep_int8 and self.int8_exact else None

    @property
    def int8_exact(self) -> bool:
        """Whether ``int8()`` keeps this tensor quantized (Q8_0 / Q6_K matrices), without decoding it."""
        multiple = INT8_EXACT.get(self.qtype)
        return multiple is not None and len(self.shape) == 2 and self.shape[1] % multiple == 0

    def int8(self) -> dict[str, torch.Tensor]:
        """Q8_0: grouped int8 storage (``qweight`` int8, ``scales`` per 32); Q6_K: its blocks as
        stored (``qweight`` uint8 [N, K/256*210], read by the native Q6_K kernel)."""
        if self.qtype == T.Q6_K:
            raw = np.asarray(self.data, dtype=np.uint8).reshape(self.shape[0], -1)  # [N, K/256*210]
            return {"qweight": copied_off_map(raw, self.rows)}
        st = int8_storage(self.data, self.qtype, self.shape)  # type: ignore[arg-type]
        return {k: self._gathered(v) for k, v in st.items()}


def copied_off_map(x: np.ndarray, rows: np.ndarray | None = None) -> torch.Tensor:
    """A tensor copy of ``x`` (a view of a file's read-only map; ``rows``: only those rows, in
    that order), made by torch's copy (both threads: 1.3-1.4 GB/s from a 4 GB BF16 file in the
    page cache on a 2-core host, against 0.7-0.8 for numpy's copy; ``bench/bench_gguf_read.py``).
    The tensor that aliases the map is only read, then dropped: nothing writes to the file, and
    the result does not depend on the file once this returns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        view = torch.from_numpy(np.ascontiguousarray(x))  # aliases the map: read once, below
    return view.clone() if rows is None else view[torch.from_numpy(rows)]


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF stores ne (fastest first)


class GGUFCheckpoint:
    """A language-model GGUF and its mmproj, read as an official MiniCPM-V checkpoint."""

    def __init__(self, pair: GGUFPair) -> None:
        self.pair = pair
        self.llm, self.proj = pair.reader(pair.model), pair.reader(pair.mmproj)
        self.arch = _arch(self.llm)
        if self.arch not in names.FAMILY_OF_ARCH:
            raise CheckpointError(
                f"{pair.model}: language-model architecture {self.arch!r} is not a MiniCPM-V backbone "
                f"(expected one of {sorted(names.FAMILY_OF_ARCH)})"
            )
        if not _field(self.proj, "clip.has_minicpmv_projector", False):
            raise CheckpointError(f"{pair.mmproj} is not a MiniCPM-V mmproj (no clip.has_minicpmv_projector)")
        number = int(_field(self.proj, "clip.minicpmv_version", 2))
        if number not in names.VERSION_OF_MMPROJ:
            raise CheckpointError(f"{pair.mmproj}: clip.minicpmv_version {number} is not a release minicpmv "
                                  f"loads ({sorted(names.VERSION_OF_MMPROJ)})")
        self.version = names.VERSION_OF_MMPROJ[number]
        self._llm_tensors = {t.name: t for t in self.llm.tensors}
        self._proj_tensors = {t.name: t for t in self.proj.tensors}

    # ------------------------------------------------------------------ config
    def _a(self, key: str, default: Any = None) -> Any:
        return _field(self.llm, f"{self.arch}.{key}", default)

    def config(self) -> dict[str, Any]:
        """The official config.json content (stored by our export, else rebuilt from metadata)."""
        stored = _field(self.llm, names.OUR_CONFIG_KEY)
        if stored:
            return json.loads(stored)
        hidden, heads = int(self._a("embedding_length")), int(self._a("attention.head_count"))
        out: dict[str, Any] = {
            "version": _CONFIG_VERSION[self.version],
            "model_type": "minicpmo" if self.version == "o2.6" else "minicpmv",
            "hidden_size": hidden,
            "intermediate_size": int(self._a("feed_forward_length")),
            "num_hidden_layers": int(self._a("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._a("attention.head_count_kv", heads)),
            "rms_norm_eps": _f32(self._a("attention.layer_norm_rms_epsilon")),
            "rope_theta": _f32(self._a("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._a("context_length")),
            "vocab_size": int(self._llm_tensors["token_embd.weight"].shape[1]),
            "tie_word_embeddings": "output.weight" not in self._llm_tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._llm_tensors,
            "head_dim": int(self._a("attention.key_length", hidden // heads)),
            "torch_dtype": "bfloat16",
            "drop_vision_last_layer": False,
            "batch_vision_input": True,
            "query_num": self.query_num(),
            "use_image_id": True,  # the official configs' value (2.5: the default; its scheme has no ids)
            "slice_mode": True,
            "slice_config": {"max_slice_nums": _DEFAULT_MAX_SLICES, "patch_size": self._patch(),
                             "scale_resolution": int(_field(self.proj, "clip.vision.image_size", 448))},
            "vision_config": self._vision_config(),
        }
        if self.version == "o2.6":
            out.update(init_audio=False, init_tts=False)
        return out

    def _patch(self) -> int:
        return int(_field(self.proj, "clip.vision.patch_size", 14))

    def query_num(self) -> int:
        n = int(_field(self.proj, "clip.minicpmv_query_num", 0))
        return n or (96 if self.version == "2.5" else 64)  # llama.cpp's fallbacks

    def _vision_config(self) -> dict[str, Any]:
        pos = self._proj_tensors["v.position_embd.weight"]
        side = int(round(float(np.sqrt(int(pos.shape[1])))))
        return {
            "hidden_size": int(_field(self.proj, "clip.vision.embedding_length")),
            "intermediate_size": int(_field(self.proj, "clip.vision.feed_forward_length")),
            "num_attention_heads": int(_field(self.proj, "clip.vision.attention.head_count")),
            "num_hidden_layers": int(_field(self.proj, "clip.vision.block_count")),
            "patch_size": self._patch(),
            "image_size": side * self._patch(),
            "model_type": "idefics2" if self.version == "2.5" else "siglip",
        }

    # ------------------------------------------------------------------ side files
    def write_side_files(self, folder: Path) -> None:
        """tokenizer.json, tokenizer_config.json and preprocessor_config.json into ``folder``."""
        stored = _field(self.proj, names.OUR_PREPROCESSOR_KEY)
        pre = json.loads(stored) if stored else self._preprocessor()
        (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        backend, tcfg = self._tokenizer()
        backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))

    def _preprocessor(self) -> dict[str, Any]:
        out = {"max_slice_nums": _DEFAULT_MAX_SLICES, "patch_size": self._patch(),
               "scale_resolution": int(_field(self.proj, "clip.vision.image_size", 448)),
               "image_feature_size": self.query_num(), "slice_mode": True,
               "norm_mean": [float(v) for v in _field(self.proj, "clip.vision.image_mean", [0.5] * 3)],
               "norm_std": [float(v) for v in _field(self.proj, "clip.vision.image_std", [0.5] * 3)],
               "use_image_id": True}
        return out

    def _tokenizer(self) -> tuple[Any, dict[str, Any]]:
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer

        model = _field(self.llm, "tokenizer.ggml.model")
        pre = str(_field(self.llm, "tokenizer.ggml.pre", "default"))
        if model != "gpt2" or pre not in _PRE:
            raise TokenizerError(
                f"{self.pair.model}: tokenizer {model!r} with pre-tokenizer {pre!r} cannot be rebuilt; minicpmv "
                f"rebuilds byte-level BPE tokenizers with pre-tokenizer {sorted(_PRE)}"
            )
        tokens = list(_field(self.llm, "tokenizer.ggml.tokens"))
        types = [int(t) for t in _field(self.llm, "tokenizer.ggml.token_type")]
        merges = [tuple(m.split(" ", 1)) for m in _field(self.llm, "tokenizer.ggml.merges", [])]
        regex, nfc, clean_up = _PRE[pre]
        backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        if nfc:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        added = [AddedToken(tokens[i], special=types[i] == _TOKEN_CONTROL, normalized=False)
                 for i in range(len(tokens)) if types[i] in (_TOKEN_CONTROL, _TOKEN_USER)]
        backend.add_special_tokens([t for t in added if t.special])
        backend.add_tokens([t for t in added if not t.special])
        special = {name: self._token(tokens, f"tokenizer.ggml.{key}_token_id")
                   for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                                     ("unk_token", "unknown"))}
        if _field(self.llm, "tokenizer.ggml.add_bos_token", False) and special["bos_token"]:
            bos = special["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokens.index(bos))])
        tcfg = {**special, "add_bos_token": False, "clean_up_tokenization_spaces": clean_up,
                "chat_template": _field(self.llm, "tokenizer.chat_template")}
        return backend, tcfg

    def _token(self, tokens: list[str], key: str) -> str | None:
        i = _field(self.llm, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    # ------------------------------------------------------------------ tensors
    def tensors(self, cfg_heads: tuple[int, int]) -> dict[str, GGUFTensor]:
        """Every official key -> its tensor (``cfg_heads``: attention and KV heads, for llama's rows)."""
        out = {names.gguf_to_llm(name): self._entry(t) for name, t in self._llm_tensors.items()}
        if self.arch == "llama":
            for key, entry in out.items():
                if key.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                    heads = cfg_heads[0] if "q_proj" in key else cfg_heads[1]
                    idx = np.arange(entry.shape[0])
                    entry.rows = names.unpermute_rotary(idx, heads)  # our row r = the file's row rows[r]
        vision, resampler = {}, {}
        for name, t in self._proj_tensors.items():
            entry = self._entry(t)
            if name.startswith("resampler."):
                resampler[name] = entry.to_float().numpy()
            else:
                vision[names.gguf_to_vision(name)] = entry
        out.update(vision)
        for key, arr in names.resampler_from_gguf(resampler).items():
            out[key] = GGUFTensor(arr, T.F32, arr.shape)
        return out

    @staticmethod
    def _entry(t: Any) -> GGUFTensor:
        return GGUFTensor(np.asarray(t.data), T(int(t.tensor_type)), _shape(t))
