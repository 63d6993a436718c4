"""Compatibility with the official ``chat()`` keyword arguments (spec §9.3).

The official code turns ``sampling=True/False`` into fixed generation presets and applies an
extra keyword argument only when its key already appears in the chosen preset; everything else
is silently dropped. ``official_generation_params`` reproduces that in one place so the engine
itself can take plain, explicit parameters. Dropped keys are logged (the reference is silent).
This module does not run the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..errors import InputError
from ..versions import VersionSpec
from .generate import GenerationParams

log = logging.getLogger(__name__)

# Keys that GenerationParams understands besides the preset ones (our extensions).
_EXTRA_KEYS = ("seed",)


def official_preset(version: VersionSpec, *, sampling: bool, enable_thinking: bool) -> dict[str, Any]:
    """The generation settings the official chat() chooses, before kwargs are merged."""
    if not sampling:
        return dict(version.beam_preset)
    if enable_thinking and version.supports_thinking:
        return dict(version.thinking_sampling_preset)
    return dict(version.sampling_preset)


def official_generation_params(
    version: VersionSpec,
    *,
    sampling: bool,
    enable_thinking: bool,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    overrides: Mapping[str, Any],
) -> GenerationParams:
    """Merge chat() kwargs into the official preset exactly as the reference does."""
    preset = official_preset(version, sampling=sampling, enable_thinking=enable_thinking)
    # In the thinking preset only do_sample and temperature are really set; the rest are HF
    # defaults, which the reference does not let kwargs override (their keys are not in its table).
    thinking = sampling and enable_thinking and version.supports_thinking
    settable = {"do_sample", "temperature"} if thinking else set(preset)
    dropped = []
    extras: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in settable:
            preset[key] = value
        elif key in _EXTRA_KEYS:
            extras[key] = value
        else:
            dropped.append(key)
    if dropped:
        log.warning(
            "ignoring generation arguments %s: the official chat() only applies keys of its "
            "preset %s (sampling=%s)", sorted(dropped), sorted(settable), sampling,
        )
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return GenerationParams(
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=int(min_new_tokens),
        do_sample=bool(preset.get("do_sample", False)),
        temperature=float(preset.get("temperature", 1.0)),
        top_k=int(preset.get("top_k", 0) or 0),
        top_p=float(preset.get("top_p", 1.0)),
        repetition_penalty=float(preset.get("repetition_penalty", 1.0)),
        num_beams=int(preset.get("num_beams", 1)),
        eos_token_ids=tuple(eos_token_ids),
        pad_token_id=0,
        seed=extras.get("seed"),
        hf_compat=version.hf_beam_compat,
    )
