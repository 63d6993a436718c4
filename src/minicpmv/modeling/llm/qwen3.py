"""Qwen3 decoder-only LLM (MiniCPM-V 4.5 backbone).

Qwen3 differs from Qwen2 only in the attention block: no q/k/v biases (``attention_bias`` false
in the official config), an explicit ``head_dim``, and RMSNorm over ``head_dim`` applied to every
head of q and k before RoPE (``self_attn.q_norm`` / ``k_norm``). Everything else is the shared
decoder of ``qwen2.py``.
"""

from __future__ import annotations

from ...config import TextConfig
from .decoder import DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3: per-head q/k RMSNorm before RoPE; q/k/v bias only if ``attention_bias``."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__(cfg, qkv_bias=cfg.attention_bias, qk_norm=True)
