"""The shared pre-norm decoder every backbone family is built on.

``DecoderForCausalLM`` is the generic decoder (embeddings, pre-norm blocks of GQA attention +
gated SiLU MLP, final RMSNorm, ``lm_head``); the flags ``qkv_bias`` and ``qk_norm`` select the
Qwen2 / Qwen3 / Llama variants, and MiniCPM swaps the layer class (``layer_cls``). Parameter
names equal the official checkpoint keys after the ``llm.`` prefix. The model consumes
``inputs_embeds`` (MiniCPM-V merges image features into the embeddings first) and returns float32
logits; generation loops, sampling and the production KV cache live in ``engine``.

A model split across devices (``modeling/placement.py``) runs here too: the hidden state moves to
each layer's device before the layer (with the rotary tables and the mask, once per device), and
to the final norm's and ``lm_head``'s; on one device nothing moves.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import TextConfig
from ..layers import (
    Attention,
    AttnMask,
    GatedMLP,
    KVCacheProtocol,
    RMSNorm,
    RotaryEmbedding,
    build_attn_mask,
    module_device,
)


class DecoderLayer(nn.Module):
    """``x += attn(norm(x)) * s; x += mlp(norm(x)) * s``; ``residual_scale`` s is 1 (no multiply)
    except in backbones that scale their residual branches (MiniCPM)."""

    residual_scale = 1.0

    def __init__(self, cfg: TextConfig, layer_idx: int, *, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            eps=cfg.rms_norm_eps,
            layer_idx=layer_idx,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    @property
    def device(self) -> torch.device:
        """Where this layer computes (its KV cache rows live there too)."""
        return self.input_layernorm.weight.device

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttnMask,
        cache: KVCacheProtocol | None,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)  # [B, T, H]
        x = x + (attn if self.residual_scale == 1.0 else attn * self.residual_scale)
        mlp = self.mlp(self.post_attention_layernorm(x))  # [B, T, H]
        return x + (mlp if self.residual_scale == 1.0 else mlp * self.residual_scale)


class DecoderModel(nn.Module):
    """``model.*`` of the checkpoint: embed_tokens, layers, norm (+ the parameter-free RoPE)."""

    def __init__(
        self, cfg: TextConfig, *, qkv_bias: bool, qk_norm: bool, layer_cls: type[DecoderLayer] = DecoderLayer
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            layer_cls(cfg, i, qkv_bias=qkv_bias, qk_norm=qk_norm) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: KVCacheProtocol | None,
    ) -> torch.Tensor:
        b, t, _ = inputs_embeds.shape  # [B, T, H]
        past = cache.get_seq_length() if cache is not None else 0
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device).expand(b, t)  # [B, T]
        static = bool(getattr(cache, "static_shapes", False))
        mask = build_attn_mask(attention_mask, t, past, inputs_embeds.dtype, device, static=static)
        return self.run(inputs_embeds, position_ids, mask, cache)

    def run(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: AttnMask,
        cache: KVCacheProtocol | None,
    ) -> torch.Tensor:
        """The blocks and the final norm under a mask the caller prepared (``forward`` builds
        the causal one; the MiniCPM-o speech decoder has its own visibility rule): [B, T, H].
        Layers on another device (a split model) get the hidden state, rotary tables and mask moved."""
        cos, sin = self.rotary_emb(position_ids.to(inputs_embeds.device), inputs_embeds.dtype)  # [B, T, hd] x2
        shared = {inputs_embeds.device: (cos, sin, mask)}
        h = inputs_embeds
        for layer in self.layers:
            if layer.device != h.device:  # a model split across devices
                if layer.device not in shared:
                    shared[layer.device] = _moved(cos, sin, mask, layer.device)
                h = h.to(layer.device)
                cos, sin, mask = shared[layer.device]
            h = layer(h, cos, sin, mask, cache)  # [B, T, H]
        return self.norm(h.to(self.norm.weight.device))


def _moved(
    cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttnMask]:
    m = None if mask.mask is None else mask.mask.to(device)
    return cos.to(device), sin.to(device), AttnMask(m, mask.is_causal)


class DecoderForCausalLM(nn.Module):
    """Qwen-style causal LM over ``inputs_embeds``; ``forward`` returns float32 logits."""

    def __init__(
        self, cfg: TextConfig, *, qkv_bias: bool, qk_norm: bool, layer_cls: type[DecoderLayer] = DecoderLayer
    ) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, qkv_bias=qkv_bias, qk_norm=qk_norm, layer_cls=layer_cls)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def embed_input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ids the model is fed during decoding: ids [...] -> [..., H]."""
        emb = self.model.embed_tokens
        return emb(ids.to(emb.weight.device))

    def embed_prompt_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of prompt text rows before image features are merged in (same by default)."""
        return self.embed_input_ids(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., H] -> float32 logits [..., V]."""
        return self.lm_head(hidden).float()

    def forward_hidden(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCacheProtocol | None = None,
    ) -> torch.Tensor:
        """Final hidden states after the last RMSNorm: [B, T, H] (in the model dtype)."""
        return self.model(inputs_embeds, position_ids, attention_mask, cache)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCacheProtocol | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, H], position_ids [B, T], attention_mask [B, past+T] (1 = key
        visible) -> float32 logits [B, T, V], or [B, 1, V] with ``last_only``."""
        h = self.forward_hidden(inputs_embeds, position_ids, attention_mask, cache)  # [B, T, H]
        if last_only:
            h = h[:, -1:]  # [B, 1, H]
        return self.logits(h.to(module_device(self.lm_head)))  # [B, T or 1, V]
