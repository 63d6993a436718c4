"""Shared fixtures: the tiny 2.6 / 4.5 conformance checkpoints loaded in float32 (once per run)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
CONF = DATA / "conformance"




def case_image(version: str, case: str, index: int = 0):
    from PIL import Image

    files = sorted((CONF / version / case / "inputs").glob("*.png"))
    with Image.open(files[index]) as im:
        return im.convert("RGB")
