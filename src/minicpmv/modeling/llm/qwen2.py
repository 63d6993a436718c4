"""Qwen2 decoder-only LLM (MiniCPM-V 2.6 and MiniCPM-o 2.6 backbone).

The shared decoder of ``decoder.py`` with q/k/v biases (``attention_bias``) and no q/k norm.
Parameter names equal the checkpoint's ``llm.*`` keys without the prefix.
"""

from __future__ import annotations

from ...config import TextConfig
from .decoder import DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2: q/k/v projections with bias (``attention_bias``, true for Qwen2), no q/k norm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__(cfg, qkv_bias=cfg.attention_bias, qk_norm=False)
