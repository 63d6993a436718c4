"""Training pictures outside the demo model's world, which it learns to refuse.

``draw_other(canvas, style, rng)`` paints over a background canvas in one of
``synthetic.OTHER_STYLES``: photo-like textures (multi-scale noise, blurred blobs), clutter of
overlapping shapes and lines, drawings whose parts touch (house, tree, face, landscape) and
scribbles. They share one property the in-world pictures never have: parts that touch or
overlap, strokes, or texture. This module only draws; labels and questions live elsewhere.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


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


_STYLES = {"noise": _noise, "blobs": _blobs, "clutter": _clutter, "house": _house, "tree": _tree, "face": _face,
           "landscape": _landscape, "scribble": _scribble}


def draw_other(canvas: Image.Image, style: str, rng: random.Random) -> Image.Image:
    """``canvas`` (the scene's background) painted in ``style``; may return a new image."""
    return _STYLES[style](canvas, rng)
