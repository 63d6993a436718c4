"""Shared helpers for the vision-tower and resampler tests: conformance cases, tiny weights.

Everything is read from the repo copy under tests/data/conformance. Pixel tensors are rebuilt
from the stored slice PNGs with the documented formula (independent of minicpmv.processing).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from minicpmv.config import ModelConfig
from minicpmv.modeling.resampler import Resampler
from minicpmv.modeling.vision_siglip import SiglipVisionTransformer

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
FAMILY = {"2.6": ("qwen2", False), "4.5": ("qwen3", True)}
PATCH = 14


@cache
def model_config(version: str) -> ModelConfig:
    family, temporal = FAMILY[version]
    return ModelConfig.from_file(CONF / version / "_checkpoint" / "config.json", family=family,
                                 temporal=temporal)


def state_dict(version: str, prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under ``prefix`` (e.g. "vpm."), prefix stripped, upcast to float32."""
    raw = load_torch(str(CONF / version / "_checkpoint" / "model.safetensors"))
    return {k[len(prefix):]: v.float() for k, v in raw.items() if k.startswith(prefix)}


@cache
def vision_tower(version: str) -> SiglipVisionTransformer:
    cfg = model_config(version)
    vpm = SiglipVisionTransformer(cfg.vision, cfg.vision_layers_used)
    vpm.load_state_dict(state_dict(version, "vpm."), strict=True)
    return vpm.eval()


@cache
def resampler(version: str) -> Resampler:
    res = Resampler(model_config(version).resampler)
    res.load_state_dict(state_dict(version, "resampler."), strict=True)
    return res.eval()


def image_cases(version: str) -> list[str]:
    out = []
    for d in sorted((CONF / version).iterdir()):
        meta = d / "expected" / "meta.json"
        if meta.is_file() and json.loads(meta.read_text())["pixel_values_source_slice"]:
            out.append(d.name)
    return out


def slice_pixels(png: Path) -> torch.Tensor:
    """[3, P, L*P] float32: (png/255 - 0.5)/0.5, CHW, patches row-major side by side."""
    img = np.asarray(Image.open(png).convert("RGB"))  # [H, W, 3] uint8
    x = ((img.astype(np.float32) / np.float32(255.0)) - np.float32(0.5)) / np.float32(0.5)
    chw = x.transpose(2, 0, 1)  # [3, H, W]
    c, hp, wp = chw.shape[0], chw.shape[1] // PATCH, chw.shape[2] // PATCH
    patches = chw.reshape(c, hp, PATCH, wp, PATCH).transpose(0, 2, 1, 3, 4)  # [3, i, r, q, j]
    out = patches.reshape(c, PATCH, hp * wp * PATCH)  # [3, P, L*P], col = (r*wp + q)*P + j
    return torch.from_numpy(np.ascontiguousarray(out))


class Case:
    """One conformance case: meta, tensors, per-slice pixels (processor order), tgt sizes."""

    def __init__(self, version: str, name: str) -> None:
        exp = CONF / version / name / "expected"
        self.version, self.name = version, name
        self.meta = json.loads((exp / "meta.json").read_text())
        self.tensors = load_file(str(exp / "tensors.safetensors"))
        self.pixels = [
            slice_pixels(exp / "slices" / f"slice_{n:03d}.png")
            for n in self.meta["pixel_values_source_slice"]
        ]
        self.tgt_sizes = torch.tensor(self.tensors["tgt_sizes"], dtype=torch.int32)  # [S, 2]


@cache
def load_case(version: str, name: str) -> Case:
    return Case(version, name)


@cache
def vision_features(version: str, name: str) -> torch.Tensor:
    """[S, Lmax, Dv]: all slices of the case padded to one Lmax, run in chunks of 16 (as the
    reference does)."""
    from minicpmv.modeling.vision_siglip import pack_slices

    case = load_case(version, name)
    vpm = vision_tower(version)
    padded, mask = pack_slices(case.pixels, case.tgt_sizes)  # [S,3,P,Lmax*P], [S,1,Lmax]
    with torch.no_grad():
        chunks = [
            vpm(padded[s : s + 16], mask[s : s + 16], case.tgt_sizes[s : s + 16])
            for s in range(0, padded.shape[0], 16)
        ]
    return torch.cat(chunks)  # [S, Lmax, Dv]
