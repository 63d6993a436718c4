"""Spoken answers through chat() / respond(): the OmniOutput, the WAV file, the streamed chunks,
the speaker state read during the prefill, the audio-length limit, and the errors.

The e2e_chat vectors themselves run in tests/conformance (chat(generate_audio=True) reproduces
them exactly); these tests check what the vectors do not cover.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpmv.engine.generate import generate_steps
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.speech import LLMTextPieces, OmniOutput, official_answer_text, speaker_hidden, stream_speech
from minicpmv.engine.speech_codes import SpeechOptions
from minicpmv.engine.spoken import SpeakerTap, SpeechRequest, SpokenAnswer
from minicpmv.errors import InputError
from minicpmv.processing.audio import load_wav

TTS = Path(__file__).resolve().parents[1] / "data" / "conformance" / "o2.6-tts"
E2E = json.loads((TTS / "e2e_chat" / "meta.json").read_text())
MSGS = E2E["msgs"]
GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}
SHORT = SpeechOptions(top_p=0.7, top_k=20, seed=0, max_frames=30)  # streamed speech stops after 2 calls


def _wav(chunks) -> np.ndarray:
    return np.concatenate([c.audio_wav for c in chunks])


def test_chat_returns_the_omni_output_and_writes_the_wav(tts_model, tmp_path):
    path = tmp_path / "answer.wav"
    out = tts_model.chat(MSGS, **GREEDY, max_new_tokens=16, generate_audio=True, output_audio_path=path,
                         speech_options=SpeechOptions(top_p=0.7, top_k=20, seed=0))
    assert isinstance(out, OmniOutput) and out.sampling_rate == 24000 and out.spk_embeds is None
    assert out.text == tts_model.chat(MSGS, **GREEDY, max_new_tokens=16, use_tts_template=True)
    wav, rate = load_wav(path)
    assert rate == 24000 and wav.shape == out.audio_wav.shape == (E2E["wav_len"],)
    assert np.abs(wav - out.audio_wav).max() <= 1 / 32767  # 16-bit PCM of the same samples
    # respond() answers the same call with the audio in its ChatResponse
    r = tts_model.respond(MSGS, **GREEDY, max_new_tokens=16, generate_audio=True,
                          speech_options=SpeechOptions(top_p=0.7, top_k=20, seed=0))
    assert r.text == out.text and np.array_equal(r.audio_wav, out.audio_wav) and r.sampling_rate == 24000
    assert r.finish_reason == "length" and r.completion_tokens == 16 and r.spk_embeds is None


def test_return_dict_and_spk_embed_without_audio(tts_model):
    text = tts_model.chat(MSGS, **GREEDY, max_new_tokens=4)
    out = tts_model.chat(MSGS, **GREEDY, max_new_tokens=4, return_dict=True)
    assert isinstance(out, OmniOutput) and out.text == text and out.audio_wav is None and out.spk_embeds is None
    batch = tts_model.prepare([MSGS], use_tts_template=True)
    out = tts_model.chat(MSGS, **GREEDY, max_new_tokens=4, use_tts_template=True, return_spk_embed=True)
    assert out.audio_wav is None and torch.allclose(out.spk_embeds[0], speaker_hidden(tts_model, batch), atol=1e-5)
    both = tts_model.chat([MSGS, MSGS], **GREEDY, max_new_tokens=4, return_dict=True)
    assert both.text == [text, text]


def test_the_streamed_answer_is_the_official_streaming_path(tts_model, tts_synth):
    """Chunks = the LLM's 3-token pieces spoken by a SpeechStream in the voice read at <|spk|>."""
    chunks = list(tts_model.chat(MSGS, **GREEDY, max_new_tokens=16, generate_audio=True, stream=True,
                                 speech_options=SHORT))
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    batch = tts_model.prepare([MSGS], use_tts_template=True)
    params = SamplingParams.from_official(tts_model.version, sampling=False, max_new_tokens=16, overrides=GREEDY)
    ids = tts_model.runner.generate_ids(batch, params)[0]
    pieces_of = LLMTextPieces(tts_model.tokenizer, tts_model.terminator_ids())
    pieces = [p for p in (pieces_of.push(t) for t in ids) if p is not None] + [pieces_of.flush()]  # 16 = 5 x 3 + 1
    want = list(stream_speech(tts_synth, speaker_hidden(tts_model, batch), pieces, SHORT))
    assert [c.text for c in chunks] == [c.text for c in want]
    assert "".join(c.text for c in chunks) == official_answer_text(tts_model.tokenizer, ids, tts_model.terminator_ids())
    assert [len(c.audio_wav) for c in chunks] == [len(c.audio_wav) for c in want]
    assert np.abs(_wav(chunks) - _wav(want)).max() < 1e-5
    # respond(stream=True) is the same stream; text only without generate_audio
    again = list(tts_model.respond(MSGS, **GREEDY, max_new_tokens=16, generate_audio=True, stream=True,
                                   speech_options=SHORT))
    assert np.array_equal(_wav(again), _wav(chunks))
    text = tts_model.chat(MSGS, **GREEDY, max_new_tokens=16, return_dict=True, stream=True)
    assert isinstance(text, OmniOutput) and "".join(text.text) == tts_model.chat(MSGS, **GREEDY, max_new_tokens=16)


def test_the_speaker_tap_reads_the_voice_in_the_same_prompt_pass(tts_model):
    batch = tts_model.prepare([MSGS], use_tts_template=True)
    model = tts_model.runner.model
    params = SamplingParams(max_new_tokens=3)
    pos = batch.input_ids.shape[1] - 3  # <|spk|> is followed by <|spk_eos|><|tts_bos|>
    tap = SpeakerTap(model, pos)
    tapped = [s.logits for s in generate_steps(tap, batch.inputs_embeds, batch.attention_mask, params)]
    plain = [s.logits for s in generate_steps(model, batch.inputs_embeds, batch.attention_mask, params)]
    assert all(torch.equal(a, b) for a, b in zip(tapped, plain, strict=True))
    assert torch.allclose(tap.hidden, speaker_hidden(tts_model, batch), atol=1e-5)
    with pytest.raises(InputError, match="outside"):
        list(generate_steps(SpeakerTap(model, 10_000), batch.inputs_embeds, batch.attention_mask, params))


def _spoken(tts_model, tts_synth, max_seconds):
    spk = torch.randn(256, generator=torch.Generator().manual_seed(3))
    request = SpeechRequest(generate_audio=True, options=tts_synth.default_options(seed=0), max_seconds=max_seconds)
    answer = SpokenAnswer(tts_model.tokenizer, tts_model.terminator_ids(), synth=tts_synth, speaker=spk,
                          request=request)
    out = []
    for piece in ["Hello there,", " how are", " you today", "? Fine."]:
        out += answer.push_text(piece)
    return answer, out + answer.finish()


def test_audio_limit_cuts_the_stream_at_exactly_that_length(tts_model, tts_synth):
    _, whole = _spoken(tts_model, tts_synth, None)
    answer, out = _spoken(tts_model, tts_synth, 0.2)
    assert sum(len(c.audio_wav) for c in whole) > 4800
    assert sum(len(c.audio_wav) for c in out) == 4800 and answer.done
    assert np.array_equal(_wav(out), _wav(whole)[:4800])
    assert answer.push_text("more") == [] and answer.finish() == []
    with pytest.raises(InputError, match="text pieces"):
        answer.push_text(b"bytes")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"generate_audio": True, "use_tts_template": False}, "speech template"),
    ({"output_audio_path": "x.wav"}, "only apply with generate_audio"),
    ({"generate_audio": True, "stream": True, "sampling": False}, "num_beams=1"),
])
def test_clear_errors(tts_model, kwargs, match):
    with pytest.raises(InputError, match=match):
        out = tts_model.chat(MSGS, max_new_tokens=2, **kwargs)
        list(out)  # a stream raises when it starts


def test_a_batch_cannot_speak(tts_model):
    with pytest.raises(InputError, match="not a batch"):
        tts_model.chat([MSGS, MSGS], max_new_tokens=2, generate_audio=True)
    with pytest.raises(InputError, match="not a batch"):
        tts_model.respond([MSGS, MSGS], max_new_tokens=2, return_spk_embed=True)


def test_a_chat_session_speaks_each_answer_like_chat(tts_model):
    import minicpmv

    opts = SpeechOptions(top_p=0.7, top_k=20, seed=0)
    session = minicpmv.ChatSession(tts_model, generate_audio=True, speech_options=opts, max_new_tokens=16, **GREEDY)
    r = session.respond(MSGS[0]["content"])
    want = tts_model.chat(MSGS, **GREEDY, max_new_tokens=16, generate_audio=True, speech_options=opts)
    assert r.text == want.text and r.sampling_rate == 24000
    assert r.audio_wav.shape == want.audio_wav.shape and np.abs(r.audio_wav - want.audio_wav).max() < 1e-5
    events = list(session.respond("And the grass?", stream=True, max_new_tokens=4))
    second = session.last_response
    assert "".join(e.text for e in events) == second.text and second.audio_wav is not None
    assert session.last_prefill_tokens < second.prompt_tokens  # the first turn's cache was reused
    quiet = session.respond("Thanks.", generate_audio=False, max_new_tokens=2)
    assert quiet.audio_wav is None


def test_static_decode_mode_speaks_like_eager(tts_model, tts_checkpoint, monkeypatch):
    """load(compile="static"): the speaking paths (chat stream, ChatSession, LiveSession) decode
    through the static-shape step over the runner's static cache and give the eager answers."""
    import minicpmv
    from minicpmv.engine import generate
    from minicpmv.engine.live import LiveSession

    made: list[int] = []

    class Counted(generate.StaticDecoder):
        def __init__(self, *args, **kwargs) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generate, "StaticDecoder", Counted)
    static = minicpmv.load(tts_checkpoint, dtype="float32", compile="static")
    assert static.runner.decode_mode.static
    kw = dict(**GREEDY, max_new_tokens=16, generate_audio=True, stream=True, speech_options=SHORT)
    eager_chunks, static_chunks = list(tts_model.chat(MSGS, **kw)), list(static.chat(MSGS, **kw))
    assert [c.text for c in static_chunks] == [c.text for c in eager_chunks]
    assert np.abs(_wav(static_chunks) - _wav(eager_chunks)).max() < 1e-5
    opts = SpeechOptions(top_p=0.7, top_k=20, seed=0)
    answers = []
    for cm in (tts_model, static):
        session = minicpmv.ChatSession(cm, generate_audio=True, speech_options=opts, max_new_tokens=8, **GREEDY)
        first, second = session.respond(MSGS[0]["content"]), session.respond("And the grass?")
        answers.append((first.text, second.text, first.audio_wav, second.audio_wav))
    (t1, t2, a1, a2), (s1, s2, b1, b2) = answers
    assert (s1, s2) == (t1, t2) and np.abs(a1 - b1).max() < 1e-5 and np.abs(a2 - b2).max() < 1e-5
    lives = []
    for cm in (tts_model, static):
        live = LiveSession(cm, speech_options=SHORT, max_new_tokens=6, **GREEDY)
        live.prefill("Describe the picture.", role="user")
        chunks = list(live.generate())
        lives.append(("".join(c.text for c in chunks), _wav(chunks)))
    assert lives[1][0] == lives[0][0] and np.abs(lives[1][1] - lives[0][1]).max() < 1e-5
    assert len(made) == 4  # chat stream, two session turns, the live turn: all on the static step
