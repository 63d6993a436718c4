"""Speech in the web UI (MiniCPM-o), without a browser: audio uploads and recordings, the voice
choice, spoken answers equal to the library's, and the page's speech controls."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

import minicpmv
from minicpmv.errors import AudioError, FeatureNotAvailableError, InputError
from minicpmv.ui.app import Handlers, build_app
from minicpmv.ui.logic import TabChat, read_upload, voice_choice

from .conftest import write_wav

GREEDY = ("beam", 0.7, 0.8, 6, 9, False)  # the page's beam preset: 3 beams, as chat(sampling=False)


def test_audio_uploads_become_16k_clips(tmp_path):
    clip = read_upload(write_wav(tmp_path / "question.wav", rate=44100))
    assert clip.dtype == np.float32 and clip.ndim == 1 and abs(len(clip) - 16000) < 64
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"not audio" * 100)
    with pytest.raises(AudioError, match="broken.mp3") as err:
        read_upload(bad)
    assert str(tmp_path) not in str(err.value)


def test_voice_choice(tmp_path):
    ref = write_wav(tmp_path / "ref.wav", 1.0, 24000, seed=3)
    assert voice_choice(False).speak is False and voice_choice(True).message()["content"][0].startswith("Use the")
    cloned = voice_choice(True, "clone", str(ref))
    assert cloned.message()["content"][1] is cloned.reference and cloned.key != voice_choice(True).key
    assert "role-play" in voice_choice(True, "roleplay", str(ref)).message()["content"][2]
    with pytest.raises(InputError, match="reference clip"):
        voice_choice(True, "clone", None)
    with pytest.raises(InputError, match="voice must be"):
        voice_choice(True, "whisper")


def test_spoken_turns_equal_the_library(shared_tts, tmp_path):
    tab = TabChat(shared_tts)
    question = write_wav(tmp_path / "q.wav", seed=1)
    options = _options(shared_tts)
    voice = voice_choice(True)
    events = list(tab.ask("What is it?", [str(question)], options, voice))
    turn = tab.turns[0]
    assert "".join(e.text for e in events) == turn.answer and turn.audio is not None
    rate, wav = turn.audio
    msgs = minicpmv.with_voice([{"role": "user", "content": [read_upload(question), "What is it?"]}])
    want = shared_tts.model.chat(msgs, sampling=False, max_new_tokens=6, generate_audio=True, max_audio_seconds=0.5)
    assert rate == 24000 and turn.answer == want.text and np.array_equal(wav, want.audio_wav)
    # another voice replaces the voice message; turning speech off keeps the conversation
    ref = write_wav(tmp_path / "ref.wav", seed=2)
    list(tab.ask("And now?", [], options, voice_choice(True, "clone", str(ref))))
    history = tab.session.history
    texts = [c for m in history for c in m["content"] if isinstance(c, str)]
    assert history[0]["content"][0].startswith("Clone the voice") and "Use the <reserved_53> voice." not in texts
    list(tab.ask("Thanks.", [], options, voice_choice(False)))
    assert tab.turns[-1].audio is None and len(tab.turns) == 3


def test_a_model_without_a_speech_head_cannot_speak(shared26):
    with pytest.raises(FeatureNotAvailableError, match="no speech head"):
        TabChat(shared26).ask("q", [], _options(shared26), voice_choice(True))


def test_handlers_play_the_spoken_answer(shared_tts, tmp_path):
    h = Handlers(gr, shared_tts)
    recording = write_wav(tmp_path / "mic.wav", rate=48000, seed=4)
    steps = list(h.submit({"text": "Hello", "files": []}, None, *GREEDY, True, "default", None, str(recording)))
    assert steps[0][4] is None and steps[0][5] is None  # player and recording cleared when sent
    *_, (_, tab, chat, status, audio, _) = steps
    assert status.startswith("Answered in") and tab.turns[0].files == [str(recording)]
    rate, pcm = audio
    assert rate == 24000 and pcm.dtype == np.int16 and 0 < len(pcm) <= 12000
    assert chat[0] == {"role": "user", "content": {"path": str(recording)}}


def test_speech_controls_follow_the_model(shared_tts, shared26):
    def props(shared):
        config = build_app(shared).get_config_file()
        return {c.get("props", {}).get("elem_id"): c["props"] for c in config["components"]}

    o26 = props(shared_tts)
    assert o26["speak"]["interactive"] is True and o26["answer-audio"]["visible"] is True
    assert o26["audio-in"]["visible"] is True and o26["voice-ref"]["sources"] == ["upload", "microphone"]
    v26 = props(shared26)
    assert v26["audio-in"]["visible"] is False and v26["answer-audio"]["visible"] is False


def _options(shared):
    from minicpmv.ui.logic import page_options

    return page_options(shared.model.version, mode="beam", max_new_tokens=6)
