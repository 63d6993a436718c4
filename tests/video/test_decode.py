"""Decoding with PyAV: frame k really is frame k, only sampled frames are decoded, clear errors.

The videos are generated here (tiny code frames, see conftest.py) with several codecs and
containers: H.264 with B-frames, MPEG-4 in AVI, VP8 in WebM, lossless FFV1 in Matroska.
"""

from __future__ import annotations

import builtins
import io
import random
from fractions import Fraction

import av
import numpy as np
import pytest

from minicpmv.errors import InputError, VideoError
from minicpmv.processing import video as vmod
from minicpmv.processing.video import Video, iter_video_frames, load_video, probe_video

from .conftest import code_frame, read_code, write_video

FORMATS = [
    ("mp4", "libx264", {"g": "8", "bf": "3"}),
    ("avi", "mpeg4", {"g": "7"}),
    ("webm", "libvpx", {"g": "9"}),
    ("mkv", "ffv1", {}),
]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {ext: write_video(root / f"c.{ext}", 120, 25, codec=codec, options=opts,
                             pix_fmt="bgr0" if codec == "ffv1" else "yuv420p")
            for ext, codec, opts in FORMATS}


@pytest.mark.parametrize("ext", [f[0] for f in FORMATS])
def test_random_frames_are_the_right_frames(clips, ext):
    info = probe_video(clips[ext])
    assert (info.num_frames, info.fps, info.width, info.height) == (120, 25.0, 64, 48)
    rng = random.Random(ext)
    for _ in range(8):
        want = sorted(rng.sample(range(120), rng.randint(1, 12)))
        got = list(iter_video_frames(clips[ext], want))
        assert [k for k, _ in got] == want
        assert [read_code(im) for _, im in got] == want
        assert all(im.mode == "RGB" and im.size == (64, 48) for _, im in got)


def test_lossless_frames_are_exact_rgb(clips):
    (k, img), = iter_video_frames(clips["mkv"], [37])
    assert k == 37 and np.array_equal(np.asarray(img), code_frame(37))


def test_only_sampled_frames_are_decoded(tmp_path, monkeypatch):
    path = write_video(tmp_path / "long.mp4", 400, 25, options={"g": "10", "bf": "2"})
    decoded = 0
    real = vmod._advance

    def counting(frames, target):
        def each():
            nonlocal decoded
            for f in frames:
                decoded += 1
                yield f
        return real(each(), target)

    monkeypatch.setattr(vmod, "_advance", counting)
    want = [5, 105, 205, 305, 395]
    got = [read_code(im) for _, im in iter_video_frames(path, want)]
    assert got == want
    assert decoded <= 5 * 14, decoded  # at most one GOP (plus B-frame delay) per wanted frame, of 400


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_file_object_and_bytes_give_the_same_frames(clips, version):
    path = clips["mp4"]
    by_path = load_video(str(path), version)
    with open(path, "rb") as f:
        by_file = load_video(f, version)
    by_bytes = load_video(path.read_bytes(), version)
    for other in (by_file, by_bytes):
        assert other.indices == by_path.indices and other.temporal_ids == by_path.temporal_ids
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(other.frames, by_path.frames,
                                                                                 strict=True))


def test_recipes_on_a_generated_video(tmp_path):
    path = write_video(tmp_path / "c.mp4", 30, 10)  # 3 s at 10 fps
    v26 = load_video(path, "2.6")  # stride 10
    assert v26.indices == [0, 10, 20] and [read_code(f) for f in v26.frames] == [0, 10, 20]
    assert v26.timestamps == [0.0, 1.0, 2.0] and v26.temporal_ids is None
    v45 = load_video(path, "4.5")  # n = round(5 * 3.0) = 15, gap 2 -> odd frames; ids = tenths
    assert [read_code(f) for f in v45.frames] == list(range(1, 30, 2))
    assert v45.temporal_ids == [[k] for k in range(1, 30, 2)] and v45.packing == 1
    forced = load_video(path, "4.5", packing=3)
    assert forced.temporal_ids[:2] == [[1, 3, 5], [7, 9, 11]] and forced.packing == 3


def test_video_shorter_than_a_second(tmp_path):
    path = write_video(tmp_path / "short.mp4", 7, 24)  # 0.29 s
    assert [read_code(f) for f in load_video(path, "2.6").frames] == [0]
    v45 = load_video(path, "4.5")  # n = round(5 * 0.29) = 1 -> the middle frame 3 at 0.125 s
    assert [read_code(f) for f in v45.frames] == [3] and v45.temporal_ids == [[1]]


def test_non_integer_frame_rate(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", 45, Fraction(30000, 1001))
    info = probe_video(path)
    assert info.fps == pytest.approx(29.97, abs=1e-3) and info.num_frames == 45
    assert load_video(path, "2.6").indices == [0, 30]  # round(29.97) = 30
    # n = round(5 * 1.5015) = 8, gap 45/8 = 5.625 -> 2, 8, 14, 19, 25, 30, 36, 42
    v45 = load_video(path, "4.5")
    assert [read_code(f) for f in v45.frames] == [2, 8, 14, 19, 25, 30, 36, 42]
    assert v45.temporal_ids == [[1], [3], [5], [6], [8], [10], [12], [14]]


def test_long_video_triggers_packing(tmp_path):
    path = write_video(tmp_path / "long.mp4", 200, 5, options={"g": "20", "bf": "2"})  # 40 s at 5 fps
    v45 = load_video(path, "4.5")  # 5*40 = 200 > 180 -> packing 2, every frame, ids 0.2 s apart
    assert v45.packing == 2 and [read_code(f) for f in v45.frames] == list(range(200))
    assert v45.temporal_ids[0] == [0, 2] and v45.temporal_ids[21] == [84, 85]  # frame 43: 8.6 s -> 85 (t)
    capped = load_video(path, "4.5", max_frames=20)  # packing ceil(200/20) = 10 > 3 -> 60 frames, 3 per group
    assert len(capped.frames) == 60 and capped.packing == 3 and len(capped.temporal_ids) == 20
    v26 = load_video(path, "2.6", max_frames=8)  # stride 5 -> 40 candidates -> 8 kept
    assert [read_code(f) for f in v26.frames] == [10, 35, 60, 85, 110, 135, 160, 185]


def test_repeated_indices_share_one_decoded_frame(tmp_path):
    path = write_video(tmp_path / "slow.mp4", 13, Fraction(13, 5))  # 2.6 fps: the recipe repeats frames
    v45 = load_video(path, "4.5")
    assert v45.indices == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12]
    assert v45.frames[3] is v45.frames[4]
    assert [read_code(f) for f in v45.frames] == v45.indices


def test_decoded_frames_are_kept_on_the_video(clips, monkeypatch):
    from minicpmv.versions import get_version

    video = Video(str(clips["mp4"]))
    policy = get_version("4.5").video
    first = video.expand(policy)
    monkeypatch.setattr(vmod, "iter_video_frames", lambda *a, **k: pytest.fail("decoded twice"))
    assert video.expand(policy) is first
    import copy

    assert copy.deepcopy(video) is video


# ---------------------------------------------------------------------------- errors


def test_missing_file():
    with pytest.raises(VideoError, match="does not exist"):
        probe_video("/nonexistent/clip.mp4")


@pytest.mark.parametrize("blob", [b"", b"not a video at all" * 50, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64])
def test_unreadable_data(blob):
    with pytest.raises(VideoError, match="cannot be read as a video"):
        probe_video(blob)


def test_truncated_file_fails_cleanly(clips):
    data = clips["mp4"].read_bytes()
    with pytest.raises(VideoError):
        load_video(data[: len(data) // 3], "4.5")


def test_corrupt_stream_data(tmp_path):
    # MPEG-4 packets labelled as H.264: the container and index are intact, every packet is
    # garbage to the decoder. (Random bit flips are not a stable test: FFmpeg conceals some.)
    data = write_video(tmp_path / "mpeg4.avi", 120, 25, codec="mpeg4").read_bytes()
    assert b"FMP4" in data
    with pytest.raises(VideoError, match="could not be decoded"):
        load_video(data.replace(b"FMP4", b"H264"), "2.6")


@pytest.mark.parametrize("ext,codec,match", [("avi", "mpeg4", "no frames"), ("mkv", "libx264", "empty or truncated")])
def test_zero_length_video(tmp_path, ext, codec, match):
    path = tmp_path / f"empty.{ext}"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    with pytest.raises(VideoError, match=match):
        probe_video(path)


def test_unsupported_codec(clips):
    data = clips["avi"].read_bytes()
    assert b"FMP4" in data
    with pytest.raises(VideoError, match="codec is unknown"):
        probe_video(data.replace(b"FMP4", b"QQQQ"))  # a FourCC no decoder knows


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    with pytest.raises(VideoError, match="no video stream"):
        probe_video(path)


def test_without_pyav(monkeypatch, clips):
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(VideoError, match=r"minicpmv\[video\]"):
        probe_video(clips["mp4"])


def test_bad_sources():
    with pytest.raises(InputError, match="path, bytes"):
        Video(123)
    with pytest.raises(VideoError, match="at least one frame"):
        Video([])
    with pytest.raises(InputError, match="only given with a list of frames"):
        Video("clip.mp4", timestamps=[0.0])
    with pytest.raises(InputError, match="HxWx3"):
        Video([np.zeros((4, 4), np.uint8)])
    assert Video(io.BytesIO(b"x")).info  # file objects are accepted lazily


# ---------------------------------------------------------------------------- frames decoded on use


@pytest.fixture()
def decode_log(monkeypatch) -> list[int]:
    """Source frame indices yielded by every ``iter_video_frames`` call (i.e. really decoded)."""
    real, log = vmod.iter_video_frames, []

    def counting(*args, **kwargs):
        for k, img in real(*args, **kwargs):
            log.append(k)
            yield k, img

    monkeypatch.setattr(vmod, "iter_video_frames", counting)
    return log


def test_file_video_frames_are_decoded_when_used(tmp_path, decode_log, monkeypatch):
    path = write_video(tmp_path / "c.mp4", 60, 10, options={"g": "8", "bf": "2"})  # 6 s
    monkeypatch.setattr(vmod, "FRAME_CACHE_BYTES", 0)  # keep nothing: every pass decodes again
    v = load_video(path, "4.5")  # n = round(5 * 6) = 30 frames: 1, 3, 5, ...
    assert isinstance(v.frames, vmod.SampledFrames) and len(v.frames) == 30
    assert decode_log == [1]  # only the first frame, as a check that the stream decodes
    assert v.frames.frame_size == (64, 48)
    assert [read_code(f) for f in v.frames] == list(range(1, 60, 2))
    assert decode_log[1:] == list(range(1, 60, 2))  # one pass, each frame once
    assert [read_code(f) for f in v.frames] == list(range(1, 60, 2))  # and again, identical
    assert read_code(v.frames[7]) == 15 and read_code(v.frames[-1]) == 59
    assert [read_code(f) for f in v.frames[2:5]] == [5, 7, 9]


def test_frame_cache_keeps_frames_up_to_its_budget(tmp_path, decode_log):
    path = write_video(tmp_path / "c.mp4", 20, 10)
    info = probe_video(path)
    index = vmod._index(str(path), "clip")
    frames = vmod.SampledFrames(str(path), index, [0, 2, 4, 6, 8], what="clip",
                                cache_bytes=3 * info.width * info.height * 4)
    assert [read_code(f) for f in frames] == [0, 2, 4, 6, 8]
    decode_log.clear()
    assert [read_code(f) for f in frames] == [0, 2, 4, 6, 8]
    assert decode_log == [6, 8]  # the first three were kept, the other two decoded again
    assert frames[1] is frames[1]  # a kept frame is returned as it is


def test_sampled_frames_need_increasing_indices(tmp_path):
    path = write_video(tmp_path / "c.mp4", 10, 10)
    with pytest.raises(InputError, match="increasing"):
        vmod.SampledFrames(str(path), vmod._index(str(path), "clip"), [3, 1], what="clip")


def test_file_object_frames_outlive_the_file(clips):
    with open(clips["mp4"], "rb") as f:
        v = load_video(f, "2.6")
    assert isinstance(v.frames, list) and [read_code(im) for im in v.frames] == v.indices


def test_processor_decodes_each_frame_once(model45, tmp_path, decode_log, monkeypatch):
    path = write_video(tmp_path / "c.mp4", 40, 10)
    monkeypatch.setattr(vmod, "FRAME_CACHE_BYTES", 0)
    out = model45.processor([[{"role": "user", "content": [Video(str(path)), "q"]}]])
    assert len(out.image_hashes[0]) == 20
    assert decode_log == [1] + list(range(1, 40, 2))  # the check at sampling, then one pass


def test_image_chain_reads_frames_only_when_asked(tmp_path, decode_log):
    from PIL import Image

    path = write_video(tmp_path / "c.mp4", 20, 10)
    frames = vmod.SampledFrames(str(path), vmod._index(str(path), "clip"), [0, 5, 10], what="clip")
    a, b = Image.new("RGB", (10, 20)), Image.new("RGB", (30, 40))
    chain = vmod.ImageChain([a])
    chain.extend(frames)
    chain.append(b)
    assert len(chain) == 5 and chain.sizes() == [(10, 20), (64, 48), (64, 48), (64, 48), (30, 40)]
    assert decode_log == []  # sizes come from the index
    assert chain[0] is a and chain[-1] is b and read_code(chain[-3]) == 5 and decode_log == [5]
    assert [read_code(f) for f in chain[1:4]] == [0, 5, 10]
    with pytest.raises(IndexError):
        chain[5]
    assert [im.size for im in chain] == chain.sizes()


# ---------------------------------------------------------------------------- frame pixel limit (issue 20)


def test_frames_over_the_pixel_limit_are_refused_before_any_decoding(tmp_path, decode_log):
    """The container's frame size is checked against ``max_pixels`` right after the demux pass,
    before a frame is decoded (64x48 = 3072 pixels)."""
    path = write_video(tmp_path / "c.mp4", 10, 10)
    with pytest.raises(VideoError, match=r"64x48 = 3072 pixels, over the limit of 3071"):
        load_video(path, "2.6", max_pixels=3071)
    with pytest.raises(VideoError, match="over the limit"):
        Video(path.read_bytes(), max_pixels=3071).expand(vmod.get_version("4.5").video)
    assert decode_log == []
    assert read_code(load_video(path, "2.6", max_pixels=3072).frames[0]) == 0  # at the limit: decodes


def test_a_frame_larger_than_its_header_is_refused_before_conversion(tmp_path, monkeypatch):
    """A stream whose header claims small frames but decodes large ones (or changes size mid-way)
    is stopped at the first oversized frame, before it becomes an RGB image."""
    path = write_video(tmp_path / "c.mp4", 10, 10)
    real = vmod._index

    def lying(src, what):
        idx = real(src, what)
        return vmod._Index(vmod.replace(idx.info, width=16, height=16), idx.pts, idx.keys)

    monkeypatch.setattr(vmod, "_index", lying)
    converted = []
    monkeypatch.setattr(av.VideoFrame, "to_image", lambda self, *a, **k: converted.append(1))
    with pytest.raises(VideoError, match=r"frame 0 .*64x48.* over the limit of 1000"):
        load_video(path, "2.6", max_pixels=1000)
    assert converted == []


def test_the_default_frame_limit_is_the_image_limit(tmp_path, monkeypatch):
    from minicpmv.processing import image as imod

    path = write_video(tmp_path / "c.mp4", 4, 4)
    monkeypatch.setattr(imod, "DEFAULT_MAX_PIXELS", 3000)
    with pytest.raises(VideoError, match="over the limit of 3000"):
        load_video(path, "2.6")


def test_frame_lists_follow_the_pixel_limit():
    big = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(InputError, match="64x48 = 3072 pixels"):
        load_video([big, big], "2.6", max_pixels=100)
    with pytest.raises(InputError, match="max_pixels must be a positive integer"):
        Video([big], max_pixels=0)
