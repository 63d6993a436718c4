"""The Vocos vocoder of MiniCPM-o 2.6: 100-bin mel at 93.75 frames/s -> 24 kHz waveform.

Layout and key names are those of ``assets/Vocos.pt`` (spec o2.6 §4.8): ``backbone`` = input
conv (k7) + LayerNorm + ConvNeXt blocks (k7, scale ``gamma``) + final LayerNorm; ``head`` =
Linear to ``n_fft + 2`` channels read as log-magnitude (exp, clipped at 100) and phase, inverse
real FFT with the stored window, overlap-add with hop 256 ("same" padding: 384 samples trimmed
at both ends, divided by the overlap-added squared window) -> 256 samples per mel frame.
``feature_extractor`` only holds the analysis buffers of the state dict (window, mel
filterbank), so that the official file loads strictly; analysis (wave -> mel) is not implemented.
Sizes are fixed by the official code, not read from config.json. Loading the file lives in
``loading/speech.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dvae import ConvNeXtBlock


@dataclass(frozen=True)
class VocosConfig:
    """The vocoder the official ``initialize_vocos`` builds (not stored in config.json)."""

    num_mel_bins: int = 100
    dim: int = 512
    intermediate_dim: int = 1536
    num_layers: int = 8
    n_fft: int = 1024
    hop_length: int = 256
    sampling_rate: int = 24000


class _MelSpec(nn.Module):
    """Holder of the analysis buffers ``spectrogram.window`` and ``mel_scale.fb`` (unused)."""

    def __init__(self, cfg: VocosConfig) -> None:
        super().__init__()
        self.spectrogram = nn.Module()
        self.spectrogram.register_buffer("window", torch.zeros(cfg.n_fft))
        self.mel_scale = nn.Module()
        self.mel_scale.register_buffer("fb", torch.zeros(cfg.n_fft // 2 + 1, cfg.num_mel_bins))


class _FeatureExtractor(nn.Module):
    def __init__(self, cfg: VocosConfig) -> None:
        super().__init__()
        self.mel_spec = _MelSpec(cfg)


class VocosBackbone(nn.Module):
    def __init__(self, cfg: VocosConfig) -> None:
        super().__init__()
        self.embed = nn.Conv1d(cfg.num_mel_bins, cfg.dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(cfg.dim, cfg.intermediate_dim, kernel=7, dilation=1, scale_name="gamma")
            for _ in range(cfg.num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=1e-6)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, F] -> [B, F, dim] (after the final LayerNorm)."""
        x = self.embed(mel)  # [B, dim, F]
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)  # [B, dim, F]
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))  # [B, F, dim]


class _ISTFT(nn.Module):
    def __init__(self, cfg: VocosConfig) -> None:
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_length
        self.register_buffer("window", torch.zeros(cfg.n_fft))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """Complex spectrum [B, n_fft/2+1, F] -> waveform [B, F * hop] ("same" padding)."""
        n_fft, hop = self.n_fft, self.hop
        pad = (n_fft - hop) // 2
        frames = torch.fft.irfft(spec, n_fft, dim=1, norm="backward") * self.window[None, :, None]  # [B, n_fft, F]
        n = frames.shape[-1]
        size = (n - 1) * hop + n_fft
        wav = F.fold(frames, output_size=(1, size), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0, pad:-pad]
        sq = self.window.square().expand(1, n, -1).transpose(1, 2)  # [1, n_fft, F]
        env = F.fold(sq, output_size=(1, size), kernel_size=(1, n_fft), stride=(1, hop)).squeeze()[pad:-pad]
        return wav / env  # [B, F * hop]


class ISTFTHead(nn.Module):
    def __init__(self, cfg: VocosConfig) -> None:
        super().__init__()
        self.out = nn.Linear(cfg.dim, cfg.n_fft + 2)
        self.istft = _ISTFT(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output [B, F, dim] -> waveform [B, F * hop]."""
        y = self.out(x).transpose(1, 2)  # [B, n_fft + 2, F]
        mag, phase = y.chunk(2, dim=1)  # [B, n_fft/2+1, F] x2
        mag = torch.clip(torch.exp(mag), max=1e2)
        spec = mag * (torch.cos(phase) + 1j * torch.sin(phase))  # complex [B, n_fft/2+1, F]
        return self.istft(spec)


class Vocos(nn.Module):
    """The vocoder; ``decode(mel)`` is the only entry point used by speech output."""

    def __init__(self, cfg: VocosConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or VocosConfig()
        self.feature_extractor = _FeatureExtractor(self.config)
        self.backbone = VocosBackbone(self.config)
        self.head = ISTFTHead(self.config)

    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, F] -> 24 kHz waveform [B, F * hop] (float32 in, float32 out)."""
        return self.head(self.backbone(mel))
