"""Fixtures of the web UI tests: tiny checkpoints, test images, and a corrupt "image"."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "tests" / "data" / "conformance"
HOUSE = ROOT / "examples" / "house.png"


@pytest.fixture(scope="session")
def shared26():
    from minicpmv.ui.logic import SharedModel

    return SharedModel.load(CONF / "2.6" / "_checkpoint", dtype="float32")


@pytest.fixture(scope="session")
def shared45():
    from minicpmv.ui.logic import SharedModel

    return SharedModel.load(CONF / "4.5" / "_checkpoint", dtype="float32")


@pytest.fixture()
def house() -> Path:
    return HOUSE


@pytest.fixture()
def corrupt_png(tmp_path: Path) -> Path:
    path = tmp_path / "broken_photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image")
    return path


@pytest.fixture()
def small_png(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "blue.png"
    Image.new("RGB", (40, 30), (20, 40, 200)).save(path)
    return path


def make_clip(path: Path, frames: int = 8) -> Path:
    """A tiny MPEG-4 clip (64x48, 4 fps) whose red bar grows frame by frame."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            img = np.zeros((48, 64, 3), np.uint8)  # [H, W, 3]
            img[:, : 8 * (i + 1)] = (200, 50, 50)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture()
def clip_mp4(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4")


@pytest.fixture(scope="session")
def shared_tts(tts_model):
    """The tiny MiniCPM-o with its speech head; spoken answers cut at 0.5 s to keep tests short."""
    from minicpmv.ui.logic import SharedModel

    return SharedModel(tts_model, max_audio_seconds=0.5)


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, seed: int = 0) -> Path:
    """A mono 16-bit WAV of noise."""
    import numpy as np

    from minicpmv.processing.audio import wav_bytes

    clip = (np.random.default_rng(seed).standard_normal(int(rate * seconds)) * 0.1).astype(np.float32)
    path.write_bytes(wav_bytes(clip, rate))
    return path
