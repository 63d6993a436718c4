"""The bundled demo checkpoint: present, the one its card describes, the CLI's default model,
and right about the example image the README's main command asks about."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minicpmv import demo_model
from minicpmv.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes.png"


def test_card_matches_the_weights_and_size_limit() -> None:
    from minicpmv.train.demo import sha256

    path = demo_model.path()
    card = json.loads((path / "DEMO_CARD.json").read_text())
    assert card["weights_sha256"] == sha256(path / "model.safetensors")
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert total <= 25 * 2**20, f"demo checkpoint is {total / 2**20:.1f} MiB, over the 25 MiB budget"
    assert set(card["heldout_exact_match"]) == {"colour", "shape", "position", "count", "reading"}


def test_demo_model_answers_the_example_image() -> None:
    from PIL import Image

    from minicpmv.api import load

    chat = load(str(demo_model.path()), dtype="float32")
    img = Image.open(EXAMPLE).convert("RGB")
    ask = lambda q: chat.chat([{"role": "user", "content": [img, q]}], sampling=False, max_new_tokens=8)  # noqa: E731
    assert ask("What colour is the shape?") == "red"
    assert ask("How many shapes are there?") == "1"


def test_cli_chat_defaults_to_the_demo_model(capsys: pytest.CaptureFixture[str]) -> None:
    from minicpmv.cli import main

    assert main(["chat", "--image", str(EXAMPLE), "--greedy", "--max-new-tokens", "8",
                 "What colour is the shape?"]) == 0
    assert capsys.readouterr().out.strip() == "red"


def test_missing_demo_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_model, "_HERE", tmp_path)
    with pytest.raises(CheckpointError, match="pass --model"):
        demo_model.path()
