"""The sampling recipes of the 2.6 and 4.5 model cards, checked against values worked out by hand.

Each row gives (frames, native fps, requested fps, max frames, max packing, force packing) and
the frame indices, packing number and temporal ids the recipe yields. The arithmetic behind each
row is in its comment; "t" marks the recipe's truncation quirk: the grid point k*0.1 divided by
0.1 lands just below k in float64 for some k (4.3 -> 42.99999...), so ``astype(int32)`` gives k-1
(k = 43, 81, 91, ... up to 600 s; found once with numpy, then written here as data).
"""

from __future__ import annotations

import math

import pytest

from minicpmv.errors import InputError
from minicpmv.processing.video import (
    Video,
    VideoOptions,
    group_ids,
    nearest_time_ids,
    packed_indices,
    stride_indices,
    uniform_sample,
)
from minicpmv.versions import get_version

ODD = list(range(1, 40, 2))


# ---------------------------------------------------------------------------- 2.6 (stride)

STRIDE_CASES = [
    # 10 s at 30 fps: stride 30
    ((300, 30.0, 1, 64), list(range(0, 300, 30))),
    # shorter than one second: one frame
    ((20, 30.0, 1, 64), [0]),
    # fps not an integer: round(29.97) = 30, round(23.976) = 24
    ((300, 29.97, 1, 64), list(range(0, 300, 30))),
    ((90, 23.976, 1, 64), [0, 24, 48, 72]),
    # round(2.5) = 2 (Python rounds half to even)
    ((10, 2.5, 1, 64), [0, 2, 4, 6, 8]),
    # 10 candidates, cap 4: gap 2.5 -> int(1.25), int(3.75), int(6.25), int(8.75) = 1, 3, 6, 8
    ((250, 25.0, 1, 4), [25, 75, 150, 200]),
    # user fps 2 at 30 fps: stride 15
    ((300, 30.0, 2, 64), list(range(0, 300, 15))),
    # native 0.25 fps: round(0.25) = 0 would be a zero stride; stride 1
    ((10, 0.25, 1, 64), list(range(10))),
]


@pytest.mark.parametrize("args,expected", STRIDE_CASES)
def test_stride_recipe(args, expected):
    n, native, fps, cap = args
    assert stride_indices(n, native, fps=fps, max_frames=cap) == expected


def test_stride_long_video_is_capped_uniformly():
    # 120 s at 25 fps: 120 candidates (every 25th frame), 64 kept; gap = 1.875, offset 0.9375:
    # i=1 -> int(2.8125)=2 -> 50, i=8 -> int(15.9375)=15 -> 375, i=62 -> int(117.1875)=117 -> 2925
    got = stride_indices(3000, 25.0, fps=1, max_frames=64)
    assert len(got) == 64
    assert got[:9] == [0, 50, 100, 150, 200, 250, 300, 350, 375]
    assert got[62:] == [2925, 2975]


# ---------------------------------------------------------------------------- 4.5 (packed)

PACKED_CASES = [
    # 4 s at 10 fps: 5*int(4) = 20 <= 180 -> packing 1, n = round(5*4.0) = 20, gap 2 -> odd frames
    ((40, 10.0, 5, 180, 3, None), ODD, 1, [[k] for k in ODD]),
    # 0.5 s at 24 fps: int(0.5) = 0 -> packing 1, n = round(5*0.5) = round(2.5) = 2 (half to even),
    # gap 6 -> frames 3, 9 at 0.125 s, 0.375 s -> nearest 0.1, 0.4
    ((12, 24.0, 5, 180, 3, None), [3, 9], 1, [[1], [4]]),
    # 29.97 fps, 60 frames = 2.002 s: n = round(min(5, 30) * 2.002) = 10, gap 6 -> 3, 9, ..., 57;
    # k/29.97 = 0.1001, 0.3003, ... -> ids 1, 3, ..., 19
    ((60, 29.97, 5, 180, 3, None), list(range(3, 60, 6)), 1, [[k] for k in range(1, 20, 2)]),
    # 2.6 fps: round(2.6) = 3 -> n = round(3*5.0) = 15 > 13 frames: gap 13/15 repeats frames 3, 9;
    # times k/2.6 -> nearest tenth
    ((13, 2.6, 5, 180, 3, None), [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12], 1,
     [[k] for k in [0, 4, 8, 12, 12, 15, 19, 23, 27, 31, 35, 35, 38, 42, 46]]),
    # 5 s at 10 fps: 25 odd frames; grid point 4.3 gives id 42 (t)
    ((50, 10.0, 5, 180, 3, None), list(range(1, 50, 2)), 1,
     [[k] for k in [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 42, 45,
                    47, 49]]),
    # force_packing 3 after the choice: groups of 3, the last one shorter
    ((40, 10.0, 5, 180, 3, 3), ODD, 3, [ODD[i : i + 3] for i in range(0, 20, 3)]),
    # force_packing 6 is capped by MAX_NUM_PACKING 3
    ((40, 10.0, 5, 180, 3, 6), ODD, 3, [ODD[i : i + 3] for i in range(0, 20, 3)]),
    # MAX_NUM_PACKING 6 and force 6
    ((40, 10.0, 5, 180, 6, 6), ODD, 6, [ODD[i : i + 6] for i in range(0, 20, 6)]),
    # max_frames 4: 5*4 = 20 > 4 -> packing ceil(20/4) = 5 > 3 -> n = 4*3 = 12, packing 3;
    # gap 40/12: int(1.67), int(5.0), int(8.33), ... -> below
    ((40, 10.0, 5, 4, 3, None), [1, 5, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38], 3,
     [[1, 5, 8], [11, 15, 18], [21, 25, 28], [31, 35, 38]]),
    # a single frame (0.033 s): the recipe's n = round(5 * 0.033) = 0 would divide by zero -> 1 frame
    ((1, 30.0, 5, 180, 3, None), [0], 1, [[0]]),
]


@pytest.mark.parametrize("args,indices,packing,groups", PACKED_CASES)
def test_packed_recipe(args, indices, packing, groups):
    n, native, fps, cap, max_packing, force = args
    got, got_packing = packed_indices(n, native, fps=fps, max_frames=cap, max_packing=max_packing,
                                      force_packing=force)
    assert got == indices
    assert got_packing == packing
    ids = nearest_time_ids([i / native for i in got], n / native, 0.1)
    assert group_ids(ids, got_packing) == groups


def test_packed_long_video_triggers_packing():
    # 60 s at 10 fps: 5*60 = 300 > 180 -> packing ceil(300/180) = 2 <= 3 -> n = 300, odd frames,
    # ids 1, 3, ..., 599 except the truncation quirk (81 -> 80, 91 -> 90, 167 -> 166, ...)
    idx, packing = packed_indices(600, 10.0, fps=5, max_frames=180, max_packing=3)
    assert idx == list(range(1, 600, 2)) and packing == 2
    groups = group_ids(nearest_time_ids([i / 10 for i in idx], 60.0, 0.1), packing)
    assert len(groups) == 150 and groups[0] == [1, 3] and groups[-1] == [597, 599]
    assert groups[20] == [80, 83] and groups[22] == [89, 90]  # frames 81 and 91 (t)


def test_packed_ten_minute_video_caps_frames():
    # 600 s at 30 fps: packing ceil(3000/180) = 17 > 3 -> n = 180*3 = 540, packing 3; gap 33.33:
    # int(16.67) = 16, int(50.0000001) = 50, int(83.33) = 83, ..., int(17983.33) = 17983;
    # times 0.533, 1.667, 2.767 -> 0.5, 1.7, 2.8; last 599.433 -> 599.4 -> 5993 (t: 5993.999...)
    idx, packing = packed_indices(18000, 30.0, fps=5, max_frames=180, max_packing=3)
    assert (len(idx), packing) == (540, 3)
    assert idx[:3] == [16, 50, 83] and idx[-1] == 17983
    groups = group_ids(nearest_time_ids([i / 30 for i in idx], 600.0, 0.1), packing)
    assert len(groups) == 180 and groups[0] == [5, 17, 28] and groups[-1][-1] == 5993


def test_packed_boundary_of_int_duration():
    # 36.9 s at 10 fps: 5*int(36.9) = 180 <= 180 -> packing 1, n = round(5*36.9) = round(184.5) = 184;
    # gap 369/184: i=91 -> int(183.497) = 183, i=183 -> int(367.997) = 367
    idx, packing = packed_indices(369, 10.0, fps=5, max_frames=180, max_packing=3)
    assert (len(idx), packing) == (184, 1)
    assert idx[0] == 1 and idx[91] == 183 and idx[-1] == 367
    # 37 s: 185 > 180 -> packing ceil(185/180) = 2, n = 185 -> odd frames 1..369
    idx, packing = packed_indices(370, 10.0, fps=5, max_frames=180, max_packing=3)
    assert idx == list(range(1, 370, 2)) and packing == 2


# ---------------------------------------------------------------------------- helpers


def test_uniform_sample_middles():
    assert uniform_sample(list(range(10)), 4) == [1, 3, 6, 8]
    assert uniform_sample(list(range(3)), 3) == [0, 1, 2]
    assert uniform_sample([7, 8], 4) == [7, 7, 8, 8]  # repeats, like the recipe
    with pytest.raises(InputError):
        uniform_sample([], 2)


def test_nearest_time_ids_ties_and_edges():
    # 0.05 is exactly halfway between 0.0 and 0.1: the earlier step wins
    assert nearest_time_ids([0.05, 0.26, 0.34], 1.0) == [0, 3, 3]
    # beyond the grid (which stops below the duration): the last point
    assert nearest_time_ids([0.95, 5.0], 1.0) == [9, 9]
    # a clip shorter than one step: only the point 0
    assert nearest_time_ids([0.0, 0.02], 0.03) == [0, 0]


def test_group_ids():
    assert group_ids([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert group_ids([1, 2], 6) == [[1, 2]]


# ---------------------------------------------------------------------------- policies and options


def test_version_table_holds_the_model_card_recipes():
    p26, p45 = get_version("2.6").video, get_version("4.5").video
    assert (p26.recipe, p26.fps, p26.max_frames, p26.max_slice_nums, p26.use_image_id) == ("stride", 1.0, 64, 2, False)
    assert (p45.recipe, p45.fps, p45.max_frames, p45.max_packing, p45.packing_limit, p45.time_scale,
            p45.max_slice_nums, p45.use_image_id) == ("packed", 5.0, 180, 3, 6, 0.1, 1, False)


def test_options_resolve_and_validate():
    p45 = get_version("4.5").video
    eff = VideoOptions(fps=2, max_frames=10, packing=5).resolve(p45)
    assert (eff.fps, eff.max_frames, eff.max_packing) == (2.0, 10, 5)  # forced packing raises the cap
    assert VideoOptions(max_packing=2).resolve(p45).max_packing == 2
    with pytest.raises(InputError, match="over this model's limit of 6"):
        VideoOptions(packing=7).resolve(p45)
    with pytest.raises(InputError, match="no temporal frame packing"):
        VideoOptions(packing=2).resolve(get_version("2.6").video)
    for bad in ({"fps": 0}, {"fps": math.inf}, {"max_frames": 0}, {"packing": 1.5}, {"use_image_id": 1}):
        with pytest.raises(InputError):
            VideoOptions(**bad)
    with pytest.raises(InputError, match="unknown video option"):
        Video([], frames_per_second=2)


def test_frame_list_uses_frames_as_given_with_timestamps():
    from PIL import Image

    frames = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(7)]
    p45 = get_version("4.5").video
    out = Video(frames, timestamps=[0, 0.3, 0.6, 1.0, 1.3, 1.6, 2.04], packing=3).expand(p45)
    assert out.temporal_ids == [[0, 3, 6], [10, 13, 16], [20]] and out.packing == 3
    assert [f.getpixel((0, 0))[0] for f in out.frames] == list(range(7))
    # no timestamps: i / fps; 200 frames over max_frames 180 -> packing ceil(200/180) = 2
    many = [Image.new("RGB", (4, 4))] * 200
    out = Video(many, fps=10).expand(p45)
    assert out.packing == 2 and out.temporal_ids[0] == [0, 1] and len(out.temporal_ids) == 100
    # more than max_frames * max_packing: uniformly capped
    out = Video(many, max_frames=10).expand(p45)
    assert len(out.frames) == 30 and out.packing == 3 and out.indices[:3] == [3, 10, 16]
    # 2.6: capped at max_frames, no temporal ids
    out = Video(many, max_frames=4).expand(get_version("2.6").video)
    assert out.indices == [25, 75, 125, 175] and out.temporal_ids is None
    with pytest.raises(InputError, match="timestamps"):
        Video(frames, timestamps=[0, 1])
    with pytest.raises(InputError, match="non-decreasing"):
        Video(frames[:2], timestamps=[1, 0])
