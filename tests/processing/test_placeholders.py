"""Placeholder strings (spec §7): structure, config markers, and the official expanded prompts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from minicpmv.config import ProcessorConfig, SliceConfig
from minicpmv.errors import InputError
from minicpmv.processing.placeholders import (
    grid_placeholder,
    image_placeholder,
    placeholder_token_count,
)
from minicpmv.processing.slicing import plan_slices

DATA = Path(__file__).resolve().parents[1] / "data"
MARK = "(<image>./</image>)"


def _json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _small_cfg() -> ProcessorConfig:
    return ProcessorConfig(image_feature_size=2)


def test_unsliced_with_and_without_id() -> None:
    plan = plan_slices(448, 448, max_slice_nums=9)
    cfg = _small_cfg()
    assert image_placeholder(plan, cfg, image_index=None) == "<image><unk><unk></image>"
    assert image_placeholder(plan, cfg, image_index=0) == "<image_id>0</image_id><image><unk><unk></image>"
    assert image_placeholder(plan, cfg, image_index=123).startswith("<image_id>123</image_id><image>")


def test_grid_rows_and_columns() -> None:
    plan = plan_slices(1280, 720, max_slice_nums=9)  # grid (3, 2)
    cfg = _small_cfg()
    one = "<slice><unk><unk></slice>"
    expected = "<image><unk><unk></image>" + one * 3 + "\n" + one * 3
    assert image_placeholder(plan, cfg, image_index=None) == expected
    assert not expected.endswith("\n")
    assert grid_placeholder(None, cfg) == ""
    assert grid_placeholder((1, 3), cfg) == "\n".join([one] * 3)


def test_custom_markers_and_slice_mode_off() -> None:
    cfg = ProcessorConfig(image_feature_size=1, im_start="[I]", im_end="[/I]", slice_start="[S]",
                          slice_end="[/S]", unk="#", im_id_start="{", im_id_end="}")
    plan = plan_slices(1000, 500, max_slice_nums=9)  # grid (2, 1)
    assert image_placeholder(plan, cfg, image_index=4) == "{4}[I]#[/I][S]#[/S][S]#[/S]"
    off = replace(cfg, slice=SliceConfig(slice_mode=False))
    assert image_placeholder(plan, off, image_index=4) == "{4}[I]#[/I]"


def test_token_count_formula() -> None:
    plan = plan_slices(1344, 1344, max_slice_nums=9)  # (3, 3)
    assert placeholder_token_count(plan, 64, None) == 66 * 10 + 2
    assert placeholder_token_count(plan, 64, 0) == 66 * 10 + 2 + 3
    assert placeholder_token_count(plan, 64, 10) == 66 * 10 + 2 + 4
    single = plan_slices(100, 100, max_slice_nums=9)
    assert placeholder_token_count(single, 64, None) == 66


@pytest.mark.parametrize("bad", [-1, 1.0, "0", True])
def test_bad_image_index(bad: object) -> None:
    plan = plan_slices(100, 100, max_slice_nums=9)
    with pytest.raises(InputError):
        image_placeholder(plan, _small_cfg(), image_index=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        placeholder_token_count(plan, 64, bad)  # type: ignore[arg-type]


def _grouped(case: Path) -> bool:
    """Cases with temporal_ids merge frames into groups: the processor's job, tested there."""
    return _json(case / "inputs" / "params.json").get("chat_kwargs", {}).get("temporal_ids") is not None


def _cases() -> list:
    out = []
    for case in sorted((DATA / "real-4.5" / "cases").iterdir()):
        if (case / "expected" / "meta.json").is_file() and not _grouped(case):
            out.append(pytest.param(case, DATA / "real-4.5" / "release", id=f"real-{case.name}"))
    for case in sorted((DATA / "conformance").glob("*/*")):
        # 2.6 / 4.5 format only (2.0 / 2.5 / o2.6 cases are checked in tests/legacy)
        if (case / "expected" / "tensors.safetensors").is_file() and not _grouped(case):
            out.append(pytest.param(case, case.parent / "_checkpoint", id=f"{case.parent.name}-{case.name}"))
    return out


@pytest.mark.parametrize(("case", "release"), _cases())
def test_official_expanded_prompts(case: Path, release: Path) -> None:
    """Replacing each image marker by our placeholder reproduces the official expanded prompt."""
    params = _json(case / "inputs" / "params.json")
    kwargs = params.get("chat_kwargs", {})
    cfg = ProcessorConfig.from_hf_dict(_json(release / "preprocessor_config.json"))
    m = kwargs.get("max_slice_nums") or cfg.slice.max_slice_nums
    use_id = cfg.use_image_id if kwargs.get("use_image_id") is None else kwargs["use_image_id"]
    meta = _json(case / "expected" / "meta.json")
    msgs = _json(case / "inputs" / "msgs.json")
    convs = msgs if msgs and isinstance(msgs[0], list) else [msgs]
    for conv, template, expanded in zip(convs, meta["chat_template_prompts"], meta["expanded_prompts"],
                                        strict=True):
        files = [case / it["file"] for msg in conv for it in msg["content"] if it["type"] == "image"]
        chunks = template.split(MARK)
        assert len(chunks) == len(files) + 1
        text = chunks[0]
        for i, (f, chunk) in enumerate(zip(files, chunks[1:], strict=True)):
            with Image.open(f) as img:
                plan = plan_slices(*img.size, max_slice_nums=m)
            text += image_placeholder(plan, cfg, image_index=i if use_id else None) + chunk
        assert text == expanded
