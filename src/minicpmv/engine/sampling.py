"""Decoding settings, logits processors and token choice: one of each for every front end.

``SamplingParams`` is the only record of decoding settings. Its two constructors are the two
ways callers speak: ``from_official`` merges the official ``chat()`` keyword arguments into the
release's preset (the official rule: a keyword applies only when its key is in the chosen
preset; the others are dropped and logged), and ``from_openai`` maps the fields of an OpenAI
chat request (``temperature == 0`` means greedy). Both end in the same validation.

``process_logits`` applies the processors a ``SamplingParams`` asks for to float32 scores
``[R, V]`` in one fixed order: OpenAI ``logit_bias``, presence / frequency penalties, then the
Hugging Face chain transformers builds for ``generate()`` (repetition penalty on generated
tokens only, min-new-tokens eos suppression, and when sampling temperature, top-k, top-p; each
with transformers' tie and edge-case handling). ``choose`` picks greedily or draws with
``torch.multinomial``. Nothing here runs a model or keeps state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from ..checks import is_int, is_number
from ..errors import InputError
from ..versions import VersionSpec

log = logging.getLogger(__name__)

FILTER_VALUE = float("-inf")
BeamCompat = Literal["4.44", "4.55"]
# official chat() keys we add on top of the presets (not generation settings of the reference)
_EXTRA_OFFICIAL_KEYS = ("seed",)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Field names and meanings follow transformers' ``GenerationConfig``
    where it has the field, OpenAI's chat API otherwise.

    ``do_sample=False`` is greedy (or beam search with ``num_beams > 1``); ``top_k`` 0 is off;
    ``repetition_penalty`` sees generated tokens only (as the reference, which passes embeddings);
    ``presence_penalty`` / ``frequency_penalty`` / ``logit_bias`` act on the raw logits first;
    ``seed`` seeds a private generator (None: torch's global one). ``stop_token_ids`` end a
    sequence like the release's terminators. ``beam_compat`` names the transformers release
    whose beam search is reproduced (see ``generate.py``).
    """

    max_new_tokens: int = 2048
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    beam_compat: BeamCompat = "4.55"

    def __post_init__(self) -> None:
        if self.top_k is None:
            object.__setattr__(self, "top_k", 0)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in self.logit_bias))
        _validate(self)

    @property
    def greedy(self) -> bool:
        """One argmax per step (no sampling, no beams)."""
        return not self.do_sample and self.num_beams == 1

    def replace(self, **changes: Any) -> SamplingParams:
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    @classmethod
    def from_official(
        cls, version: VersionSpec, *, sampling: bool = True, enable_thinking: bool = False,
        max_new_tokens: int = 2048, min_new_tokens: int = 0, overrides: Mapping[str, Any] | None = None,
    ) -> SamplingParams:
        """The settings the official ``chat()`` ends up with for these keyword arguments."""
        preset, settable = official_preset(version, sampling=sampling, enable_thinking=enable_thinking)
        extras: dict[str, Any] = {}
        dropped = []
        for key, value in (overrides or {}).items():
            if key in settable:
                preset[key] = value
            elif key in _EXTRA_OFFICIAL_KEYS:
                extras[key] = value
            else:
                dropped.append(key)
        if dropped:
            log.warning("ignoring generation arguments %s: the official chat() only applies keys of its "
                        "preset %s (sampling=%s)", sorted(dropped), sorted(settable), sampling)
        return cls(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=preset.get("do_sample", False), temperature=preset.get("temperature", 1.0),
            top_k=preset.get("top_k", 0) or 0, top_p=preset.get("top_p", 1.0),
            repetition_penalty=preset.get("repetition_penalty", 1.0), num_beams=preset.get("num_beams", 1),
            seed=extras.get("seed"), beam_compat=version.hf_beam_compat,  # type: ignore[arg-type]
        )

    @classmethod
    def from_openai(
        cls, *, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
        repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
        min_tokens: int = 0, seed: int | None = None, logit_bias: Sequence[tuple[int, float]] = (),
        stop_token_ids: Sequence[int] = (),
    ) -> SamplingParams:
        """An OpenAI chat request's fields; ``temperature`` 0 means greedy."""
        if not is_number(temperature) or temperature < 0:
            raise InputError(f"invalid sampling parameter: temperature must be >= 0, got {temperature!r}")
        sample = temperature > 0
        return cls(
            max_new_tokens=max_tokens, min_new_tokens=min_tokens, do_sample=sample,
            temperature=float(temperature) if sample else 1.0, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, logit_bias=tuple(logit_bias), seed=seed,
            stop_token_ids=tuple(stop_token_ids),
        )


def official_preset(version: VersionSpec, *, sampling: bool, enable_thinking: bool) -> tuple[dict[str, Any], set[str]]:
    """The official chat()'s preset for these switches, and the keys a keyword may override.

    In the thinking preset only ``do_sample`` and ``temperature`` are set by the reference; the
    rest are transformers defaults, which its merge rule does not let keywords change."""
    if not sampling:
        preset = dict(version.beam_preset)
        return preset, set(preset)
    if enable_thinking and version.supports_thinking:
        return dict(version.thinking_sampling_preset), {"do_sample", "temperature"}
    preset = dict(version.sampling_preset)
    return preset, set(preset)


def _validate(p: SamplingParams) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise InputError(f"invalid sampling parameter: {what}")

    need(is_int(p.max_new_tokens) and p.max_new_tokens >= 1, f"max_new_tokens must be an integer >= 1, "
         f"got {p.max_new_tokens!r}")
    need(is_int(p.min_new_tokens) and p.min_new_tokens >= 0, f"min_new_tokens must be an integer >= 0, "
         f"got {p.min_new_tokens!r}")
    need(isinstance(p.do_sample, bool), f"do_sample must be true or false, got {p.do_sample!r}")
    need(is_number(p.temperature) and p.temperature > 0,
         f"temperature must be > 0 (turn sampling off for greedy decoding), got {p.temperature!r}")
    need(is_int(p.top_k) and p.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {p.top_k!r}")
    need(is_number(p.top_p) and 0 <= p.top_p <= 1, f"top_p must be in [0, 1], got {p.top_p!r}")
    need(is_number(p.repetition_penalty) and p.repetition_penalty > 0,
         f"repetition_penalty must be > 0, got {p.repetition_penalty!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        need(is_number(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v!r}")
    need(all(is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100 for t, b in p.logit_bias),
         "logit_bias maps token ids >= 0 to biases in [-100, 100]")
    need(is_int(p.num_beams) and p.num_beams >= 1, f"num_beams must be an integer >= 1, got {p.num_beams!r}")
    need(not (p.num_beams > 1 and p.do_sample), "beam sampling (num_beams > 1 with sampling) is not supported")
    need(is_number(p.length_penalty), f"length_penalty must be a finite number, got {p.length_penalty!r}")
    need(p.early_stopping in (True, False, "never"),
         f"early_stopping must be True, False or 'never', got {p.early_stopping!r}")
    need(p.seed is None or is_int(p.seed), f"seed must be None or an integer, got {p.seed!r}")
    need(all(is_int(t) and t >= 0 for t in p.stop_token_ids), f"stop_token_ids must be ids >= 0, "
         f"got {p.stop_token_ids!r}")
    need(p.beam_compat in ("4.44", "4.55"), f"beam_compat must be '4.44' or '4.55', got {p.beam_compat!r}")


# ---------------------------------------------------------------------------- processors
def repetition_penalty(scores: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every id in ``prev_ids`` ([R, n]): negative scores are multiplied, others divided.

    Repeated ids are penalised once. Returns a new tensor."""
    if prev_ids.shape[-1] == 0:
        return scores.clone()
    prev = prev_ids.to(device=scores.device, dtype=torch.long)
    picked = torch.gather(scores, 1, prev)  # [R, n]
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, prev, picked)


def min_new_tokens_mask(
    scores: torch.Tensor, num_generated: int, min_new_tokens: int, eos_ids: Sequence[int]
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
    kth = torch.topk(scores, k)[0][..., -1:]  # [R, 1]
    return scores.masked_fill(scores < kth, FILTER_VALUE)


def top_p_filter(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering as transformers: drop the low tail whose cumulative prob is <= 1 - p."""
    sorted_scores, order = torch.sort(scores, descending=False)  # ascending, [R, V]
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, FILTER_VALUE)


def openai_penalties(
    scores: torch.Tensor, history: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """Subtract ``presence`` once and ``frequency`` per occurrence for every id in ``history`` ([1, n])."""
    if history.shape[-1] == 0 or (not presence and not frequency):
        return scores
    ids, counts = torch.unique(history[0].to(scores.device), return_counts=True)  # [u]
    out = scores.clone()
    out[0, ids] -= presence + frequency * counts.to(scores.dtype)
    return out


def add_logit_bias(scores: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """Add OpenAI ``logit_bias`` values (ids beyond the vocabulary are ignored)."""
    if not bias:
        return scores
    out = scores.clone()
    for tok, value in bias:
        if tok < out.shape[-1]:
            out[:, tok] += value
    return out


def process_logits(
    scores: torch.Tensor, history: torch.Tensor, params: SamplingParams, eos_ids: Sequence[int] = (),
    *, sample: bool | None = None,
) -> torch.Tensor:
    """Every processor ``params`` asks for, in the module docstring's order.

    ``scores`` [R, V] float32 and ``history`` [R, n] (generated ids) belong to rows sharing
    ``params``; the OpenAI penalties need one row (R = 1) when they are set. ``sample``
    overrides ``params.do_sample`` (beam search scores log-probs without the sampling warpers).
    Processors whose setting is neutral are skipped, as transformers skips adding them."""
    scores = add_logit_bias(scores, params.logit_bias)
    scores = openai_penalties(scores, history, params.presence_penalty, params.frequency_penalty)
    if params.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, history, params.repetition_penalty)
    if params.min_new_tokens > 0 and eos_ids:
        scores = min_new_tokens_mask(scores, history.shape[-1], params.min_new_tokens, eos_ids)
    if params.do_sample if sample is None else sample:
        if params.temperature != 1.0:
            scores = temperature(scores, params.temperature)
        if params.top_k:
            scores = top_k_filter(scores, params.top_k)
        if params.top_p < 1.0:
            scores = top_p_filter(scores, params.top_p)
    return scores


def greedy_choice(scores: torch.Tensor) -> torch.Tensor:
    """Index of the largest score per row (first one on ties), ``[R]`` int64."""
    return torch.argmax(scores, dim=-1)


def sample_choice(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from softmax(scores) with ``torch.multinomial``, ``[R]`` int64."""
    probs = torch.softmax(scores, dim=-1)  # [R, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def make_generator(params: SamplingParams, device: torch.device | str, offset: int = 0) -> torch.Generator | None:
    """A generator seeded with ``params.seed + offset`` when sampling with a seed, else None."""
    if not params.do_sample or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed + offset)
