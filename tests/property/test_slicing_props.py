"""Property tests for slice plans and placeholders (plans only; no pixels are resized)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from minicpmv.config import ProcessorConfig
from minicpmv.processing.placeholders import image_placeholder, placeholder_token_count
from minicpmv.processing.slicing import plan_slices

SIDES = st.integers(min_value=1, max_value=5000)
MAX_SLICES = st.integers(min_value=1, max_value=12)
CFG = ProcessorConfig()


@settings(max_examples=200, deadline=None)
@given(w=SIDES, h=SIDES, m=MAX_SLICES)
def test_grid_within_budget_and_sizes_are_patch_multiples(w: int, h: int, m: int) -> None:
    plan = plan_slices(w, h, max_slice_nums=m)
    if plan.grid is not None:
        cols, rows = plan.grid
        assert cols >= 1 and rows >= 1 and 2 <= cols * rows <= m
        assert plan.refine_size is not None
        assert plan.refine_size[0] % cols == 0 and plan.refine_size[1] % rows == 0
    assert plan.num_slices == len(plan.slice_sizes) == len(plan.tgt_sizes)
    for (sw, sh), (th, tw) in zip(plan.slice_sizes, plan.tgt_sizes, strict=True):
        assert sw > 0 and sh > 0 and sw % 14 == 0 and sh % 14 == 0
        assert (th, tw) == (sh // 14, sw // 14)


@settings(max_examples=200, deadline=None)
@given(w=SIDES, h=SIDES, m=MAX_SLICES)
def test_no_slicing_when_small_or_single(w: int, h: int, m: int) -> None:
    plan = plan_slices(w, h, max_slice_nums=m)
    if w * h <= 448 * 448 or m == 1:
        assert plan.grid is None and plan.num_slices == 1
    else:
        assert plan.grid is not None


@settings(max_examples=200, deadline=None)
@given(w=SIDES, h=SIDES, m=MAX_SLICES, idx=st.none() | st.integers(min_value=0, max_value=10_000),
       q=st.integers(min_value=1, max_value=96))
def test_placeholder_unk_count_and_token_count(w: int, h: int, m: int, idx: int | None, q: int) -> None:
    cfg = ProcessorConfig(image_feature_size=q)
    plan = plan_slices(w, h, max_slice_nums=m)
    text = image_placeholder(plan, cfg, image_index=idx)
    assert text.count("<unk>") == q * plan.num_slices
    assert text.count("<slice>") == plan.num_slices - 1
    markers = text.count("<") - text.count("<unk>")  # every non-unk marker is one token
    digits = 0 if idx is None else len(str(idx))
    newlines = text.count("\n")
    assert placeholder_token_count(plan, q, idx) == text.count("<unk>") + markers + digits + newlines
    assert (idx is not None) == text.startswith("<image_id>")


@settings(max_examples=100, deadline=None)
@given(w=SIDES, h=SIDES, m=MAX_SLICES)
def test_deterministic(w: int, h: int, m: int) -> None:
    a = plan_slices(w, h, max_slice_nums=m)
    b = plan_slices(w, h, max_slice_nums=m)
    assert a == b
    assert image_placeholder(a, CFG, image_index=3) == image_placeholder(b, CFG, image_index=3)
