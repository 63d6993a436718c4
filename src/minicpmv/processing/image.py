"""Pixel side of image preprocessing: loading, resizing into slices, normalised patch tensors.

``load_image`` opens a PIL image, path, bytes or binary file object, fully decodes it (so
truncated files are caught here, not later) and returns it in RGB; every failure is an
``ImageError``. ``make_slices`` applies a ``SlicePlan`` with Pillow's BICUBIC resize on the
uint8 image (pass order pinned to Pillow 13's, see ``resize_bicubic``) and row-major crops
(spec §6.3). ``to_patches`` normalises a slice in float32 and
lays its 14x14 patches side by side (spec §6.4-6.5), bit-exact with the reference.

Slicing decisions live in ``slicing.py``; placeholder text in ``placeholders.py``. numpy and
Pillow only, no torch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import zlib
from collections.abc import Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import BinaryIO, TypeVar, overload

import numpy as np
from PIL import Image

from ..errors import ImageError, InputError
from .slicing import SlicePlan

log = logging.getLogger(__name__)

# Pillow's hard decompression-bomb threshold (2 x the default Image.MAX_IMAGE_PIXELS); Pillow
# only warns between MAX_IMAGE_PIXELS and this value.
DEFAULT_MAX_PIXELS = 178_956_970

ImageSource = Image.Image | str | PathLike | bytes | bytearray | memoryview | BinaryIO

# Pillow's bomb check: the error always, the warning when warning filters turn it into an error
# (we do not touch the global warning filters; our own max_pixels check follows the header read).
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

# Exceptions Pillow's decoders are known to raise on corrupt or truncated data.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError,
    KeyError,
)


def describe_source(src: object, kind: str = "image") -> str:
    """How an error names a media source: "image file 'a.png'", "video bytes (12 bytes)", ..."""
    if isinstance(src, (str, PathLike)):
        return f"{kind} file '{src}'"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"{kind} bytes ({len(src)} bytes)"
    return f"{kind} {type(src).__name__}"


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{what} has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(
            f"{what} is {w}x{h} = {w * h} pixels, over the size limit of {max_pixels} pixels; "
            "downscale it first or pass a larger max_pixels"
        )


def _open(src: ImageSource, what: str) -> Image.Image:
    """Image.open on a path / bytes / file object, with typed errors (header only, lazy)."""
    if isinstance(src, (str, PathLike)):
        path = Path(src)
        if str(src).startswith(("http://", "https://")):
            raise ImageError(f"{what}: URLs are not fetched; download the image and pass the file")
        if not path.exists():
            raise ImageError(f"{what} does not exist")
        if not path.is_file():
            raise ImageError(f"{what} is not a regular file")
        fp: str | BinaryIO = str(path)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        fp = src
    else:
        raise InputError(
            f"cannot load an image from {type(src).__name__}; pass a PIL image, a path, bytes "
            "or a binary file object"
        )
    try:
        return Image.open(fp)
    except _BOMB_ERRORS as e:
        raise ImageError(f"{what} exceeds Pillow's pixel size limit: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{what} is not a recognised image format") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{what} cannot be read: {e}") from e


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``src`` (PIL image, path, bytes, binary file object) as a fully decoded RGB image.

    Raises ImageError when the file is missing, not an image, truncated/corrupt, or larger than
    ``max_pixels`` (checked from the header, before any pixel is decoded).
    """
    what = describe_source(src)
    img = src if isinstance(src, Image.Image) else _open(src, what)
    try:
        _check_pixels(img.size, max_pixels, what)
    except ImageError:
        if img is not src:
            img.close()
        raise
    try:
        img.load()  # full decode: detects truncation now
        rgb = img.convert("RGB")  # a new image (a copy when already RGB)
    except _BOMB_ERRORS as e:
        raise ImageError(f"{what} exceeds Pillow's pixel size limit: {e}") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{what} is truncated or corrupt: {e}") from e
    finally:
        if img is not src:
            img.close()
    log.debug("loaded %s: %dx%d, mode %s", what, rgb.size[0], rgb.size[1], img.mode)
    return rgb


def resize_bicubic(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pillow BICUBIC resize with Pillow 13's pass order, whatever Pillow is installed.

    Pillow resizes in two 8-bit passes. Up to 12.x it always ran the horizontal pass first;
    13.0 (which produced the reference vectors) runs the vertical pass first when the height
    shrinks by more than twice as many pixels as the width. The order changes rounding (up to
    about 12 levels on a few pixels), so we make it explicit: a vertical-only resize followed by
    a horizontal-only one is bit-identical to one vertical-first call, since each pass stores
    8-bit values in between either way.
    """
    w, h = size
    dh, dw = img.height - h, img.width - w
    if dh > 0 and dh > 2 * dw:
        img = img.resize((img.width, h), Image.Resampling.BICUBIC)
    return img.resize((w, h), Image.Resampling.BICUBIC)


def make_slices(img: Image.Image, plan: SlicePlan) -> list[Image.Image]:
    """Resized slices of ``img`` per ``plan``: the source/overview first, then tiles row-major."""
    if img.size != plan.image_size:
        raise InputError(f"image is {img.size[0]}x{img.size[1]} but the slice plan is for "
                         f"{plan.image_size[0]}x{plan.image_size[1]}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    slices = [resize_bicubic(img, plan.source_size)]
    tile = plan.tile_size
    if plan.grid is None or plan.refine_size is None or tile is None:
        return slices
    refined = resize_bicubic(img, plan.refine_size)
    cols, rows = plan.grid
    tw, th = tile
    for r in range(rows):
        for c in range(cols):
            slices.append(refined.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)))
    return slices


def to_patches(
    img: Image.Image,
    patch_size: int = 14,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> np.ndarray:
    """Normalised float32 patches ``[3, P, L*P]`` of one slice; patch k = (r, c), k = r*w + c."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    p = patch_size
    if width % p or height % p:
        raise InputError(f"slice size {width}x{height} is not a multiple of patch size {p}")
    h, w = height // p, width // p
    mean32 = np.asarray(mean, dtype=np.float32)  # [3]
    std32 = np.asarray(std, dtype=np.float32)  # [3]
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)  # [H, W, 3]
    x = (x - mean32) / std32  # [H, W, 3] float32
    x = x.transpose(2, 0, 1)  # [3, H, W]
    x = x.reshape(3, h, p, w, p).transpose(0, 2, 1, 3, 4)  # [3, P, h, w, P]
    return np.ascontiguousarray(x.reshape(3, p, h * w * p))  # [3, P, L*P]


T = TypeVar("T")


class LazySequence(Sequence[T]):
    """A read-only sequence whose items are made on read by ``_item(i)`` (0 <= i < len); a
    slice gives a list. Subclasses define ``__len__`` and ``_item``."""

    def _item(self, i: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        n = len(self)
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(n))]
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return self._item(i % n)

    def __iter__(self) -> Iterator[T]:
        return (self._item(i) for i in range(len(self)))


class PatchList(LazySequence[np.ndarray]):
    """The ``to_patches`` tensors of a list of slices, made each time one is read.

    The processor returns this instead of a list: a conversation's pixels are then held once,
    as the uint8 slices, not also as float32 tensors three times their size (540 video frames:
    about 440 MB instead of 1.7 GB). Reading the same entry twice gives equal arrays. Compares
    equal to a list of equal arrays.
    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, slices: Sequence[Image.Image], patch_size: int = 14,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.slices = list(slices)
        self._args = (int(patch_size), tuple(mean), tuple(std))

    def __len__(self) -> int:
        return len(self.slices)

    def _item(self, i: int) -> np.ndarray:
        return to_patches(self.slices[i], *self._args)  # [3, P, L*P]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(np.array_equal(a, b) for a, b in zip(self, other, strict=True))

    def __repr__(self) -> str:
        return f"PatchList({len(self)} slices, patch size {self._args[0]})"

    def source_digest(self, i: int) -> bytes:
        """Digest of what entry ``i`` is made from (the uint8 slice and the patch/normalisation
        settings): equal digests give equal arrays, and no float tensor is made to compute it."""
        h = hashlib.blake2b(digest_size=20)
        h.update(repr(self._args).encode())
        h.update(image_content_hash(self.slices[i]).encode())
        return h.digest()


def image_content_hash(img: Image.Image) -> str:
    """sha256 hex digest of an image's size, mode and raw pixel bytes (cache key)."""
    digest = hashlib.sha256()
    digest.update(f"{img.size[0]}x{img.size[1]}:{img.mode}:".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()
