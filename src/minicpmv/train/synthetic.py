"""Synthetic visual-question data for the demo model: shapes, colours, positions, counts, words.

Every image is drawn from a seeded ``random.Random``, so a (seed, index) pair always gives the same
image, question and answer. Four kinds of image:

- ``single``: one shape (circle, square, triangle, star) in one of six colours, in one of the nine
  cells of a 3x3 grid; asked for its colour, shape, position and count (multi-turn, random order);
- ``many``: 2 to 6 shapes in distinct cells; asked how many there are;
- ``word``: a word from ``WORDS`` printed at a legible size on a 224x224 canvas;
- ``bigword``: a 448x448 canvas with the word printed small inside one quadrant, so that it can
  only be read at slice resolution (the 224-pixel overview halves it).

``dense_labels`` gives the per-image targets the recipe pretrains the vision tower on (per-cell
colour and shape, count, the word's letters and id). Records follow the official fine-tuning
format (``id``, ``image``, ``conversations``). This module does not train anything (``demo.py``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

CANVAS = 224
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220),
    "yellow": (240, 200, 20), "purple": (148, 72, 189), "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WORDS = tuple("""
apple bird boat book cake car cat chair cloud cup desk dog door duck egg fish flag frog gift goat
hand hat home horse key kite lamp leaf lion map milk moon mouse nest net owl pen pig rain ring road
rock rose sand ship shoe sock star sun table tent tiger tree train truck van vase wall web whale
wind wolf zoo bell bread clock coat corn crab drum fan fork fox gate glass grape hill ice jam jar
king lake lock nose oak pear pie plum pot queen rope salt seed snow soup spoon tap toy wave yarn
""".split())
MAX_LETTERS = 8
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What color is the shape?", "Which colour is the object?",
               "What is the colour of the shape in the picture?"),
    "shape": ("What shape is this?", "What shape is in the image?", "Which shape do you see?",
              "Name the shape in the picture."),
    "position": ("Where is the shape?", "Where is the shape in the image?",
                 "In which part of the image is the shape?", "Where is the object located?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes.",
              "How many objects do you see?"),
    "reading": ("What word is written in the image?", "What does the text say?", "Read the word in the image.",
                "What is written here?"),
}
FAMILIES = tuple(QUESTIONS)
KINDS = ("single", "many", "word", "bigword")


@dataclass
class Scene:
    """What an image shows: shapes per cell (index 0..8) and/or a word."""

    kind: str
    size: int
    cells: dict[int, tuple[str, str]] = field(default_factory=dict)  # cell -> (colour, shape)
    word: str | None = None
    quadrant: int = 0  # bigword: the quadrant (slice) holding the word, 0..3 row-major

    def crop_box(self) -> tuple[int, int, int, int]:
        """The 224x224 region (one slice of a 448x448 image) that holds the word."""
        x, y = (self.quadrant % 2) * CANVAS, (self.quadrant // 2) * CANVAS
        return (x, y, x + CANVAS, y + CANVAS)

    def qa(self, family: str) -> str:
        """The exact answer of ``family`` for this scene."""
        if family == "count":
            return str(len(self.cells))
        if family == "reading":
            assert self.word is not None
            return self.word
        (cell, (colour, shape)), = self.cells.items()
        return {"colour": colour, "shape": shape, "position": POSITIONS[cell]}[family]

    def families(self) -> tuple[str, ...]:
        if self.kind == "single":
            return ("colour", "shape", "position", "count")
        return ("count",) if self.kind == "many" else ("reading",)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: Any) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=fill)
    else:
        d.polygon(_star(cx, cy, r * 1.1), fill=fill)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _background(rng: random.Random, size: int) -> Image.Image:
    tone = rng.randint(228, 255)
    return Image.new("RGB", (size, size), (tone, tone, rng.randint(max(220, tone - 8), 255)))


def make_scene(rng: random.Random, kind: str) -> Scene:
    """Draw the content of a scene (no pixels yet)."""
    if kind in ("single", "many"):
        k = 1 if kind == "single" else rng.randint(2, 6)
        cells = rng.sample(range(9), k)
        return Scene(kind, CANVAS, {c: (rng.choice(list(COLOURS)), rng.choice(SHAPES)) for c in cells})
    return Scene(kind, CANVAS if kind == "word" else 2 * CANVAS, word=rng.choice(WORDS), quadrant=rng.randrange(4))


def render(scene: Scene, rng: random.Random, *, masks: bool = False) -> Any:
    """The pixels of ``scene`` (jittered positions, sizes and tones drawn from ``rng``).

    With ``masks=True`` returns ``(image, masks)``: three "L" images of the same size holding, per
    pixel, the colour id and shape id (1-based, 0 = none) of the shape drawn there and the letter id
    (1..26) of the character box there.
    """
    img = _background(rng, scene.size)
    layers = [img] + ([Image.new("L", img.size, 0) for _ in range(3)] if masks else [])
    draws = [ImageDraw.Draw(x) for x in layers]
    cell = scene.size / 3
    for c, (colour, shape) in sorted(scene.cells.items()):
        r = rng.uniform(16, 26)
        cx = (c % 3 + 0.5) * cell + rng.uniform(-7, 7)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-7, 7)
        fills = [COLOURS[colour], 1 + list(COLOURS).index(colour), 1 + SHAPES.index(shape)]
        for d, fill in zip(draws[:3], fills, strict=False):
            _draw_shape(d, shape, cx, cy, r, fill)
    if scene.word is not None:
        _draw_word(draws, scene, rng)
    return (img, layers[1:]) if masks else img


def _draw_word(draws: list[ImageDraw.ImageDraw], scene: Scene, rng: random.Random) -> None:
    size = rng.randint(48, 64) if scene.kind == "word" else rng.randint(30, 36)
    word = scene.word or ""
    while True:  # shrink until the word fits its 224-pixel region with a margin
        font = _font(size)
        x0, y0, x1, y1 = draws[0].textbbox((0, 0), word, font=font)
        if x1 - x0 <= CANVAS - 16 or size <= 12:
            break
        size -= 2
    w, h = x1 - x0, y1 - y0
    if scene.kind == "word":
        ox, oy, span = 0, 0, scene.size
    else:  # inside one quadrant, away from the slice borders
        span = CANVAS
        ox, oy = scene.crop_box()[:2]
    x = ox + rng.uniform(6, max(6.0, span - w - 6)) - x0
    y = oy + rng.uniform(6, max(6.0, span - h - 6)) - y0
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    draws[0].text((x, y), word, fill=ink, font=font)
    if len(draws) == 4:  # letter boxes
        for i, ch in enumerate(word):
            a, b = x + font.getlength(word[:i]), x + font.getlength(word[: i + 1])
            draws[3].rectangle((a, y + y0, b - 1, y + y1), fill=1 + ord(ch) - ord("a"))


def dense_labels(scene: Scene) -> dict[str, Any]:
    """Pretraining targets: per-cell colour (0 none) and shape (0 none), count, letters, word id."""
    colour_ids = [0] * 9
    shape_ids = [0] * 9
    for c, (colour, shape) in scene.cells.items():
        colour_ids[c] = 1 + list(COLOURS).index(colour)
        shape_ids[c] = 1 + SHAPES.index(shape)
    letters = [0] * MAX_LETTERS
    if scene.word:
        for i, ch in enumerate(scene.word[:MAX_LETTERS]):
            letters[i] = 1 + ord(ch) - ord("a")
    cell_ids = [c + 1 if c in scene.cells else 0 for c in range(9)]
    return {"colour": colour_ids, "shape": shape_ids, "cell": cell_ids, "count": len(scene.cells), "letters": letters,
            "word": 0 if scene.word is None else 1 + WORDS.index(scene.word)}


def conversation(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    """The scene's questions in random order and phrasing; the image marker goes in the first one."""
    fams = list(scene.families())
    rng.shuffle(fams)
    conv = []
    for i, fam in enumerate(fams):
        q = rng.choice(QUESTIONS[fam])
        conv.append({"role": "user", "content": ("<image>\n" + q) if i == 0 else q})
        conv.append({"role": "assistant", "content": scene.qa(fam)})
    return conv


def sample_kind(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def write_split(out: Path, name: str, n: int, seed: int, weights: dict[str, float]) -> Path:
    """Write ``n`` records (images under ``out/name/``) to ``out/name.json``; returns that path."""
    rng = random.Random(seed)
    (out / name).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        scene = make_scene(rng, sample_kind(rng, weights))
        rel = f"{name}/{i:06d}.png"
        render(scene, rng).save(out / rel)
        records.append({"id": f"{name}-{i}", "image": rel, "conversations": conversation(scene, rng),
                        "kind": scene.kind, "answers": {f: scene.qa(f) for f in scene.families()}})
    path = out / f"{name}.json"
    path.write_text(json.dumps(records, indent=0))
    return path
