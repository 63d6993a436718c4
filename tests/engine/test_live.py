"""Live sessions: the official framing of streamed pieces, cached = one prompt, the streamed audio
encoder, interruption, many sessions at once, and the errors. (The speech of a session is checked
against the streaming_path vectors in tests/conformance.)"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.engine.kv_cache import KVCache
from minicpmv.engine.live import GENERATE_PROMPT, LiveSession
from minicpmv.engine.speech import speaker_hidden
from minicpmv.engine.speech_codes import SpeechOptions
from minicpmv.errors import ContextLengthError, FeatureNotAvailableError, InputError

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}
SHORT = SpeechOptions(top_p=0.7, top_k=20, seed=0, max_frames=30)


def _frame(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (64, 48), colour)


def _chunk(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(16000) * 0.1).astype(np.float32)


def test_pieces_are_framed_as_the_official_streaming_prefill(tts_model):
    s = LiveSession(tts_model, generate_audio=False, max_new_tokens=3, **GREEDY)
    s.prefill("You are a helpful assistant.", role="system")
    s.prefill([_frame((200, 30, 30)), _chunk(0)])
    s.prefill("What is it?")
    answer = s.generate()
    next(answer)
    answer.close()  # the user interrupts after the first piece
    s.prefill(["And", " now?"])
    s.prefill("more")
    list(s.generate())  # 3 tokens, no terminator: cut
    s.prefill("x", role="assistant")
    s.prefill("y")
    assert s.prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n(<image>./</image>)(<audio>./</audio>)What is it?" + GENERATE_PROMPT
        + "<|tts_eos|><|im_end|>\n<|im_start|>user\nAnd now?more" + GENERATE_PROMPT
        + "x<|tts_eos|><|im_end|>\n<|im_start|>user\ny")
    s.reset()
    assert s.prompt == "" and s.cached_tokens == 0
    s.prefill("Hi")
    assert s.prompt == "<|im_start|>user\nHi<|im_end|>\n"


def test_a_session_answers_as_one_prompt_would(tts_model):
    """Text + image pieces fed one by one give chat()'s greedy answer over the same prompt, and
    the voice is the hidden state at <|spk|> (cached = uncached)."""
    img = _frame((30, 200, 30))
    s = LiveSession(tts_model, generate_audio=False, omni_input=False, max_new_tokens=9, **GREEDY)
    s.prefill("Describe things.", role="system")
    s.prefill([img, "What colour"])
    s.prefill(" is it?")
    chunks = list(s.generate())
    msgs = [{"role": "system", "content": "Describe things."}, {"role": "user", "content": [img, "What colour is it?"]}]
    batch = tts_model.prepare([msgs], use_tts_template=True, max_slice_nums=1, use_image_id=False, id0_quirk=False)
    assert s.cached_tokens + 1 == len(batch.input_ids[0]) + 9  # the last token is not fed back
    want = tts_model.chat(msgs, **GREEDY, max_new_tokens=9, use_tts_template=True, max_slice_nums=1,
                          use_image_id=False, id0_quirk=False)
    assert "".join(c.text for c in chunks) == s.last_text == want
    assert chunks[-1].finish_reason == "length" and all(c.audio_wav is None for c in chunks)
    assert torch.allclose(s.voice, speaker_hidden(tts_model, batch), atol=1e-5)


def test_streamed_audio_chunks_continue_the_encoder_cache(tts_model):
    model = tts_model.model
    proc = tts_model.processor
    feats = [torch.from_numpy(proc.prompt_inputs("(<audio>./</audio>)", clips=[_chunk(i)]).audio_features[0][0])
             for i in range(2)]
    cache = KVCache(len(model.apm.layers))
    with torch.inference_mode():
        first = model.encode_audio_streaming(feats[0], cache)
        second = model.encode_audio_streaming(feats[1], cache)
        alone = model.encode_audio([feats[0]])[0]
        second_alone = model.encode_audio_streaming(feats[1], KVCache(len(model.apm.layers)))
    assert first.shape == second.shape == (25, model.hidden_size) and cache.get_seq_length() == 100
    assert torch.allclose(first, alone, atol=1e-5)  # a first piece is the clip encoded on its own
    assert (second - second_alone).abs().max() > 1e-3  # a later piece attends to the earlier ones


def _run(tts_model, seed: int) -> tuple[str, np.ndarray]:
    s = LiveSession(tts_model, speech_options=SHORT, max_new_tokens=6, **GREEDY)
    s.prefill("You are a helpful assistant.", role="user")
    s.prefill([_frame((seed * 60 % 255, 20, 20)), _chunk(seed)])
    chunks = list(s.generate())
    return "".join(c.text for c in chunks), np.concatenate([c.audio_wav for c in chunks])


def test_many_sessions_at_once_equal_one_at_a_time(tts_model):
    alone = [_run(tts_model, i) for i in range(3)]
    got: dict[int, tuple[str, np.ndarray]] = {}

    def run(i: int) -> None:
        got[i] = _run(tts_model, i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        assert got[i][0] == alone[i][0] and np.array_equal(got[i][1], alone[i][1])
        assert len(alone[i][1]) > 0
    assert not np.array_equal(alone[0][1][:12800], alone[1][1][:12800])


def test_say_speaks_in_the_last_answers_voice(tts_model):
    s = LiveSession(tts_model, speech_options=SHORT)
    with pytest.raises(InputError, match="no voice yet"):
        list(s.say(["Hello."]))
    s.voice = torch.randn(256, generator=torch.Generator().manual_seed(1))
    chunks = list(s.say(["Hello", " there."]))
    assert chunks and all(c.sampling_rate == 24000 for c in chunks)
    assert "".join(c.text for c in chunks) == "Hello there."


@pytest.fixture(scope="module")
def o26_without_speech():
    import minicpmv

    return minicpmv.load(CONF / "o2.6" / "_checkpoint", dtype="float32")


def test_clear_errors(tts_model, o26_without_speech, model26):
    s = LiveSession(tts_model, generate_audio=False)
    with pytest.raises(InputError, match="prefill"):
        list(s.generate())
    with pytest.raises(InputError, match="role"):
        s.prefill("hi", role="tool")
    with pytest.raises(InputError, match="PIL images"):
        s.prefill([b"bytes"])
    with pytest.raises(InputError, match="num_beams=1"):
        LiveSession(tts_model, sampling=False)
    with pytest.raises(ContextLengthError, match="context"):
        s.prefill("word " * (tts_model.runner.context_length + 10))
    assert s.cached_tokens == 0 and s.prompt == ""  # a refused piece leaves the session as it was
    with pytest.raises(FeatureNotAvailableError, match="speech head"):
        LiveSession(o26_without_speech)
    with pytest.raises(FeatureNotAvailableError, match="MiniCPM-o"):
        LiveSession(model26, generate_audio=False)
