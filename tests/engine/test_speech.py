"""Speech output beyond the vectors: independent concurrent streams, push and pull forms, the
early-first-chunk variant, a stream ending, the long-answer segment split, LLM text pieces,
the speaker state at <|spk|>, WAV output, and clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpmv.engine.generate import prefill_positions
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.speech import (
    LLMTextPieces,
    SpeechSynthesizer,
    get_synthesizer,
    speak_answer,
    speaker_hidden,
    speaker_position,
    stream_speech,
)
from minicpmv.engine.speech_codes import SpeechTrace
from minicpmv.errors import CheckpointError, FeatureNotAvailableError, InputError
from minicpmv.processing.audio import load_wav

TTS = Path(__file__).resolve().parents[1] / "data" / "conformance" / "o2.6-tts"
STREAM = json.loads((TTS / "streaming_path" / "meta.json").read_text())
PIECES = STREAM["llm_text_pieces"]


def _spk(seed: int) -> torch.Tensor:
    return torch.randn(256, generator=torch.Generator().manual_seed(seed))


def _wav(chunks) -> np.ndarray:
    return np.concatenate([c.audio_wav for c in chunks])


def test_concurrent_streams_equal_one_at_a_time(tts_synth):
    opts = tts_synth.default_options(seed=0)
    alone = [_wav(stream_speech(tts_synth, _spk(i), PIECES, opts)) for i in range(2)]
    got: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        got[i] = _wav(stream_speech(tts_synth, _spk(i), PIECES, opts))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert np.array_equal(got[i], alone[i])
    assert not np.array_equal(alone[0], alone[1])


def test_push_and_pull_forms_and_both_first_chunk_variants_agree(tts_synth):
    opts = tts_synth.default_options(seed=0)
    stream = tts_synth.stream(_spk(6), opts)
    pushed = [c for p in PIECES for c in stream.feed(p)] + stream.finish()
    pulled = list(stream_speech(tts_synth, _spk(6), PIECES, opts))
    early = list(stream_speech(tts_synth, _spk(6), PIECES, opts, first_chunk="early"))
    assert np.array_equal(_wav(pushed), _wav(pulled))
    # the same samples, emitted at other boundaries (w * x / w rounds differently in the overlap-free part)
    assert np.abs(_wav(pushed) - _wav(early)).max() < 1e-7
    assert len(early) == len(pulled) + 1 and len(early[0].audio_wav) == 12800 - 2048
    assert "".join(c.text for c in pulled) == "".join(PIECES)
    assert all(c.sampling_rate == 24000 and c.audio_wav.dtype == np.float32 for c in pulled)
    with pytest.raises(InputError, match="first_chunk"):
        tts_synth.stream(_spk(6), opts, first_chunk="soon")


def test_the_stream_ignores_text_after_the_speech_ended(tts_synth):
    stream = tts_synth.stream(_spk(6), tts_synth.default_options(seed=0))
    for p in PIECES:
        stream.feed(p)
    assert stream.finish() and stream.done
    assert stream.feed("more text") == [] and stream.finish() == []
    empty = tts_synth.stream(_spk(6), tts_synth.default_options(seed=0))
    with pytest.raises(InputError, match="text pieces"):
        empty.feed(12)
    assert empty.finish() == []  # no text at all: no speech


def test_tts_eos_cuts_a_piece(tts_synth):
    opts = tts_synth.default_options(seed=0)
    cut = list(stream_speech(tts_synth, _spk(6), [*PIECES[:-1], " blue.<|tts_eos|> and more"], opts))
    assert np.array_equal(_wav(cut), _wav(stream_speech(tts_synth, _spk(6), PIECES, opts)))
    assert "".join(c.text for c in cut) == "".join(PIECES)


def test_long_streamed_answers_continue_in_a_new_segment(tts_synth):
    words = ("hello world how are you today . " * 19).split(" ")
    pieces = [" ".join(words[i : i + 3]) + " " for i in range(0, len(words), 3)]
    trace = SpeechTrace()
    chunks = list(stream_speech(tts_synth, _spk(0), pieces, tts_synth.default_options(seed=0), trace=trace))
    starts = [c for c in trace.prefill_calls if c["begin"] == 0]
    # segment 1 starts with [0, 12); segment 2 is primed with [Stts][spk_emb] + its 5 last text ids
    assert [(c["end"], c["with_spk"]) for c in starts][:3] == [(12, True), (7, True), (12, True)]
    split_at = trace.prefill_calls.index(starts[1])
    assert max(c["end"] for c in trace.prefill_calls[:split_at]) > 120  # past reserved - 180 tokens
    second = [t for t in trace.text_calls if t["text_in"].startswith("how are you today.")]
    assert second, "the new segment's text starts from the decoded last 5 ids"
    assert all(len(c.audio_wav) > 0 for c in chunks)
    assert "".join(pieces).startswith("".join(c.text for c in chunks))


def test_llm_text_pieces_group_three_ids_and_hold_split_characters(tts_model):
    tok = tts_model.tokenizer
    ids = tok.encode("ab€cd") + [423]  # € is three byte tokens here; 423 = <|im_end|>
    pieces = LLMTextPieces(tok, tts_model.terminator_ids())
    out = [p for i in ids if (p := pieces.push(i)) is not None]
    assert "".join(out) == "ab€cd" and all("\ufffd" not in p for p in out)
    assert len(out) == -(-len(ids) // 3)  # one piece per 3 ids, the terminator closes the last
    assert pieces.flush() is None
    held = LLMTextPieces(tok, tts_model.terminator_ids())
    assert held.push(tok.encode("€")[0]) is None
    assert held.flush() == ""  # an unfinished character waits for the next piece


def _batch(tts_model, text: str = "What color is the sky?"):
    return tts_model.prepare([[{"role": "user", "content": text}]], use_tts_template=True)


def test_speaker_state_is_the_final_hidden_at_the_spk_slot(tts_model):
    batch = _batch(tts_model)
    ids = batch.input_ids[0].tolist()
    pos = speaker_position(ids, tts_model.tokenizer)
    assert tts_model.tokenizer.decode(ids[pos - 1 : pos + 2]) == "<|spk_bos|><|spk|><|spk_eos|>"
    with torch.inference_mode():
        full = tts_model.model.forward_hidden(batch.inputs_embeds, prefill_positions(batch.attention_mask),
                                              batch.attention_mask)[0, pos]
    assert torch.allclose(speaker_hidden(tts_model, batch), full, atol=1e-6)
    plain = tts_model.prepare([[{"role": "user", "content": "hi"}]])
    with pytest.raises(InputError, match="speaker slot"):
        speaker_hidden(tts_model, plain)


def test_speak_answer_writes_a_24khz_wav(tmp_path, tts_model):
    batch = _batch(tts_model)
    params = SamplingParams.from_official(tts_model.version, sampling=False, max_new_tokens=6,
                                          overrides={"num_beams": 1, "repetition_penalty": 1.0})
    ids = tts_model.runner.generate_ids(batch, params)[0]
    out = speak_answer(tts_model, batch, ids, options=get_synthesizer(tts_model).default_options(seed=0),
                       output_audio_path=tmp_path / "a.wav")
    data, rate = load_wav(tmp_path / "a.wav")
    assert rate == 24000 and len(data) == len(out.audio_wav) > 0 and out.sampling_rate == 24000
    assert np.abs(data - np.clip(out.audio_wav, -1, 1)).max() <= 1 / 32767
    assert out.text == tts_model.runner.postprocess(ids) and out.spk_embeds.shape == (1, 256)


def test_synthesis_limits_and_empty_text(tts_synth):
    opts = tts_synth.default_options(seed=0, chunk_frames=1, max_frames=3)
    # the limit is checked after every call (with one frame per call: the 4th frame ends it);
    # without a limit the same text runs on past the 31 chunked calls
    assert tts_synth.codes("hello", _spk(1), opts).shape == (4, 4)
    unlimited = tts_synth.default_options(seed=0, chunk_frames=1, max_frames=64)
    assert tts_synth.codes("hello", _spk(1), unlimited).shape[0] > 31
    out = tts_synth.synthesize("", _spk(1), tts_synth.default_options(seed=0))
    assert out.sampling_rate == 24000 and np.isfinite(out.audio_wav).all() and len(out.audio_wav) % 512 == 0
    with pytest.raises(InputError, match=r"speaker state must be \[256\]"):
        tts_synth.synthesize("hi", torch.zeros(2, 256))


def test_synthesizer_setup_errors(tts_synth, tts_model, model26):
    assert get_synthesizer(tts_model) is tts_synth
    assert tts_synth.tts.dtype == torch.float32
    with pytest.raises(FeatureNotAvailableError, match="no speech head"):
        SpeechSynthesizer.from_chat_model(model26)
    other = copy.copy(tts_synth.tts)
    other.config = dataclasses.replace(tts_synth.tts.config, spk_emb_token_id=5)
    with pytest.raises(CheckpointError, match=r"maps \[spk_emb\] to 207"):
        SpeechSynthesizer(other, tts_synth.vocos, tts_synth.tokenizer)


def test_speaker_state_from_a_sessions_hidden_states(tts_model):
    from minicpmv.engine.speech import speaker_hidden_from_states

    ids = tts_model.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>")
    hidden = torch.arange(len(ids) * 3, dtype=torch.float32).view(len(ids), 3)
    pos = speaker_position(ids, tts_model.tokenizer)
    assert torch.equal(speaker_hidden_from_states(hidden, ids, tts_model.tokenizer), hidden[pos])
    with pytest.raises(InputError, match="hidden states must be"):
        speaker_hidden_from_states(hidden[:-1], ids, tts_model.tokenizer)
