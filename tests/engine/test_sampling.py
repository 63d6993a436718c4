"""Logits processors against hand-computed examples (HF semantics, edge cases included)."""

from __future__ import annotations

import math

import torch

from minicpmv.engine.sampling import (
    greedy_choice,
    min_new_tokens_mask,
    process_scores,
    repetition_penalty,
    sample_choice,
    temperature,
    top_k_filter,
    top_p_filter,
)

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


def test_process_scores_order_and_skips() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.5, 1.5, 0.1]])
    gen = torch.tensor([[0]])
    out = process_scores(
        scores,
        gen,
        repetition_penalty_value=2.0,
        min_new_tokens=3,
        eos_ids=(4,),
        do_sample=True,
        temperature_value=0.5,
        top_k=3,
        top_p=1.0,
    )
    # penalty: 2 -> 1; eos 4 -> -inf; /0.5 -> [2, -2, 1, 3, -inf]; top-3 keeps 3, 2, 1
    assert torch.equal(out, torch.tensor([[2.0, -INF, 1.0, 3.0, -INF]]))
    greedy = process_scores(scores, gen, do_sample=False, temperature_value=0.5, top_k=1, top_p=0.1)
    assert torch.equal(greedy, scores)  # warpers only apply when sampling
    assert torch.equal(process_scores(scores, gen, do_sample=True, top_k=0), scores)


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
