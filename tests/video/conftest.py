"""Helpers for the video tests: tiny generated videos whose frame k shows the number k.

Frame k carries k in binary as a 4x3 grid of 16x16 black/white blocks (bit b at row b // 4,
column b % 4), which survives lossy codecs, so a test can read back which frame it got.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data"
CONF = DATA / "conformance"
BLOCK = 16
BITS = 12


def code_frame(k: int, width: int = 64, height: int = 48) -> np.ndarray:
    """An RGB frame [H, W, 3] uint8 showing k as a block code."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, :, 2] = 60  # a blue tint so colour channels matter
    for b in range(BITS):
        if k >> b & 1:
            r, c = divmod(b, 4)
            arr[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = 255
    return arr


def read_code(img: Image.Image) -> int:
    """The number a frame shows (block centres thresholded)."""
    a = np.asarray(img.convert("L"), dtype=np.float64)
    k = 0
    for b in range(BITS):
        r, c = divmod(b, 4)
        m = 4
        if a[r * BLOCK + m : (r + 1) * BLOCK - m, c * BLOCK + m : (c + 1) * BLOCK - m].mean() > 128:
            k |= 1 << b
    return k


def write_video(path: Path, frames: int | list[np.ndarray], fps: float | Fraction, *, codec: str = "libx264",
                options: dict[str, str] | None = None, pix_fmt: str = "yuv420p") -> Path:
    """Encode ``frames`` (a count of code frames, or RGB arrays) at ``fps`` into ``path``."""
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    arrays = [code_frame(k) for k in range(frames)] if isinstance(frames, int) else frames
    h, w = arrays[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        default = {"g": "8", "bf": "2"} if codec == "libx264" else {"g": "8"}
        s.options = dict(options if options is not None else default)
        for arr in arrays:
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path

