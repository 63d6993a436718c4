"""The official slicing decisions and placeholders of 2.0, 2.5 and o2.6 (30 sizes each), exactly."""

from __future__ import annotations

import json
import re

import pytest

from minicpmv.config import ProcessorConfig
from minicpmv.processing.placeholders import placeholder_scheme
from minicpmv.processing.slicing import plan_slices
from minicpmv.versions import get_version

from .conftest import CONF

TABLE = json.loads((CONF / "slicing" / "slicing_table.json").read_text())
QUERIES = {"2.0": 64, "2.5": 96, "o2.6": 64}
ROWS = [(v, e) for v in ("2.0", "2.5", "o2.6") for e in TABLE[v]]


def _compress(text: str) -> str:
    """The table writes runs of <unk> as '<unk>*N'."""
    return re.sub(r"(?:<unk>)+", lambda m: f"<unk>*{len(m.group(0)) // 5}", text)


@pytest.mark.parametrize("version,entry", ROWS, ids=[f"{v}-{e['size'][0]}x{e['size'][1]}" for v, e in ROWS])
def test_slicing_table_row(version, entry):
    spec = get_version(version)
    cfg = ProcessorConfig(image_feature_size=QUERIES[version])
    w, h = entry["size"]
    plan = plan_slices(w, h, max_slice_nums=9)
    assert (list(plan.grid) if plan.grid else None) == entry["grid"]
    assert list(plan.source_size) == entry["source_size"]
    assert plan.num_slices - 1 == entry["n_slices"]
    assert plan.num_slices == entry["n_images_total"]
    if plan.grid:
        assert list(plan.slice_sizes[1]) == entry["slice_size"]
    index = 0 if spec.placeholder_scheme == "per_slice" else None
    text = placeholder_scheme(spec.placeholder_scheme).render(plan, cfg, image_index=index)
    assert _compress(text) == entry["placeholder"]
    assert text.count("<unk>") == entry["n_unk"]
    assert text.count("\n") == entry["n_newlines_in_placeholder"]


def test_table_covers_all_three_versions():
    assert {v: len(TABLE[v]) for v in ("2.0", "2.5", "o2.6")} == {"2.0": 30, "2.5": 30, "o2.6": 30}
