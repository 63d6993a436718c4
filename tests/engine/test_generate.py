"""Greedy / sampled generation: cache consistency, batching, positions, finishing, parameters."""

from __future__ import annotations

import pytest
import torch

from minicpmv.engine.generate import (
    PAD_ID,
    DecodeMode,
    decode_logits,
    generate_steps,
    generate_tokens,
    prefill_positions,
)
from minicpmv.engine.kv_cache import KVCache, StaticKVCache
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import InputError

EOS = (256, 257)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
    return ids, (ids != 0).long()  # the reference's mask: id 0 is invisible


def _run(model, ids, mask, cache=None, **kw):
    eos = kw.pop("eos_token_ids", EOS)
    params = SamplingParams(**{"max_new_tokens": 10, **kw})
    steps = list(generate_steps(model, model.embed_tokens(ids), mask, params, eos_ids=eos, cache=cache))
    return torch.stack([s.tokens for s in steps], 1), torch.stack([s.logits for s in steps], 1)


def _uncached_greedy(model, ids, mask, n):
    """Reference: recompute the whole sequence every step, no cache, no finishing."""
    embeds, tokens, logits = model.embed_tokens(ids), [], []
    for _ in range(n):
        pos = prefill_positions(mask)
        with torch.no_grad():
            out = model.forward(embeds, pos, mask, cache=None, last_only=True)[:, -1]
        nxt = out.argmax(-1)
        tokens.append(nxt)
        logits.append(out)
        embeds = torch.cat([embeds, model.embed_tokens(nxt[:, None])], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("static", [False, True])
def test_cached_generation_matches_full_recompute(tiny_lm, static: bool) -> None:
    ids, mask = _left_pad([[5, 6, 0, 7, 8, 9], [3, 4, 5]])  # id 0 in a prompt + left padding
    cache = StaticKVCache(2, 2, 2, 8, capacity=32) if static else None
    tokens, logits = _run(tiny_lm, ids, mask, cache=cache, eos_token_ids=(), max_new_tokens=12)
    ref_tokens, ref_logits = _uncached_greedy(tiny_lm, ids, mask, 12)
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_static_and_dynamic_cache_agree(tiny_lm) -> None:
    ids, mask = _left_pad([[11, 12, 13], [14, 15, 16, 17, 18]])
    a_tok, a_log = _run(tiny_lm, ids, mask, cache=KVCache.for_model(tiny_lm, 2), repetition_penalty=1.3)
    b_tok, b_log = _run(
        tiny_lm, ids, mask, cache=KVCache.for_model(tiny_lm, 2, capacity=20), repetition_penalty=1.3
    )
    assert torch.equal(a_tok, b_tok)
    assert torch.allclose(a_log, b_log, atol=1e-5)


def test_batched_rows_equal_single_rows(tiny_lm_cls) -> None:
    model = tiny_lm_cls(seed=5).eval()
    with torch.no_grad():
        model.head[:, 256] += 0.9  # make eos likely so rows finish at different steps
    rows = [[40, 41, 42, 43, 44, 45, 46], [50, 0, 52], [60, 61, 62, 63, 64]]
    ids, mask = _left_pad(rows)
    tokens, logits = _run(model, ids, mask, max_new_tokens=16)
    ends = []
    for i, row in enumerate(rows):
        single_ids = torch.tensor([row])
        s_tok, s_log = _run(model, single_ids, (single_ids != 0).long(), max_new_tokens=16)
        n = s_tok.shape[1]
        assert tokens[i, :n].tolist() == s_tok[0].tolist()
        assert torch.all(tokens[i, n:] == 0)  # finished rows emit pad_token_id
        assert torch.allclose(logits[i, :n], s_log[0], atol=1e-5)
        ends.append(n)
    assert len(set(ends)) > 1 and min(ends) < 16  # the test really covers per-row finishing
    assert tokens.shape[1] == max(ends)  # stops once every row is finished


def test_positions_follow_hf_with_masked_tokens(tiny_lm) -> None:
    ids = torch.tensor([[0, 0, 7, 8, 0, 9], [1, 2, 3, 4, 5, 6]])
    mask = (ids != 0).long()
    tiny_lm.position_log.clear()
    tiny_lm.mask_log.clear()
    _run(tiny_lm, ids, mask, max_new_tokens=3, eos_token_ids=())
    log = tiny_lm.position_log
    assert log[0].tolist() == [[1, 1, 0, 1, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert [p.tolist() for p in log[1:]] == [[[3], [6]], [[4], [7]]]
    assert tiny_lm.mask_log[-1].tolist() == [[0, 0, 1, 1, 0, 1, 1, 1], [1] * 8]


def test_prefill_positions_helper() -> None:
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    assert prefill_positions(mask).tolist() == [[1, 0, 1, 1, 2], [0, 1, 2, 3, 4]]


def test_masked_id0_token_is_invisible(tiny_lm) -> None:
    """A prompt with a masked token gives the same logits as the prompt without it."""
    with_bang, mask = _left_pad([[5, 6, 0, 7]])
    without, mask2 = _left_pad([[5, 6, 7]])
    _, a = _run(tiny_lm, with_bang, mask, max_new_tokens=3, eos_token_ids=())
    _, b = _run(tiny_lm, without, mask2, max_new_tokens=3, eos_token_ids=())
    assert torch.allclose(a, b, atol=1e-5)


def _eos_lm(history_lm_cls, first_eos_row: int):
    """HistoryLM over 6 tokens: token 5 = eos; after token `first_eos_row` eos wins."""
    table = torch.zeros(6, 6)
    table[:, 1] = 1.0  # default: emit 1
    table[first_eos_row, 5] = 3.0
    table[1, 2] = 2.0  # after 1 comes 2
    return history_lm_cls(table)


def test_finished_rows_pad_and_generation_stops(history_lm_cls) -> None:
    model = _eos_lm(history_lm_cls, first_eos_row=2)  # 3 -> 1 -> 2 -> eos ; 4 -> 1 -> 2 -> eos
    ids = torch.tensor([[3, 3], [2, 2]])  # row 1 ends with token 2: eos at once
    params = SamplingParams(max_new_tokens=8)
    steps = list(generate_steps(model, model.embed_tokens(ids), torch.ones(2, 2, dtype=torch.long), params,
                                eos_ids=(5,)))
    tokens = torch.stack([s.tokens for s in steps], 1).tolist()
    assert tokens == [[1, 2, 5], [5, PAD_ID, PAD_ID]]
    assert [s.finished.tolist() for s in steps] == [[False, True], [False, True], [True, True]]
    assert [s.reasons for s in steps] == [(None, "stop"), (None, "stop"), ("stop", "stop")]


def test_a_row_at_its_token_limit_finishes_with_length(history_lm_cls) -> None:
    model = _eos_lm(history_lm_cls, first_eos_row=2)
    steps = list(generate_steps(model, model.embed_tokens(torch.tensor([[3, 3]])), None,
                                SamplingParams(max_new_tokens=2), eos_ids=(5,)))
    assert [s.reasons for s in steps] == [(None,), ("length",)]


def test_min_new_tokens_suppresses_eos(history_lm_cls) -> None:
    table = torch.zeros(6, 6)
    table[:, 5] = 5.0  # eos always best
    model = history_lm_cls(table)
    ids = torch.tensor([[1, 2]])
    mask = torch.ones(1, 2, dtype=torch.long)
    for n in (0, 1, 3):
        params = SamplingParams(max_new_tokens=8, min_new_tokens=n)
        out = [int(t) for t in generate_tokens(model, model.embed_tokens(ids), mask, params, eos_ids=(5,))]
        assert len(out) == n + 1 and out[-1] == 5 and 5 not in out[:-1]


def test_max_new_tokens_and_generate_tokens_yield_rows(tiny_lm) -> None:
    ids, mask = _left_pad([[9, 8, 7], [6, 5]])
    params = SamplingParams(max_new_tokens=4)
    out = list(generate_tokens(tiny_lm, tiny_lm.embed_tokens(ids), mask, params))
    assert len(out) == 4 and all(t.shape == (2,) and t.dtype == torch.long for t in out)


def test_mask_none_means_all_visible(tiny_lm) -> None:
    ids = torch.tensor([[9, 8, 7]])
    params = SamplingParams(max_new_tokens=4)
    a = list(generate_tokens(tiny_lm, tiny_lm.embed_tokens(ids), None, params))
    b = list(generate_tokens(tiny_lm, tiny_lm.embed_tokens(ids), torch.ones(1, 3, dtype=torch.long), params))
    assert [t.tolist() for t in a] == [t.tolist() for t in b]


def test_continuing_from_a_cached_prefix(tiny_lm) -> None:
    """Session reuse: prefix in the cache + only the new embeddings == everything from scratch."""
    prefix, suffix = [20, 21, 0, 22], [23, 24, 25]
    full = torch.tensor([prefix + suffix])
    full_mask = (full != 0).long()
    cache = KVCache.for_model(tiny_lm, 1)
    pre = torch.tensor([prefix])
    list(
        generate_tokens(
            tiny_lm,
            tiny_lm.embed_tokens(pre),
            (pre != 0).long(),
            SamplingParams(max_new_tokens=1),
            cache=cache,
        )
    )
    assert cache.get_seq_length() == len(prefix)  # the sampled token is not fed back
    _, cont = _run(tiny_lm, torch.tensor([suffix]), full_mask, cache=cache, max_new_tokens=5)
    _, fresh = _run(tiny_lm, full, full_mask, max_new_tokens=5)
    assert torch.allclose(cont, fresh, atol=1e-5)
    with pytest.raises(InputError):  # mask must cover cached + new positions
        _run(tiny_lm, torch.tensor([suffix]), torch.ones(1, 3, dtype=torch.long), cache=cache)


def test_seeded_sampling_is_reproducible_and_matches_global_rng(tiny_lm) -> None:
    ids, mask = _left_pad([[30, 31, 32], [33, 34]])
    kw = dict(
        do_sample=True,
        temperature=1.3,
        top_k=40,
        top_p=0.95,
        repetition_penalty=1.05,
        max_new_tokens=12,
        eos_token_ids=(),
    )
    a, _ = _run(tiny_lm, ids, mask, seed=7, **kw)
    b, _ = _run(tiny_lm, ids, mask, seed=7, **kw)
    c, _ = _run(tiny_lm, ids, mask, seed=8, **kw)
    torch.manual_seed(7)  # transformers samples from the global generator
    d, _ = _run(tiny_lm, ids, mask, seed=None, **kw)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


# Recorded with transformers 4.44.2 and 4.55.0 (identical) on the same HistoryLM, prompt and
# settings, after torch.manual_seed(1234); eos = (10, 11), pad = 0, max_new_tokens = 12.
HF_SAMPLING = {
    "sample_chat26": (
        dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.05),
        [[7, 11, 0], [4, 9, 10]],
    ),
    "sample_think": (dict(do_sample=True, temperature=0.7, top_k=50), [[7, 11, 0], [4, 7, 11]]),
    "sample_hot": (
        dict(do_sample=True, temperature=1.5, top_p=0.5, min_new_tokens=4),
        [[7, 2, 8, 2, 8, 8, 4, 7, 3, 8, 4, 7], [4, 4, 7, 3, 10, 0, 0, 0, 0, 0, 0, 0]],
    ),
    "greedy_rep": (
        dict(repetition_penalty=1.3, min_new_tokens=3),
        [[7, 2, 8, 4, 9, 4, 1, 8, 1, 1, 8, 1], [4, 6, 1, 1, 8, 1, 1, 8, 1, 1, 8, 1]],
    ),
}


@pytest.mark.parametrize("case", sorted(HF_SAMPLING))
def test_matches_recorded_transformers_output(history_lm_cls, case: str) -> None:
    g = torch.Generator().manual_seed(1)
    model = history_lm_cls(torch.randn(12, 12, generator=g) * 1.5, torch.randn(5, 12, generator=g))
    ids = torch.tensor([[0, 3, 1, 4], [2, 0, 5, 9]])
    kw, expected = HF_SAMPLING[case]
    tokens, _ = _run(
        model, ids, (ids != 0).long(), max_new_tokens=12, eos_token_ids=(10, 11), seed=1234, **kw
    )
    assert tokens.tolist() == expected


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=0),
        dict(max_new_tokens=4, min_new_tokens=-1),
        dict(max_new_tokens=4, temperature=0.0),
        dict(max_new_tokens=4, temperature=float("nan")),
        dict(max_new_tokens=4, top_k=-1),
        dict(max_new_tokens=4, top_p=1.5),
        dict(max_new_tokens=4, repetition_penalty=0.0),
        dict(max_new_tokens=4, num_beams=0),
        dict(max_new_tokens=4, num_beams=3, do_sample=True),
        dict(max_new_tokens=4, early_stopping="soon"),
        dict(max_new_tokens=4, stop_token_ids=(-1,)),
        dict(max_new_tokens=4, seed=1.5),
        dict(max_new_tokens=4, beam_compat="4.30"),
        dict(max_new_tokens=4, presence_penalty=2.5),
        dict(max_new_tokens=4, logit_bias=((3, 101.0),)),
        dict(max_new_tokens=4, do_sample=1),
        dict(max_new_tokens=True),
    ],
)
def test_invalid_params_raise(kw) -> None:
    with pytest.raises(InputError):
        SamplingParams(**kw)


def test_shape_errors(tiny_lm) -> None:
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(InputError):
        list(generate_tokens(tiny_lm, torch.zeros(1, 3), torch.ones(1, 3), params))
    with pytest.raises(InputError):
        list(generate_tokens(tiny_lm, torch.zeros(1, 3, 32), torch.ones(1, 4), params))
    with pytest.raises(InputError):
        list(
            generate_tokens(
                tiny_lm, torch.zeros(1, 3, 32), None, SamplingParams(max_new_tokens=2, num_beams=2)
            )
        )


# ------------------------------------------------------------------ static-shape decoding
STATIC = DecodeMode(static=True, capacity=16)


def _run_mode(model, ids, mask, mode, cache=None, **kw):
    params = SamplingParams(**{"max_new_tokens": 10, **kw})
    steps = list(generate_steps(model, model.embed_tokens(ids), mask, params, eos_ids=EOS, cache=cache, mode=mode))
    return torch.stack([s.tokens for s in steps], 1), torch.stack([s.logits for s in steps], 1)


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 1.3},
                                {"do_sample": True, "temperature": 1.2, "top_p": 0.9, "seed": 3}])
def test_static_decoder_equals_dense(tiny_lm, kw) -> None:
    """Same tokens, same logits to float rounding: the static step attends over the whole capacity,
    hidden keys with exactly zero weight. 7 + 12 positions do not fit 16: the cache grows to 32."""
    ids, mask = _left_pad([[5, 6, 0, 7, 8, 9, 10], [3, 4, 5]])
    dense_tok, dense_log = _run_mode(tiny_lm, ids, mask, None, max_new_tokens=12, **kw)
    cache = KVCache.for_model(tiny_lm, 2, capacity=16)
    tok, log = _run_mode(tiny_lm, ids, mask, STATIC, cache=cache, max_new_tokens=12, **kw)
    assert torch.equal(tok, dense_tok)
    assert torch.allclose(log, dense_log, atol=1e-5, rtol=1e-5)
    assert cache.capacity == 32 and cache.get_seq_length() == 7 + 11  # the last token is not fed back


def test_static_decoder_keeps_shapes_and_hf_positions(tiny_lm) -> None:
    ids = torch.tensor([[0, 0, 7, 8, 0, 9], [1, 2, 3, 4, 5, 6]])
    tiny_lm.position_log.clear()
    tiny_lm.mask_log.clear()
    _run_mode(tiny_lm, ids, (ids != 0).long(), STATIC, max_new_tokens=4)
    assert [p.tolist() for p in tiny_lm.position_log[1:]] == [[[3], [6]], [[4], [7]], [[5], [8]]]
    decode_masks = tiny_lm.mask_log[1:]
    assert {tuple(m.shape) for m in decode_masks} == {(2, 16)}  # one shape for every step
    assert decode_masks[-1].tolist()[0] == [0, 0, 1, 1, 0, 1, 1, 1, 1] + [0] * 7


def test_static_decoder_continues_a_cached_prefix(tiny_lm) -> None:
    """A session's next turn: crop the static cache to the shared prefix, prefill the rest."""
    prefix, suffix = [20, 21, 0, 22], [23, 24, 25]
    full = torch.tensor([prefix + suffix])
    full_mask = (full != 0).long()
    cache = KVCache.for_model(tiny_lm, 1, capacity=16)
    pre = torch.tensor([prefix])
    _run_mode(tiny_lm, pre, (pre != 0).long(), STATIC, cache=cache, max_new_tokens=3)
    assert cache.get_seq_length() == len(prefix) + 2
    cache.crop(len(prefix))
    tok, cont = _run_mode(tiny_lm, torch.tensor([suffix]), full_mask, STATIC, cache=cache, max_new_tokens=5)
    fresh_tok, fresh = _run_mode(tiny_lm, full, full_mask, None, max_new_tokens=5)
    assert torch.equal(tok, fresh_tok) and torch.allclose(cont, fresh, atol=1e-5)


def test_a_static_mode_with_a_dynamic_cache_decodes_densely(tiny_lm) -> None:
    ids, mask = _left_pad([[9, 8, 7]])
    tiny_lm.mask_log.clear()
    _run_mode(tiny_lm, ids, mask, STATIC, cache=KVCache.for_model(tiny_lm, 1), max_new_tokens=3)
    assert [m.shape[1] for m in tiny_lm.mask_log] == [3, 4, 5]


def test_decode_mode_from_compile() -> None:
    assert DecodeMode.from_compile(False, "cpu") == DecodeMode()
    assert DecodeMode.from_compile("static", "cpu") == DecodeMode(static=True)
    assert DecodeMode.from_compile(True, "cpu").compile == "default"
    assert DecodeMode.from_compile("auto", "cuda:0").compile == "reduce-overhead"
    mode = DecodeMode.from_compile("max-autotune", "cpu", capacity=512)
    assert mode.static and mode.capacity == 512 and mode.capacity_for(513) == 1024
    assert DecodeMode().step() is decode_logits
    for bad in ("fast", 3):
        with pytest.raises(InputError):
            DecodeMode.from_compile(bad, "cpu")
    with pytest.raises(InputError):
        DecodeMode(static=True, capacity=0)
