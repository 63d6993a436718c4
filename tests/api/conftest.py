"""Shared fixtures: the tiny 2.6 / 4.5 conformance checkpoints loaded in float32 (once per run)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
CONF = DATA / "conformance"


@pytest.fixture(scope="session")
def model26():
    import minicpmv

    return minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32")


@pytest.fixture(scope="session")
def model45():
    import minicpmv

    return minicpmv.load(CONF / "4.5" / "_checkpoint", dtype="float32")


@pytest.fixture(params=["2.6", "4.5"])
def model(request, model26, model45):
    return model26 if request.param == "2.6" else model45


def case_image(version: str, case: str, index: int = 0):
    from PIL import Image

    files = sorted((CONF / version / case / "inputs").glob("*.png"))
    with Image.open(files[index]) as im:
        return im.convert("RGB")
