"""Video input: decode a file with PyAV, sample frames as the model cards do, group them in time.

What this file does
-------------------
``Video`` wraps a video (a path, bytes, a binary file object, or a list of frames with optional
timestamps) plus per-video overrides. ``Video.expand(policy)`` returns ``VideoFrames``: the
sampled RGB frames, their source indices and timestamps, and for 4.5 the temporal id groups
that the 3D resampler packs together. The processor turns each frame into an image placeholder,
exactly as if the frames had been passed as images (which is what the official recipes do).

Decoding reads only the sampled frames: one demux pass (no decoding) lists every packet's
presentation timestamp and the keyframes, which gives the exact frame count and maps frame index
k to its timestamp; then, for each wanted frame, we seek to the keyframe before it when that
skips work and decode forward to it. Files whose packets lack timestamps are decoded in one
sequential pass instead. A video file's (path or bytes) frames are a ``SampledFrames`` sequence: sampling needs
only the demux pass, and frames are decoded when they are used (the processor iterates them
once per call), keeping at most ``FRAME_CACHE_BYTES`` of decoded frames. So the memory of a
long video is the decoder's few reference frames, never the video or all sampled frames. A
binary file object is decoded at once (its owner may close it): pass a path for long videos.

The recipes (model cards of MiniCPM-V 2.6 and 4.5), restated
--------------------------------------------------------------
Let N be the number of frames and F the container's average frame rate (``avg_frame_rate``).
``uniform(xs, n)`` picks n items of xs: with gap = len(xs)/n, item i is xs[int(i*gap + gap/2)]
(the middle of each of n equal bins; n > len(xs) repeats items, as in the recipe).

* 2.6 (``recipe="stride"``): take every s-th frame from frame 0 with s = round(F / fps)
  (Python's round, so 2.5 -> 2; fps = 1 by default); if more than ``max_frames`` (64) remain,
  keep ``uniform(them, max_frames)``. chat() is then called with ``use_image_id=False`` and
  ``max_slice_nums=2``. No temporal ids (2.6 has no temporal resampler).
* 4.5 (``recipe="packed"``): D = N / F seconds; c = the requested fps (``choose_fps``, 5 in the
  model card's call); M = ``max_frames`` (``MAX_NUM_FRAMES``, 180); P = ``max_packing``
  (``MAX_NUM_PACKING``, 3, valid 1..6).
  - if c * int(D) <= M: packing 1, n = round(min(c, round(F)) * min(M, D));
  - else packing = ceil(D * c / M); if packing <= P: n = round(D * c);
    otherwise n = round(M * P) and packing = P.
  Frame indices = uniform(range(N), n). A forced packing (``force_packing``, truthy) replaces
  the packing by min(force, P) after the frame choice. Frame k's time is k / F seconds; it is
  mapped to the nearest point of the grid 0, 0.1, 0.2, ... (numpy ``arange(0, D, 0.1)``) and
  its id is int(grid value / 0.1) (truncating, as the recipe's ``astype(int32)``). Ids are
  chunked in order into groups of ``packing`` (the last group may be shorter); chat() gets
  ``use_image_id=False``, ``max_slice_nums=1`` and ``temporal_ids=groups``.

Deliberate differences, only where the recipe has no answer: the recipe's nearest-point search
(a kd-tree) breaks exact floating-point ties in an order internal to the tree; we take the
earlier grid point (a difference of one 0.1 s step, only for timestamps exactly halfway between
two steps). Where the recipe would divide by zero (4.5 clips shorter than about 0.1 s, or
videos under 0.5 fps) we take min(N, max(1, round(min(c, F) * D))) frames; where 2.6 would use
a zero stride (F < fps / 2) we use stride 1. A list of frames is used as given (capped like
the recipe: at most ``max_frames`` for 2.6, at most ``max_frames * max_packing`` for 4.5, packing
the least that keeps the groups within ``max_frames``); missing timestamps are i / fps.

What this file does not do: slicing, placeholders and tokens (``processor.py``), audio, rotation
metadata (ignored, like the recipe's decord), or any model work. No torch; PyAV is imported only
when a file is decoded (the optional ``[video]`` extra).
"""

from __future__ import annotations

import bisect
import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from PIL import Image

from ..errors import InputError, VideoError
from ..versions import VersionSpec, VideoPolicy, get_version
from . import image as _image
from .image import LazySequence, describe_source, load_image

log = logging.getLogger(__name__)

T = TypeVar("T")
VideoSource = str | PathLike | bytes | bytearray | memoryview | BinaryIO
INSTALL_HINT = "video input needs PyAV: pip install 'minicpmv[video]'"
MAX_DECODER_THREADS = 4
FRAME_CACHE_BYTES = 64 * 2**20  # decoded frames a SampledFrames keeps (the rest are decoded again)
OPTION_KEYS = ("fps", "max_frames", "packing", "max_packing", "max_slice_nums", "use_image_id", "max_pixels",
               "timestamps")


# ---------------------------------------------------------------------------- sampling (pure)


def uniform_sample(items: Sequence[T], n: int) -> list[T]:
    """n items of ``items``, the middle of each of n equal bins (repeats when n > len(items))."""
    if n < 1 or not len(items):
        raise InputError(f"cannot sample {n} item(s) from {len(items)}")
    gap = len(items) / n
    return [items[int(i * gap + gap / 2)] for i in range(n)]


def stride_indices(num_frames: int, native_fps: float, *, fps: float, max_frames: int) -> list[int]:
    """2.6 recipe: every round(native_fps / fps)-th frame, at most ``max_frames`` (uniformly)."""
    step = max(1, round(native_fps / fps))
    picked = list(range(0, num_frames, step))
    return uniform_sample(picked, max_frames) if len(picked) > max_frames else picked


def packed_indices(
    num_frames: int, native_fps: float, *, fps: float, max_frames: int, max_packing: int,
    force_packing: int | None = None,
) -> tuple[list[int], int]:
    """4.5 recipe: (frame indices, packing number); see the module docstring."""
    duration = num_frames / native_fps
    if fps * int(duration) <= max_frames:
        packing = 1
        count = round(min(fps, round(native_fps)) * min(max_frames, duration))
    else:
        packing = math.ceil(duration * fps / max_frames)
        if packing <= max_packing:
            count = round(duration * fps)
        else:
            count, packing = round(max_frames * max_packing), max_packing
    if count < 1:  # the recipe divides by zero here
        count = min(num_frames, max(1, round(min(fps, native_fps) * duration)))
    indices = uniform_sample(range(num_frames), count)
    if force_packing:
        packing = min(force_packing, max_packing)
    return indices, packing


def nearest_time_ids(timestamps: Sequence[float], duration: float, time_scale: float = 0.1) -> list[int]:
    """Ids of the grid points ``arange(0, duration, time_scale)`` nearest to each timestamp.

    The id is int(point / time_scale), truncated like the recipe; exact ties take the earlier
    point.
    """
    grid = np.arange(0, duration, time_scale)  # [G] float64, the recipe's grid
    if grid.size == 0:
        grid = np.zeros(1)
    t = np.asarray(list(timestamps), dtype=np.float64)  # [n]
    if grid.size == 1:
        pick = np.zeros(t.shape, dtype=np.int64)
    else:
        hi = np.clip(np.searchsorted(grid, t), 1, grid.size - 1)  # [n]
        lo = hi - 1
        pick = np.where(np.abs(t - grid[lo]) <= np.abs(grid[hi] - t), lo, hi)
    return [int(v) for v in (grid[pick] / time_scale).astype(np.int32)]


def group_ids(ids: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive chunks of ``size`` ids (the last may be shorter)."""
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


# ---------------------------------------------------------------------------- recipes


class StrideRecipe:
    """2.6: every round(native fps / fps)-th frame, one frame per resampler entry."""

    def frames_per_entry(self, policy: VideoPolicy) -> int:
        return 1

    def sample(self, policy: VideoPolicy, num_frames: int, native_fps: float,
               force_packing: int | None) -> tuple[list[int], int]:
        return stride_indices(num_frames, native_fps, fps=policy.fps, max_frames=policy.max_frames), 1

    def packing_for(self, policy: VideoPolicy, num_frames: int, force_packing: int | None) -> int:
        return 1

    def groups(self, policy: VideoPolicy, timestamps: Sequence[float], duration: float,
               packing: int) -> list[list[int]] | None:
        return None  # no temporal ids


class PackedRecipe:
    """4.5: ``fps`` frames per second in groups of up to ``max_packing`` frames, temporal ids."""

    def frames_per_entry(self, policy: VideoPolicy) -> int:
        return policy.max_packing

    def sample(self, policy: VideoPolicy, num_frames: int, native_fps: float,
               force_packing: int | None) -> tuple[list[int], int]:
        return packed_indices(num_frames, native_fps, fps=policy.fps, max_frames=policy.max_frames,
                              max_packing=policy.max_packing, force_packing=force_packing)

    def packing_for(self, policy: VideoPolicy, num_frames: int, force_packing: int | None) -> int:
        return min(force_packing or math.ceil(num_frames / policy.max_frames), policy.max_packing)

    def groups(self, policy: VideoPolicy, timestamps: Sequence[float], duration: float,
               packing: int) -> list[list[int]] | None:
        return group_ids(nearest_time_ids(timestamps, duration, policy.time_scale), packing)


RECIPES: dict[str, StrideRecipe | PackedRecipe] = {"stride": StrideRecipe(), "packed": PackedRecipe()}


def recipe_of(policy: VideoPolicy) -> StrideRecipe | PackedRecipe:
    """The frame-sampling strategy a version's ``VideoPolicy`` names."""
    try:
        return RECIPES[policy.recipe]
    except KeyError:
        raise InputError(f"unknown video recipe {policy.recipe!r}; known: {', '.join(RECIPES)}") from None


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class VideoOptions:
    """Per-video overrides of the version's ``VideoPolicy`` (None = the policy's value)."""

    fps: float | None = None  # 2.6: frames per second sampled; 4.5: choose_fps
    max_frames: int | None = None  # 2.6: most frames; 4.5: MAX_NUM_FRAMES (most groups)
    packing: int | None = None  # 4.5: force_packing (frames per group)
    max_packing: int | None = None  # 4.5: MAX_NUM_PACKING
    max_slice_nums: int | None = None  # slicing of the frames (None: call's value, else policy)
    use_image_id: bool | None = None
    max_pixels: int | None = None  # pixels per decoded frame (None: the image limit, DEFAULT_MAX_PIXELS)

    def __post_init__(self) -> None:
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps)
                                         and self.fps > 0 and not isinstance(self.fps, bool)):
            raise InputError(f"video fps must be a positive number, got {self.fps!r}")
        for name in ("max_frames", "packing", "max_packing", "max_slice_nums", "max_pixels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
                raise InputError(f"video {name} must be a positive integer, got {v!r}")
        if self.use_image_id is not None and not isinstance(self.use_image_id, bool):
            raise InputError(f"video use_image_id must be True or False, got {self.use_image_id!r}")

    @property
    def pixel_limit(self) -> int:
        """Most pixels a frame may have (checked before a frame is decoded into an image)."""
        return int(self.max_pixels or _image.DEFAULT_MAX_PIXELS)

    def resolve(self, policy: VideoPolicy) -> VideoPolicy:
        """The policy with these overrides applied (and checked against the model's limits)."""
        if self.packing is not None and policy.packing_limit < 2 and self.packing > 1:
            raise InputError(f"packing={self.packing}: this model has no temporal frame packing "
                             "(only MiniCPM-V 4.5 packs frames)")
        max_packing = self.max_packing or max(policy.max_packing, self.packing or 1)
        if max_packing > policy.packing_limit:
            raise InputError(f"packing of {max_packing} frames per group is over this model's limit of "
                             f"{policy.packing_limit}")
        return replace(policy, fps=float(self.fps or policy.fps),
                       max_frames=int(self.max_frames or policy.max_frames), max_packing=int(max_packing))


# ---------------------------------------------------------------------------- decoding (PyAV)


@dataclass(frozen=True)
class VideoInfo:
    """What a demux pass tells about a video file."""

    num_frames: int
    fps: float  # average frame rate (frames per second)
    width: int
    height: int
    codec: str

    @property
    def duration(self) -> float:
        """Seconds, as the recipes compute it: frames / average fps."""
        return self.num_frames / self.fps


@dataclass
class _Index:
    info: VideoInfo
    pts: list[int] | None  # presentation timestamps in order (frame k -> pts[k]); None: no index
    keys: list[int]  # keyframe timestamps, sorted


def _av() -> Any:
    try:
        import av
    except ImportError as e:
        raise VideoError(INSTALL_HINT) from e
    return av


def _describe(src: object) -> str:
    return describe_source(src, "video")


def check_frame_pixels(width: int, height: int, limit: int, what: str) -> None:
    """VideoError when a ``width`` x ``height`` frame is over ``limit`` pixels (decompression bombs)."""
    if width * height > limit:
        raise VideoError(f"{what} is {width}x{height} = {width * height} pixels, over the limit of {limit} "
                         "pixels per frame (max_pixels); downscale the video or raise the limit")


class _Opened:
    """Context manager: an av input container and its first video stream, typed errors."""

    def __init__(self, src: VideoSource, what: str) -> None:
        self.src, self.what = src, what

    def __enter__(self) -> tuple[Any, Any]:
        av = _av()
        src = self.src
        if isinstance(src, (str, PathLike)):
            path = Path(src)
            if not path.is_file():
                raise VideoError(f"{self.what} does not exist or is not a regular file")
            target: Any = str(path)
        elif isinstance(src, (bytes, bytearray, memoryview)):
            target = io.BytesIO(bytes(src))
        else:
            src.seek(0)
            target = src
        try:
            self.container = av.open(target, mode="r")
        except av.EOFError as e:
            raise VideoError(f"{self.what} ends before any video data (empty or truncated file)") from e
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{self.what} cannot be read as a video (corrupt or not a video): {e}") from e
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{self.what} has no video stream")
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        if stream.codec_context is not None:  # frame threads each hold frames: bound them
            stream.codec_context.thread_count = min(os.cpu_count() or 1, MAX_DECODER_THREADS)
        return self.container, stream

    def __exit__(self, *exc: object) -> None:
        self.container.close()


def _codec_name(stream: Any, what: str) -> str:
    ctx = stream.codec_context
    name = getattr(ctx, "name", None) if ctx is not None else None
    if not name or name == "none":
        raise VideoError(f"{what}: its video codec is unknown to or not decodable by this FFmpeg build; "
                         "convert the video, e.g. to H.264 MP4")
    return str(name)


def _scan_packets(container: Any, stream: Any) -> tuple[list[int] | None, list[int], int]:
    """(sorted pts of every frame packet or None, sorted keyframe pts, packet count)."""
    pts: list[int] = []
    keys: list[int] = []
    count, missing = 0, False
    for packet in container.demux(stream):
        if packet.size == 0 or getattr(packet, "is_discard", False):
            continue
        count += 1
        if packet.pts is None:
            missing = True
            continue
        pts.append(int(packet.pts))
        if packet.is_keyframe:
            keys.append(int(packet.pts))
    if missing or len(set(pts)) != len(pts):
        return None, [], count
    return sorted(pts), sorted(keys), count


def _frame_rate(stream: Any, container: Any, num_frames: int, what: str) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    if container.duration:
        return num_frames / (container.duration / 1_000_000)
    raise VideoError(f"{what} has no frame rate and no duration")


def _index(src: VideoSource, what: str) -> _Index:
    av = _av()
    with _Opened(src, what) as (container, stream):
        codec = _codec_name(stream, what)
        try:
            pts, keys, count = _scan_packets(container, stream)
        except av.FFmpegError as e:
            raise VideoError(f"{what} is corrupt (demuxing failed: {e})") from e
        num = len(pts) if pts is not None else (int(stream.frames or 0) or count)
        if num < 1:
            raise VideoError(f"{what} has no frames (zero-length video)")
        info = VideoInfo(num, _frame_rate(stream, container, num, what), int(stream.codec_context.width),
                         int(stream.codec_context.height), codec)
    return _Index(info, pts, keys)


class _NotIndexed(Exception):
    """The packet timestamps do not match the decoded frames; fall back to sequential decoding."""


def _decode_indexed(container: Any, stream: Any, idx: _Index, wanted: list[int]) -> Iterator[tuple[int, Any]]:
    """(frame index, av frame) for each wanted index (sorted, unique), seeking when it skips work."""
    pts = idx.pts or []
    keys = idx.keys or pts[:1]
    frames: Iterator[Any] | None = None
    pos: int | None = None  # pts of the last frame taken
    for k in wanted:
        target = pts[k]
        frame = None
        key = keys[max(bisect.bisect_right(keys, target) - 1, 0)]
        if frames is not None and pos is not None and key <= pos < target:
            frame = _advance(frames, target)  # no keyframe to jump to: keep decoding forward
        if frame is None or frame.pts != target:
            frame, frames = _seek_to(container, stream, keys, target)
        pos = frame.pts
        yield k, frame


def _seek_to(container: Any, stream: Any, keys: list[int], target: int) -> tuple[Any, Iterator[Any]]:
    """Seek to the keyframe before ``target`` (then an earlier one, then the start) and decode to it."""
    at = max(bisect.bisect_right(keys, target) - 1, 0)
    for j in dict.fromkeys((at, max(at - 1, 0), 0)):
        container.seek(keys[j], stream=stream, backward=True)
        frames = container.decode(stream)
        frame = _advance(frames, target)
        if frame is not None and frame.pts == target:
            return frame, frames
    raise _NotIndexed(f"the decoder produced no frame with pts {target}")


def _advance(frames: Iterator[Any], target: int) -> Any:
    """Decode until a frame with pts >= target; None at the end of the stream."""
    for frame in frames:
        if frame.pts is None:
            raise _NotIndexed("decoded frames carry no timestamps")
        if frame.pts >= target:
            return frame
    return None


def _decode_sequential(container: Any, stream: Any, wanted: list[int]) -> Iterator[tuple[int, Any]]:
    """(frame index, av frame) by counting decoded frames from the start."""
    if not wanted:
        return
    todo = set(wanted)
    last = max(wanted)
    for k, frame in enumerate(container.decode(stream)):
        if k in todo:
            yield k, frame
        if k >= last:
            return
    raise VideoError(f"the video ended before frame {last}")


def iter_video_frames(src: VideoSource, indices: Sequence[int], *, index: _Index | None = None,
                      what: str | None = None, max_pixels: int | None = None) -> Iterator[tuple[int, Image.Image]]:
    """(frame index, RGB image) for the distinct ``indices`` in increasing order; decodes only
    what is needed to reach them. Raises VideoError for unreadable or corrupt videos and for a
    frame over ``max_pixels`` (default: the image limit), before it becomes an image."""
    what = what or _describe(src)
    limit = int(max_pixels or _image.DEFAULT_MAX_PIXELS)

    def rgb(k: int, frame: Any) -> Image.Image:
        check_frame_pixels(int(frame.width), int(frame.height), limit, f"{what}: frame {k}")
        return frame.to_image()

    idx = index or _index(src, what)
    wanted = sorted(set(int(i) for i in indices))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < idx.info.num_frames:
        raise InputError(f"frame indices must lie in [0, {idx.info.num_frames}), got {wanted[0]}..{wanted[-1]}")
    av = _av()
    done: set[int] = set()
    try:
        if idx.pts is not None:
            try:
                with _Opened(src, what) as (container, stream):
                    for k, frame in _decode_indexed(container, stream, idx, wanted):
                        done.add(k)
                        yield k, rgb(k, frame)
                return
            except _NotIndexed as e:
                log.info("%s: %s; decoding sequentially", what, e)
        with _Opened(src, what) as (container, stream):
            for k, frame in _decode_sequential(container, stream, wanted):
                if k not in done:
                    yield k, rgb(k, frame)
    except av.FFmpegError as e:
        raise VideoError(f"{what} could not be decoded (corrupt data or unsupported codec): {e}") from e


class SampledFrames(LazySequence[Image.Image]):
    """The sampled frames of a video file, decoded when they are used.

    A sequence of RGB images (frame i is source frame ``indices[i]``). Iterating decodes the
    frames in one forward pass (seeking past unwanted stretches); indexing decodes one frame.
    Decoded frames are kept while their total stays within ``cache_bytes`` (Pillow RGB costs
    4 bytes a pixel): a short clip is decoded once, a long one streams on every pass, so a
    10-minute video never sits in memory at full resolution. ``frame_size`` is known without
    decoding. ``list(frames)`` decodes and keeps them all.
    """

    def __init__(self, source: VideoSource, index: _Index, indices: Sequence[int], *, what: str,
                 cache_bytes: int | None = None, max_pixels: int | None = None) -> None:
        self._indices = [int(k) for k in indices]
        if any(b < a for a, b in zip(self._indices, self._indices[1:], strict=False)):
            raise InputError("sampled frame indices must be in increasing order")
        self._source, self._index, self._what = source, index, what
        self._budget = FRAME_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        self._max_pixels = max_pixels
        self._cache: dict[int, Image.Image] = {}
        self._cached_bytes = 0

    def __repr__(self) -> str:
        return f"SampledFrames({len(self)} of {self._what}, {len(self._cache)} decoded and kept)"

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        return self._index.info.width, self._index.info.height

    @property
    def cached_bytes(self) -> int:
        """Bytes of the decoded frames kept (at most the cache budget)."""
        return self._cached_bytes

    def __len__(self) -> int:
        return len(self._indices)

    def _item(self, i: int) -> Image.Image:
        k = self._indices[i]
        img = self._cache.get(k)
        if img is None:
            _, img = next(iter(iter_video_frames(self._source, [k], index=self._index, what=self._what,
                                                 max_pixels=self._max_pixels)))
            self._keep(k, img)
        return img

    def __iter__(self) -> Iterator[Image.Image]:
        missing = sorted(set(self._indices) - self._cache.keys())
        decoded: Iterator[tuple[int, Image.Image]] = iter(())
        if missing:
            decoded = iter_video_frames(self._source, missing, index=self._index, what=self._what,
                                        max_pixels=self._max_pixels)
        last: tuple[int, Image.Image] | None = None
        for k in self._indices:
            img = self._cache.get(k)
            if img is None:
                if last is None or last[0] != k:
                    last = next(decoded, None)
                    if last is None or last[0] != k:
                        raise VideoError(f"{self._what}: frame {k} could not be decoded")
                    self._keep(*last)
                img = last[1]
            yield img

    def _keep(self, k: int, img: Image.Image) -> None:
        cost = img.width * img.height * 4
        if self._cached_bytes + cost <= self._budget:
            self._cache[k] = img
            self._cached_bytes += cost


class ImageChain(LazySequence[Image.Image]):
    """A conversation's images in tag order: single images and videos' frames, without decoding
    the frames of file videos before they are iterated (see ``SampledFrames``)."""

    def __init__(self, images: Sequence[Image.Image] = ()) -> None:
        self._parts: list[Sequence[Image.Image]] = []
        self._len = 0
        self.extend(images)

    def append(self, img: Image.Image) -> None:
        if not self._parts or not isinstance(self._parts[-1], list):
            self._parts.append([])
        self._parts[-1].append(img)  # type: ignore[attr-defined]
        self._len += 1

    def extend(self, images: Sequence[Image.Image]) -> None:
        if isinstance(images, SampledFrames):
            self._parts.append(images)
            self._len += len(images)
        else:
            for img in images:
                self.append(img)

    def __len__(self) -> int:
        return self._len

    def _item(self, i: int) -> Image.Image:
        for part in self._parts:
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)

    def __iter__(self) -> Iterator[Image.Image]:
        for part in self._parts:
            yield from part

    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each image, without decoding video frames."""
        out: list[tuple[int, int]] = []
        for part in self._parts:
            if isinstance(part, SampledFrames):
                out.extend([part.frame_size] * len(part))
            else:
                out.extend(img.size for img in part)
        return out


def probe_video(src: VideoSource) -> VideoInfo:
    """Frame count, average fps, size and codec of a video (one demux pass, no decoding)."""
    return _index(src, _describe(src)).info


# ---------------------------------------------------------------------------- Video


@dataclass(frozen=True)
class VideoFrames:
    """A sampled video, ready to be placed in a message as consecutive images."""

    frames: Sequence[Image.Image]  # RGB, in time order (file videos: SampledFrames, decoded on use)
    indices: list[int]  # source frame index of each frame (position in the list for frame lists)
    timestamps: list[float]  # seconds
    temporal_ids: list[list[int]] | None  # 4.5: frame groups of time ids; None without packing
    packing: int
    max_slice_nums: int | None = None  # the video's own override (None: call's value, else policy)
    use_image_id: bool | None = None
    info: VideoInfo | None = None


def _to_rgb(frame: Any, i: int, max_pixels: int) -> Image.Image:
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise InputError(f"video frame {i} must be a HxWx3 uint8 array, got {frame.shape} {frame.dtype}")
        check_frame_pixels(frame.shape[1], frame.shape[0], max_pixels, f"video frame {i}")
        return Image.fromarray(frame, "RGB")
    if isinstance(frame, Image.Image):
        return load_image(frame, max_pixels=max_pixels)
    raise InputError(f"video frame {i} must be a PIL image or an HxWx3 uint8 array, got {type(frame).__name__}")


def _check_timestamps(ts: Any, n: int) -> list[float]:
    try:
        out = [float(t) for t in ts]
    except (TypeError, ValueError) as e:
        raise InputError(f"video timestamps must be numbers (seconds), got {ts!r:.80}") from e
    if len(out) != n:
        raise InputError(f"{n} video frames but {len(out)} timestamps")
    if any(not math.isfinite(t) or t < 0 for t in out) or any(b < a for a, b in zip(out, out[1:], strict=False)):
        raise InputError("video timestamps must be finite, >= 0 and non-decreasing")
    return out


class Video:
    """A video content item: ``Video("clip.mp4")``, ``Video(open(...,'rb'))``, ``Video(bytes)``
    or ``Video([frame, ...], timestamps=[...])``, with optional overrides of the model's video
    recipe (``fps``, ``max_frames``, ``packing``, ``max_packing``, ``max_slice_nums``,
    ``use_image_id``). Decoded frames are kept on the object, so a session holding it decodes
    once. Copies (``copy.deepcopy``) share the object.
    """

    def __init__(self, source: VideoSource | Sequence[Any], *, timestamps: Sequence[float] | None = None,
                 **options: Any) -> None:
        unknown = sorted(set(options) - set(OPTION_KEYS))
        if unknown:
            raise InputError(f"unknown video option(s) {unknown}; known: {', '.join(OPTION_KEYS[:-1])}")
        self.options = VideoOptions(**options)
        self._frames: list[Image.Image] | None = None
        self._timestamps: list[float] | None = None
        if isinstance(source, (list, tuple)):
            if not source:
                raise VideoError("a video given as frames needs at least one frame")
            self._frames = [_to_rgb(f, i, self.options.pixel_limit) for i, f in enumerate(source)]
            if timestamps is not None:
                self._timestamps = _check_timestamps(timestamps, len(self._frames))
            self.source: Any = None
        elif isinstance(source, (str, PathLike, bytes, bytearray, memoryview)) or hasattr(source, "read"):
            if timestamps is not None:
                raise InputError("timestamps are only given with a list of frames")
            self.source = source
        else:
            raise InputError(f"a video must be a path, bytes, a binary file or a list of frames, "
                             f"got {type(source).__name__}")
        self._index: _Index | None = None
        self._memo: tuple[VideoPolicy, VideoFrames] | None = None

    def __repr__(self) -> str:
        what = f"{len(self._frames)} frames" if self._frames is not None else _describe(self.source)
        return f"Video({what})"

    def __deepcopy__(self, memo: dict[int, Any]) -> Video:
        return self

    def __copy__(self) -> Video:
        return self

    def info(self) -> VideoInfo | None:
        """Frame count, fps, size and codec of a file video (None for a list of frames)."""
        if self._frames is not None:
            return None
        if self._index is None:
            self._index = _index(self.source, _describe(self.source))
        return self._index.info

    def expand(self, policy: VideoPolicy) -> VideoFrames:
        """Sample (and decode) the frames under ``policy`` with this video's overrides."""
        if self._memo is not None and self._memo[0] == policy:
            return self._memo[1]
        eff = self.options.resolve(policy)
        out = self._from_frames(eff) if self._frames is not None else self._from_file(eff)
        self._memo = (policy, out)
        return out

    def _plan(self, eff: VideoPolicy, num_frames: int, native_fps: float) -> tuple[list[int], int]:
        return recipe_of(eff).sample(eff, num_frames, native_fps, self.options.packing)

    def _finish(self, eff: VideoPolicy, frames: Sequence[Image.Image], indices: list[int], ts: list[float],
                duration: float, packing: int, info: VideoInfo | None) -> VideoFrames:
        groups = recipe_of(eff).groups(eff, ts, duration, packing)
        log.info("%r: %d frame(s), packing %d", self, len(frames), packing)
        return VideoFrames(frames, indices, ts, groups, packing, self.options.max_slice_nums,
                           self.options.use_image_id, info)

    def _from_file(self, eff: VideoPolicy) -> VideoFrames:
        info = self.info()
        assert info is not None
        limit = self.options.pixel_limit
        check_frame_pixels(info.width, info.height, limit, f"{_describe(self.source)}: its frames")
        indices, packing = self._plan(eff, info.num_frames, info.fps)
        assert self._index is not None
        frames: Sequence[Image.Image] = SampledFrames(self.source, self._index, indices,
                                                      what=_describe(self.source), max_pixels=limit)
        if not isinstance(self.source, (str, PathLike, bytes, bytearray, memoryview)):
            frames = list(frames)  # a file object may be closed by its owner: decode it now
        else:
            frames[0]  # decode one frame now: a stream the decoder cannot read fails here, not later
        return self._finish(eff, frames, list(indices), [i / info.fps for i in indices], info.duration,
                            packing, info)

    def _from_frames(self, eff: VideoPolicy) -> VideoFrames:
        frames = self._frames or []
        ts = self._timestamps or [i / eff.fps for i in range(len(frames))]
        positions = list(range(len(frames)))
        recipe = recipe_of(eff)
        cap = eff.max_frames * recipe.frames_per_entry(eff)
        if len(positions) > cap:
            log.info("%r: keeping %d of %d frames (max_frames=%d)", self, cap, len(frames), eff.max_frames)
            positions = uniform_sample(positions, cap)
        packing = recipe.packing_for(eff, len(positions), self.options.packing)
        kept_ts = [ts[p] for p in positions]
        return self._finish(eff, [frames[p] for p in positions], positions, kept_ts,
                            kept_ts[-1] + eff.time_scale, packing, None)


def as_video(item: Any) -> Video | None:
    """A ``Video`` for a content item that is one (``Video`` or ``{"type": "video", ...}``), else None."""
    if isinstance(item, Video):
        return item
    if isinstance(item, dict) and item.get("type") == "video":
        if "video" not in item:
            raise InputError("a {'type': 'video'} item needs a 'video' key (path, file, bytes or frames)")
        options = {k: v for k, v in item.items() if k not in ("type", "video")}
        src = item["video"]
        if isinstance(src, Video):
            if options:
                raise InputError("give the options to Video(...) itself, not next to a Video object")
            return src
        return Video(src, **options)
    return None


def resolve_video_items(items: Sequence[Any]) -> list[Any]:
    """Content items with every video item turned into a ``Video`` (which keeps its decoded frames)."""
    return [v if (v := as_video(it)) is not None else it for it in items]


def load_video(source: VideoSource | Sequence[Any], version: str | VersionSpec | VideoPolicy = "4.5",
               **options: Any) -> VideoFrames:
    """Frames and temporal ids of a video under a version's recipe, e.g. for custom pipelines."""
    if isinstance(version, VideoPolicy):
        policy = version
    else:
        spec = version if isinstance(version, VersionSpec) else get_version(version)
        if spec.video is None:
            raise InputError(f"MiniCPM-V {spec.name} has no video recipe")
        policy = spec.video
    timestamps = options.pop("timestamps", None)
    return Video(source, timestamps=timestamps, **options).expand(policy)
