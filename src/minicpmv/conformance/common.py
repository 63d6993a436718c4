"""What every conformance case format shares: one stage's result and the two comparisons.

``StageResult`` is one line of the report; ``exact`` compares values that must be equal (ids,
strings), ``close`` compares arrays within an absolute tolerance and ``allclose`` within
``atol + rtol * |expected|`` (NaN anywhere fails). Nothing here loads a model or reads case files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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


def close(case: str, stage: str, got: np.ndarray, want: np.ndarray, tol: float) -> StageResult:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return StageResult(case, stage, False, note=f"shape {got.shape} != expected {want.shape}")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    return StageResult(case, stage, err <= tol, err, tol)


def allclose(case: str, stage: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> StageResult:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return StageResult(case, stage, False, note=f"shape {got.shape} != expected {want.shape}")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    ok = bool(np.all(np.abs(got - want) <= atol + rtol * np.abs(want)))
    return StageResult(case, stage, ok, err, atol, note=f"(+ rtol {rtol:g})")
