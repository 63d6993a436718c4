"""Placeholder text that stands for one image in the prompt (spec §7), and its token count.

``image_placeholder`` builds ``[<image_id>i</image_id>]<image><unk>*Q</image>`` followed by the
grid part (rows joined by "\\n", each row cols x ``<slice><unk>*Q</slice>``) from a
``SlicePlan``. ``placeholder_token_count`` predicts how many tokens that text encodes to (every
marker is one token, each digit of the image index is one token, each row break one token).

``wrapped_placeholder`` is the 2.0 / 2.5 form (one ``<slice>`` pair around all slices, no image
ids); ``PLACEHOLDER_SCHEMES`` maps ``VersionSpec.placeholder_scheme`` to the renderer and the
markers that delimit feature rows. It does not decide slicing (``slicing.py``), split prompts or
tokenize (``processor.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import ProcessorConfig
from ..errors import InputError
from .slicing import SlicePlan


def _check_index(image_index: int | None) -> None:
    if image_index is None:
        return
    if isinstance(image_index, bool) or not isinstance(image_index, int) or image_index < 0:
        raise InputError(f"image_index must be a non-negative integer or None, got {image_index!r}")


def grid_placeholder(grid: tuple[int, int] | None, cfg: ProcessorConfig) -> str:
    """The slice part: rows joined by "\\n", each row = cols x (<slice> + unk*Q + </slice>)."""
    if grid is None:
        return ""
    cols, rows = grid
    one = cfg.slice_start + cfg.unk * cfg.image_feature_size + cfg.slice_end
    return "\n".join(one * cols for _ in range(rows))


def image_placeholder(plan: SlicePlan, cfg: ProcessorConfig, *, image_index: int | None) -> str:
    """Placeholder of one image; ``image_index=None`` omits the ``<image_id>`` prefix.

    The grid part follows only when ``cfg.slice.slice_mode`` is on, as in the reference.
    """
    _check_index(image_index)
    text = cfg.im_start + cfg.unk * cfg.image_feature_size + cfg.im_end
    if image_index is not None:
        text = f"{cfg.im_id_start}{image_index}{cfg.im_id_end}" + text
    if cfg.slice.slice_mode:
        text += grid_placeholder(plan.grid, cfg)
    return text


def placeholder_token_count(plan: SlicePlan, query_num: int, image_index: int | None) -> int:
    """Tokens in ``image_placeholder(plan, ...)`` (with slice mode on) for ``query_num`` queries.

    = (2 + digits of the index, if any) + (Q + 2) * num_slices + (rows - 1).
    """
    _check_index(image_index)
    if query_num < 1:
        raise InputError(f"query_num must be >= 1, got {query_num}")
    count = (query_num + 2) * plan.num_slices
    if plan.grid is not None:
        count += plan.grid[1] - 1  # one "\n" token between consecutive rows
    if image_index is not None:
        count += 2 + len(str(image_index))
    return count


def wrapped_placeholder(plan: SlicePlan, cfg: ProcessorConfig, *, image_index: int | None = None) -> str:
    """2.0 / 2.5 placeholder (spec 2.0 §2.6): every image and slice is ``<image><unk>*Q</image>``;
    the slices follow the source image inside ONE ``<slice>...</slice>`` pair, rows joined by
    "\\n". These releases have no image ids, so ``image_index`` is ignored."""
    _check_index(image_index)
    one = cfg.im_start + cfg.unk * cfg.image_feature_size + cfg.im_end
    if plan.grid is None or not cfg.slice.slice_mode:
        return one
    cols, rows = plan.grid
    return one + cfg.slice_start + "\n".join(one * cols for _ in range(rows)) + cfg.slice_end


@dataclass(frozen=True)
class PlaceholderScheme:
    """How a release writes image placeholders and which markers delimit feature runs."""

    name: str
    render: Callable[..., str]  # (plan, cfg, *, image_index) -> text
    slice_markers_bound_features: bool  # <slice>/</slice> open/close a run of <unk> rows

    def start_markers(self, cfg: ProcessorConfig) -> tuple[str, ...]:
        return (cfg.im_start, cfg.slice_start) if self.slice_markers_bound_features else (cfg.im_start,)

    def end_markers(self, cfg: ProcessorConfig) -> tuple[str, ...]:
        return (cfg.im_end, cfg.slice_end) if self.slice_markers_bound_features else (cfg.im_end,)


PLACEHOLDER_SCHEMES: dict[str, PlaceholderScheme] = {
    "per_slice": PlaceholderScheme("per_slice", image_placeholder, True),  # 2.6, o2.6, 4.0, 4.5
    "wrapped": PlaceholderScheme("wrapped", wrapped_placeholder, False),  # 2.0, 2.5
}


def placeholder_scheme(name: str) -> PlaceholderScheme:
    """The scheme named by ``VersionSpec.placeholder_scheme``."""
    if name not in PLACEHOLDER_SCHEMES:
        raise InputError(f"unknown placeholder scheme {name!r}; known: {sorted(PLACEHOLDER_SCHEMES)}")
    return PLACEHOLDER_SCHEMES[name]
