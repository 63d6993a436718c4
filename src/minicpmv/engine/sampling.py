"""Logits processors and token choice with Hugging Face ``generate()`` semantics.

Pure functions over float32 scores ``[B, V]``: repetition penalty, min-new-tokens eos
suppression, temperature, top-k and top-p filtering (each behaves like the corresponding
transformers processor/warper, including tie and edge-case handling), and the final greedy /
multinomial choice. ``process_scores`` chains them in the order transformers builds its list:
repetition penalty → min-new-tokens → (sampling only) temperature → top-k → top-p.

Nothing here runs a model or keeps state; random draws use the generator passed in.
"""

from __future__ import annotations

import torch

FILTER_VALUE = float("-inf")


def repetition_penalty(scores: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every id in ``prev_ids`` ([B, n]): negative scores are multiplied, others divided.

    ``prev_ids`` are the generated tokens only (the reference never sees prompt ids, spec §9.2).
    Repeated ids are penalised once. Returns a new tensor.
    """
    if prev_ids.shape[-1] == 0:
        return scores.clone()
    prev = prev_ids.to(device=scores.device, dtype=torch.long)
    picked = torch.gather(scores, 1, prev)  # [B, n]
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, prev, picked)


def min_new_tokens_mask(
    scores: torch.Tensor, num_generated: int, min_new_tokens: int, eos_ids: tuple[int, ...]
) -> torch.Tensor:
    """Set the eos scores to -inf while fewer than ``min_new_tokens`` tokens were generated."""
    out = scores.clone()
    ids = [i for i in eos_ids if 0 <= i < scores.shape[-1]]  # ids outside the vocabulary never match
    if num_generated < min_new_tokens and ids:
        out[:, ids] = FILTER_VALUE
    return out


def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    """Divide by the temperature ``t`` (> 0)."""
    return scores / t


def top_k_filter(scores: torch.Tensor, k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep scores >= the k-th largest (ties with it survive, so more than k may remain)."""
    k = min(max(k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1:]  # [B, 1]
    return scores.masked_fill(scores < kth, FILTER_VALUE)


def top_p_filter(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering as transformers: drop the low tail whose cumulative prob is <= 1 - p."""
    sorted_scores, order = torch.sort(scores, descending=False)  # ascending, [B, V]
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, FILTER_VALUE)


def process_scores(
    scores: torch.Tensor,
    generated: torch.Tensor,
    *,
    repetition_penalty_value: float = 1.0,
    min_new_tokens: int = 0,
    eos_ids: tuple[int, ...] = (),
    do_sample: bool = False,
    temperature_value: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Apply the processors transformers would build for these settings, in its order.

    ``generated`` is ``[B, n]`` (tokens generated so far); processors whose setting is neutral
    are skipped exactly as transformers skips adding them.
    """
    if repetition_penalty_value != 1.0:
        scores = repetition_penalty(scores, generated, repetition_penalty_value)
    if min_new_tokens > 0 and eos_ids:
        scores = min_new_tokens_mask(scores, generated.shape[-1], min_new_tokens, eos_ids)
    if do_sample:
        if temperature_value != 1.0:
            scores = temperature(scores, temperature_value)
        if top_k:
            scores = top_k_filter(scores, top_k)
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p)
    return scores


def greedy_choice(scores: torch.Tensor) -> torch.Tensor:
    """Index of the largest score per row (first one on ties), ``[B]`` int64."""
    return torch.argmax(scores, dim=-1)


def sample_choice(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from softmax(scores) with ``torch.multinomial``, ``[B]`` int64."""
    probs = torch.softmax(scores, dim=-1)  # [B, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
