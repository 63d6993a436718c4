"""Fixtures for the fine-tuning tests: tiny checkpoints, tiny images and official-format data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
CKPT = {v: CONF / v / "_checkpoint" for v in ("2.6", "4.5")}


def write_data(root: Path, records: list[dict], name: str = "train.json") -> Path:
    """Write tiny images a.png / b.png next to the data file and the records as JSON."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (220, 30, 30)).save(root / "a.png")
    Image.new("RGB", (30, 40), (30, 30, 220)).save(root / "b.png")
    path = root / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def qa_records(n: int) -> list[dict]:
    """n single-image question/answer records with varied answers (some multi-turn)."""
    out = []
    for i in range(n):
        img = "a.png" if i % 2 == 0 else "b.png"
        conv = [{"role": "user", "content": f"What colour is it? ({i})"},
                {"role": "assistant", "content": "red" if i % 2 == 0 else "blue"}]
        if i % 3 == 0:
            conv += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": f"yes {i}"}]
        out.append({"id": f"s{i}", "image": img, "conversations": conv})
    return out


class PickleTrap:
    """Unpickling this object creates ``marker`` (proves that a loader never unpickles)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="session")
def chat26():
    import minicpmv

    return minicpmv.load(CKPT["2.6"], dtype="float32")


@pytest.fixture(scope="session")
def chat45():
    import minicpmv

    return minicpmv.load(CKPT["4.5"], dtype="float32")
