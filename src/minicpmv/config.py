"""Frozen configuration dataclasses for every model component, read from Hugging Face files.

``ModelConfig.from_hf_dict`` turns an official ``config.json`` into typed, validated pieces
(text backbone, vision tower, resampler, slicing) and ``ProcessorConfig.from_hf_dict`` does the
same for ``preprocessor_config.json``. Keys that change behaviour we do not implement (rope
scaling, sliding-window attention, ...) are rejected with a ConfigError instead of being
ignored. This module knows nothing about versions beyond storing the ``version`` field; the
per-release behaviour lives in ``versions.py``. No torch import here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)


def _req(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    return d[key]


@dataclass(frozen=True)
class TextConfig:
    """Decoder-only LLM backbone (Qwen2, Qwen3, Llama, MiniCPM)."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (NaViT variant with the fixed 70x70 position table)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    num_channels: int = 3

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ResamplerConfig:
    """Perceiver-style resampler: ``query_num`` learned queries cross-attending to vision rows."""

    query_num: int
    embed_dim: int  # = LLM hidden size
    kv_dim: int  # = vision hidden size
    num_heads: int  # = embed_dim // 128 in every official release
    temporal: bool = False  # 4.5: 3D resampler with temporal position embedding + frame groups
    max_size: tuple[int, int] = (70, 70)
    max_temporal_size: int = 72000


@dataclass(frozen=True)
class SliceConfig:
    """LLaVA-UHD slicing parameters."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    slice_mode: bool = True


@dataclass(frozen=True)
class ProcessorConfig:
    """``preprocessor_config.json``: placeholder markers, normalisation, slicing defaults."""

    image_feature_size: int = 64
    use_image_id: bool = True
    slice: SliceConfig = field(default_factory=SliceConfig)
    im_start: str = "<image>"
    im_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    unk: str = "<unk>"
    im_id_start: str = "<image_id>"
    im_id_end: str = "</image_id>"
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ProcessorConfig:
        slice_cfg = SliceConfig(
            max_slice_nums=int(d.get("max_slice_nums", 9)),
            scale_resolution=int(d.get("scale_resolution", 448)),
            patch_size=int(d.get("patch_size", 14)),
            slice_mode=bool(d.get("slice_mode", True)),
        )
        kw: dict[str, Any] = {"slice": slice_cfg}
        for key in ("im_start", "im_end", "slice_start", "slice_end", "unk", "im_id_start", "im_id_end"):
            if key in d:
                kw[key] = str(d[key])
        if "image_feature_size" in d:
            kw["image_feature_size"] = int(d["image_feature_size"])
        if "use_image_id" in d:
            kw["use_image_id"] = bool(d["use_image_id"])
        for key in ("norm_mean", "norm_std"):
            if key in d:
                vals = tuple(float(v) for v in d[key])
                if len(vals) != 3:
                    raise ConfigError(f"preprocessor_config.json: '{key}' must have 3 values, got {vals}")
                kw[key] = vals
        return cls(**kw)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> ProcessorConfig:
        """Defaults consistent with a model config, for checkpoints without a preprocessor file."""
        return cls(
            image_feature_size=cfg.query_num, use_image_id=cfg.use_image_id, slice=cfg.slice
        )


# Keys of config.json that are known and deliberately not used at inference.
_IGNORED_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version",
        "torch_dtype", "dtype", "initializer_range", "use_cache", "attention_dropout",
        "max_window_layers", "batch_vision_input", "image_size", "sliding_window",
        "pad_token_id", "use_sliding_window", "rope_scaling", "tie_word_embeddings",
        "hidden_act", "bos_token_id", "eos_token_id", "quantization_config",
    }
)


@dataclass(frozen=True)
class ModelConfig:
    """The whole MiniCPM-V model: version, backbone, vision tower, resampler and slicing."""

    version: str
    text: TextConfig
    vision: VisionConfig
    resampler: ResamplerConfig
    slice: SliceConfig
    query_num: int = 64
    use_image_id: bool = True
    vision_batch_size: int = 16
    drop_vision_last_layer: bool = False
    batch_3d_resampler: bool = True
    torch_dtype: str = "bfloat16"
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def vision_layers_used(self) -> int:
        n = self.vision.num_hidden_layers
        return n - 1 if self.drop_vision_last_layer else n

    def with_text_layers(self, n: int) -> ModelConfig:
        """A copy with ``n`` LLM layers (benchmarks build real-width, shallow models)."""
        return replace(self, text=replace(self.text, num_hidden_layers=n))

    @classmethod
    def from_file(cls, path: str | Path, *, family: str, temporal: bool) -> ModelConfig:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"no config.json at {p}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d, family=family, temporal=temporal)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, family: str, temporal: bool) -> ModelConfig:
        """Parse an official config.json. ``family``/``temporal`` come from the version table."""
        text = _text_config(d, family)
        vision = _vision_config(d)
        query_num = int(d.get("query_num", 64))
        sd = dict(d.get("slice_config") or {})
        # The official config class copies vision_config.patch_size over the top-level value.
        slice_cfg = SliceConfig(
            max_slice_nums=int(sd.get("max_slice_nums", 1)),
            scale_resolution=int(sd.get("scale_resolution", 448)),
            patch_size=vision.patch_size,
            slice_mode=True,
        )
        resampler = ResamplerConfig(
            query_num=query_num,
            embed_dim=text.hidden_size,
            kv_dim=vision.hidden_size,
            num_heads=max(text.hidden_size // 128, 1),
            temporal=temporal,
        )
        unknown = sorted(set(d) - _KNOWN_KEYS)
        if unknown:
            log.debug("config.json keys not used by minicpmv: %s", unknown)
        return cls(
            version=str(d.get("version")),
            text=text,
            vision=vision,
            resampler=resampler,
            slice=slice_cfg,
            query_num=query_num,
            use_image_id=bool(d.get("use_image_id", True)),
            vision_batch_size=int(d.get("vision_batch_size", 16)),
            # The official config class defaults this to True when the key is absent.
            drop_vision_last_layer=bool(d.get("drop_vision_last_layer", True)),
            batch_3d_resampler=bool(d.get("batch_3d_resampler", True)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            quantization=d.get("quantization_config"),
            raw=d,
        )


_KNOWN_KEYS = _IGNORED_KEYS | {
    "version", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "num_hidden_layers", "vocab_size", "rms_norm_eps", "rope_theta",
    "max_position_embeddings", "attention_bias", "vision_config", "query_num",
    "slice_config", "slice_mode", "use_image_id", "vision_batch_size",
    "drop_vision_last_layer", "batch_3d_resampler", "patch_size",
}


def _text_config(d: dict[str, Any], family: str) -> TextConfig:
    where = "config.json"
    if d.get("rope_scaling") not in (None, {}):
        raise ConfigError(f"{where}: rope_scaling={d['rope_scaling']!r} is not supported")
    if d.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={d['hidden_act']!r} is not supported (only silu)")
    hidden = int(_req(d, "hidden_size", where))
    heads = int(_req(d, "num_attention_heads", where))
    return TextConfig(
        family=family,
        hidden_size=hidden,
        intermediate_size=int(_req(d, "intermediate_size", where)),
        num_hidden_layers=int(_req(d, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        vocab_size=int(_req(d, "vocab_size", where)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        attention_bias=bool(d.get("attention_bias", family == "qwen2")),
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
    )


def _vision_config(d: dict[str, Any]) -> VisionConfig:
    vd = dict(d.get("vision_config") or {})
    vision = VisionConfig(
        hidden_size=int(vd.get("hidden_size", 1152)),
        intermediate_size=int(vd.get("intermediate_size", 4304)),
        num_hidden_layers=int(vd.get("num_hidden_layers", 27)),
        num_attention_heads=int(vd.get("num_attention_heads", 16)),
        patch_size=int(vd.get("patch_size", 14)),
        image_size=int(vd.get("image_size", 980)),
        layer_norm_eps=float(vd.get("layer_norm_eps", 1e-6)),
        hidden_act=str(vd.get("hidden_act", "gelu_pytorch_tanh")),
        num_channels=int(vd.get("num_channels", 3)),
    )
    if vision.hidden_act != "gelu_pytorch_tanh":
        raise ConfigError(f"config.json: vision hidden_act={vision.hidden_act!r} is not supported")
    return vision
