"""Reading audio of any rate and format (``read_audio``: exact for 16 kHz mono PCM WAV, PyAV
otherwise), and the 16-bit PCM / WAV writers used for speech output."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from minicpmv.errors import AudioError
from minicpmv.processing.audio import load_wav, pcm16, read_audio, save_wav, wav_bytes


def _tone(rate: int, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_16k_mono_wav_is_read_exactly(tmp_path, pcm_wav):
    path = pcm_wav(tmp_path / "a.wav", _tone(16000), 16000)
    want, rate = load_wav(path)
    assert rate == 16000 and np.array_equal(read_audio(path), want)
    assert np.array_equal(read_audio(path.read_bytes()), want)


def test_other_rates_and_stereo_are_resampled_to_16k_mono(tmp_path, pcm_wav):
    tone = _tone(48000)
    path = pcm_wav(tmp_path / "b.wav", np.stack([tone, tone], axis=1), 48000)
    got = read_audio(path)
    assert got.dtype == np.float32 and got.ndim == 1 and abs(len(got) - len(tone) / 3) <= 32
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(got)) / 16000)
    assert np.abs(got[200:-200] - ref[200:-200]).max() < 0.02  # a 440 Hz tone survives resampling
    assert len(read_audio(path, rate=24000)) == pytest.approx(len(tone) / 2, abs=32)


def test_unreadable_audio_is_a_clear_error(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        read_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="cannot be decoded|no audio"):
        read_audio(b"this is not audio at all" * 10, what="upload")


def test_wav_writers_agree(tmp_path):
    x = np.array([0.0, 0.5, -0.5, 1.5, -2.0], dtype=np.float32)
    assert np.frombuffer(pcm16(x), "<i2").tolist() == [0, 16384, -16384, 32767, -32767]
    save_wav(tmp_path / "c.wav", x, 24000)
    assert (tmp_path / "c.wav").read_bytes() == wav_bytes(x, 24000)
    with wave.open(io.BytesIO(wav_bytes(x, 24000))) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()) == (24000, 1, 2, 5)
    with pytest.raises(AudioError, match="NaN"):
        pcm16(np.array([np.nan], np.float32))
