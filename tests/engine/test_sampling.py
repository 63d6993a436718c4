"""SamplingParams (official presets, OpenAI fields, one validation) and the logits processors
against hand-computed examples (HF semantics, edge cases included)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from minicpmv.engine.sampling import (
    SamplingParams,
    greedy_choice,
    min_new_tokens_mask,
    process_logits,
    repetition_penalty,
    sample_choice,
    temperature,
    top_k_filter,
    top_p_filter,
)
from minicpmv.errors import InputError
from minicpmv.versions import get_version

INF = float("inf")


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, -2.0, 4.0]])
    prev = torch.tensor([[0, 1, 1], [3, 2, 2]])  # repeats are penalised once
    out = repetition_penalty(scores, prev, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, -3.0], [1.0, 1.0, -4.0, 2.0]]))
    assert torch.equal(scores[0], torch.tensor([2.0, -1.0, 0.5, -3.0]))  # input untouched


def test_repetition_penalty_with_nothing_generated_is_identity() -> None:
    scores = torch.tensor([[2.0, -1.0]])
    assert torch.equal(repetition_penalty(scores, torch.zeros(1, 0, dtype=torch.long), 1.3), scores)


def test_repetition_penalty_on_log_probs_pushes_them_down() -> None:
    logp = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), dim=-1)
    out = repetition_penalty(logp, torch.tensor([[2]]), 1.2)
    assert out[0, 2] == logp[0, 2] * 1.2 and out[0, 2] < logp[0, 2]


def test_min_new_tokens_mask() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    masked = min_new_tokens_mask(scores, num_generated=1, min_new_tokens=2, eos_ids=(3, 1, 99))
    assert torch.equal(masked, torch.tensor([[1.0, -INF, 3.0, -INF]]))
    assert torch.equal(min_new_tokens_mask(scores, 2, 2, (3,)), scores)


def test_temperature() -> None:
    assert torch.allclose(temperature(torch.tensor([[1.4, -0.7]]), 0.7), torch.tensor([[2.0, -1.0]]))


def test_top_k_keeps_ties_with_kth() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    assert torch.equal(top_k_filter(scores, 2), torch.tensor([[-INF, 3.0, 3.0, -INF, -INF]]))
    assert torch.equal(top_k_filter(scores, 3), torch.tensor([[-INF, 3.0, 3.0, 2.0, -INF]]))
    tied = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert torch.equal(top_k_filter(tied, 2), torch.tensor([[-INF, 2.0, 2.0, 2.0, -INF]]))
    assert torch.equal(top_k_filter(scores, 50), scores)  # k larger than the vocabulary


def test_top_k_per_row() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert torch.equal(top_k_filter(scores, 1), torch.tensor([[-INF, -INF, 2.0], [2.0, -INF, -INF]]))


def test_top_p_removes_low_tail() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    scores = probs.log()
    # ascending cumsum: .05, .20, .50, 1.0 -> with p=.6 remove cum <= .4: ids 3 and 2
    out = top_p_filter(scores, 0.6)
    assert torch.isinf(out[0, 2]) and torch.isinf(out[0, 3])
    assert torch.equal(out[0, :2], scores[0, :2])
    # p=.9: remove cum <= .1: only id 3
    assert torch.isinf(top_p_filter(scores, 0.9)).tolist() == [[False, False, False, True]]


def test_top_p_edge_cases() -> None:
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.equal(top_p_filter(scores, 1.0), scores)  # keeps everything
    only_top = top_p_filter(scores, 0.0)  # everything is "<= 1", but one token is always kept
    assert (~torch.isinf(only_top)).sum() == 1 and not torch.isinf(only_top[0, 0])
    two = top_p_filter(scores, 0.0, min_tokens_to_keep=2)
    assert (~torch.isinf(two)).tolist() == [[True, True, False, False]]
    dominant = torch.tensor([[10.0, 0.0, 0.0]])
    assert (~torch.isinf(top_p_filter(dominant, 0.5))).tolist() == [[True, False, False]]
    # already filtered entries stay filtered
    pre = torch.tensor([[2.0, 1.0, -INF, 0.0]])
    assert torch.isinf(top_p_filter(pre, 0.99)[0, 2])


def test_top_p_boundary_uses_float32_cumsum_like_hf() -> None:
    # 1 - 0.8 = 0.19999999999999996, float32 cumsum .05 + .15 = 0.2000000030: not removed
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    cum = scores.sort()[0].softmax(-1).cumsum(-1)
    expected = (cum <= (1 - 0.8)).sum().item()
    assert (torch.isinf(top_p_filter(scores, 0.8))).sum().item() == expected


def test_process_logits_order_and_skips() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.5, 1.5, 0.1]])
    gen = torch.tensor([[0]])
    p = SamplingParams(repetition_penalty=2.0, min_new_tokens=3, do_sample=True, temperature=0.5, top_k=3)
    out = process_logits(scores, gen, p, eos_ids=(4,))
    # penalty: 2 -> 1; eos 4 -> -inf; /0.5 -> [2, -2, 1, 3, -inf]; top-3 keeps 3, 2, 1
    assert torch.equal(out, torch.tensor([[2.0, -INF, 1.0, 3.0, -INF]]))
    greedy = SamplingParams(temperature=0.5, top_k=1, top_p=0.1)
    assert torch.equal(process_logits(scores, gen, greedy), scores)  # warpers only apply when sampling
    assert torch.equal(process_logits(scores, gen, SamplingParams(do_sample=True)), scores)
    assert not torch.equal(process_logits(scores, gen, greedy, sample=True), scores)  # beam search's override


def test_openai_penalties_and_bias_come_first() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    history = torch.tensor([[3, 3, 1]])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((0, 10.0), (9, 5.0)))
    out = process_logits(scores, history, p)
    # bias: id 0 +10 (id 9 is past the vocabulary); id 3: -0.5 - 2*0.25; id 1: -0.5 - 0.25
    assert torch.equal(out, torch.tensor([[11.0, 1.25, 3.0, 3.0]]))
    assert torch.equal(scores, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))  # input untouched


def test_choices() -> None:
    scores = torch.tensor([[0.0, 3.0, 3.0], [5.0, -INF, 1.0]])
    assert greedy_choice(scores).tolist() == [1, 0]  # first index on ties
    forced = torch.tensor([[-INF, 0.0, -INF], [-INF, -INF, 0.0]])
    assert sample_choice(forced, torch.Generator().manual_seed(0)).tolist() == [1, 2]
    flat = torch.zeros(4, 50)
    a = sample_choice(flat, torch.Generator().manual_seed(3))
    b = sample_choice(flat, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long


def test_sampling_distribution_roughly_matches_softmax() -> None:
    scores = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]]).repeat(4000, 1)
    draws = sample_choice(scores, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


# ---------------------------------------------------------------------------- SamplingParams
def _official(version, sampling=True, thinking=False, **kw):
    return SamplingParams.from_official(
        get_version(version), sampling=sampling, enable_thinking=thinking,
        max_new_tokens=kw.pop("max_new_tokens", 20), min_new_tokens=kw.pop("min_new_tokens", 0), overrides=kw)


def test_official_sampling_presets() -> None:
    p = _official("2.6")
    assert (p.do_sample, p.top_p, p.top_k, p.temperature, p.repetition_penalty) == (True, 0.8, 100, 0.7, 1.05)
    assert _official("4.5").repetition_penalty == 1.03
    t = _official("4.5", thinking=True)
    assert (t.do_sample, t.temperature, t.top_k, t.top_p, t.repetition_penalty) == (True, 0.7, 50, 1.0, 1.0)


def test_official_non_sampling_is_beam_search_with_version_compat() -> None:
    p = _official("2.6", sampling=False)
    assert (p.do_sample, p.num_beams, p.repetition_penalty, p.beam_compat) == (False, 3, 1.2, "4.44")
    assert _official("4.5", sampling=False).beam_compat == "4.55"


def test_official_merge_applies_only_preset_keys(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        p = _official("2.6", sampling=False, num_beams=1, repetition_penalty=1.0, top_k=3, temperature=0.1)
    assert (p.num_beams, p.repetition_penalty, p.top_k, p.temperature, p.greedy) == (1, 1.0, 0, 1.0, True)
    assert "top_k" in caplog.text and "temperature" in caplog.text
    q = _official("2.6", top_k=5, num_beams=4)
    assert q.top_k == 5 and q.num_beams == 1
    r = _official("4.5", thinking=True, temperature=0.3, top_p=0.5)  # thinking: only temperature settable
    assert r.temperature == 0.3 and r.top_p == 1.0


def test_official_seed_and_token_limits() -> None:
    assert _official("2.6", seed=3).seed == 3
    assert _official("2.6", min_new_tokens=4).min_new_tokens == 4
    with pytest.raises(InputError, match="max_new_tokens"):
        _official("2.6", max_new_tokens=0)
    with pytest.raises(InputError, match="temperature"):
        _official("2.6", temperature=0.0)  # the one validation: the preset path checks it too


def test_openai_fields() -> None:
    g = SamplingParams.from_openai(max_tokens=5, temperature=0)
    assert (g.do_sample, g.temperature, g.greedy) == (False, 1.0, True)
    s = SamplingParams.from_openai(max_tokens=5, temperature=0.5, top_p=0.9, top_k=4, presence_penalty=1.0,
                                   min_tokens=2, seed=9, logit_bias=[(3, -1.0)], stop_token_ids=[7])
    assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.presence_penalty, s.min_new_tokens, s.seed) == (
        True, 0.5, 0.9, 4, 1.0, 2, 9)
    assert s.logit_bias == ((3, -1.0),) and s.stop_token_ids == (7,)
    for bad in (dict(temperature=-1), dict(top_p=1.5), dict(presence_penalty=3), dict(max_tokens=0),
                dict(logit_bias=[(1, 200.0)]), dict(top_k=-2)):
        with pytest.raises(InputError):
            SamplingParams.from_openai(**{"max_tokens": 5, **bad})


def test_same_explicit_values_give_the_same_params_from_both_constructors() -> None:
    official = _official("2.6", temperature=0.9, top_p=0.7, top_k=20, repetition_penalty=1.1, seed=4,
                         max_new_tokens=12)
    openai = SamplingParams.from_openai(max_tokens=12, temperature=0.9, top_p=0.7, top_k=20,
                                        repetition_penalty=1.1, seed=4)
    assert openai.replace(beam_compat=official.beam_compat) == official
