"""Fixtures shared by every test folder: the tiny 2.6 / 4.5 conformance checkpoints in float32,
and the tiny MiniCPM-o with speech output (assembled from the o2.6-tts vectors).

They are loaded once per test session. Tests may monkeypatch them (pytest restores) but must not
leave state behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

CONF = Path(__file__).resolve().parent / "data" / "conformance"


@pytest.fixture(scope="session")
def model26():
    import minicpmv

    return minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32")


@pytest.fixture(scope="session")
def model45():
    import minicpmv

    return minicpmv.load(CONF / "4.5" / "_checkpoint", dtype="float32")


@pytest.fixture(scope="session")
def tts_checkpoint(tmp_path_factory):
    """The o2.6-tts vectors' archive assembled into a runnable MiniCPM-o directory (README steps 1-4)."""
    from minicpmv.conformance import assemble_tts_checkpoint

    return assemble_tts_checkpoint(CONF / "o2.6-tts" / "_checkpoint", tmp_path_factory.mktemp("o26_tts"))


@pytest.fixture(scope="session")
def tts_model(tts_checkpoint):
    """The tiny MiniCPM-o with its speech head, float32 (as the vectors were made)."""
    import minicpmv

    return minicpmv.load(tts_checkpoint, dtype="float32")


@pytest.fixture(scope="session")
def tts_synth(tts_model):
    from minicpmv.engine.speech import get_synthesizer

    return get_synthesizer(tts_model)


@pytest.fixture(params=["2.6", "4.5"])
def model(request, model26, model45):
    return model26 if request.param == "2.6" else model45


def _model_config(version: str) -> Any:
    from minicpmv.config import ModelConfig
    from minicpmv.versions import detect_version

    raw = json.loads((CONF / version / "_checkpoint" / "config.json").read_text(encoding="utf-8"))
    spec = detect_version(raw)
    return ModelConfig.from_hf_dict(raw, family=spec.llm_family, temporal=spec.temporal_resampler)


def _checkpoint_state(version: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    sd = load_file(str(CONF / version / "_checkpoint" / "model.safetensors"))
    return {k: v.float() for k, v in sd.items()}



@pytest.fixture(scope="session")
def tiny_config() -> Any:
    """Factory: version -> the ModelConfig of its tiny conformance checkpoint."""
    return _model_config


@pytest.fixture(scope="session")
def tiny_state() -> Any:
    """Factory: version -> the tiny checkpoint's state dict in float32."""
    return _checkpoint_state


@pytest.fixture(scope="session")
def pcm_wav():
    """A writer of 16-bit PCM WAV files: ``pcm_wav(path, samples [N] or [N, channels], rate)``."""
    import wave

    import numpy as np

    def write(path, samples, rate: int):
        data = np.asarray(samples, dtype=np.float64)
        data = data[:, None] if data.ndim == 1 else data
        with wave.open(str(path), "wb") as f:
            f.setnchannels(data.shape[1])
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(np.round(data * 32767).astype("<i2").tobytes())
        return path

    return write
