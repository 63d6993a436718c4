"""Shared fixtures of the modeling tests: the tiny conformance checkpoints and their cases.

Only fixtures are used by the test modules (they never import this file, so it cannot clash with
other ``conftest.py`` modules); parametrize lists are built in the test modules. Models are built
with ``MiniCPMV(cfg)`` and filled with ``load_state_dict(strict=True)`` from the checkpoint's
safetensors (upcast to float32), so these tests do not depend on ``minicpmv.loading``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
VERSIONS = ("2.6", "4.5")


class Case:
    """One conformance case: meta.json, tensors.safetensors and the slice PNGs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version = path.parent.name
        self.name = path.name
        self.meta: dict[str, Any] = json.loads((path / "expected" / "meta.json").read_text(encoding="utf-8"))
        self.t = load_file(str(path / "expected" / "tensors.safetensors"))

    @property
    def has_images(self) -> bool:
        return any(self.meta["num_slices_per_conv"])

    def pixel_values(self) -> list[torch.Tensor]:
        """[3, 14, L*14] float32 per pixel_values entry, built from the slice PNGs (README formula)."""
        out = []
        for idx in self.meta["pixel_values_source_slice"]:
            png = self.path / "expected" / "slices" / f"slice_{idx:03d}.png"
            a = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint8)
            x = (a.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
            chw = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # [3, H, W]
            h, w = chw.shape[1] // 14, chw.shape[2] // 14
            pv = chw.reshape(3, h, 14, w, 14).permute(0, 2, 1, 3, 4).reshape(3, 14, h * w * 14)
            out.append(pv)
        return out

    def bounds(self) -> list[list[tuple[int, int]]]:
        return [[(int(s), int(e)) for s, e in conv] for conv in self.meta["image_bound"]]

    def split_features(self, feats: torch.Tensor) -> list[torch.Tensor | None]:
        """Split resampler output [N, Q, H] per conversation by its number of placeholder blocks."""
        out: list[torch.Tensor | None] = []
        k = 0
        for conv in self.meta["image_bound"]:
            n = len(conv)
            out.append(feats[k : k + n] if n else None)
            k += n
        assert k == feats.shape[0]
        return out


def hf_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids exactly as HF generate derives them from the attention mask."""
    pos = mask.long().cumsum(-1) - 1  # [B, S]
    return pos.masked_fill(mask == 0, 1)


@pytest.fixture(scope="session")
def tiny_models(tiny_config: Any, tiny_state: Any) -> dict[str, Any]:
    from minicpmv.modeling.vlm import MiniCPMV

    models = {}
    for v in VERSIONS:
        m = MiniCPMV(tiny_config(v))
        m.load_state_dict(tiny_state(v), strict=True)
        models[v] = m.float().eval()
    return models


@pytest.fixture(scope="session")
def load_case() -> Any:
    """Factory: (version, case name) -> Case (cached)."""
    cache: dict[tuple[str, str], Case] = {}

    def get(version: str, name: str) -> Case:
        if (version, name) not in cache:
            cache[(version, name)] = Case(CONF / version / name)
        return cache[(version, name)]

    return get


@pytest.fixture(scope="session")
def positions() -> Any:
    return hf_position_ids
