"""The speech frame loop's pieces: visibility rule, score processing order, the windowed
repetition penalty, the position-addressed KV cache, options, and that the sampler, greedy
choice and interleaved utterances agree on the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpmv.engine.speech_codes import (
    CodeGenerator,
    SpeechCache,
    SpeechOptions,
    SpeechTrace,
    process_code_scores,
    repetition_penalty_window,
    visible_columns,
)
from minicpmv.errors import InputError

CORE = Path(__file__).resolve().parents[1] / "data" / "conformance" / "o2.6-tts" / "core_chat_path"


def test_visibility_releases_ten_text_tokens_per_fifty_frames():
    mask = torch.tensor([1] * 30 + [0] * 272 + [1], dtype=torch.int8)  # 27 text tokens + [Etts]
    v = visible_columns(302, 303, mask, reserved=300, text_chunk=10)
    assert v[:12].all() and not v[12:303].any()  # first step: [Stts], speaker, 10 tokens; not itself
    v = visible_columns(350, 351, mask, reserved=300, text_chunk=10)
    assert v[:12].all() and not v[12:303].any() and v[303:].all()
    v = visible_columns(351, 352, mask, reserved=300, text_chunk=10)
    assert v[:22].all() and not v[22:303].any()
    v = visible_columns(1000, 1001, mask, reserved=300, text_chunk=10)
    assert v[:30].all() and not v[30:303].any() and v[303:].all()  # the text mask hides padding


def test_scores_first_frame_skips_top_p_top_k_and_end_ban_is_last():
    torch.manual_seed(0)
    logits = torch.randn(4, 626)
    opts = SpeechOptions()
    first = process_code_scores(logits, torch.zeros(4, 0, dtype=torch.long), first_frame=True, ban_end=True,
                                options=opts, end_id=625)
    assert torch.isfinite(first[:, :625]).all() and torch.isinf(first[:, 625]).all()
    assert torch.equal(first[:, :625], (logits / torch.tensor([0.1, 0.3, 0.1, 0.3])[:, None])[:, :625])
    later = process_code_scores(logits, torch.zeros(4, 0, dtype=torch.long), first_frame=False, ban_end=False,
                                options=opts, end_id=625)
    kept = torch.isfinite(later).sum(-1)
    assert (kept >= 3).all() and (kept <= 20).all()
    # the ban comes after top-p/top-k: an end id kept among the last 3 leaves 2
    peaked = torch.full((4, 626), -10.0)
    peaked[:, 625], peaked[:, 3], peaked[:, 4] = 10.0, 9.0, 8.0
    banned = process_code_scores(peaked, torch.zeros(4, 0, dtype=torch.long), first_frame=False, ban_end=True,
                                 options=opts, end_id=625)
    assert (torch.isfinite(banned).sum(-1) == 2).all()


def test_windowed_repetition_penalty_counts_occurrences():
    scores = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    history = torch.tensor([[0] * 20 + [1, 1, 0]])  # only the last 16 count: id 0 x14, id 1 x2
    out = repetition_penalty_window(scores, history, 1.5)
    assert torch.allclose(out, torch.tensor([[2.0 / 1.5**14, -2.0 * 1.5**2, 1.0, 0.5]]))


def test_cache_writes_at_any_position_and_grows():
    cache = SpeechCache(1, 2, 4, 10, dtype=torch.float32, device=torch.device("cpu"), capacity=12)
    k = torch.ones(1, 2, 3, 4)
    keys, _ = cache.at(2).update(0, k, k)
    cache.commit(3)
    assert keys.shape[2] == 5 and cache.length == 10 and cache.get_seq_length() == 10
    keys, _ = cache.at(10).update(0, 2 * k, 2 * k)  # past the capacity of 12
    cache.commit(3)
    assert keys.shape[2] == 13 and cache.length == 13
    assert keys[0, 0, :2].abs().sum() == 0 and (keys[0, 0, 2:5] == 1).all() and (keys[0, 0, 10:] == 2).all()


def test_options_are_validated():
    for bad in ({"temperature": (0.1, 0.0)}, {"top_p": 1.5}, {"top_k": 0}, {"repetition_penalty": 0.0},
                {"chunk_frames": 0}):
        with pytest.raises(InputError):
            SpeechOptions(**bad)


def _core(synth, **opts):
    meta = json.loads((CORE / "meta.json").read_text())
    spk = torch.from_numpy(np.load(CORE / "tensors.npz")["spk_hidden"])
    return synth.codes(meta["text"], spk, synth.default_options(**opts))


def test_sampling_greedy_and_seeds_agree_where_all_mass_is_on_one_id(tts_synth):
    want = np.load(CORE / "tensors.npz")["codes"].tolist()
    assert _core(tts_synth, greedy=True).tolist() == want
    assert _core(tts_synth, seed=1).tolist() == want
    assert _core(tts_synth).tolist() == want  # unseeded: its own random generator


def test_interleaved_utterances_do_not_share_state(tts_synth):
    """Two generators stepped alternately give what each gives alone (no state on the model)."""
    cond = tts_synth.tts_text("I have 23 books.")
    spk = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
    from minicpmv.processing.tts_text import text_mask

    def start(i):
        g = CodeGenerator(tts_synth.tts, tts_synth.default_options(seed=7), trace=SpeechTrace())
        g.set_text_mask(text_mask(cond.n_tokens))
        with torch.inference_mode():
            g.prefill_text(cond.ids, 0, 12, tts_synth.speaker_embedding(spk[i]))
        return g

    alone = []
    for i in range(2):
        g = start(i)
        with torch.inference_mode():
            for _ in range(5):
                g.generate(5)
        alone.append(g.codes)
    a, b = start(0), start(1)
    with torch.inference_mode():
        for _ in range(5):
            a.generate(5)
            b.generate(5)
    assert torch.equal(a.codes, alone[0]) and torch.equal(b.codes, alone[1])
    assert alone[0].shape[0] == 25 and not torch.equal(alone[0], alone[1])
