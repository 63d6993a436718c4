"""Beam search: a hand-traced example, outputs recorded from transformers 4.44.2 / 4.55.0,
batch-vs-single consistency and cache handling."""

from __future__ import annotations

import pytest
import torch

from minicpmv.engine.beam import beam_search
from minicpmv.engine.kv_cache import KVCache
from minicpmv.engine.sampling import SamplingParams

COMPATS = ("4.44", "4.55")


def _hand_model(history_lm_cls):
    # next-token probabilities; tokens a=0, b=1, c=2, eos=3
    probs = torch.tensor(
        [
            [0.10, 0.45, 0.30, 0.15],  # after a
            [0.10, 0.13, 0.17, 0.60],  # after b
            [0.12, 0.50, 0.10, 0.28],  # after c (the prompt)
            [0.25, 0.25, 0.25, 0.25],
        ]
    )
    return history_lm_cls(probs.log())


@pytest.mark.parametrize("compat", COMPATS)
def test_hand_traced_two_beams(history_lm_cls, compat: str) -> None:
    """num_beams=2, eos=3, length_penalty 1, prompt "c"; log-probs rounded to 3 decimals.

    step 1: b -.693, eos -1.273 (rank 1 -> hypothesis [] = -1.273/1), a -2.120
            beams [b] -.693, [a] -2.120
    step 2: [b,eos] -1.204 (rank 0 -> hypothesis [b] = -1.204/2 = -.602), [b,c] -2.465,
            [b,b] -2.733, [a,b] -2.919; beams [b,c], [b,b]; not done (-.602 > -1.273)
    step 3: [b,c,b] -3.158, [b,b,eos] -3.244 (rank 1 -> [b,b] = -1.081 replaces []),
            [b,c,eos] -3.738 (rank 2: ignored), [b,b,c] -4.505
    final : [b,c,b] -3.158/3 = -1.053 replaces [b,b]; best is [b] (-.602) -> [b, eos]
    (normalising by the length without eos would make [b] -1.204 and pick [b,c,b])
    """
    model = _hand_model(history_lm_cls)
    embeds = model.embed_tokens(torch.tensor([[2]]))
    mask = torch.ones(1, 1, dtype=torch.long)

    def run(n: int) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=n, num_beams=2, beam_compat=compat)
        return beam_search(model, embeds, mask, params, eos_ids=(3,))

    assert run(3) == [[1, 3]]
    assert run(1) == [[1]]  # the running beam [b] (-.693) beats hypothesis [] (-1.273)


def _table_model(history_lm_cls, seed: int, hist_seed: int | None = None):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(8, 8, generator=g) * 2
    table[:, -2:] += 1.0
    hist = (
        None if hist_seed is None else torch.randn(5, 8, generator=torch.Generator().manual_seed(hist_seed))
    )
    return history_lm_cls(table, hist)


# transformers.generate(inputs_embeds, attention_mask, num_beams=3, repetition_penalty=1.2,
# eos_token_id=[6, 7], pad_token_id=0, max_new_tokens=10) on _table_model(seed), prompt [1, 2].
# The two versions pick different hypotheses here: 4.44 stops the search later (its early-stop
# check uses the best candidate including eos, 4.55 the best running beam).
HF_SINGLE = {
    175: ([4, 5, 2, 4, 3, 6], [4, 3, 7]),
    347: ([0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 7]),
    559: ([2, 3, 0, 0, 0, 0, 0, 1, 4, 6], [2, 3, 0, 0, 0, 1, 4, 7]),
}

# Same, batched: prompts [[0, 0, 3, 1], [2, 5, 0, 4]] with mask = ids != 0, history term on
# (hist seed = seed + 1000), max_new_tokens=8. 4.44 appends eos[0] and pads with 0; 4.55 keeps
# the eos actually chosen and pads with eos[0] (its fill value is `pad or eos[0]`, pad being 0).
HF_BATCH = {
    22: ([[4, 1, 5, 2, 6], [2, 6, 0, 0, 0]], [[4, 1, 5, 2, 7], [2, 7, 6, 6, 6]]),
    29: ([[1, 1, 1, 6], [0, 6, 0, 0]], [[1, 1, 1, 6], [0, 7, 6, 6]]),
    31: ([[1, 1, 3, 4, 6], [6, 0, 0, 0, 0]], [[1, 1, 3, 4, 7], [7, 6, 6, 6, 6]]),
    21: (
        [[4, 5, 5, 5, 5, 5, 5, 5], [6, 0, 0, 0, 0, 0, 0, 0]],
        [[4, 5, 5, 5, 5, 5, 5, 5], [7, 6, 6, 6, 6, 6, 6, 6]],
    ),
}


def _chat_params(compat: str, n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, num_beams=3, repetition_penalty=1.2, beam_compat=compat)


EOS = (6, 7)


@pytest.mark.parametrize("seed", sorted(HF_SINGLE))
@pytest.mark.parametrize("compat", COMPATS)
def test_matches_recorded_transformers_single(history_lm_cls, seed: int, compat: str) -> None:
    model = _table_model(history_lm_cls, seed)
    out = beam_search(
        model,
        model.embed_tokens(torch.tensor([[1, 2]])),
        torch.ones(1, 2, dtype=torch.long),
        _chat_params(compat, 10),
        eos_ids=EOS,
    )
    assert out == [HF_SINGLE[seed][COMPATS.index(compat)]]


@pytest.mark.parametrize("seed", sorted(HF_BATCH))
@pytest.mark.parametrize("compat", COMPATS)
def test_matches_recorded_transformers_batch(history_lm_cls, seed: int, compat: str) -> None:
    model = _table_model(history_lm_cls, seed, hist_seed=seed + 1000)
    ids = torch.tensor([[0, 0, 3, 1], [2, 5, 0, 4]])
    out = beam_search(model, model.embed_tokens(ids), (ids != 0).long(), _chat_params(compat, 8), eos_ids=EOS)
    assert out == HF_BATCH[seed][COMPATS.index(compat)]


def _strip(row: list[int], eos: tuple[int, ...]) -> list[int]:
    row = list(row)
    while row and (row[-1] == 0 or row[-1] in eos):
        row.pop()
    return row


@pytest.mark.parametrize("compat", COMPATS)
def test_batched_beams_equal_single_rows(history_lm_cls, compat: str) -> None:
    """Rows of a left-padded batch search independently (the history term goes through the cache,
    so wrong beam reordering of the cache would show up here too)."""
    model = _table_model(history_lm_cls, 3, hist_seed=4)
    rows = [[3, 1], [2, 5, 0, 4], [1, 1, 1, 2, 3]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    batch = beam_search(model, model.embed_tokens(ids), (ids != 0).long(), _chat_params(compat, 9), eos_ids=EOS)
    assert len({len(r) for r in batch}) == 1
    for row, got in zip(rows, batch, strict=True):
        one = torch.tensor([row])
        single = beam_search(model, model.embed_tokens(one), (one != 0).long(), _chat_params(compat, 9), eos_ids=EOS)
        assert _strip(got, (6, 7)) == _strip(single[0], (6, 7))


def test_wrong_cache_reordering_would_be_detected(history_lm_cls, monkeypatch) -> None:
    model = _table_model(history_lm_cls, 22, hist_seed=1022)
    ids = torch.tensor([[0, 0, 3, 1], [2, 5, 0, 4]])
    monkeypatch.setattr(KVCache, "reorder", lambda self, index: None)
    out = beam_search(model, model.embed_tokens(ids), (ids != 0).long(), _chat_params("4.44", 8), eos_ids=EOS)
    assert out != HF_BATCH[22][0]


@pytest.mark.parametrize("compat", COMPATS)
def test_beam_with_transformer_static_and_dynamic_cache(tiny_lm_cls, compat: str) -> None:
    model = tiny_lm_cls(seed=2).eval()
    with torch.no_grad():
        model.head[:, 256:258] += 0.6
    ids = torch.tensor([[0, 0, 10, 11, 12], [13, 14, 0, 15, 16]])
    mask = (ids != 0).long()
    params = SamplingParams(max_new_tokens=10, num_beams=3, repetition_penalty=1.2, beam_compat=compat)
    dyn = beam_search(model, model.embed_tokens(ids), mask, params, eos_ids=(256, 257))
    static = beam_search(
        model, model.embed_tokens(ids), mask, params, eos_ids=(256, 257), cache=KVCache.for_model(model, 2, capacity=20)
    )
    assert dyn == static


def test_beam_min_new_tokens(history_lm_cls) -> None:
    table = torch.zeros(6, 6)
    table[:, 5] = 4.0  # eos dominates everywhere
    table[:, 1] = 1.0
    model = history_lm_cls(table)
    embeds = model.embed_tokens(torch.tensor([[2, 3]]))
    for compat in COMPATS:
        params = SamplingParams(max_new_tokens=6, num_beams=2, min_new_tokens=3, beam_compat=compat)
        out = beam_search(model, embeds, torch.ones(1, 2, dtype=torch.long), params, eos_ids=(5,))[0]
        assert 5 not in out[:3] and out[3] == 5
