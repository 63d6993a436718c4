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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, MiniCPMVError

log = logging.getLogger(__name__)


def read_json_object(
    path: Path, *, error: type[MiniCPMVError] = ConfigError, what: str = ""
) -> dict[str, Any] | None:
    """The JSON object stored at ``path``; None if there is no such file.

    Unreadable files, invalid JSON and non-object documents raise ``error`` naming the file
    (``what`` prefixes the path in the message, e.g. "tokenizer file ").
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what}{path} cannot be read as JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{what}{path} must hold a JSON object")
    return data


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
    # MiniCPM (2.0) µP scalars; None where the config has none (read by modeling/llm/<family>.py)
    scale_emb: float | None = None
    scale_depth: float | None = None
    dim_model_base: int | None = None


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
    query_pos_embed: bool = False  # 2.0: a stored [Q, D] position table added to the queries
    max_size: tuple[int, int] = (70, 70)
    max_temporal_size: int = 72000


@dataclass(frozen=True)
class AudioConfig:
    """MiniCPM-o audio input: Whisper-style encoder (``audio_config``) + projector + pooling."""

    d_model: int = 1024
    encoder_layers: int = 24
    encoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    layer_norm_eps: float = 1e-5  # torch LayerNorm default, as WhisperEncoder
    pool_step: int = 2  # audio_pool_step: AvgPool1d kernel and stride
    chunk_length: float = 1.0  # audio_chunk_length in seconds: encoder block mask and placeholders
    chunk_input: bool = True  # config "chunk_input": the encoder uses the chunk block mask

    @property
    def projector_in_dim(self) -> int:
        """Input width of ``audio_projection_layer`` (the reference uses encoder_ffn_dim // 4)."""
        return self.encoder_ffn_dim // 4


@dataclass(frozen=True)
class TTSConfig:
    """MiniCPM-o speech output (``tts_config``, ConditionalChatTTS; spec o2.6 §4.8).

    Defaults are those of the official ``ConditionalChatTTSConfig``; the released checkpoint sets
    ``llm_dim`` 3584. The Llama decoder over audio codes takes the LlamaConfig defaults for what
    the official code does not pass (RMSNorm eps 1e-6, RoPE theta 10000, MHA, vocab 32000).
    """

    llm_dim: int = 2560
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 20
    max_position_embeddings: int = 4096
    num_audio_tokens: int = 626  # 625 codes + the end-of-speech id 625
    num_text_tokens: int = 21178
    num_mel_bins: int = 100
    num_vq: int = 4
    spk_emb_token_id: int = 21143
    num_spk_embs: int = 1
    audio_bos_token_id: int = 21132
    text_eos_token_id: int = 21133
    streaming_text_chunk_size: int = 10
    streaming_text_reserved_len: int = 300
    streaming_audio_chunk_size: int = 50
    use_mlp: bool = True
    top_p: float | None = 0.7
    top_k: int | None = 20
    repetition_penalty: float = 1.0
    decoder_vocab_size: int = 32000  # LlamaConfig default: ``model.embed_tokens`` (stored, never read)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def condition_length(self) -> int:
        """[Stts] + speaker slots + reserved text + [Ptts]: 303 with the official values."""
        return 1 + self.num_spk_embs + self.streaming_text_reserved_len + 1

    @property
    def eos_code(self) -> int:
        return self.num_audio_tokens - 1


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
    vision_tower: str = "navit"  # "navit" | "idefics2" | "timm_siglip" (from the version table)
    audio: AudioConfig | None = None  # MiniCPM-o: audio encoder present (init_audio)
    tts: TTSConfig | None = None  # MiniCPM-o: speech output head present (init_tts + tts_config)
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
    def from_file(cls, path: str | Path, *, family: str, temporal: bool, **options: Any) -> ModelConfig:
        d = read_json_object(Path(path))
        if d is None:
            raise ConfigError(f"no config.json at {path}")
        return cls.from_hf_dict(d, family=family, temporal=temporal, **options)

    @classmethod
    def from_hf_dict(
        cls, d: dict[str, Any], *, family: str, temporal: bool, vision_tower: str = "navit",
        resampler_query_pos: bool = False,
    ) -> ModelConfig:
        """Parse an official config.json. The keyword arguments come from the version table
        (``VersionSpec.config_kwargs()``): backbone family, resampler and vision-tower variant."""
        text = _text_config(d, family)
        if vision_tower not in _VISION_READERS:
            raise ConfigError(f"unknown vision tower {vision_tower!r}; known: {', '.join(_VISION_READERS)}")
        vision = _VISION_READERS[vision_tower](d)
        query_num = int(d.get("query_num", 64))
        # 2.0 keeps the slicing fields at the top level instead of in slice_config
        sd = dict(d.get("slice_config") or {k: d[k] for k in ("max_slice_nums", "scale_resolution") if k in d})
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
            query_pos_embed=resampler_query_pos,
        )
        if d.get("init_vision") is False:
            raise ConfigError("config.json: init_vision=false (no vision tower) is not supported")
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
            vision_tower=vision_tower,
            audio=_audio_config(d),
            tts=_tts_config(d),
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
    "scale_emb", "scale_depth", "dim_model_base", "vision_encoder", "tiny_vision_overrides",
    "max_slice_nums", "scale_resolution", "audio_config", "audio_pool_step", "audio_chunk_length",
    "init_audio", "init_vision", "init_tts", "tts_config", "chunk_input",
}


@dataclass(frozen=True)
class _FamilyTraits:
    """What an LLM family implies when config.json does not say: q/k/v bias default, q/k norm."""

    attention_bias: bool = False
    qk_norm: bool = False


_FAMILIES = {
    "qwen2": _FamilyTraits(attention_bias=True),
    "qwen3": _FamilyTraits(qk_norm=True),
    "llama": _FamilyTraits(),
    "minicpm": _FamilyTraits(),
}


def _text_config(d: dict[str, Any], family: str) -> TextConfig:
    where = "config.json"
    if family not in _FAMILIES:
        raise ConfigError(f"unknown LLM family {family!r}; known: {', '.join(_FAMILIES)}")
    traits = _FAMILIES[family]
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
        attention_bias=bool(d.get("attention_bias", traits.attention_bias)),
        scale_emb=_opt_float(d, "scale_emb"),
        scale_depth=_opt_float(d, "scale_depth"),
        dim_model_base=None if d.get("dim_model_base") is None else int(d["dim_model_base"]),
        qk_norm=traits.qk_norm,
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


def _opt_float(d: dict[str, Any], key: str) -> float | None:
    return None if d.get(key) is None else float(d[key])


# timm model names used by MiniCPM-V 2.0 -> (embed_dim, depth, num_heads, mlp_ratio, patch, img_size)
_TIMM_TOWERS: dict[str, tuple[int, int, int, float, int, int]] = {
    "vit_so400m_patch14_siglip_384": (1152, 27, 16, 3.7362, 14, 384),
}


def _timm_vision_config(d: dict[str, Any]) -> VisionConfig:
    """2.0: the tower is named by a timm model (``vision_encoder``); its shape is fixed by the name.

    ``tiny_vision_overrides`` ({embed_dim, depth, num_heads}, not an official field) shrinks it for
    test checkpoints the way timm keyword overrides do (the MLP ratio stays the registry's).
    """
    name = str(_req(d, "vision_encoder", "config.json")).split(".")[0]
    if name not in _TIMM_TOWERS:
        raise ConfigError(
            f"config.json: vision_encoder {d['vision_encoder']!r} is not supported; known: {sorted(_TIMM_TOWERS)}"
        )
    dim, depth, heads, mlp_ratio, patch, img = _TIMM_TOWERS[name]
    over = dict(d.get("tiny_vision_overrides") or {})
    unknown = sorted(set(over) - {"embed_dim", "depth", "num_heads"})
    if unknown:
        raise ConfigError(f"config.json: tiny_vision_overrides has unsupported keys {unknown}")
    dim = int(over.get("embed_dim", dim))
    return VisionConfig(
        hidden_size=dim,
        intermediate_size=int(dim * mlp_ratio),
        num_hidden_layers=int(over.get("depth", depth)),
        num_attention_heads=int(over.get("num_heads", heads)),
        patch_size=patch,
        image_size=img,
        layer_norm_eps=1e-6,
        hidden_act="gelu",  # timm's default: exact (erf) GELU
    )


# how each vision tower's settings are read (``VersionSpec.vision_tower`` names one)
_VISION_READERS = {"navit": _vision_config, "idefics2": _vision_config, "timm_siglip": _timm_vision_config}


def _audio_config(d: dict[str, Any]) -> AudioConfig | None:
    """MiniCPM-o: the Whisper encoder settings, or None without ``audio_config`` / init_audio=false."""
    ad = d.get("audio_config")
    if ad is None or not d.get("init_audio", True):
        return None
    if not isinstance(ad, dict):
        raise ConfigError("config.json: audio_config must be an object")
    act = ad.get("activation_function", "gelu")
    if act != "gelu":
        raise ConfigError(f"config.json: audio_config.activation_function={act!r} is not supported (only gelu)")
    return AudioConfig(
        d_model=int(ad.get("d_model", 1024)),
        encoder_layers=int(ad.get("encoder_layers", 24)),
        encoder_attention_heads=int(ad.get("encoder_attention_heads", 16)),
        encoder_ffn_dim=int(ad.get("encoder_ffn_dim", 4096)),
        num_mel_bins=int(ad.get("num_mel_bins", 80)),
        max_source_positions=int(ad.get("max_source_positions", 1500)),
        pool_step=int(d.get("audio_pool_step", 2)),
        chunk_length=float(d.get("audio_chunk_length", 1.0)),
        chunk_input=bool(d.get("chunk_input", True)),
    )


_TTS_KEYS = {f.name for f in fields(TTSConfig)} - {"decoder_vocab_size", "rms_norm_eps", "rope_theta"}
# tts_config keys that only matter for training or name the module; anything else unknown is refused
_TTS_IGNORED = {"model_type", "attn_implementation", "aug_loss_weight", "do_sample", "use_text", "streaming",
                "_name_or_path", "architectures", "transformers_version", "torch_dtype"}


def _tts_config(d: dict[str, Any]) -> TTSConfig | None:
    """MiniCPM-o: the speech head settings, or None without ``tts_config`` / init_tts=false
    (the MiniCPM-o config class defaults ``init_tts`` to true)."""
    td = d.get("tts_config")
    if td is None or not d.get("init_tts", True):
        return None
    if not isinstance(td, dict):
        raise ConfigError("config.json: tts_config must be an object")
    where = "config.json: tts_config"
    if td.get("use_speaker_embedding", True) is not True or td.get("use_llm_hidden_state", False):
        raise ConfigError(f"{where}: only use_speaker_embedding=true, use_llm_hidden_state=false exist "
                          "in the official code (it raises NotImplementedError otherwise)")
    unknown = sorted(set(td) - _TTS_KEYS - _TTS_IGNORED - {"use_speaker_embedding", "use_llm_hidden_state"})
    if unknown:
        raise ConfigError(f"{where}: unsupported keys {unknown}")
    kw: dict[str, Any] = {}
    for f in fields(TTSConfig):
        if f.name in td and f.name in _TTS_KEYS:
            v = td[f.name]
            kw[f.name] = None if v is None and f.name in ("top_p", "top_k") else type(f.default)(v)
    cfg = TTSConfig(**kw)
    if cfg.num_spk_embs != 1 or cfg.num_vq < 1 or cfg.streaming_text_chunk_size < 1:
        raise ConfigError(f"{where}: num_spk_embs must be 1 and chunk sizes positive, got {td!r:.200}")
    return cfg
