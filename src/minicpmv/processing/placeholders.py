"""Placeholder text that stands for one image in the prompt (spec §7), and its token count.

``image_placeholder`` builds ``[<image_id>i</image_id>]<image><unk>*Q</image>`` followed by the
grid part (rows joined by "\\n", each row cols x ``<slice><unk>*Q</slice>``) from a
``SlicePlan``. ``placeholder_token_count`` predicts how many tokens that text encodes to (every
marker is one token, each digit of the image index is one token, each row break one token).

It does not decide slicing (``slicing.py``), split prompts or tokenize (``processor.py``).
"""

from __future__ import annotations

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
