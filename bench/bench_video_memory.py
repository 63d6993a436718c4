"""Video decoding memory benchmark: a generated 10-minute 1280x720 video, sampled as the recipes do.

Writes the video to a temporary directory (MPEG-4 Part 2, keyframe every 250 frames, 1 Mbit/s:
fast to encode, and a worst case for seeking), then measures, each in a fresh subprocess, the
peak RSS growth (VmHWM after minus VmRSS before; the peak is reset first) and wall time of:

  probe        frame count / fps / size (one demux pass, no decoding)
  stream-4.5   the 4.5 recipe's 540 sampled frames, streamed one at a time (nothing kept)
  load-2.6     ``load_video(path, "2.6")``, then every one of its 64 frames read
  load-4.5     ``load_video(path, "4.5")``, then every one of its 540 frames read (packing 3)
  process-4.5  the real 4.5 release's processor on a message holding the video: decoding,
               sampling, slicing and the float32 pixel tensors of all 540 frames
  eager-4.5    baseline: the 540 sampled frames decoded and kept as RGB images (what
               load_video returned before frames were decoded on use)
  naive-4.5    baseline: decode every frame in order and keep the sampled ones (no seeking)

Reading a frame means its pixels are summed, so every frame is really decoded. "kept" is the
memory of the pixels a scenario holds at its end (Pillow stores RGB in 4 bytes per pixel: W*H*4
each): for load-* the frames ``SampledFrames`` keeps within its cache budget, for process-4.5
the model-size slices it returns (their float32 tensors are made when read). "overhead" is the
growth beyond them (decoder buffers, packet index, tokenizer, allocator). Not part of the test suite.

  python bench/bench_video_memory.py                 # 10 minutes, 1280x720, 30 fps
  python bench/bench_video_memory.py --minutes 1     # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from _common import reset_peak_rss, status_kib

SCENARIOS = ("probe", "stream-4.5", "load-2.6", "load-4.5", "process-4.5", "eager-4.5", "naive-4.5")
ROOT = Path(__file__).resolve().parents[1]
REAL_45 = ROOT / "tests" / "data" / "real-4.5" / "release"


def make_video(path: Path, minutes: float, width: int, height: int, fps: int) -> None:
    """A yuv420p MPEG-4 video: gradient, a moving bar and the frame number as 64x64 blocks."""
    import av

    n = int(minutes * 60 * fps)
    y0 = np.tile(np.linspace(16, 235, width, dtype=np.uint8), (height, 1))  # [H, W]
    chroma = np.full((height // 2, width), 128, np.uint8)  # U and V planes, [H/2, W] together
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt, s.bit_rate = width, height, "yuv420p", 1_000_000
        s.options = {"g": "250"}
        s.thread_type = "AUTO"
        for k in range(n):
            y = y0.copy()
            x = (k * 8) % (width - 40)
            y[:, x : x + 40] = 235
            for b in range(16):
                if k >> b & 1:
                    y[64 * (b // 8) : 64 * (b // 8 + 1), 64 * (b % 8) : 64 * (b % 8 + 1)] = 0
            frame = av.VideoFrame.from_ndarray(np.concatenate([y, chroma]), format="yuv420p")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _naive(path: str, indices: list[int]) -> list:
    import av

    wanted, out = set(indices), {}
    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        for k, frame in enumerate(c.decode(stream)):
            if k in wanted:
                out[k] = frame.to_image()
    return [out[i] for i in indices]


def _indices_45(info: object) -> list[int]:
    """The 4.5 recipe's sampled frame indices (default policy)."""
    from minicpmv.processing.video import packed_indices
    from minicpmv.versions import get_version

    p = get_version("4.5").video
    indices, _ = packed_indices(info.num_frames, info.fps, fps=p.fps, max_frames=p.max_frames,
                                max_packing=p.max_packing)
    return indices


def _process_45(path: str) -> object:
    """The real 4.5 release's processor (tokenizer, template, 448 px slicing) on one video message."""
    from minicpmv.processing.processor import Processor
    from minicpmv.processing.video import Video
    from minicpmv.versions import get_version

    processor = Processor.from_dir(REAL_45, get_version("4.5"))
    return processor([[{"role": "user", "content": [Video(path), "Describe the video."]}]])


def child(scenario: str, path: str) -> dict:
    """Run one scenario in this (fresh) process and report RSS growth and time."""
    from minicpmv.processing.video import iter_video_frames, load_video, probe_video

    reset_peak_rss()
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    info = probe_video(path)
    kept = 0
    if scenario == "stream-4.5":
        frames_out = sum(1 for _ in iter_video_frames(path, _indices_45(info)))
    elif scenario in ("load-2.6", "load-4.5"):
        frames = load_video(path, scenario.split("-")[1]).frames
        frames_out = sum(1 for f in frames if np.asarray(f).sum() >= 0)  # decode and read each
        kept = frames.cached_bytes
    elif scenario == "process-4.5":
        inputs = _process_45(path)
        frames_out = len(inputs.image_hashes[0])
        kept = sum(s.width * s.height * 4 for s in inputs.slices[0])  # the uint8 slices it holds
    elif scenario in ("eager-4.5", "naive-4.5"):
        frames = list(load_video(path, "4.5").frames) if scenario == "eager-4.5" else _naive(path, _indices_45(info))
        frames_out = len(frames)
        kept = sum(f.width * f.height * 4 for f in {id(f): f for f in frames}.values())
    else:
        frames_out = 0
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {"scenario": scenario, "frames": frames_out, "seconds": seconds,
            "growth_mb": max(peak - before, 0) / 1024, "kept_mb": kept / 2**20,
            "video_frames": info.num_frames}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--child", nargs=2, metavar=("SCENARIO", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.mp4"
        t0 = time.perf_counter()
        make_video(path, args.minutes, args.width, args.height, args.fps)
        print(f"video: {args.minutes:g} min {args.width}x{args.height} @ {args.fps} fps, "
              f"{path.stat().st_size / 2**20:.1f} MiB, encoded in {time.perf_counter() - t0:.0f} s")
        rows = []
        for sc in args.scenarios.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", sc, str(path)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    frame_mb = args.width * args.height * 3 / 2**20  # as uint8 RGB arrays
    whole_gb = rows[0]["video_frames"] * frame_mb / 1024
    print(f"the whole video decoded to RGB would be {whole_gb:.1f} GiB ({rows[0]['video_frames']} frames)")
    print(f"{'scenario':<12} {'frames':>6} {'time s':>7} {'RSS growth MB':>14} {'kept MB':>8} {'overhead MB':>12}")
    for r in rows:
        print(f"{r['scenario']:<12} {r['frames']:>6} {r['seconds']:>7.1f} {r['growth_mb']:>14.1f} "
              f"{r['kept_mb']:>8.1f} {r['growth_mb'] - r['kept_mb']:>12.1f}")
    by = {r["scenario"]: r for r in rows}
    if "process-4.5" in by:
        print(f"process-4.5 holds {by['process-4.5']['kept_mb']:.0f} MB of uint8 slices for "
              f"{by['process-4.5']['frames']} frames; their float32 pixel tensors "
              f"({3 * by['process-4.5']['kept_mb']:.0f} MB in all: 12 bytes a pixel, not 4) are made when "
              "read, a chunk at a time")
    if "load-4.5" in by and "naive-4.5" in by:
        print(f"time, seeking vs decoding every frame (4.5 recipe): "
              f"{by['load-4.5']['seconds'] / by['naive-4.5']['seconds']:.2f}x")
    if "load-2.6" in by and "naive-4.5" in by:
        print(f"time, 2.6 recipe (64 frames) vs decoding every frame: "
              f"{by['load-2.6']['seconds'] / by['naive-4.5']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
