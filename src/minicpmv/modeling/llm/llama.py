"""Llama decoder-only LLM (MiniCPM-Llama3-V 2.5 and MiniCPM-V 4.0 backbones).

Llama 3 is the shared pre-norm decoder of ``qwen2.py`` without q/k/v biases (``attention_bias``
false in the official configs), with its own RoPE base and RMSNorm epsilon from config.json.
MiniCPM-V 4.0 (spec 2.6/4.5 §14, unverified) multiplies the *prompt* embeddings by
``scale_emb`` when its config carries one — the wrapper does it before merging image features,
while tokens generated later are embedded by the plain Llama model, unscaled. Parameter names
equal the checkpoint's ``llm.*`` keys without the prefix.
"""

from __future__ import annotations

import torch

from ...config import TextConfig
from .decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama: no q/k/v bias unless ``attention_bias``; no q/k norm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__(cfg, qkv_bias=cfg.attention_bias, qk_norm=False)

    def embed_prompt_ids(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.embed_input_ids(ids)  # [..., H]
        scale = self.config.scale_emb
        return emb if scale is None else emb * scale
