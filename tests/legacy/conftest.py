"""Fixtures of the older-release tests: the tiny 2.0 / 2.5 / o2.6 checkpoints in float32 (once per run)."""

from __future__ import annotations

from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
LEGACY = ("2.0", "2.5", "o2.6")


@pytest.fixture(scope="session")
def legacy_models():
    """Loaded lazily: ``legacy_models(version)`` -> ChatModel (cached for the session)."""
    import minicpmv

    cache: dict[str, object] = {}

    def get(version: str):
        if version not in cache:
            cache[version] = minicpmv.load(CONF / version / "_checkpoint", dtype="float32")
        return cache[version]

    return get


def case_image(version: str, case: str, index: int = 0):
    from PIL import Image

    inputs = CONF / version / case / "inputs"
    files = sorted(inputs.glob("*.png"))
    with Image.open(files[index]) as im:
        return im.convert("RGB")


def case_audio(case: str = "audio_1p3s"):
    import numpy as np

    return np.load(CONF / "o2.6" / case / "inputs" / "audio_0.npy")
