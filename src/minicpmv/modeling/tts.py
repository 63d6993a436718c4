"""MiniCPM-o 2.6's speech head (``tts.*``, ConditionalChatTTS; spec o2.6 §4.8) as modules.

``ConditionalChatTTS`` holds, under the checkpoint's key names: ``projector`` (LLM hidden at
``<|spk|>`` -> speaker row, L2-normalised), ``emb_text`` (ChatTTS text ids), ``emb_code.{0..3}``
(one table per codebook; a frame's input is the sum), ``model`` (a Llama decoder built from the
shared ``llm/decoder.py`` blocks; its ``embed_tokens`` is stored in checkpoints but never read,
the decoder is always driven with embeddings), ``head_code.{0..3}`` (weight-normed linear heads:
row r of W is ``g_r * v_r / |v_r|``) and ``dvae`` (codes -> mel, ``dvae.py``).

The module computes: speaker rows, text / code input embeddings, decoder hidden states under a
mask the caller prepares, and raw code logits. It holds no per-utterance state; the generation
schedule, the visibility rule, sampling and the KV cache live in ``engine/speech.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig, TTSConfig
from .audio_whisper import AudioProjector
from .dvae import DVAE
from .layers import AttnMask, KVCacheProtocol
from .llm.decoder import DecoderModel


def decoder_config(cfg: TTSConfig) -> TextConfig:
    """The inner LlamaModel's settings (LlamaConfig defaults where the official code passes none)."""
    return TextConfig(
        family="llama",
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        vocab_size=cfg.decoder_vocab_size,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=False,
    )


class _WeightNormParams(nn.Module):
    """``parametrizations.weight``: ``original0`` = magnitude g [out, 1], ``original1`` = direction v."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.original0 = nn.Parameter(torch.ones(out_features, 1))
        self.original1 = nn.Parameter(torch.ones(out_features, in_features))


class _Parametrizations(nn.Module):
    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = _WeightNormParams(out_features, in_features)


class WeightNormHead(nn.Module):
    """A bias-free Linear stored as torch weight-norm parametrization (dim 0), keys as the checkpoint."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.parametrizations = _Parametrizations(out_features, in_features)

    def weight(self) -> torch.Tensor:
        """W [out, in] = v * (g / |v|_row), by the kernel torch's weight-norm parametrization uses
        (its row-norm summation differs in the last bits from ``Tensor.norm``)."""
        p = self.parametrizations.weight
        return torch._weight_norm(p.original1, p.original0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class ConditionalChatTTS(nn.Module):
    """``tts.*`` of a MiniCPM-o checkpoint; see the module docstring."""

    def __init__(self, cfg: TTSConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.use_mlp:
            self.projector: nn.Module = AudioProjector(cfg.llm_dim, cfg.hidden_size)
        else:
            self.projector = nn.Linear(cfg.llm_dim, cfg.hidden_size, bias=False)
        self.emb_code = nn.ModuleList(nn.Embedding(cfg.num_audio_tokens, cfg.hidden_size) for _ in range(cfg.num_vq))
        self.emb_text = nn.Embedding(cfg.num_text_tokens, cfg.hidden_size)
        self.head_code = nn.ModuleList(WeightNormHead(cfg.hidden_size, cfg.num_audio_tokens) for _ in range(cfg.num_vq))
        self.dvae = DVAE(cfg.num_mel_bins)
        self.model = DecoderModel(decoder_config(cfg), qkv_bias=False, qk_norm=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.emb_text.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb_text.weight.device

    def speaker_embedding(self, llm_hidden: torch.Tensor) -> torch.Tensor:
        """LLM hidden states at ``<|spk|>`` [n, llm_dim] -> L2-normalised speaker rows [n, H]."""
        projected = self.projector(llm_hidden.to(device=self.device, dtype=self.dtype))  # [n, H]
        return F.normalize(projected, p=2, dim=-1)

    def text_embeddings(self, ids: torch.Tensor, speaker: torch.Tensor | None = None) -> torch.Tensor:
        """ChatTTS ids [T] -> rows [T, H]; the ``[spk_emb]`` rows take ``speaker`` [n_spk, H]."""
        emb = self.emb_text(ids.to(self.device))  # [T, H]
        slots = (ids == self.config.spk_emb_token_id).nonzero().flatten().tolist()
        if slots:
            if speaker is None:
                raise ValueError("the text holds a [spk_emb] slot but no speaker embedding was given")
            if len(slots) != self.config.num_spk_embs or slots[-1] - slots[0] + 1 != len(slots):
                raise ValueError(f"expected {self.config.num_spk_embs} consecutive [spk_emb] slots, got {slots}")
            emb = emb.clone()
            emb[slots[0] : slots[-1] + 1] = speaker.to(emb.dtype)
        return emb

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Code frames [T, num_vq] -> input rows [T, H] (the sum of one row per codebook)."""
        codes = codes.to(self.device)
        rows = [table(codes[:, i]) for i, table in enumerate(self.emb_code)]  # [T, H] each
        return torch.stack(rows, dim=-1).sum(-1)  # [T, H]

    def hidden(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, mask: AttnMask, cache: KVCacheProtocol
    ) -> torch.Tensor:
        """Decoder final-norm hidden states [1, T, H] for rows at ``position_ids`` [1, T]."""
        return self.model.run(inputs_embeds, position_ids, mask, cache)

    def head_weights(self) -> list[torch.Tensor]:
        """The weight-normed head matrices [num_audio_tokens, H] (compute once per utterance)."""
        return [head.weight() for head in self.head_code]

    def logits(self, hidden: torch.Tensor, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states [..., H] -> raw float32 code logits [..., num_vq, num_audio_tokens]."""
        weights = weights if weights is not None else self.head_weights()
        return torch.stack([F.linear(hidden, w).float() for w in weights], dim=-2)
