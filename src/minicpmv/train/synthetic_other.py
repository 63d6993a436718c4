"""Training pictures outside the demo model's world, which it learns to refuse.

``draw_other(canvas, style, rng)`` paints over a background canvas in one of
``synthetic.OTHER_STYLES``: photo-like textures (multi-scale noise, blurred blobs), clutter of
overlapping shapes and lines, drawings whose parts touch (house, tree, face, landscape) and
scribbles. They share one property the in-world pictures never have: parts that touch or
overlap, strokes, or texture. Stage 2 with the recipe's ``stage2_open_world`` also draws
``synthetic.STAGE2_OTHER_STYLES``: photo-like scenes (shaded sky and ground, soft objects, grain),
figures, cars and boats, and pictures combining several drawings; with ``stage2_real_photos``,
crops of the photos scikit-image ships (``photo_dir``). This module only draws; labels and
questions live elsewhere.
"""

from __future__ import annotations

import importlib.util
import math
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import InputError

# Photos scikit-image ships in ``skimage/data`` (read as files; skimage itself is not imported).
# None of them is among the evaluation's photos (the JPEGs inside gradio).
PHOTO_FILES = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
               "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
               "motorcycle_left.png", "retina.jpg", "rocket.jpg")


def _rgb(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def _noise(canvas: Image.Image, rng: random.Random) -> Image.Image:
    w, h = canvas.size
    out = np.zeros((h, w, 3), np.float32)  # [h, w, 3]
    nrng = np.random.default_rng(rng.randrange(2**31))
    for octave in range(rng.randint(2, 5)):
        cells = 2 ** (octave + 1)
        small = nrng.random((cells, cells, 3)).astype(np.float32) * 255  # [c, c, 3]
        layer = Image.fromarray(small.astype(np.uint8), "RGB").resize((w, h), Image.BICUBIC)
        out += np.asarray(layer, np.float32) / 2 ** (octave + 1)
    out = (out - out.min()) / max(float(np.ptp(out)), 1.0) * 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _blobs(canvas: Image.Image, rng: random.Random) -> Image.Image:
    w, h = canvas.size
    img = Image.new("RGB", (w, h), _rgb(rng))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(8, 30)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.4) * min(w, h)
        d.ellipse((cx - r, cy - r * rng.uniform(0.4, 1.2), cx + r, cy + r), fill=_rgb(rng))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.01, 0.05) * min(w, h)))


def _clutter(canvas: Image.Image, rng: random.Random) -> Image.Image:
    w, h = canvas.size
    d = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(6, 16)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.3) * min(w, h)
        if rng.random() < 0.5:
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_rgb(rng))
        else:
            d.polygon([(cx + r * math.cos(a), cy + r * math.sin(a))
                       for a in sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 6)))], fill=_rgb(rng))
        d.line((rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)), fill=_rgb(rng),
               width=max(1, int(rng.uniform(0.005, 0.03) * min(w, h))))
    return canvas


def _house(canvas: Image.Image, rng: random.Random) -> Image.Image:
    w, h = canvas.size
    s = min(w, h) * rng.uniform(0.35, 0.6)
    x0, y0 = rng.uniform(0.05 * w, w - s - 0.05 * w), rng.uniform(0.3 * h, h - s * 0.8 - 0.03 * h)
    d = ImageDraw.Draw(canvas)
    d.rectangle((x0, y0, x0 + s, y0 + s * 0.8), fill=_rgb(rng), outline=(0, 0, 0) if rng.random() < 0.5 else None)
    d.polygon([(x0 - s * 0.1, y0), (x0 + s * 1.1, y0), (x0 + s / 2, y0 - s * rng.uniform(0.4, 0.7))], fill=_rgb(rng))
    d.rectangle((x0 + s * 0.4, y0 + s * 0.4, x0 + s * 0.6, y0 + s * 0.8), fill=_rgb(rng))
    for wx in (0.12, 0.68):
        d.rectangle((x0 + s * wx, y0 + s * 0.15, x0 + s * (wx + 0.2), y0 + s * 0.35), fill=_rgb(rng))
    return canvas


def _tree(canvas: Image.Image, rng: random.Random) -> Image.Image:
    w, h = canvas.size
    s = min(w, h) * rng.uniform(0.3, 0.5)
    cx = rng.uniform(0.3 * w, 0.7 * w)
    base = h * rng.uniform(0.8, 0.97)
    d = ImageDraw.Draw(canvas)
    d.rectangle((cx - s * 0.1, base - s, cx + s * 0.1, base), fill=(rng.randint(80, 140), rng.randint(40, 80), 20))
    green = (rng.randint(0, 80), rng.randint(110, 200), rng.randint(0, 80))
    for _ in range(rng.randint(1, 4)):
        ox, oy, r = rng.uniform(-0.3, 0.3) * s, rng.uniform(-0.2, 0.2) * s, s * rng.uniform(0.35, 0.6)
        d.ellipse((cx + ox - r, base - s + oy - r, cx + ox + r, base - s + oy + r), fill=green)
    return canvas


def _face(canvas: Image.Image, rng: random.Random) -> Image.Image:
    w, h = canvas.size
    r = min(w, h) * rng.uniform(0.25, 0.45)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    d = ImageDraw.Draw(canvas)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_rgb(rng), outline=(0, 0, 0), width=max(1, int(r / 20)))
    for ex in (-0.35, 0.35):
        e = r * 0.12
        d.ellipse((cx + ex * r - e, cy - 0.25 * r - e, cx + ex * r + e, cy - 0.25 * r + e), fill=(0, 0, 0))
    d.arc((cx - 0.5 * r, cy - 0.2 * r, cx + 0.5 * r, cy + 0.55 * r), 20, 160, fill=(0, 0, 0), width=max(1, int(r / 15)))
    return canvas


def _landscape(canvas: Image.Image, rng: random.Random) -> Image.Image:
    w, h = canvas.size
    sky = np.linspace(rng.uniform(120, 200), 255, h, dtype=np.float32)[:, None, None]  # [h, 1, 1]
    tint = np.asarray([0.55, 0.75, 1.0], np.float32)[None, None, :]
    img = Image.fromarray(np.broadcast_to(sky * tint, (h, w, 3)).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    horizon = h * rng.uniform(0.5, 0.75)
    pts = [(x, horizon + math.sin(x / w * rng.uniform(2, 8)) * h * 0.05) for x in np.linspace(0, w, 20)]
    d.polygon([*pts, (w, h), (0, h)], fill=(rng.randint(20, 90), rng.randint(110, 190), rng.randint(20, 80)))
    r = min(w, h) * rng.uniform(0.06, 0.12)
    sx, sy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.08, 0.3) * h
    d.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(255, rng.randint(200, 240), 40))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2)))


def _scribble(canvas: Image.Image, rng: random.Random) -> Image.Image:
    w, h = canvas.size
    d = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(1, 5)):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        pts = [(x, y)]
        for _ in range(rng.randint(5, 30)):
            x = min(max(x + rng.uniform(-0.2, 0.2) * w, 0), w)
            y = min(max(y + rng.uniform(-0.2, 0.2) * h, 0), h)
            pts.append((x, y))
        d.line(pts, fill=_rgb(rng), width=max(1, int(rng.uniform(0.005, 0.03) * min(w, h))), joint="curve")
    return canvas


def _photo(canvas: Image.Image, rng: random.Random) -> Image.Image:
    """A photo-like scene: shaded sky and ground, soft objects with highlights, sensor noise."""
    w, h = canvas.size
    horizon = int(h * rng.uniform(0.2, 0.8))
    top, low = np.asarray(_rgb(rng), np.float32), np.asarray(_rgb(rng), np.float32)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]  # [h, 1, 1]
    img = np.broadcast_to(top * (1 - ramp) + low * ramp, (h, w, 3)).copy()  # [h, w, 3]
    ground = np.asarray(_noise(canvas, rng), np.float32) * rng.uniform(0.3, 0.8)  # [h, w, 3]
    img[horizon:] = img[horizon:] * 0.4 + ground[horizon:]
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(out)
    for _ in range(rng.randint(2, 10)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0.3 * h, h), rng.uniform(0.04, 0.3) * min(w, h)
        c = _rgb(rng)
        d.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r), fill=c)
        hi = tuple(min(255, v + 60) for v in c)
        d.ellipse((cx - r * 0.5, cy - r * 0.6, cx, cy - r * 0.1), fill=hi)
    out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 3)))
    grain = np.random.default_rng(rng.randrange(2**31)).normal(0, rng.uniform(2, 14), (h, w, 3))  # [h, w, 3]
    return Image.fromarray((np.asarray(out, np.float32) + grain).clip(0, 255).astype(np.uint8), "RGB")


def _person(canvas: Image.Image, rng: random.Random) -> Image.Image:
    """A stick figure or a filled figure with a round head."""
    w, h = canvas.size
    s = min(w, h) * rng.uniform(0.3, 0.8)
    cx, top = rng.uniform(0.3, 0.7) * w, rng.uniform(0.05, 0.3) * h
    d = ImageDraw.Draw(canvas)
    c, lw = _rgb(rng), max(2, int(s / rng.uniform(15, 40)))
    r = s * 0.12
    d.ellipse((cx - r, top, cx + r, top + 2 * r), fill=_rgb(rng), outline=c, width=lw)
    neck, hip = top + 2 * r, top + s * 0.6
    d.line((cx, neck, cx, hip), fill=c, width=lw)
    for side in (-1, 1):
        d.line((cx, neck + s * 0.1, cx + side * s * rng.uniform(0.15, 0.3), neck + s * rng.uniform(0, 0.3)), fill=c,
               width=lw)
        d.line((cx, hip, cx + side * s * rng.uniform(0.1, 0.25), top + s), fill=c, width=lw)
    return canvas


def _vehicle(canvas: Image.Image, rng: random.Random) -> Image.Image:
    """A car (body, cabin, wheels) or a sailing boat (hull, mast, sail) on a line of ground or water."""
    w, h = canvas.size
    s = min(w, h) * rng.uniform(0.35, 0.7)
    x0, base = rng.uniform(0.05 * w, max(0.06 * w, w - s - 0.05 * w)), h * rng.uniform(0.6, 0.9)
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, base, w, h), fill=_rgb(rng))
    if rng.random() < 0.5:
        d.rectangle((x0, base - s * 0.35, x0 + s, base - s * 0.1), fill=_rgb(rng))
        d.polygon([(x0 + s * 0.2, base - s * 0.35), (x0 + s * 0.3, base - s * 0.55), (x0 + s * 0.7, base - s * 0.55),
                   (x0 + s * 0.8, base - s * 0.35)], fill=_rgb(rng))
        for fx in (0.22, 0.78):
            r = s * 0.11
            d.ellipse((x0 + s * fx - r, base - s * 0.1 - r, x0 + s * fx + r, base - s * 0.1 + r), fill=(20, 20, 20))
    else:
        d.polygon([(x0, base - s * 0.2), (x0 + s, base - s * 0.2), (x0 + s * 0.8, base), (x0 + s * 0.2, base)],
                  fill=_rgb(rng))
        mast = x0 + s * rng.uniform(0.4, 0.6)
        d.line((mast, base - s * 0.2, mast, base - s), fill=(60, 40, 20), width=max(1, int(s / 40)))
        d.polygon([(mast, base - s), (mast, base - s * 0.25), (mast + s * 0.35, base - s * 0.25)], fill=_rgb(rng))
    return canvas


def _composite(canvas: Image.Image, rng: random.Random) -> Image.Image:
    """Two or three of the drawings above on one canvas (a child's picture of a scene)."""
    parts = rng.sample([_house, _tree, _face, _person, _vehicle], rng.randint(2, 3))
    if rng.random() < 0.4:
        canvas = _landscape(canvas, rng)
    for part in parts:
        canvas = part(canvas, rng)
    return canvas


def photo_dir() -> Path:
    """Where scikit-image's photos are; ``InputError`` if it is not installed or lacks them."""
    spec = importlib.util.find_spec("skimage")  # finds the package without importing it
    root = Path(next(iter(spec.submodule_search_locations or []), "")) / "data" if spec else None
    missing = [f for f in PHOTO_FILES if root is None or not (root / f).is_file()]
    if missing:
        raise InputError(f"stage2_real_photos needs the photos scikit-image ships ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''} not found): pip install scikit-image")
    return root


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    """scikit-image's photos, found and read once per process (not once per picture drawn)."""
    root = photo_dir()
    return tuple(Image.open(root / f).convert("RGB") for f in PHOTO_FILES)


def _real_photo(canvas: Image.Image, rng: random.Random) -> Image.Image:
    """A crop (40-100% of each side) of one of scikit-image's photos, resized to the canvas."""
    photo = rng.choice(_photos())
    cw, ch = int(photo.width * rng.uniform(0.4, 1)), int(photo.height * rng.uniform(0.4, 1))
    x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
    return photo.crop((x, y, x + cw, y + ch)).resize(canvas.size, Image.BICUBIC)


_STYLES = {"noise": _noise, "blobs": _blobs, "clutter": _clutter, "house": _house, "tree": _tree, "face": _face,
           "landscape": _landscape, "scribble": _scribble, "photo": _photo, "person": _person, "vehicle": _vehicle,
           "composite": _composite, "real_photo": _real_photo}


def draw_other(canvas: Image.Image, style: str, rng: random.Random) -> Image.Image:
    """``canvas`` (the scene's background) painted in ``style``; may return a new image."""
    return _STYLES[style](canvas, rng)
