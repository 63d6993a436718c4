"""What every conformance case format shares: one stage's result, the comparisons, and the model
taps both runners use.

``StageResult`` is one line of the report; ``exact`` compares values that must be equal (ids,
strings), ``close`` compares arrays within an absolute tolerance and ``allclose`` within
``atol + rtol * |expected|`` (NaN anywhere fails, also when several arrays are pooled:
``worst_error`` propagates NaN instead of skipping it).
``features_and_vision`` runs the model's own ``encode_features`` and records, on the way, the
vision tower output the resampler read (so the vision and resampler stages test the path
``chat()`` takes). ``unpad`` cuts a generated row after its first terminator (what follows must
be padding), ``generate_kwargs`` names our decoding settings as the reference's ``generate``
kwargs. Nothing here reads case files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..engine.chat import ChatModel
from ..engine.features import FeatureCache
from ..engine.generate import PAD_ID
from ..engine.sampling import SamplingParams


@dataclass
class StageResult:
    case: str
    stage: str
    ok: bool
    max_err: float | None = None
    tol: float | None = None
    note: str = ""

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        err = "" if self.max_err is None else f" max_abs_err={self.max_err:.3g} (tol {self.tol:g})"
        note = f"  {self.note}" if self.note else ""
        return f"{status}  {self.case:<34} {self.stage:<14}{err}{note}"


def exact(case: str, stage: str, got: Any, want: Any) -> StageResult:
    ok = got == want
    note = "" if ok else f"expected {str(want)[:120]!r}, got {str(got)[:120]!r}"
    return StageResult(case, stage, ok, note=note)


def worst_error(pairs: Iterable[tuple[Any, Any]]) -> float:
    """The largest absolute difference over all (got, want) pairs; NaN if any difference is NaN
    (Python's ``max`` would skip a NaN that is not first); inf for a shape mismatch."""
    worst = 0.0
    for got, want in pairs:
        a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            worst = float(np.max([worst, float(np.max(np.abs(a - b)))]))  # np.max keeps NaN
    return worst


def close(case: str, stage: str, got: np.ndarray, want: np.ndarray, tol: float) -> StageResult:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return StageResult(case, stage, False, note=f"shape {got.shape} != expected {want.shape}")
    err = worst_error([(got, want)])
    return StageResult(case, stage, err <= tol, err, tol)


def allclose(case: str, stage: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> StageResult:
    """Within ``atol + rtol * |want|`` everywhere (NaN fails); the error shown is the worst absolute one."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return StageResult(case, stage, False, note=f"shape {got.shape} != expected {want.shape}")
    err = worst_error([(got, want)])
    ok = bool(np.all(np.abs(got - want) <= atol + rtol * np.abs(want)))  # NaN fails
    return StageResult(case, stage, ok, err, atol, note=f"(+ rtol {rtol:g})")


def features_and_vision(
    cm: ChatModel, inputs: Any, cache: FeatureCache | None = None
) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    """``cm.runner.encode_features(inputs, cache)`` and the vision tower output of every slice,
    [L_s, Dv] in processor order, as the resampler received it inside that call. When the
    ``cache`` already held some slices (so the tower did not run for them), the call is repeated
    without it: the vision stages always see every slice."""
    seen: list[torch.Tensor] = []

    def tap(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        feats, sizes = args[0], args[1]  # [S, Lmax, Dv], [S, 2]
        for s in range(feats.shape[0]):
            seen.append(feats[s, : int(sizes[s, 0] * sizes[s, 1])].detach().clone())  # [L_s, Dv]

    handle = cm.model.resampler.register_forward_pre_hook(tap)
    try:
        features = cm.runner.encode_features(inputs, cache)
        slices = sum(len(conv) for conv in inputs.pixel_values)
        if cache is not None and len(seen) != slices:
            seen.clear()
            features = cm.runner.encode_features(inputs, None)
    finally:
        handle.remove()
    return features, seen


def unpad(row: Sequence[int], terminators: Iterable[int], pad_id: int = 0) -> list[int]:
    """``row`` up to and including its first terminator when only padding follows it; else the
    whole row (a 0 that is not after a terminator is a real token, "!" in the Qwen vocabularies)."""
    ends = set(terminators)
    for i, t in enumerate(row):
        if t in ends:
            return list(row[: i + 1]) if all(x == pad_id for x in row[i + 1 :]) else list(row)
    return list(row)


def generate_kwargs(params: SamplingParams, eos_ids: Sequence[int], names: Iterable[str]) -> dict[str, Any]:
    """Our decoding settings (``params`` and the release's terminators ``eos_ids``) under the
    reference's ``generate`` kwarg ``names``."""
    ours = {"eos_token_id": [*eos_ids, *params.stop_token_ids], "pad_token_id": PAD_ID}
    return {n: ours[n] if n in ours else getattr(params, n, "<not set>") for n in names}
