"""Spoken answers over the OpenAI API, with the official ``openai`` client: ``modalities`` with
audio (whole and streamed), ``input_audio``, voices (named clips, a clip in the system message),
``/v1/audio/speech`` with instructions, limits, and 400s for what cannot be spoken. 8 concurrent
streamed spoken answers equal the same requests one at a time (greedy; the tiny speech head's
sampler is effectively arg-max)."""

from __future__ import annotations

import base64
import io
import threading
import wave

import httpx
import numpy as np
import openai
import pytest

import minicpmv
from minicpmv.processing.audio import wav_bytes

from .conftest import NAME, LiveServer

QUESTION = [{"role": "user", "content": "What color is the sky?"}]


def _clip(seed: int, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(rate * seconds)) * 0.1).astype(np.float32)


def _audio_part(clip: np.ndarray, rate: int = 16000) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(clip, rate)).decode(),
                                                   "format": "wav"}}


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as f:
        assert (f.getnchannels(), f.getsampwidth()) == (1, 2)
        return np.frombuffer(f.readframes(f.getnframes()), "<i2"), f.getframerate()


@pytest.fixture(scope="module")
def voice_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("voices") / "narrator.wav"
    path.write_bytes(wav_bytes(_clip(7, 1.5, 22050), 22050))  # any rate: read_audio resamples
    return path


@pytest.fixture(scope="module")
def server_tts(tts_model, voice_file):
    with LiveServer(tts_model, max_batch_size=8, max_queue=64, voices=(("narrator", str(voice_file)),),
                    max_audio_seconds=1.0, max_input_audio_seconds=5.0, max_speech_input_chars=200) as srv:
        yield srv


def test_spoken_answer_is_a_24khz_wav_equal_to_the_library(server_tts, tts_model):
    r = server_tts.client().chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=8, temperature=0, modalities=["text", "audio"],
        audio={"voice": "default", "format": "wav"})
    msg = r.choices[0].message
    assert msg.content is None and msg.audio.id.startswith("audio_") and msg.audio.expires_at > 0
    pcm, rate = _read_wav(base64.b64decode(msg.audio.data))
    assert rate == 24000 and 0 < len(pcm) <= 24000  # max_audio_seconds = 1
    want = tts_model.chat(minicpmv.with_voice(QUESTION), sampling=False, num_beams=1, repetition_penalty=1.0,
                          max_new_tokens=8, generate_audio=True, id0_quirk=False, max_audio_seconds=1.0)
    assert msg.audio.transcript == want.text and r.choices[0].finish_reason == "length"
    assert np.array_equal(pcm, np.round(np.clip(want.audio_wav, -1, 1) * 32767).astype("<i2"))
    assert r.usage.completion_tokens == 8
    server_tts.wait_idle()


def _stream(srv: LiveServer, seed: int, fmt: str = "pcm16") -> tuple[str, bytes, list]:
    messages = [{"role": "user", "content": [_audio_part(_clip(seed)), {"type": "text", "text": "Answer."}]}]
    stream = srv.client().chat.completions.create(
        model=NAME, messages=messages, max_tokens=6, temperature=0, stream=True,
        modalities=["text", "audio"], audio={"voice": "narrator", "format": fmt})
    chunks = list(stream)
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and getattr(c.choices[0].delta, "audio", None)]
    transcript = "".join(a.get("transcript") or "" for a in audio)
    data = b"".join(base64.b64decode(a["data"]) for a in audio if a.get("data"))
    return transcript, data, chunks


def test_streamed_spoken_answer_has_openai_audio_deltas(server_tts):
    transcript, data, chunks = _stream(server_tts, 1)
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and getattr(c.choices[0].delta, "audio", None)]
    assert audio[0]["id"].startswith("audio_") and all("id" not in a for a in audio[1:])
    assert "expires_at" in audio[-1] and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert 0 < len(data) <= 2 * 24000 and len(data) % 2 == 0  # pcm16, at most max_audio_seconds
    _, wav, _ = _stream(server_tts, 1, fmt="wav")  # the same audio behind a streaming WAV header
    assert wav[:4] == b"RIFF" and wav[44:] == data
    assert np.array_equal(_read_wav(wav)[0], np.frombuffer(data, "<i2"))
    server_tts.wait_idle()


def test_8_concurrent_streamed_answers_equal_one_at_a_time(server_tts):
    alone = [_stream(server_tts, i)[:2] for i in range(8)]
    got: dict[int, tuple[str, bytes]] = {}

    def run(i: int) -> None:
        got[i] = _stream(server_tts, i)[:2]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(8)] == alone
    assert len({a[1] for a in alone}) > 1  # different questions, different speech
    server_tts.wait_idle()


def test_a_voice_clip_in_the_system_message(server_tts):
    clone = {"type": "text", "text": "Clone the voice in the provided audio prompt."}
    messages = [{"role": "system", "content": [clone, _audio_part(_clip(9))]}, *QUESTION]
    body = {"model": NAME, "messages": messages, "max_tokens": 3, "temperature": 0, "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16"}}
    r = server_tts.post(body)
    assert r.status_code == 200, r.text
    assert len(base64.b64decode(r.json()["choices"][0]["message"]["audio"]["data"])) > 0
    r = server_tts.post({**body, "audio": {"voice": "narrator", "format": "wav"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_voice"
    r = server_tts.post({**body, "modalities": ["text"]})
    assert r.status_code == 400 and "voice prompt" in r.json()["error"]["message"]


def test_speech_endpoint_reads_the_input_in_a_voice(server_tts, tmp_path):
    client = server_tts.client()
    out = tmp_path / "speech.wav"
    with client.audio.speech.with_streaming_response.create(
            model=NAME, voice="narrator", input="Hello there. How are you today?",
            instructions="A calm voice, slowly.", response_format="wav") as response:
        response.stream_to_file(out)
    pcm, rate = _read_wav(out.read_bytes())
    assert rate == 24000 and 0 < len(pcm) <= 24000
    raw = httpx.post(f"{server_tts.url}/v1/audio/speech", json={
        "model": NAME, "voice": "default", "input": "Hello there.", "response_format": "pcm"}, timeout=120)
    assert raw.status_code == 200 and raw.headers["content-type"] == "audio/pcm" and len(raw.content) % 2 == 0


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"voice": "alloy", "input": "Hi"}, 400, "invalid_voice"),
    ({"voice": "default", "input": "Hi", "response_format": "mp3"}, 400, "unsupported"),
    ({"voice": "default", "input": "Hi", "speed": 1.5}, 400, "unsupported"),
    ({"voice": "default", "input": "x" * 201}, 400, "input_too_long"),
    ({"voice": "default", "input": "   "}, 400, "invalid_request"),
    ({"voice": "default", "input": "Hi", "model": "other"}, 404, "model_not_found"),
])
def test_speech_endpoint_errors(server_tts, body, status, code):
    r = httpx.post(f"{server_tts.url}/v1/audio/speech", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_spoken_request_errors(server_tts):
    client = server_tts.client()
    ask = {"model": NAME, "messages": QUESTION, "max_tokens": 2, "modalities": ["text", "audio"]}
    cases = [
        ({}, "audio parameter"),
        ({"audio": {"voice": "default", "format": "mp3"}}, "audio.format"),
        ({"audio": {"voice": "nobody", "format": "wav"}}, "unknown voice 'nobody'"),
        ({"audio": {"voice": "default", "format": "wav"}, "n": 2}, "n must be 1"),
    ]
    for extra, match in cases:
        with pytest.raises(openai.BadRequestError, match=match):
            client.chat.completions.create(**{**ask, **extra})
    long_clip = [{"role": "user", "content": [_audio_part(_clip(0, 6.0)), {"type": "text", "text": "Hi"}]}]
    r = server_tts.post({**ask, "messages": long_clip, "audio": {"voice": "default", "format": "wav"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "audio_too_long"
    server_tts.wait_idle()


def test_a_model_without_a_speech_head_gives_400s(server26):
    client = server26.client()
    with pytest.raises(openai.BadRequestError, match="no speech head"):
        client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=2, modalities=["text", "audio"],
                                       audio={"voice": "default", "format": "wav"})
    r = httpx.post(f"{server26.url}/v1/audio/speech", json={"model": NAME, "voice": "default", "input": "Hi"},
                   timeout=60)
    assert r.status_code == 400 and "no speech head" in r.json()["error"]["message"]
    r = server26.post({"model": NAME, "max_tokens": 2, "messages": [
        {"role": "user", "content": [_audio_part(_clip(0)), {"type": "text", "text": "Hi"}]}]})
    assert r.status_code == 400 and "audio input" in r.json()["error"]["message"]


def test_speech_work_keeps_the_request_timeout(tts_model, monkeypatch):
    """The request timeout (from arrival) also bounds the speech: /v1/audio/speech and a spoken
    chat answer whose synthesis outlasts it are 504, and the server keeps serving."""
    import time

    from minicpmv.engine.speech import SpeechSynthesizer
    from minicpmv.engine.spoken import SpokenAnswer

    real_synth, real_push = SpeechSynthesizer.synthesize, SpokenAnswer.push_text

    def slow_synth(self, *args, **kwargs):
        time.sleep(1.5)
        return real_synth(self, *args, **kwargs)

    def slow_push(self, *args, **kwargs):
        time.sleep(1.5)
        return real_push(self, *args, **kwargs)

    monkeypatch.setattr(SpeechSynthesizer, "synthesize", slow_synth)
    monkeypatch.setattr(SpokenAnswer, "push_text", slow_push)
    with LiveServer(tts_model, request_timeout_s=1.0, max_audio_seconds=1.0) as srv:
        r = httpx.post(f"{srv.url}/v1/audio/speech", json={"model": NAME, "voice": "default", "input": "Hello."},
                       timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        spoken = srv.post({"model": NAME, "messages": QUESTION, "max_tokens": 2, "temperature": 0,
                           "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"}})
        assert spoken.status_code == 504 and spoken.json()["error"]["code"] == "timeout"
        srv.wait_idle()
        text = srv.post({"model": NAME, "messages": QUESTION, "max_tokens": 2, "temperature": 0})
        assert text.status_code == 200 and text.json()["choices"][0]["message"]["content"]
