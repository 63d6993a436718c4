"""``minicpmv chat --audio-out``: the spoken answer as a 24 kHz WAV (one-shot, voice cloning,
interactive), equal to the library's, and one-line errors for what cannot be spoken."""

from __future__ import annotations

import io
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from minicpmv.cli import main

CONF = Path(__file__).resolve().parent / "data" / "conformance"
GREEDY = ["--dtype", "float32", "--greedy", "--max-new-tokens", "6"]


def _noise(rate: int, channels: int, seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.3, 0.3, (int(rate * seconds), channels))


def _read(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getsampwidth()) == (1, 2)
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32767, f.getframerate()


def test_chat_writes_the_spoken_answer_in_the_cloned_voice(tts_checkpoint, tts_model, tmp_path, capsys, pcm_wav):
    import minicpmv

    question = pcm_wav(tmp_path / "question.wav", _noise(16000, 1, 1.0, 0), 16000)
    ref = pcm_wav(tmp_path / "voice_48k_stereo.wav", _noise(48000, 2, 1.5, 1), 48000)  # resampled and mixed down
    out = tmp_path / "answer.wav"
    rc = main(["chat", "--model", str(tts_checkpoint), *GREEDY, "--audio", str(question), "--voice", str(ref),
               "--audio-out", str(out), "--max-audio-seconds", "1", "What do you hear?"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    got, rate = _read(out)
    assert rate == 24000 and len(got) > 0 and f"wrote {out}" in captured.err
    # the library's answer to the same conversation
    msgs = minicpmv.with_voice([{"role": "user", "content": [minicpmv.load_wav(question)[0], "What do you hear?"]}],
                               minicpmv.read_audio(ref))
    want = tts_model.chat(msgs, sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=6,
                          generate_audio=True, max_audio_seconds=1)
    assert captured.out == want.text + "\n"
    assert len(got) == len(want.audio_wav) == 24000 and np.abs(got - want.audio_wav).max() < 2e-4  # 16-bit rounding


def test_interactive_chat_speaks_every_answer(tts_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAnd again?\n:quit\n"))
    out = tmp_path / "turn.wav"
    rc = main(["chat", "--model", str(tts_checkpoint), *GREEDY, "--max-new-tokens", "3", "-i", "--audio-out", str(out),
               "--max-audio-seconds", "0.5"])
    assert rc == 0, capsys.readouterr().err
    for k in (1, 2):
        wav, rate = _read(tmp_path / f"turn-{k}.wav")
        assert rate == 24000 and 0 < len(wav) <= 12000
    assert not out.exists()


@pytest.mark.parametrize(("extra", "match"), [
    (["--voice", "ref.wav"], "add --audio-out"),
    (["--max-audio-seconds", "2"], "add --audio-out"),
    (["--audio-out", "a.wav", "--max-audio-seconds", "0"], "must be positive"),
    (["--audio-out", "answer.mp3"], "give a .wav path"),
    (["--audio-out", "missing/answer.wav"], "does not exist"),
    (["--audio-out", "a.wav", "--voice-mode", "clone"], "voice-mode clone"),
    (["--audio-out", "a.wav", "--voice", "nothing.wav"], "does not exist"),
])
def test_bad_speech_flags_are_one_line_errors(extra, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["chat", "--model", str(CONF / "2.6" / "_checkpoint"), *extra, "Hi"])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1


@pytest.mark.parametrize(("existing", "interactive"), [("a.wav", False), ("a-2.wav", True)])
def test_existing_audio_files_are_never_overwritten(existing, interactive, tmp_path, capsys):
    (tmp_path / existing).write_bytes(b"kept")
    args = ["chat", "--model", str(CONF / "2.6" / "_checkpoint"), "--audio-out", str(tmp_path / "a.wav")]
    rc = main([*args, "-i"] if interactive else [*args, "Hi"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / existing} exists" in err and err.count("\n") == 1
    assert (tmp_path / existing).read_bytes() == b"kept"


def test_a_model_without_a_speech_head_says_so(tmp_path, capsys):
    rc = main(["chat", "--model", str(CONF / "2.6" / "_checkpoint"), "--dtype", "float32",
               "--audio-out", str(tmp_path / "a.wav"), "Hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "speech head" in err and err.count("\n") == 1 and not (tmp_path / "a.wav").exists()
