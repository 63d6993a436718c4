"""MiniCPM-o's audio input path: Whisper-style encoder, projector and pooling (spec o2.6 §4.7).

``WhisperEncoder`` (the checkpoint's ``apm``) maps log-mel features ``[B, n_mels, F]`` to
``[B, ceil(F/2), d]``: two GELU convolutions (the second with stride 2), a learned position
table, pre-LN transformer layers (q/v/out projections with bias, k without) and a final
LayerNorm. ``AudioProjector`` (``audio_projection_layer``) is Linear-ReLU-Linear to the LLM width;
``encode_audio`` adds the 2x average pooling and cuts each segment to its token count.

The attention mask is the reference's: keys at position ``t >= frames`` (the segment's mel-frame
count, compared with the *halved* time axis, as the official code does) are hidden, and with a
chunk length of c seconds a query at t sees only keys before the end of its own 50c-frame block.
Parameter names equal the checkpoint keys without the ``apm.`` / ``audio_projection_layer.``
prefixes. Streaming input (the reference's ``streaming_prefill``): ``forward(..., cache=...)``
appends each piece's keys/values to a cache (``KVCacheProtocol``, one layer index per encoder
layer), continues the position table after the cached positions and lets the piece attend to
every cached position and to itself (no mask), as the official encoder with its
``EncoderDecoderCache`` does. This module computes no mel features (``processing/audio.py`` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioConfig
from ..errors import InputError
from .layers import KVCacheProtocol


def conv_output_frames(frames: int) -> int:
    """Encoder positions for ``frames`` mel frames (conv2 has stride 2)."""
    return (frames - 1) // 2 + 1


def audio_token_count(frames: int, pool_step: int = 2) -> int:
    """LLM rows one segment of ``frames`` mel frames turns into (after the average pooling)."""
    return (conv_output_frames(frames) - pool_step) // pool_step + 1


def encoder_attention_mask(frames: Sequence[int], length: int, chunk_frames: int) -> torch.Tensor:
    """Boolean [B, 1, T, T] (True = attend) for segments of ``frames`` mel frames, T = ``length``."""
    t = torch.arange(length)
    keys_ok = t[None, :] < torch.tensor(list(frames))[:, None]  # [B, T] (reference: mel frames)
    allowed = keys_ok[:, None, None, :].expand(len(frames), 1, length, length)  # [B, 1, T, T]
    if chunk_frames > 0:
        block_end = (t // chunk_frames + 1) * chunk_frames  # [T]
        chunk = t[None, :] < block_end[:, None]  # [T(query), T(key)]
        allowed = allowed & chunk[None, None]
    return allowed


class WhisperAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise InputError(f"audio d_model {d} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, d // heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCacheProtocol | None = None,
                layer_idx: int = 0) -> torch.Tensor:
        b, t, d = x.shape  # [B, T, d]
        shape = (b, t, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, h, T, hd]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, h, past+T, hd]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, h, T, hd]
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))  # [B, T, d]


class WhisperEncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.self_attn = WhisperAttention(d, cfg.encoder_attention_heads)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCacheProtocol | None = None,
                layer_idx: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache, layer_idx)  # [B, T, d]
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))  # [B, T, d]


class WhisperEncoder(nn.Module):
    """The ``apm`` child of MiniCPM-o (encoder only; no decoder weights exist)."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCacheProtocol | None = None) -> torch.Tensor:
        """features [B, n_mels, F], mask [B, 1, T, T] bool -> last hidden state [B, T, d].

        With ``cache`` (streaming input, batch 1, no mask): the positions continue after the
        cached ones and the new keys/values are appended to it."""
        if cache is not None and mask is not None:
            raise InputError("the streaming audio encoder attends to every cached position: give no mask")
        w = self.conv1.weight
        x = F.gelu(self.conv1(features.to(device=w.device, dtype=w.dtype)))  # [B, d, F]
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)  # [B, T, d]
        past = cache.get_seq_length() if cache is not None else 0
        t = x.shape[1]
        if past + t > self.embed_positions.num_embeddings:
            raise InputError(
                f"an audio segment of {t} encoder positions after {past} cached ones exceeds the "
                f"{self.embed_positions.num_embeddings} the encoder supports (at most 30 s of audio)"
            )
        x = x + self.embed_positions.weight[past : past + t]  # [B, T, d]
        if mask is not None:
            mask = mask.to(x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, cache, i)  # [B, T, d]
        return self.layer_norm(x)  # [B, T, d]


class AudioProjector(nn.Module):
    """``audio_projection_layer``: Linear -> ReLU -> Linear (both with bias)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))  # [..., H]


def pad_segments(segments: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """[n_mels, F_i] segments -> zero-padded batch [n, n_mels, Fmax] and the frame counts F_i."""
    if not segments:
        raise InputError("no audio segments to encode")
    mels = segments[0].shape[0]
    frames = [int(s.shape[1]) for s in segments]
    bad = [tuple(s.shape) for s in segments if s.dim() != 2 or s.shape[0] != mels or s.shape[1] < 1]
    if bad:
        raise InputError(f"audio features must be [{mels}, frames] with frames >= 1, got {bad[:3]}")
    out = segments[0].new_zeros(len(segments), mels, max(frames))  # [n, n_mels, Fmax]
    for i, s in enumerate(segments):
        out[i, :, : frames[i]] = s
    return out, frames
