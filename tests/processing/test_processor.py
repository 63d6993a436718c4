"""Processor: official outputs (real 4.5 release, 2.6/4.5 conformance), temporal ids, errors."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from minicpmv.config import ProcessorConfig
from minicpmv.engine import compat
from minicpmv.errors import ContextLengthError, InputError, PlaceholderMismatchError
from minicpmv.processing.chat_template import IMAGE_TAG
from minicpmv.processing.image import make_slices
from minicpmv.processing.processor import ModelInputs, Processor, split_temporal_ids
from minicpmv.processing.slicing import plan_slices
from minicpmv.processing.tokenizer import Tokenizer
from minicpmv.versions import QWEN2_CHAT_TEMPLATE, get_version

DATA = Path(__file__).resolve().parents[1] / "data"
REAL_CASES = sorted(p for p in (DATA / "real-4.5" / "cases").iterdir() if (p / "expected").is_dir())
CONF_CASES = [
    pytest.param(v, p, id=f"{v}/{p.name}")
    for v in ("2.6", "4.5")
    for p in sorted((DATA / "conformance" / v).iterdir())
    if (p / "expected").is_dir()
]
VIDEO = DATA / "real-4.5" / "cases" / "video_6frames_temporal_3" / "inputs"


def _lists(rows: list) -> list:
    return [[list(x) for x in row] for row in rows]


def _padded(out: ModelInputs, *, hide_id0: bool = True) -> tuple[list, list, list]:
    """The batch as the engine lays it out (``engine/compat.py``): left-padded ids, the
    reference's attention mask and the shifted image bounds."""
    ids, pads = compat.left_pad(out.input_ids)
    mask = compat.attention_mask(ids, pads, hide_id0=hide_id0)
    return ids.tolist(), mask.tolist(), compat.shift_bounds(out.image_bounds, pads)


def _frames(n: int = 6) -> list[Image.Image]:
    paths = sorted(VIDEO.glob("*_frame_*.png"))[:n]
    return [Image.open(p).convert("RGB") for p in paths]


def _video_conv(frames: list[Image.Image], text: str = "Describe the video.") -> list[dict]:
    return [{"role": "user", "content": [*frames, text]}]


# ---------------------------------------------------------------------------- real 4.5 release


@pytest.mark.parametrize("case", REAL_CASES, ids=lambda p: p.name)
def test_real45_case(real45_processor: Processor, load_case, case: Path) -> None:
    convs, params, meta = load_case(case)
    out = real45_processor(convs, **params["chat_kwargs"])
    assert out.prompts == meta["chat_template_prompts"]
    assert out.expanded_prompts == meta["expanded_prompts"]
    assert out.input_ids == meta["input_ids"]
    zeros = [[i for i, m in enumerate(row) if m == 0] for row in _padded(out)[1]]
    assert zeros == meta["attention_mask_zero_positions"]
    assert _lists(out.image_bounds) == meta["image_bound"]
    assert _lists(out.tgt_sizes) == meta["tgt_sizes"]
    assert [len(pv) for pv in out.pixel_values] == meta["num_slices_per_conv"]
    assert out.temporal_ids == meta["temporal_ids_from_processor"]
    assert [len(h) for h in out.image_hashes] == [len(s) for s in meta["image_sizes_wh"]]


@pytest.mark.parametrize("case", REAL_CASES, ids=lambda p: p.name)
def test_real45_pixel_values_in_processor_order(real45_processor: Processor, load_case, case: Path) -> None:
    convs, params, meta = load_case(case)
    out = real45_processor(convs, **params["chat_kwargs"])
    got = [hashlib.sha256(np.ascontiguousarray(pv, dtype=np.float32).tobytes()).hexdigest()
           for conv in out.pixel_values for pv in conv]
    assert got == meta["pixel_values_sha256"]


@pytest.mark.parametrize("case", REAL_CASES, ids=lambda p: p.name)
def test_real45_decode_round_trip(real45_tokenizer: Tokenizer, load_case, case: Path) -> None:
    _, _, meta = load_case(case)
    decoded = [real45_tokenizer.decode(ids) for ids in meta["input_ids"]]
    flags = [d == e for d, e in zip(decoded, meta["expanded_prompts"], strict=True)]
    assert flags == meta["decode_roundtrip_equal"]
    if meta["decoded_texts"] is not None:
        assert decoded == meta["decoded_texts"]


# ---------------------------------------------------------------------------- conformance


def _pixel_stats(pv: np.ndarray) -> list[float]:
    x = pv.astype(np.float64).ravel()
    w = (np.arange(x.size) % 97).astype(np.float64)
    return [x.sum(), (x * x).sum(), (x * w).sum(), float(x.size)]


@pytest.mark.parametrize("version, case", CONF_CASES)
def test_conformance_case(conformance_processors, load_case, version: str, case: Path) -> None:
    convs, params, meta = load_case(case)
    out = conformance_processors[version](convs, **params["chat_kwargs"])
    ids, mask, bounds = _padded(out)
    assert out.prompts == meta["chat_template_prompts"]
    assert out.expanded_prompts == meta["expanded_prompts"]
    assert ids == meta["input_ids"]
    assert _lists(bounds) == meta["image_bound"]
    assert _lists(out.tgt_sizes) == meta["tgt_sizes"]
    assert [len(pv) for pv in out.pixel_values] == meta["num_slices_per_conv"]
    assert out.temporal_ids == meta["temporal_ids_from_processor"]
    tensors = load_file(str(case / "expected" / "tensors.safetensors"))
    assert mask == tensors["attention_mask"].tolist()
    stats = [_pixel_stats(pv) for conv in out.pixel_values for pv in conv]
    if stats:
        np.testing.assert_allclose(stats, tensors["pixel_values_stats"], rtol=1e-9, atol=1e-6)


def test_batched_conversations_are_left_padded(conformance_processors, load_case) -> None:
    root = DATA / "conformance" / "4.5"
    (a, _, meta_a), (b, _, meta_b) = load_case(root / "single_448"), load_case(root / "fewshot")
    out = conformance_processors["4.5"](a + b)
    assert out.input_ids == meta_a["input_ids"] + meta_b["input_ids"]
    ids, mask, bounds = _padded(out)
    pad = len(meta_b["input_ids"][0]) - len(meta_a["input_ids"][0])
    assert pad > 0 and ids[0] == [0] * pad + meta_a["input_ids"][0] and ids[1] == meta_b["input_ids"][0]
    assert mask[0][:pad] == [0] * pad and all(mask[0][pad:])
    shifted = [[s + pad, e + pad] for s, e in meta_a["image_bound"][0]]
    assert _lists(bounds) == [shifted, meta_b["image_bound"][0]]
    assert out.temporal_ids == meta_a["temporal_ids_from_processor"] + meta_b["temporal_ids_from_processor"]


def test_entries_follow_the_slices() -> None:
    """One resampler entry per slice, or per (frame group, slice index) with temporal ids."""
    proc = Processor.from_dir(DATA / "real-4.5" / "release", get_version("4.5"))
    frames = _frames(6)
    out = proc([_video_conv(frames)], temporal_ids=[[0, 1], [2, 3], [4, 5]], max_slice_nums=1)
    assert out.entries == [[(0, 2), (2, 2), (4, 2)]] and out.temporal_ids == [[[0, 1], [2, 3], [4, 5]]]
    plain = proc([_video_conv(frames[:2])])
    n = len(plain.pixel_values[0])
    assert plain.entries == [[(i, 1) for i in range(n)]] and plain.temporal_ids == [[[-1]] * n]


# ---------------------------------------------------------------------------- chat template choice


def _copy_checkpoint(src: Path, dst: Path, *, chat_template: object = "keep") -> Path:
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is None:
        cfg.pop("chat_template")
    elif chat_template != "keep":
        cfg["chat_template"] = chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


def test_fallback_template_only_without_checkpoint_template(tmp_path: Path, load_case) -> None:
    ckpt = _copy_checkpoint(DATA / "conformance" / "2.6" / "_checkpoint", tmp_path, chat_template=None)
    proc = Processor.from_dir(ckpt, get_version("2.6"))
    assert proc.tokenizer.chat_template is None and proc.template.source == QWEN2_CHAT_TEMPLATE
    for _, case in (p.values for p in CONF_CASES if p.values[0] == "2.6"):
        convs, params, meta = load_case(case)
        out = proc(convs, **params["chat_kwargs"])
        assert out.prompts == meta["chat_template_prompts"], case.name
        assert _padded(out)[0] == meta["input_ids"], case.name


def test_checkpoint_template_wins_over_fallback(tmp_path: Path) -> None:
    custom = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    ckpt = _copy_checkpoint(DATA / "conformance" / "2.6" / "_checkpoint", tmp_path, chat_template=custom)
    out = Processor.from_dir(ckpt, get_version("2.6"))([[{"role": "user", "content": "hi"}]])
    assert out.prompts == ["[user]hi"]


def test_no_preprocessor_config_uses_defaults(tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(DATA / "conformance" / "4.5" / "_checkpoint", tmp_path)
    (ckpt / "preprocessor_config.json").unlink()
    proc = Processor.from_dir(ckpt, get_version("4.5"))
    assert proc.cfg == ProcessorConfig()


# ---------------------------------------------------------------------------- temporal ids (4.5)


def test_temporal_groups_with_slicing_order(real45_processor: Processor) -> None:
    frames = _frames(6)
    plan = plan_slices(640, 360, max_slice_nums=2)
    assert plan.num_slices == 3
    groups = [[0, 5, 10], [15, 20, 25]]
    out = real45_processor([_video_conv(frames)], max_slice_nums=2, use_image_id=True, temporal_ids=groups)
    cut = [make_slices(f, plan) for f in frames]
    expected = [cut[f][s] for g in (range(0, 3), range(3, 6)) for s in range(3) for f in g]
    assert [im.tobytes() for im in out.slices[0]] == [im.tobytes() for im in expected]
    assert out.tgt_sizes[0] == [plan.tgt_sizes[s] for _ in range(2) for s in range(3) for _ in range(3)]
    assert out.temporal_ids == [[groups[0]] * 3 + [groups[1]] * 3]
    assert len(out.image_bounds[0]) == 6
    text = out.expanded_prompts[0]
    assert text.count("<image_id>") == 2
    assert "<image_id>0</image_id>" in text and "<image_id>3</image_id>" in text
    # "\n" chunks before skipped frames are stripped; the one before a group's first frame stays
    assert "</slice>\n<image_id>3</image_id>" in text and "</slice>\n\n" not in text


def test_uneven_groups_and_text_strip(real45_processor: Processor) -> None:
    f = _frames(3)
    conv = [{"role": "user", "content": [f[0], " a ", f[1], "b", f[2], "end"]}]
    out = real45_processor([conv], use_image_id=False, max_slice_nums=1, temporal_ids=[[1], [2, 3]])
    parts = out.prompts[0].split(IMAGE_TAG)
    assert parts[1] == "\n a \n" and parts[2] == "\nb\n"
    # frame 2 is skipped: the chunk before it is stripped and gets no placeholder
    text = out.expanded_prompts[0]
    assert text.count("<image>") == 2 and "</image>\n a \n<image>" in text
    assert "</image>b\nend<|im_end|>" in text
    assert out.temporal_ids == [[[1], [2, 3]]]
    assert len(out.pixel_values[0]) == 3 and len(out.image_bounds[0]) == 2


def test_video_without_temporal_ids(real45_processor: Processor) -> None:
    out = real45_processor([_video_conv(_frames(3))], max_slice_nums=1, use_image_id=False)
    assert out.temporal_ids == [[[-1], [-1], [-1]]]
    assert out.expanded_prompts[0].count("<image>") == 3


def test_split_temporal_ids_depths() -> None:
    assert split_temporal_ids(None, 2) == [None, None]
    assert split_temporal_ids([[0, 1], [2]], 1) == [[[0, 1], [2]]]
    assert split_temporal_ids([[[0, 1]], None], 2) == [[[0, 1]], None]


@pytest.mark.parametrize(
    "temporal_ids, match",
    [
        ([[0, 1], [2]], "3 frame ids but the conversation has 6"),
        ([[0, 1, 2], [3, 4, 5], [6]], "7 frame ids"),
        ([[0, 1, 2], [], [3, 4, 5]], "non-empty"),
        ([[0, 1, 2], [3, 4, "5"]], "integer"),
        ([[0, 1, 2], [3, 4, -5]], "non-negative"),
        ([[0, 1, 2], [3, 4, True]], "integer"),
        ([[[0, 1, 2, 3, 4, 5]], [[0]]], "2 conversation"),
        ("0,1,2", "non-empty list"),
        ([], "non-empty list"),
    ],
)
def test_bad_temporal_ids(real45_processor: Processor, temporal_ids: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        real45_processor([_video_conv(_frames(6))], max_slice_nums=1, temporal_ids=temporal_ids)


def test_temporal_group_with_different_slice_counts(real45_processor: Processor) -> None:
    frames = [_frames(1)[0], Image.new("RGB", (100, 100), "white")]
    with pytest.raises(InputError, match="slice counts"):
        real45_processor([_video_conv(frames)], max_slice_nums=9, temporal_ids=[[0, 1]])


def test_temporal_ids_refused_for_26(conformance_processors) -> None:
    with pytest.raises(InputError, match="temporal_ids"):
        conformance_processors["2.6"]([_video_conv(_frames(2))], temporal_ids=[[0, 1]])


# ---------------------------------------------------------------------------- options and errors


def test_26_has_no_temporal_output_nor_thinking(conformance_processors) -> None:
    proc = conformance_processors["2.6"]
    out = proc([[{"role": "user", "content": "hi"}]])
    assert out.temporal_ids is None and out.pixel_values == [[]] and out.image_bounds == [[]]
    assert proc([[{"role": "user", "content": "hi"}]], enable_thinking=False).prompts == out.prompts
    with pytest.raises(InputError, match="thinking"):
        proc([[{"role": "user", "content": "hi"}]], enable_thinking=True)


def test_45_thinking_flag_defaults_to_false(conformance_processors) -> None:
    proc = conformance_processors["4.5"]
    conv = [{"role": "user", "content": "hi"}]
    assert proc([conv]).prompts[0].endswith("<think>\n\n</think>\n\n")
    assert proc([conv], enable_thinking=True).prompts[0].endswith("<|im_start|>assistant\n<think>\n")


def test_image_ids_count_across_turns_and_can_be_disabled(real45_processor: Processor) -> None:
    a, b = Image.new("RGB", (100, 80), "red"), Image.new("RGB", (90, 90), "blue")
    conv = [{"role": "user", "content": [a, "x"]}, {"role": "assistant", "content": "y"},
            {"role": "user", "content": [b, "z"]}]
    text = real45_processor([conv]).expanded_prompts[0]
    assert "<image_id>0</image_id>" in text and "<image_id>1</image_id>" in text
    assert "<image_id>" not in real45_processor([conv], use_image_id=False).expanded_prompts[0]


def test_literal_tag_without_image(real45_processor: Processor) -> None:
    conv = [{"role": "user", "content": f"What does {IMAGE_TAG} mean?"}]
    with pytest.raises(PlaceholderMismatchError, match="1 '.*' tag.*0 image"):
        real45_processor([conv])
    conv = [{"role": "user", "content": [Image.new("RGB", (50, 50)), f"and {IMAGE_TAG}"]}]
    with pytest.raises(PlaceholderMismatchError, match="2 .* 1 image"):
        real45_processor([conv])


@pytest.mark.parametrize("text", ["look <image> here", "a </slice> b", "x <slice></slice> y",
                                  "<image>" + "<unk>" * 64 + "</image>"])
def test_literal_markers_in_text(real45_processor: Processor, text: str) -> None:
    conv = [{"role": "user", "content": [Image.new("RGB", (50, 50)), text]}]
    with pytest.raises(PlaceholderMismatchError):
        real45_processor([conv])


def test_unknown_item_and_first_role(real45_processor: Processor) -> None:
    with pytest.raises(InputError, match="unsupported"):
        real45_processor([[{"role": "user", "content": ["q", {"type": "hologram", "hologram": "v.holo"}]}]])
    with pytest.raises(InputError, match="does not exist"):  # video items are supported (tests/video)
        real45_processor([[{"role": "user", "content": ["q", {"type": "video", "video": "v.mp4"}]}]])
    with pytest.raises(InputError, match="first message"):
        real45_processor([[{"role": "assistant", "content": "q"}]])
    with pytest.raises(InputError, match="non-empty"):
        real45_processor([])
    with pytest.raises(InputError, match="wrap a single conversation"):
        real45_processor([{"role": "user", "content": "q"}])


def test_prompt_too_long_for_images(real45_processor: Processor, load_case) -> None:
    convs, params, meta = load_case(DATA / "real-4.5" / "cases" / "zh_image_1344x1344")
    last_end = meta["image_bound"][0][-1][1]  # index of the last </slice>
    with pytest.raises(ContextLengthError, match="image placeholder"):
        real45_processor(convs, **params["chat_kwargs"], max_length=last_end)
    with pytest.raises(ContextLengthError):
        real45_processor(convs, **params["chat_kwargs"], max_length=10)


def test_text_only_truncation_is_kept(real45_processor: Processor, load_case, caplog) -> None:
    convs, params, meta = load_case(DATA / "real-4.5" / "cases" / "zh_image_1344x1344")
    keep = meta["image_bound"][0][-1][1] + 1
    with caplog.at_level(logging.WARNING, logger="minicpmv.processing.processor"):
        out = real45_processor(convs, **params["chat_kwargs"], max_length=keep)
    assert out.input_ids == [meta["input_ids"][0][:keep]]
    assert _lists(out.image_bounds) == meta["image_bound"]
    assert "truncated" in caplog.text


@pytest.mark.parametrize("bad", [0, -3, 1.5, "10"])
def test_bad_max_length(real45_processor: Processor, bad: object) -> None:
    with pytest.raises(InputError, match="max_length"):
        real45_processor([[{"role": "user", "content": "hi"}]], max_length=bad)


def test_model_inputs_shapes(real45_processor: Processor) -> None:
    img = Image.new("RGB", (1000, 500), "red")
    out = real45_processor([[{"role": "user", "content": [img, "q"]}], [{"role": "user", "content": "t"}]])
    assert isinstance(out, ModelInputs) and len(out) == 2
    for pv, (h, w) in zip(out.pixel_values[0], out.tgt_sizes[0], strict=True):
        assert pv.dtype == np.float32 and pv.shape == (3, 14, h * w * 14)
    assert len(out.slices[0]) == len(out.pixel_values[0]) and out.slices[1] == []
    assert out.temporal_ids[1] == [] and out.image_hashes[1] == []
