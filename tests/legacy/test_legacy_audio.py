"""MiniCPM-o audio input: features, placeholders, WAV reading and every bad-input error."""

from __future__ import annotations

import dataclasses
import wave

import numpy as np
import pytest

from minicpmv.errors import AudioError, InputError
from minicpmv.processing.audio import (
    AUDIO_TAG,
    AudioFeatureConfig,
    audio_placeholder,
    audio_token_count,
    check_waveform,
    clip_features,
    extract_audio,
    load_wav,
    mel_filters,
)

from .conftest import CONF, case_audio

CFG = AudioFeatureConfig()


def _wav(path, data: np.ndarray, rate: int = 16000, channels: int = 1) -> str:
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return str(path)


def test_log_mel_matches_the_reference_features():
    want = np.load(CONF / "o2.6" / "audio_1p3s" / "expected" / "tensors.npz")["audio_features"][0]
    (got,) = clip_features(case_audio(), CFG)
    assert got.shape == want.shape == (80, 130) and got.dtype == np.float32
    assert np.max(np.abs(got - want)) < 1e-4


def test_mel_filters_are_slaney_triangles():
    bank = mel_filters(400, 80, 16000)  # [201, 80]
    assert bank.shape == (201, 80) and (bank >= 0).all()
    assert np.all(bank.max(axis=0) > 0)  # every band covers at least one FFT bin
    peaks = bank.argmax(axis=0)
    assert np.all(np.diff(peaks) >= 0)  # bands move up in frequency


def test_long_clips_are_cut_into_30s_segments():
    clip = np.random.default_rng(0).uniform(-0.1, 0.1, 16000 * 31).astype(np.float32)
    segs = clip_features(clip, CFG)
    assert [s.shape[1] for s in segs] == [3000, 100]
    assert audio_token_count(clip.shape[0], CFG) == 750 + 25  # per-segment counts add up


@pytest.mark.parametrize("seconds,groups", [(1.0, [25]), (1.3, [25, 7]), (2.5, [25, 25, 12])])
def test_placeholder_has_one_group_per_second(seconds, groups):
    text = audio_placeholder(int(16000 * seconds), CFG)
    parts = text.split("<|audio_end|>")[:-1]
    assert [p.count("<unk>") for p in parts] == groups
    assert all(p.startswith("<|audio_start|>") for p in parts)
    assert audio_placeholder(int(16000 * seconds), CFG, chunked=False).count("<|audio_start|>") == 1


def test_extract_audio_keeps_the_input_unchanged():
    clip = case_audio()
    item = {"type": "audio", "audio": clip, "sampling_rate": 16000}
    msgs = [{"role": "user", "content": [clip, "what is it?", item]}]
    out, clips = extract_audio(msgs, CFG)
    assert out[0]["content"] == [AUDIO_TAG, "what is it?", AUDIO_TAG] and len(clips) == 2
    assert msgs[0]["content"][0] is clip


def test_wav_files(tmp_path):
    clip = np.sin(np.arange(8000) / 10).astype(np.float32) * 0.5
    data, rate = load_wav(_wav(tmp_path / "a.wav", clip))
    assert rate == 16000 and data.dtype == np.float32 and np.max(np.abs(data - clip)) < 1e-4
    item = {"type": "audio", "audio": str(tmp_path / "a.wav")}
    out, clips = extract_audio([{"role": "user", "content": [item]}], CFG)
    assert len(clips) == 1 and clips[0].shape == (8000,)


# ---------------------------------------------------------------------------- bad input


def test_wrong_sample_rate(tmp_path):
    clip = np.zeros(16000, dtype=np.float32)
    with pytest.raises(AudioError, match="44100 Hz.*16000 Hz"):
        check_waveform(clip, 44100, CFG, "message 0")
    path = _wav(tmp_path / "8k.wav", np.zeros(8000, dtype=np.float32), rate=8000)
    with pytest.raises(AudioError, match="8000 Hz"):
        extract_audio([{"role": "user", "content": [{"type": "audio", "audio": path}]}], CFG)


@pytest.mark.parametrize("bad,match", [
    (np.zeros(16000, dtype=np.int16), "dtype int16.*32768"),
    (np.zeros((16000, 2), dtype=np.float32), "1-D mono"),
    (np.full(16000, np.nan, dtype=np.float32), "NaN"),
    (np.zeros(100, dtype=np.float32), "too short"),
])
def test_wrong_dtype_shape_values(bad, match):
    with pytest.raises(AudioError, match=match):
        extract_audio([{"role": "user", "content": [bad, "hi"]}], CFG)


def test_stereo_and_non_pcm_wav(tmp_path):
    stereo = _wav(tmp_path / "st.wav", np.zeros(3200, dtype=np.float32), channels=2)
    data, rate = load_wav(stereo)
    with pytest.raises(AudioError, match="mono"):
        check_waveform(data, rate, CFG, stereo)
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEfmt garbage")
    with pytest.raises(AudioError, match="PCM WAV"):
        load_wav(tmp_path / "junk.wav")
    with pytest.raises(AudioError, match="does not exist"):
        load_wav(tmp_path / "missing.wav")


def test_clip_longer_than_the_limit(legacy_models):
    cm = legacy_models("o2.6")
    msgs = [{"role": "user", "content": [np.zeros(16000 * 3, dtype=np.float32), "hi"]}]
    proc = cm.processor
    saved = proc.audio_cfg
    try:
        proc.audio_cfg = dataclasses.replace(saved, max_seconds=2.0)
        with pytest.raises(AudioError, match=r"3\.0 s long, longer than the limit of 2 s"):
            cm.chat(msgs, sampling=False, max_new_tokens=2)
    finally:
        proc.audio_cfg = saved
    with pytest.raises(AudioError, match="600 s"):  # the default limit
        check_waveform(np.zeros(16000 * 601, dtype=np.float32), None, CFG, "clip")


def test_audio_needs_a_minicpm_o_checkpoint(legacy_models):
    with pytest.raises(InputError, match="does not take audio input"):
        legacy_models("2.5").chat([{"role": "user", "content": [case_audio(), "hi"]}])
