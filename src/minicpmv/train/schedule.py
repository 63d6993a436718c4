"""The demo recipe's learning-rate factor: a linear warm-up multiplied by a cosine decay over the
whole run (the warm-up overlaps the cosine's first steps, unlike ``trainer``'s fine-tuning schedule,
which starts its cosine after the warm-up). Used with ``torch.optim.lr_scheduler.LambdaLR`` by both
demo stages; does not build optimisers."""

from __future__ import annotations

import math
from collections.abc import Callable


def warm_cosine(warm: int, total: int) -> Callable[[int], float]:
    """step -> min(1, (step + 1) / warm) * (1 + cos(pi * min(1, step / total))) / 2 (a ``warm`` or
    ``total`` below 1 counts as 1: a run of no steps still gets a defined factor)."""
    warm, total = max(1, warm), max(1, total)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))

    return factor
