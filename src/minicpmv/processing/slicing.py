"""LLaVA-UHD slicing decisions for one image: grid choice and every resize target (spec §6.1-6.3).

``plan_slices`` turns an original image size and ``max_slice_nums`` into a ``SlicePlan``: the
overview ("source") size, the grid (cols, rows) if the image is sliced, the size the whole image
is resized to before being cut into tiles, and the resulting slice sizes / ``tgt_sizes``. The
arithmetic mirrors the reference exactly: Python's banker's ``round``, ``int()`` truncation and
natural-log aspect ratios, with ties going to the first candidate grid.

This module only does integer/float math on sizes. It touches no pixels (see ``image.py``) and
builds no placeholder text (see ``placeholders.py``). No numpy, Pillow or torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

DEFAULT_SCALE_RESOLUTION = 448
DEFAULT_PATCH_SIZE = 14


@dataclass(frozen=True)
class SlicePlan:
    """How one image is turned into slices.

    ``image_size``, ``source_size`` and ``refine_size`` are (w, h) in pixels; ``grid`` is
    (cols, rows) or None when the image is not sliced (then ``refine_size`` is None too).
    """

    image_size: tuple[int, int]
    grid: tuple[int, int] | None
    source_size: tuple[int, int]
    refine_size: tuple[int, int] | None
    patch_size: int = DEFAULT_PATCH_SIZE

    @property
    def tile_size(self) -> tuple[int, int] | None:
        """(w, h) of one grid tile, or None without a grid."""
        if self.grid is None or self.refine_size is None:
            return None
        cols, rows = self.grid
        return (self.refine_size[0] // cols, self.refine_size[1] // rows)

    @property
    def slice_sizes(self) -> list[tuple[int, int]]:
        """(w, h) of every slice: the source/overview first, then the grid tiles row-major."""
        sizes = [self.source_size]
        tile = self.tile_size
        if tile is not None and self.grid is not None:
            sizes.extend([tile] * (self.grid[0] * self.grid[1]))
        return sizes

    @property
    def num_slices(self) -> int:
        return 1 + (self.grid[0] * self.grid[1] if self.grid is not None else 0)

    @property
    def tgt_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of every slice in patches, in ``slice_sizes`` order."""
        p = self.patch_size
        return [(h // p, w // p) for (w, h) in self.slice_sizes]


def ensure_divide(length: float, patch_size: int) -> int:
    """``max(round(length / p) * p, p)`` with Python's round-half-to-even."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, *, allow_upscale: bool
) -> tuple[int, int]:
    """Target (w, h), multiples of ``patch_size``, of area about ``scale_resolution**2``.

    Images not larger than ``scale_resolution**2`` keep their size unless ``allow_upscale``.
    """
    w, h = size
    if w * h > scale_resolution * scale_resolution or allow_upscale:
        ratio = w / h
        h = int(scale_resolution / math.sqrt(ratio))
        w = int(h * ratio)
    return (ensure_divide(w, patch_size), ensure_divide(h, patch_size))


def get_refine_size(
    size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int
) -> tuple[int, int]:
    """Size the whole image is resized to before being cut into ``grid`` equal tiles."""
    cols, rows = grid
    refine_w = ensure_divide(size[0], cols)  # multiple of the column count, not of patch_size
    refine_h = ensure_divide(size[1], rows)
    cell = (refine_w // cols, refine_h // rows)  # exact: refine_w is a multiple of cols
    cell_w, cell_h = find_best_resize(cell, scale_resolution, patch_size, allow_upscale=True)
    return (cell_w * cols, cell_h * rows)


def get_sliced_grid(
    size: tuple[int, int], max_slice_nums: int, scale_resolution: int = DEFAULT_SCALE_RESOLUTION
) -> tuple[int, int] | None:
    """Best (cols, rows) grid for an image of ``size`` (w, h), or None if it is not sliced."""
    w, h = size
    log_ratio = math.log(w / h)
    ratio = w * h / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [c for c in (multiple - 1, multiple, multiple + 1) if c != 1 and c <= max_slice_nums]
    best: tuple[int, int] | None = None
    best_err = math.inf
    for count in counts:
        for cols in range(1, count + 1):
            if count % cols:
                continue
            grid = (cols, count // cols)
            err = abs(log_ratio - math.log(grid[0] / grid[1]))
            if err < best_err:  # strict: on ties the first grid wins
                best, best_err = grid, err
    return best


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return value


def plan_slices(
    width: int,
    height: int,
    *,
    max_slice_nums: int,
    scale_resolution: int = DEFAULT_SCALE_RESOLUTION,
    patch_size: int = DEFAULT_PATCH_SIZE,
) -> SlicePlan:
    """The slicing plan of a ``width`` x ``height`` image (spec §6.3).

    Without a grid the single slice is the image resized (up or down) to about
    ``scale_resolution**2`` area; with a grid the overview is downscaled and the whole image is
    resized to ``refine_size`` and cut into cols x rows tiles.
    """
    _check_positive_int("image width", width)
    _check_positive_int("image height", height)
    _check_positive_int("max_slice_nums", max_slice_nums)
    _check_positive_int("scale_resolution", scale_resolution)
    _check_positive_int("patch_size", patch_size)
    size = (width, height)
    grid = get_sliced_grid(size, max_slice_nums, scale_resolution)
    if grid is None:
        source = find_best_resize(size, scale_resolution, patch_size, allow_upscale=True)
        return SlicePlan(size, None, source, None, patch_size)
    source = find_best_resize(size, scale_resolution, patch_size, allow_upscale=False)
    refine = get_refine_size(size, grid, scale_resolution, patch_size)
    return SlicePlan(size, grid, source, refine, patch_size)
