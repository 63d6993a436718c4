"""MiniCPM decoder-only LLM (MiniCPM-V 2.0 backbone, MiniCPM-2.4B; spec 2.0 §2.2).

A Llama-shaped decoder (pre-RMSNorm, RoPE, SwiGLU, no biases, MHA) with three µP scalars from
config.json, all applied here and nowhere else:

* token embeddings are multiplied by ``scale_emb`` — for prompt text and for generated tokens
  alike (image features merged into the prompt by the VLM stay unscaled);
* every sub-layer output is multiplied by ``scale_depth / sqrt(num_hidden_layers)`` before its
  residual add;
* the final hidden state is divided by ``hidden_size / dim_model_base`` before ``lm_head``.

Parameter names equal the checkpoint's ``llm.*`` keys without the prefix.
"""

from __future__ import annotations

import math

import torch

from ...config import TextConfig
from ...errors import ConfigError
from .decoder import DecoderForCausalLM, DecoderLayer


def _required(cfg: TextConfig) -> tuple[float, float, int]:
    missing = [k for k in ("scale_emb", "scale_depth", "dim_model_base") if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"config.json: the MiniCPM backbone needs {', '.join(missing)}")
    return float(cfg.scale_emb), float(cfg.scale_depth), int(cfg.dim_model_base)  # type: ignore[arg-type]


class MiniCPMDecoderLayer(DecoderLayer):
    """``x += attn(norm(x)) * s; x += mlp(norm(x)) * s`` with s = scale_depth / sqrt(layers)."""

    def __init__(self, cfg: TextConfig, layer_idx: int, *, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__(cfg, layer_idx, qkv_bias=qkv_bias, qk_norm=qk_norm)
        _, scale_depth, _ = _required(cfg)
        self.residual_scale = scale_depth / math.sqrt(cfg.num_hidden_layers)


class MiniCPMForCausalLM(DecoderForCausalLM):
    """MiniCPM-2.4B: scaled embeddings, scaled residual branches, scaled logits."""

    def __init__(self, cfg: TextConfig) -> None:
        scale_emb, _, dim_model_base = _required(cfg)
        super().__init__(cfg, qkv_bias=cfg.attention_bias, qk_norm=False, layer_cls=MiniCPMDecoderLayer)
        self.scale_emb = scale_emb
        self.logit_divisor = cfg.hidden_size / dim_model_base

    def embed_input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return super().embed_input_ids(ids) * self.scale_emb  # [..., H]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden / self.logit_divisor).float()  # [..., V]
