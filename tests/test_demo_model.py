"""The bundled demo checkpoint: present, the one its card describes, the CLI's default model, and
right about the README's example and a handful of pictures drawn here by hand (not by a generator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from minicpmv import demo_model
from minicpmv.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def chat():
    from minicpmv.api import load

    return load(str(demo_model.path()), dtype="float32")


def ask(chat, images: list[Image.Image], question: str) -> str:
    return chat.chat([{"role": "user", "content": [*images, question]}], sampling=False, num_beams=1,
                     repetition_penalty=1.0, max_new_tokens=32)


def test_card_matches_the_weights_and_size_limit() -> None:
    from minicpmv.train.demo import sha256

    path = demo_model.path()
    card = json.loads((path / "DEMO_CARD.json").read_text())
    assert card["weights_sha256"] == sha256(path / "model.safetensors")
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert total <= 25 * 2**20, f"demo checkpoint is {total / 2**20:.1f} MiB, over the 25 MiB budget"
    assert card["seed"] == 0


def test_cli_chat_defaults_to_the_demo_model(capsys: pytest.CaptureFixture[str]) -> None:
    from minicpmv.cli import main

    assert main(["chat", "--image", str(EXAMPLES / "shapes.png"), "--greedy", "--max-new-tokens", "8",
                 "What colour is the shape?"]) == 0
    assert capsys.readouterr().out == "red\n"


def test_missing_demo_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_model, "_HERE", tmp_path)
    with pytest.raises(CheckpointError, match="pass --model"):
        demo_model.path()


def _canvas(w: int, h: int, bg: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (w, h), bg)
    return img, ImageDraw.Draw(img)


def _red_circle() -> Image.Image:
    img, d = _canvas(300, 300)
    d.ellipse((90, 90, 210, 210), fill=(230, 20, 20))
    return img


def _three_green_triangles() -> Image.Image:
    img, d = _canvas(600, 300)
    for x in (100, 300, 500):
        d.polygon([(x, 100), (x + 60, 200), (x - 60, 200)], fill=(30, 160, 40))
    return img


def _square_and_star() -> Image.Image:
    img, d = _canvas(500, 400)
    d.rectangle((60, 150, 180, 270), fill=(220, 30, 30))  # red square on the left
    d.polygon([(380, 120), (400, 180), (460, 180), (410, 215), (430, 275), (380, 240), (330, 275), (350, 215),
               (300, 180), (360, 180)], fill=(40, 90, 220))  # blue star on the right
    return img


def _house() -> Image.Image:
    return Image.open(EXAMPLES / "house.png").convert("RGB")


def _blue_square_top_left() -> Image.Image:
    img, d = _canvas(448, 448)
    d.rectangle((30, 30, 130, 130), fill=(20, 60, 230))
    return img


# What the bundled model gets right among pictures drawn here by hand. It gets these wrong (the
# README's evaluation table has the rates): on _square_and_star, "What colour is the star?" ("red",
# the square's colour), "Is the square left of the star?" ("no") and "Where is the star?" ("left");
# on _three_green_triangles, "How many triangles are there?" ("1") and "What colour are the
# triangles?" ("2": no training question is worded so); and it cannot read (issue 21).
CASES = [
    (_red_circle, "What colour is the shape?", "red"),
    (_red_circle, "What shape is this?", "circle"),
    (_blue_square_top_left, "Where is the shape?", "top left"),
    (_square_and_star, "What colour is the square?", "red"),
    (_three_green_triangles, "How many shapes are there?", "3"),
    (_house, "What is in this image?", "I only know simple shapes, colours, counts, positions and text."),
]


@pytest.mark.parametrize(("draw", "question", "answer"), CASES, ids=[f"{d.__name__}:{q}" for d, q, _ in CASES])
def test_demo_model_answers_hand_made_pictures(chat, draw, question: str, answer: str) -> None:
    assert ask(chat, [draw()], question) == answer


def test_demo_model_answers_change_with_the_picture(chat) -> None:
    """The answers come from the pixels, not from the question wording."""
    answers = set()
    for rgb, expected in (((230, 20, 20), "red"), ((20, 60, 230), "blue")):
        img, d = _canvas(300, 300)
        d.ellipse((90, 90, 210, 210), fill=rgb)
        got = ask(chat, [img], "What colour is the shape?")
        assert got == expected
        answers.add(got)
    assert len(answers) == 2
