"""Slicing decisions (spec §6.1-6.3) against the official tables, worked examples and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from minicpmv.config import ProcessorConfig
from minicpmv.errors import InputError
from minicpmv.processing.placeholders import image_placeholder, placeholder_token_count
from minicpmv.processing.slicing import (
    SlicePlan,
    ensure_divide,
    find_best_resize,
    get_sliced_grid,
    plan_slices,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "conformance"
VERSIONS = ("2.6", "4.5")


def _table(version: str) -> dict:
    return json.loads((DATA / version / "_tables" / "slicing_table.json").read_text(encoding="utf-8"))


def _rows() -> list:
    out = []
    for version in VERSIONS:
        for row in _table(version)["rows"]:
            w, h = row["image_size_wh"]
            out.append(pytest.param(version, row, id=f"{version}-{w}x{h}-m{row['max_slice_nums']}"))
    return out


def _cfg(version: str) -> ProcessorConfig:
    path = DATA / version / "_checkpoint" / "preprocessor_config.json"
    return ProcessorConfig.from_hf_dict(json.loads(path.read_text(encoding="utf-8")))


def _tuple_or_none(v: list | None) -> tuple | None:
    return None if v is None else tuple(v)


def test_tables_cover_both_max_slice_nums() -> None:
    for version in VERSIONS:
        table = _table(version)
        assert (table["scale_resolution"], table["patch_size"]) == (448, 14)
        assert len(table["rows"]) == 86
        assert {r["max_slice_nums"] for r in table["rows"]} == {9, 1}


@pytest.mark.parametrize(("version", "row"), _rows())
def test_slicing_table_row(version: str, row: dict) -> None:
    table = _table(version)
    w, h = row["image_size_wh"]
    plan = plan_slices(w, h, max_slice_nums=row["max_slice_nums"],
                       scale_resolution=table["scale_resolution"], patch_size=table["patch_size"])
    assert plan.image_size == (w, h)
    assert plan.grid == _tuple_or_none(row["grid_cols_rows"])
    assert plan.source_size == tuple(row["source_size_wh"])
    assert plan.refine_size == _tuple_or_none(row["refine_size_wh"])
    assert plan.slice_sizes == [tuple(s) for s in row["slice_sizes_wh"]]
    assert plan.tgt_sizes == [tuple(s) for s in row["tgt_sizes_hw"]]
    assert plan.num_slices == row["num_slices"]

    cfg = _cfg(version)
    assert cfg.image_feature_size == table["image_feature_size"]
    full = image_placeholder(plan, cfg, image_index=0)
    assert full == row["placeholder_use_image_id_idx0"]
    assert placeholder_token_count(plan, cfg.image_feature_size, 0) == row["placeholder_num_tokens"]
    prefix = "<image_id>0</image_id>"
    bare = image_placeholder(plan, cfg, image_index=None)
    assert row["placeholder_without_image_id_equals_suffix"] is True
    assert full == prefix + bare
    assert placeholder_token_count(plan, cfg.image_feature_size, None) == row["placeholder_num_tokens"] - 3


@pytest.mark.parametrize("version", VERSIONS)
def test_token_count_matches_tokenizer(version: str) -> None:
    """The count formula agrees with the conformance tokenizer on sliced and unsliced images."""
    tok = Tokenizer.from_file(str(DATA / version / "_checkpoint" / "tokenizer.json"))
    cfg = _cfg(version)
    for (w, h), m, idx in [((1920, 1080), 9, 0), ((1344, 1344), 9, 12), ((60, 40), 9, 305),
                           ((300, 4000), 9, None), ((1000, 1000), 1, 7)]:
        plan = plan_slices(w, h, max_slice_nums=m)
        text = image_placeholder(plan, cfg, image_index=idx)
        n = len(tok.encode(text, add_special_tokens=False).ids)
        assert n == placeholder_token_count(plan, cfg.image_feature_size, idx)


def test_worked_example_1280x720() -> None:
    plan = plan_slices(1280, 720, max_slice_nums=9)
    assert plan.grid == (3, 2)
    assert plan.source_size == (602, 336)
    assert plan.refine_size == (1470, 812)
    assert plan.tile_size == (490, 406)
    assert plan.slice_sizes == [(602, 336)] + [(490, 406)] * 6
    assert plan.tgt_sizes[0] == (24, 43)


@pytest.mark.parametrize(("size", "expected"), [((60, 40), (546, 364)), ((1, 500), (14, 10024)),
                                                ((5000, 20), (7000, 28)), ((448, 448), (448, 448))])
def test_unsliced_images_are_resized_to_448_area(size: tuple[int, int], expected: tuple) -> None:
    plan = plan_slices(*size, max_slice_nums=9)
    assert plan.grid is None and plan.refine_size is None
    assert plan.source_size == expected
    assert plan.slice_sizes == [expected] and plan.num_slices == 1


def test_ensure_divide_rounds_half_to_even() -> None:
    assert ensure_divide(715.5 * 14, 14) == 716 * 14
    assert ensure_divide(42.5 * 14, 14) == 42 * 14
    assert ensure_divide(3, 14) == 14  # never below one patch
    assert ensure_divide(0, 14) == 14


def test_find_best_resize_keeps_small_without_upscale() -> None:
    assert find_best_resize((100, 60), 448, 14, allow_upscale=False) == (98, 56)
    assert find_best_resize((100, 60), 448, 14, allow_upscale=True) != (98, 56)


def test_grid_tie_goes_to_first_candidate() -> None:
    # 2:1 image, 4 slices allowed: counts (2, 3, 4); (2, 1) matches the aspect exactly.
    grid = get_sliced_grid((1000, 500), 4)
    assert grid == (2, 1)
    # exact tie: a square image, count 2 → (1,2) and (2,1) are equally bad; first is (1, 2).
    assert get_sliced_grid((700, 700), 2) == (1, 2)


def test_max_slice_nums_one_never_slices() -> None:
    plan = plan_slices(3000, 3000, max_slice_nums=1)
    assert plan.grid is None and plan.num_slices == 1


@pytest.mark.parametrize("kwargs", [
    {"width": 0, "height": 10, "max_slice_nums": 9},
    {"width": 10, "height": -1, "max_slice_nums": 9},
    {"width": 10, "height": 10, "max_slice_nums": 0},
    {"width": 10.5, "height": 10, "max_slice_nums": 9},
    {"width": 10, "height": 10, "max_slice_nums": True},
    {"width": 10, "height": 10, "max_slice_nums": 9, "patch_size": 0},
])
def test_invalid_inputs_raise_input_error(kwargs: dict) -> None:
    w = kwargs.pop("width")
    h = kwargs.pop("height")
    with pytest.raises(InputError):
        plan_slices(w, h, **kwargs)


def test_plan_is_frozen_and_hashable() -> None:
    plan = plan_slices(1920, 1080, max_slice_nums=9)
    assert plan == plan_slices(1920, 1080, max_slice_nums=9)
    assert hash(plan) == hash(plan_slices(1920, 1080, max_slice_nums=9))
    with pytest.raises(AttributeError):
        plan.grid = None  # type: ignore[misc]
    assert isinstance(plan, SlicePlan)
