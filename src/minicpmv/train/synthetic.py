"""Training pictures for the demo model: seeded scenes of shapes, printed text and "other" images.

Every picture comes from a seeded ``random.Random``, so a (seed, index) pair always gives the same
scene, pixels and labels. Three kinds of scene (``make_scene``):

- ``shapes``: 1-9 filled shapes (``demo_world.SHAPES``) in colours sampled from hue/saturation/value
  ranges per colour name, apart from each other, on a light, dark or tinted background (some with
  a gentle gradient), on a canvas of any aspect ratio from 2:5 to 5:2 (160-520 px on the shorter side);
- ``text``: one line of 1-12 letters/digits (lower, upper, capitalised, digits, codes or mixed) in
  one of ``TRAIN_FONTS`` (none of them used by the evaluation), or, for the vision pretraining
  only (``lines=True``), several lines for more characters per picture;
- ``other``: what the model must refuse: noise textures, blurred blobs, overlapping clutter,
  drawings made of touching parts (house, tree, face, landscape) and scribbles.

``render`` draws a scene at its canvas size and returns the object-id and character-id masks used
by ``dense_labels``, which gives the vision pretraining targets per patch (colour, shape, position
bin, size bin, same-shape/same-colour counts of the object there, character and its index in its
line) and per resampler slot (``SLOT_NAMES``). ``char_grid`` draws characters one per patch cell
(with per-patch labels) for an optional character curriculum. Questions and answers live in
``synthetic_qa.py``; nothing here trains or evaluates.
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from ..processing.image import make_slices
from ..processing.slicing import plan_slices
from .demo_world import ALPHABET, COLOURS, MAX_CHARS, MAX_OBJECTS, SHAPES

VIEW = 224  # scale_resolution of the demo model: every picture is seen as one ~224x224 view
PATCH = 14
XBINS = 12  # horizontal / vertical position bins of an object's centre (3x3 cell = 4x4 bins)
SIZE_EDGES = (0.06, 0.09, 0.12, 0.16, 0.21, 0.27, 0.35)  # sqrt(area) / shorter side -> 8 bins
IGNORE = -100
FONT_ROOT = Path("/usr/share/fonts")
TRAIN_FONTS = (
    "opentype/cantarell/Cantarell-Regular.otf", "opentype/cantarell/Cantarell-Bold.otf",
    "opentype/comic-neue/ComicNeue-Regular.otf", "opentype/comic-neue/ComicNeue-Bold.otf",
    "opentype/ebgaramond/EBGaramond12-Regular.otf",
    "opentype/linux-libertine/LinBiolinum_R.otf", "opentype/linux-libertine/LinBiolinum_RB.otf",
    "opentype/linux-libertine/LinLibertine_R.otf", "opentype/linux-libertine/LinLibertine_RB.otf",
    "opentype/urw-base35/C059-Roman.otf", "opentype/urw-base35/C059-Bold.otf",
    "opentype/urw-base35/P052-Roman.otf", "opentype/urw-base35/P052-Bold.otf",
    "opentype/urw-base35/URWBookman-Light.otf", "opentype/urw-base35/URWBookman-Demi.otf",
    "opentype/urw-base35/URWGothic-Book.otf", "opentype/urw-base35/URWGothic-Demi.otf",
    "truetype/crosextra/Caladea-Regular.ttf", "truetype/crosextra/Caladea-Bold.ttf",
    "truetype/crosextra/Carlito-Regular.ttf", "truetype/crosextra/Carlito-Bold.ttf",
    "truetype/inconsolata/Inconsolata.otf",
    "truetype/jetbrains-mono/JetBrainsMono-Regular.ttf", "truetype/jetbrains-mono/JetBrainsMono-Bold.ttf",
    "truetype/karla/Karla-Regular.otf", "truetype/karla/Karla-Bold.otf",
    "truetype/lato/Lato-Regular.ttf", "truetype/lato/Lato-Bold.ttf", "truetype/lato/Lato-Black.ttf",
    "truetype/noto/NotoMono-Regular.ttf", "truetype/noto/NotoSansMono-Bold.ttf",
    "truetype/open-sans/OpenSans-Regular.ttf", "truetype/open-sans/OpenSans-Bold.ttf",
    "truetype/open-sans/OpenSans-CondBold.ttf", "truetype/open-sans/OpenSans-Semibold.ttf",
    "truetype/roboto/unhinted/RobotoTTF/Roboto-Regular.ttf", "truetype/roboto/unhinted/RobotoTTF/Roboto-Bold.ttf",
    "truetype/roboto/unhinted/RobotoTTF/Roboto-Medium.ttf",
    "truetype/roboto/unhinted/RobotoCondensed-Regular.ttf", "truetype/roboto/unhinted/RobotoCondensed-Bold.ttf",
)
FONT_PACKAGES = ("fonts-cantarell", "fonts-comic-neue", "fonts-ebgaramond", "fonts-linuxlibertine",
                 "fonts-urw-base35", "fonts-crosextra-caladea", "fonts-crosextra-carlito", "fonts-inconsolata",
                 "fonts-jetbrains-mono", "fonts-karla", "fonts-lato", "fonts-noto-mono", "fonts-open-sans",
                 "fonts-roboto-unhinted")
# hue ranges (degrees), saturation and value ranges per colour name
HSV_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-12, 8), (0.6, 1.0), (0.55, 1.0)), "orange": ((18, 40), (0.75, 1.0), (0.85, 1.0)),
    "yellow": ((46, 62), (0.6, 1.0), (0.8, 1.0)), "green": ((80, 160), (0.45, 1.0), (0.35, 0.9)),
    "blue": ((195, 240), (0.5, 1.0), (0.45, 1.0)), "purple": ((258, 305), (0.35, 1.0), (0.35, 0.85)),
    "pink": ((310, 352), (0.22, 0.95), (0.86, 1.0)), "brown": ((12, 38), (0.4, 0.9), (0.25, 0.65)),
    "gray": ((0, 360), (0.0, 0.06), (0.35, 0.75)), "black": ((0, 360), (0.0, 0.5), (0.0, 0.16)),
    "white": ((0, 360), (0.0, 0.05), (0.96, 1.0)),
}


@dataclass
class Obj:
    """One shape: name, colour name and RGB, centre and half extents in canvas pixels."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    hw: float
    hh: float
    inner: float = 0.45  # star: inner radius ratio

    def area(self) -> float:
        if self.shape == "circle":
            return math.pi * self.hw * self.hh
        if self.shape in ("square", "rectangle"):
            return 4 * self.hw * self.hh
        if self.shape in ("triangle", "diamond"):
            return 2 * self.hw * self.hh
        return abs(_shoelace(_star(self.cx, self.cy, self.hw, self.inner)))


@dataclass
class Scene:
    """What a picture shows. ``lines`` holds the text lines (one for a ``text`` scene)."""

    kind: str
    width: int
    height: int
    background: tuple[tuple[int, int, int], tuple[int, int, int], str]  # two colours, gradient direction
    objects: list[Obj] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    font: str = ""
    font_px: int = 0
    text_rgb: tuple[int, int, int] = (0, 0, 0)
    text_xy: list[tuple[float, float]] = field(default_factory=list)
    style: str = ""  # the drawing style of an ``other`` scene
    seed: int = 0  # for the textures of ``other`` scenes

    @property
    def text(self) -> str | None:
        return self.lines[0] if self.kind == "text" and len(self.lines) == 1 else None

    def size_of(self, o: Obj) -> float:
        return math.sqrt(o.area()) / min(self.width, self.height)


# -- colours ---------------------------------------------------------------------------------------


def sample_rgb(rng: random.Random, name: str) -> tuple[int, int, int]:
    (h0, h1), (s0, s1), (v0, v1) = HSV_RANGES[name]
    h = (rng.uniform(h0, h1) % 360) / 360
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return (round(r * 255), round(g * 255), round(b * 255))


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def sample_background(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int], str]:
    kind = rng.choices(("light", "dark", "tint"), weights=(0.7, 0.15, 0.15))[0]
    s, v = {"light": ((0, 0.1), (0.9, 1.0)), "dark": ((0, 0.4), (0.05, 0.3)), "tint": ((0.1, 0.3), (0.75, 0.95))}[kind]
    hue = rng.random()

    def one() -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(*s), rng.uniform(*v))
        return (round(r * 255), round(g * 255), round(b * 255))

    first = one()
    direction = rng.choice(("none", "none", "v", "h", "d"))
    return first, (one() if direction != "none" else first), direction


def paint_background(bg: tuple[tuple[int, int, int], tuple[int, int, int], str], w: int, h: int) -> Image.Image:
    a, b, direction = bg
    if direction == "none":
        return Image.new("RGB", (w, h), a)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)  # [h, w]
    fy, fx = ys / max(h - 1, 1), xs / max(w - 1, 1)  # [h, w]
    t = {"v": fy, "h": fx, "d": (fx + fy) / 2}[direction]
    pix = np.asarray(a, np.float32) * (1 - t[..., None]) + np.asarray(b, np.float32) * t[..., None]  # [h, w, 3]
    return Image.fromarray(pix.round().astype(np.uint8), "RGB")


def object_colour(rng: random.Random, bg: tuple[tuple[int, int, int], tuple[int, int, int], str],
                  exclude: set[str] = frozenset()) -> tuple[str, tuple[int, int, int]]:
    """A colour name and shade that stands out from both ends of the background."""
    for _ in range(100):
        name = rng.choice([c for c in COLOURS if c not in exclude])
        rgb = sample_rgb(rng, name)
        if min(_distance(rgb, bg[0]), _distance(rgb, bg[1])) >= 90:
            return name, rgb
    return "black" if sum(bg[0]) > 300 else "white", (0, 0, 0) if sum(bg[0]) > 300 else (255, 255, 255)


# -- scenes ----------------------------------------------------------------------------------------


def canvas_size(rng: random.Random) -> tuple[int, int]:
    short = int(math.exp(rng.uniform(math.log(160), math.log(520))))
    aspect = 1.0 if rng.random() < 0.4 else math.exp(rng.uniform(math.log(0.4), math.log(2.5)))
    return (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))


def _half_extents(rng: random.Random, shape: str, r: float) -> tuple[float, float]:
    if shape == "square":
        return r * 0.88, r * 0.88
    if shape == "rectangle":
        long, short = r * 1.15, r * 1.15 / rng.uniform(1.6, 2.4)
        return (long, short) if rng.random() < 0.6 else (short, long)
    if shape == "triangle":
        return r, r * rng.uniform(0.75, 1.0)
    if shape == "diamond":
        return r * rng.uniform(0.6, 0.85), r
    return r, r


def place_objects(rng: random.Random, w: int, h: int, n: int, bg: Any, *, same: dict[str, str] | None = None
                  ) -> list[Obj]:
    """``n`` shapes apart from each other (a gap of at least 3% of the shorter side)."""
    short = min(w, h)
    rmax = {1: 0.3, 2: 0.2, 3: 0.17, 4: 0.15, 5: 0.13, 6: 0.12}.get(n, 0.105)
    for _ in range(50):
        objs: list[Obj] = []
        for _ in range(n):
            shape = (same or {}).get("shape") or rng.choice(SHAPES)
            colour = (same or {}).get("colour")
            name, rgb = (colour, sample_rgb(rng, colour)) if colour else object_colour(rng, bg)
            for _ in range(60):
                r = rng.uniform(0.06, rmax) * short
                hw, hh = _half_extents(rng, shape, r)
                m = 0.02 * short
                if w - 2 * (hw + m) <= 0 or h - 2 * (hh + m) <= 0:
                    continue
                cx, cy = rng.uniform(hw + m, w - hw - m), rng.uniform(hh + m, h - hh - m)
                gap = 0.03 * short
                if all(abs(cx - o.cx) > hw + o.hw + gap or abs(cy - o.cy) > hh + o.hh + gap for o in objs):
                    objs.append(Obj(shape, name, rgb, cx, cy, hw, hh, rng.uniform(0.38, 0.5)))
                    break
            else:
                break
        if len(objs) == n:
            return objs
        rmax *= 0.85
    raise InputError(f"could not place {n} shapes on a {w}x{h} canvas")


def sample_text(rng: random.Random, n: int | None = None) -> str:
    n = n or rng.choices(range(1, MAX_CHARS + 1), weights=[2, 3, 4, 5, 6, 6, 6, 6, 5, 5, 4, 4])[0]
    style = rng.choices(("lower", "upper", "capital", "digits", "code", "mixed"), weights=(3, 3, 2, 1, 1.5, 2))[0]
    lower, upper, digits = ALPHABET[36:], ALPHABET[10:36], ALPHABET[:10]
    if style == "lower":
        return "".join(rng.choice(lower) for _ in range(n))
    if style == "upper":
        return "".join(rng.choice(upper) for _ in range(n))
    if style == "capital":
        return rng.choice(upper) + "".join(rng.choice(lower) for _ in range(n - 1))
    if style == "digits":
        return "".join(rng.choice(digits) for _ in range(n))
    if style == "code":
        return "".join(rng.choice(upper + digits) for _ in range(n))
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@lru_cache(maxsize=512)
def font(path: str, px: int) -> ImageFont.FreeTypeFont:
    full = FONT_ROOT / path
    if not full.is_file():
        raise InputError(f"training font {full} is missing: apt-get install {' '.join(FONT_PACKAGES)}")
    return ImageFont.truetype(str(full), px)


def check_fonts() -> None:
    """InputError naming the Debian packages when a training font is missing."""
    for path in TRAIN_FONTS:
        font(path, 12)


def _view_scale(w: int, h: int) -> float:
    vw, _ = plan_slices(w, h, max_slice_nums=1, scale_resolution=VIEW).source_size
    return vw / w


def text_scene(rng: random.Random, w: int, h: int, bg: Any, *, lines: int = 1) -> Scene:
    """One line of text (or ``lines`` lines), at least ~9 px tall in the model's view."""
    path = rng.choice(TRAIN_FONTS)
    scale = _view_scale(w, h)
    short = min(w, h)
    texts = [sample_text(rng) for _ in range(lines)]
    hi = 0.32 if lines == 1 else 0.8 / lines
    px = int(rng.uniform(0.09, hi) * short / 0.72)
    while True:
        f = font(path, max(px, 6))
        widths = [f.getlength(t) for t in texts]
        if max(widths) <= 0.94 * w or px <= 6:
            break
        px = int(px * 0.9)
    if px * 0.72 * scale < 9 and lines == 1:  # too small to read in the view: fewer characters, bigger
        keep = max(1, int(len(texts[0]) * (px * 0.72 * scale) / 9))
        return text_scene_fixed(rng, w, h, bg, path, texts[0][:keep])
    return _place_lines(rng, w, h, bg, path, texts, max(px, 6))


def text_scene_fixed(rng: random.Random, w: int, h: int, bg: Any, path: str, text: str) -> Scene:
    px = int(9 / (0.72 * _view_scale(w, h))) + 1
    while font(path, px).getlength(text) > 0.94 * w and len(text) > 1:
        text = text[:-1]
    return _place_lines(rng, w, h, bg, path, [text], px)


def _place_lines(rng: random.Random, w: int, h: int, bg: Any, path: str, texts: list[str], px: int) -> Scene:
    f = font(path, px)
    line_h = px * 1.25
    total = line_h * len(texts)
    y = rng.uniform(0.02 * h, max(0.02 * h, h - total - 0.02 * h))
    xy = []
    for t in texts:
        tw = f.getlength(t)
        xy.append((rng.uniform(0.03 * w, max(0.03 * w, w - tw - 0.03 * w)), y))
        y += line_h
    dark = sum(bg[0]) < 300
    if rng.random() < 0.25:
        _, rgb = object_colour(rng, bg)
    else:
        v = rng.randint(200, 255) if dark else rng.randint(0, 70)
        rgb = (v, v, v) if rng.random() < 0.7 else tuple(min(255, max(0, v + rng.randint(-40, 40))) for _ in range(3))
    return Scene("text", w, h, bg, lines=texts, font=path, font_px=px, text_rgb=rgb, text_xy=xy)  # type: ignore[arg-type]


OTHER_STYLES = ("noise", "blobs", "clutter", "house", "tree", "face", "landscape", "scribble")
# Stage 2 (the questions) with the recipe's stage2_open_world also draws these; stage 1 keeps the
# list above, so that its pictures, hence the bundled tower, stay those of the recipe that made them.
STAGE2_OTHER_STYLES = (*OTHER_STYLES, "photo", "photo", "person", "vehicle", "composite", "composite")


def char_grid(rng: random.Random, jitter: int, chars: int = 40) -> tuple[Image.Image, np.ndarray]:
    """A ``VIEW`` x ``VIEW`` picture of ``chars`` random characters in one training font (11-20 px),
    each in its own patch cell with its centre at most ``jitter`` px from the cell's, and the
    per-patch labels [cells] (1 + index in ``ALPHABET``; 0 = empty cell). The first steps of a
    character curriculum: the tower learns glyphs that one patch holds before misaligned ones."""
    side = VIEW // PATCH
    bg = sample_background(rng)
    img = paint_background(bg, VIEW, VIEW)
    ink = (0, 0, 0) if sum(bg[0]) > 380 else (255, 255, 255)
    f = font(rng.choice(TRAIN_FONTS), rng.randint(11, 20))
    draw = ImageDraw.Draw(img)
    labels = np.zeros(side * side, np.int64)
    for cell in rng.sample(range(side * side), min(chars, side * side)):
        c = rng.choice(ALPHABET)
        r, q = divmod(cell, side)
        dx, dy = rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)
        draw.text((q * PATCH + PATCH // 2 + dx, r * PATCH + PATCH // 2 + dy), c, fill=ink, font=f, anchor="mm")
        labels[cell] = 1 + ALPHABET.index(c)
    return img, labels


def make_scene(rng: random.Random, kind: str, *, n_objects: int | None = None, lines: int = 1,
               size: tuple[int, int] | None = None) -> Scene:
    """A random scene of ``kind`` (shapes, text or other), on a canvas of ``size`` or a random one."""
    w, h = size or canvas_size(rng)
    bg = sample_background(rng)
    if kind == "shapes":
        n = n_objects or rng.choices(range(1, MAX_OBJECTS + 1), weights=[5, 3, 3, 2, 2, 2, 2, 2, 2])[0]
        same = None
        if n > 1 and rng.random() < 0.25:  # same-shape or same-colour groups for the counting questions
            same = {"shape": rng.choice(SHAPES)} if rng.random() < 0.5 else {"colour": object_colour(rng, bg)[0]}
        return Scene("shapes", w, h, bg, objects=place_objects(rng, w, h, n, bg, same=same))
    if kind == "text":
        return text_scene(rng, w, h, bg, lines=lines)
    if kind == "other":
        return Scene("other", w, h, bg, style=rng.choice(OTHER_STYLES), seed=rng.randrange(2**31))
    raise InputError(f"unknown scene kind {kind!r}")


# -- drawing ---------------------------------------------------------------------------------------


def _star(cx: float, cy: float, r: float, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * inner
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    # centre the star's bounding box on (cx, cy): its points reach r up but only r*cos(36deg) down
    lift = (r - r * math.cos(math.pi / 5)) / 2
    return [(x, y + lift) for x, y in pts]


def _shoelace(pts: list[tuple[float, float]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True))


def draw_object(d: ImageDraw.ImageDraw, o: Obj, fill: Any) -> None:
    x0, y0, x1, y1 = o.cx - o.hw, o.cy - o.hh, o.cx + o.hw, o.cy + o.hh
    if o.shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape in ("square", "rectangle"):
        d.rectangle((x0, y0, x1, y1), fill=fill)
    elif o.shape == "triangle":
        d.polygon([(o.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif o.shape == "diamond":
        d.polygon([(o.cx, y0), (x1, o.cy), (o.cx, y1), (x0, o.cy)], fill=fill)
    else:
        d.polygon(_star(o.cx, o.cy, o.hw, o.inner), fill=fill)


def render(scene: Scene, *, masks: bool = False) -> Any:
    """The pixels of ``scene`` at its canvas size; with ``masks=True`` also ``(objects, chars)``:
    "L" images holding, per pixel, the 1-based object index and the 1-based character id
    (characters numbered over all lines in reading order), 0 elsewhere."""
    img = paint_background(scene.background, scene.width, scene.height)
    objs = Image.new("L", img.size, 0) if masks else None
    chars = Image.new("L", img.size, 0) if masks else None
    d = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        draw_object(d, o, o.rgb)
        if objs is not None:
            draw_object(ImageDraw.Draw(objs), o, i + 1)
    if scene.kind == "text":
        _draw_text(d, scene, ImageDraw.Draw(chars) if chars is not None else None)
    if scene.kind == "other":
        from .synthetic_other import draw_other

        img = draw_other(img, scene.style, random.Random(scene.seed))
    return (img, (objs, chars)) if masks else img


def _draw_text(d: ImageDraw.ImageDraw, scene: Scene, mask: ImageDraw.ImageDraw | None) -> None:
    f = font(scene.font, scene.font_px)
    cid = 0
    for text, (x, y) in zip(scene.lines, scene.text_xy, strict=True):
        d.text((x, y), text, fill=scene.text_rgb, font=f)
        if mask is None:
            continue
        top, bottom = y + f.getbbox("Hg")[1], y + f.getbbox("Hg")[3]
        for i in range(len(text)):
            cid += 1
            a, b = x + f.getlength(text[:i]), x + f.getlength(text[: i + 1])
            mask.rectangle((a, top, max(a, b - 1), bottom), fill=cid)


# -- dense labels ----------------------------------------------------------------------------------

SLOT_NAMES = ("global", "largest", "smallest", *(f"shape:{s}" for s in SHAPES), *(f"colour:{c}" for c in COLOURS),
              *(f"char:{i}" for i in range(MAX_CHARS)))
WORLD = ("shapes", "text", "other")


def view_of(img: Image.Image) -> Image.Image:
    """The single ~224x224 view the model sees of ``img`` (the processor's resize, no slicing)."""
    plan = plan_slices(img.width, img.height, max_slice_nums=1, scale_resolution=VIEW)
    return make_slices(img, plan)[0]


def _patch_majority(mask: Image.Image, size: tuple[int, int], thresh: float) -> np.ndarray:
    """Per patch of the view: the id covering most of it (if at least ``thresh``), else 0. [h*w]"""
    m = np.asarray(mask.resize(size, Image.NEAREST))  # [H, W]
    hp, wp = size[1] // PATCH, size[0] // PATCH
    blocks = m[: hp * PATCH, : wp * PATCH].reshape(hp, PATCH, wp, PATCH).transpose(0, 2, 1, 3).reshape(hp * wp, -1)
    best = np.zeros(hp * wp, np.int64)
    best_frac = np.zeros(hp * wp, np.float32)
    for v in np.unique(blocks):
        if v == 0:
            continue
        frac = (blocks == v).mean(axis=1)  # [L]
        take = (frac > best_frac) & (frac >= thresh)
        best[take], best_frac[take] = int(v), frac[take]
    return best


def size_bin(size: float) -> int:
    return int(np.searchsorted(SIZE_EDGES, size))


def object_facts(scene: Scene, o: Obj) -> dict[str, int]:
    """Class ids (1-based; 0 = none) of one object's attributes."""
    same_shape = sum(p.shape == o.shape for p in scene.objects)
    same_colour = sum(p.colour == o.colour for p in scene.objects)
    return {"colour": 1 + COLOURS.index(o.colour), "shape": 1 + SHAPES.index(o.shape),
            "xbin": 1 + min(int(o.cx / scene.width * XBINS), XBINS - 1),
            "ybin": 1 + min(int(o.cy / scene.height * XBINS), XBINS - 1),
            "size": 1 + size_bin(scene.size_of(o)), "nshape": same_shape, "ncolour": same_colour}


PATCH_HEADS = {"colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "xbin": 1 + XBINS, "ybin": 1 + XBINS,
               "size": 1 + len(SIZE_EDGES) + 1, "nshape": 1 + MAX_OBJECTS, "ncolour": 1 + MAX_OBJECTS,
               "char": 1 + len(ALPHABET), "index": 1 + MAX_CHARS, "world": len(WORLD), "count": 1 + MAX_OBJECTS}


def patch_labels(scene: Scene, masks: tuple[Image.Image, Image.Image], view: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per-patch targets [L] (row-major over the view's patches); 0 = nothing there."""
    objs = _patch_majority(masks[0], view, 0.25)
    chars = _patch_majority(masks[1], view, 0.2)
    facts = [object_facts(scene, o) for o in scene.objects]
    out = {k: np.zeros(objs.shape, np.int64) for k in PATCH_HEADS}
    for i, f in enumerate(facts):
        sel = objs == i + 1
        for k, v in f.items():
            out[k][sel] = v
    char_ids, index_ids = [0], [0]
    for text in scene.lines:
        char_ids += [1 + ALPHABET.index(c) for c in text]
        index_ids += list(range(1, len(text) + 1))
    out["char"] = np.asarray(char_ids)[chars]
    out["index"] = np.asarray(index_ids)[chars]
    out["world"][:] = WORLD.index(scene.kind)
    out["count"][:] = len(scene.objects) if scene.kind == "shapes" else (0 if scene.kind == "text" else IGNORE)
    return out


def _object_slot(scene: Scene, group: list[Obj]) -> dict[str, int]:
    """Slot targets for the objects a slot is keyed to: attributes shared by all of them."""
    out = {"present": int(bool(group))}
    if not group:
        return out
    facts = [object_facts(scene, o) for o in group]
    for k in ("colour", "shape", "xbin", "ybin", "size"):
        vals = {f[k] for f in facts}
        out[k] = vals.pop() if len(vals) == 1 and (k in ("colour", "shape") or len(group) == 1) else IGNORE
    out["count"] = len(group)
    return out


def _extreme(scene: Scene, largest: bool) -> list[Obj]:
    objs = sorted(scene.objects, key=scene.size_of, reverse=largest)
    if len(objs) > 1:
        a, b = scene.size_of(objs[0]), scene.size_of(objs[1])
        if max(a, b) / min(a, b) < 1.15:
            return []  # no clear largest/smallest: the slot is not supervised
    return objs[:1]


def slot_labels(scene: Scene) -> list[dict[str, int]]:
    """Targets of each resampler slot in ``SLOT_NAMES`` order (missing key = not supervised)."""
    objs = scene.objects
    world = {"world": WORLD.index(scene.kind)}
    if scene.kind == "shapes":
        world["count"] = len(objs)
        for s in SHAPES:
            world[f"n:{s}"] = sum(o.shape == s for o in objs)
        for c in COLOURS:
            world[f"n:{c}"] = sum(o.colour == c for o in objs)
    elif scene.kind == "text":
        world["count"] = 0
        if scene.text is not None:
            world["nchars"] = len(scene.text)
    slots = [world]
    if scene.kind == "other":
        return slots + [{} for _ in SLOT_NAMES[1:]]
    for largest in (True, False):
        group = _extreme(scene, largest)
        slots.append(_object_slot(scene, group) if group or not objs else {})
    slots += [_object_slot(scene, [o for o in objs if o.shape == s]) for s in SHAPES]
    slots += [_object_slot(scene, [o for o in objs if o.colour == c]) for c in COLOURS]
    text = scene.text
    for i in range(MAX_CHARS):
        if scene.kind == "text" and text is None:
            slots.append({})
        else:
            slots.append({"char": 1 + ALPHABET.index(text[i]) if text and i < len(text) else 0})
    return slots
