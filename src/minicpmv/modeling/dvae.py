"""The MiniCPM-o speech codec's decoder side: audio codes -> 100-bin mel (ChatTTS DVAE).

``GFSQ`` turns the 4 codebook ids of a frame into a 1024-wide feature (2 groups x 2 residual
levels of finite scalar quantization with levels (5, 5, 5, 5), each group projected 4 -> 512);
``DVAE.decode`` interleaves the two 512-channel halves in time (one code frame = 2 mel frames),
runs the ConvNeXt decoder stack and the output convolution and scales by ``coef``
(spec o2.6 §4.8; conformance README "Chat path" steps 9). Parameter names equal the checkpoint
keys under ``tts.dvae.``. The encoder side (``downsample_conv``, ``encoder``, the FSQ
quantization of features) is built so that checkpoints load strictly, but it is never run:
MiniCPM-o inference does not encode mel to codes. The vocoder lives in ``vocos.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FSQ_LEVELS = (5, 5, 5, 5)
GROUPS = 2
RESIDUALS = 2


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> LayerNorm -> Linear -> GELU -> Linear -> per-channel scale, residual.

    The scale parameter is called ``coef`` in the DVAE and ``gamma`` in Vocos (``scale_name``);
    the DVAE dilates its depthwise convolution (kernel 7, dilation 2), Vocos does not.
    """

    def __init__(self, dim: int, intermediate: int, *, kernel: int = 7, dilation: int = 1,
                 scale_name: str = "coef") -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=dilation * (kernel // 2), dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate)
        self.pwconv2 = nn.Linear(intermediate, dim)
        self.scale_name = scale_name
        self.register_parameter(scale_name, nn.Parameter(torch.ones(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)  # [B, T, C]
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))  # [B, T, C]
        y = y * getattr(self, self.scale_name)
        return x + y.transpose(1, 2)  # [B, C, T]


class DVAEDecoder(nn.Module):
    """``conv_in`` (k3 -> GELU -> k3), ConvNeXt blocks (k7, dilation 2), ``conv_out`` (k1, no bias)."""

    def __init__(self, idim: int, odim: int, *, n_layer: int = 12, bn_dim: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.conv_in = nn.Sequential(nn.Conv1d(idim, bn_dim, 3, 1, 1), nn.GELU(), nn.Conv1d(bn_dim, hidden, 3, 1, 1))
        self.decoder_block = nn.ModuleList(
            ConvNeXtBlock(hidden, hidden * 4, kernel=7, dilation=2) for _ in range(n_layer)
        )
        self.conv_out = nn.Conv1d(hidden, odim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_in(x)  # [B, hidden, T]
        for block in self.decoder_block:
            y = block(y)
        return self.conv_out(y)  # [B, odim, T]


class ResidualFSQ(nn.Module):
    """One group: ``project_in`` (512 -> 4, used only for encoding) and ``project_out`` (4 -> 512)."""

    def __init__(self, dim: int, levels: tuple[int, ...], num_quantizers: int) -> None:
        super().__init__()
        self.levels = levels
        self.num_quantizers = num_quantizers
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)

    def codes(self, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """indices [..., R] -> the summed residual codes [..., len(levels)] (before project_out).

        Each index spells one digit per level (``index // basis % level``), mapped to
        ``(digit - level // 2) / (level // 2)``; residual level r is scaled by ``(level - 1) ** -r``.
        """
        levels = torch.tensor(self.levels, device=indices.device)  # [D]
        basis = torch.cumprod(torch.tensor((1, *self.levels[:-1]), device=indices.device), 0)  # [D]
        digits = (indices.long()[..., None] // basis) % levels  # [..., R, D]
        half = (levels // 2).to(dtype)
        values = (digits.to(dtype) - half) / half  # [..., R, D] in [-1, 1]
        out = None
        for r in range(self.num_quantizers):
            scaled = values[..., r, :] * (levels.to(dtype) - 1) ** -r  # [..., D]
            out = scaled if out is None else out + scaled
        return out  # type: ignore[return-value]

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [..., R] -> features [..., dim]."""
        return self.project_out(self.codes(indices, self.project_out.weight.dtype))


class GroupedResidualFSQ(nn.Module):
    """``rvqs``: one ResidualFSQ per group, outputs concatenated along the feature axis."""

    def __init__(self, dim: int, levels: tuple[int, ...], groups: int, num_quantizers: int) -> None:
        super().__init__()
        self.rvqs = nn.ModuleList(ResidualFSQ(dim // groups, levels, num_quantizers) for _ in range(groups))


class GFSQ(nn.Module):
    """Grouped residual FSQ lookup: code frames [B, T, G*R] -> features [B, dim, T]."""

    def __init__(self, dim: int = 1024, levels: tuple[int, ...] = FSQ_LEVELS, groups: int = GROUPS,
                 residuals: int = RESIDUALS) -> None:
        super().__init__()
        self.groups, self.residuals = groups, residuals
        self.quantizer = GroupedResidualFSQ(dim, levels, groups, residuals)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, G*R] (codebook c = group c // R, residual level c % R) -> [B, dim, T]."""
        b, t, n = codes.shape
        if n != self.groups * self.residuals:
            raise ValueError(f"expected {self.groups * self.residuals} codebooks per frame, got {n}")
        idx = codes.view(b, t, self.groups, self.residuals)  # [B, T, G, R]
        parts = [rvq.decode(idx[:, :, g]) for g, rvq in enumerate(self.quantizer.rvqs)]  # [B, T, dim/G] each
        return torch.cat(parts, dim=-1).transpose(1, 2)  # [B, dim, T]


class DVAE(nn.Module):
    """``tts.dvae``: GFSQ lookup + ConvNeXt decoder + output conv, scaled by ``coef``."""

    def __init__(self, num_mel_bins: int = 100) -> None:
        super().__init__()
        self.coef = nn.Parameter(torch.ones(1, num_mel_bins, 1))
        # encoder side: loaded, never run (inference does not encode mel to codes)
        self.downsample_conv = nn.Sequential(
            nn.Conv1d(num_mel_bins, 512, 3, 1, 1), nn.GELU(), nn.Conv1d(512, 512, 4, 2, 1), nn.GELU()
        )
        self.encoder = DVAEDecoder(512, 1024, bn_dim=128, hidden=256)
        self.decoder = DVAEDecoder(512, 512, bn_dim=128, hidden=256)
        self.out_conv = nn.Conv1d(512, num_mel_bins, 3, 1, 1, bias=False)
        self.vq_layer = GFSQ()

    def decode_stages(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """codes [B, T, 4] -> ``vq_feats`` [B, 1024, T], ``decoder_out`` [B, 512, 2T], ``mel`` [B, 100, 2T]."""
        feats = self.vq_layer.embed(codes)  # [B, 1024, T]
        b, c, t = feats.shape
        # channel halves interleaved in time: frame t of half j -> mel time 2t + j
        x = feats.view(b, 2, c // 2, t).permute(0, 2, 3, 1).reshape(b, c // 2, 2 * t)  # [B, 512, 2T]
        dec = self.decoder(x)  # [B, 512, 2T]
        mel = self.out_conv(dec) * self.coef  # [B, 100, 2T]
        return {"vq_feats": feats, "decoder_out": dec, "mel": mel}

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, 4] (ids 0..624) -> mel [B, 100, 2T]."""
        return self.decode_stages(codes)["mel"]
