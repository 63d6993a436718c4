"""Conformance harness: run golden-vector cases and compare every stage with the reference.

Two case formats exist: ``expected/tensors.safetensors`` (2.6, 4.5; ``safetensors_cases``) and
``expected/tensors.npz`` (2.0, 2.5, o2.6; ``npz_cases``); ``make_runner`` picks by the files.
This package is a tool on top of the public API; nothing in the library imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.chat import ChatModel
from ..errors import MiniCPMVError
from .common import StageResult
from .npz_cases import NpzCaseRunner, is_npz_case
from .safetensors_cases import CaseRunner

__all__ = ["CaseRunner", "NpzCaseRunner", "StageResult", "expand_case_dirs", "make_runner", "run_cases"]

def make_runner(chat_model: ChatModel, case_dir: Path) -> Any:
    """The runner for the case's vector format: ``tensors.safetensors`` (2.6 / 4.5) or
    ``tensors.npz`` (2.0 / 2.5 / o2.6, see ``npz_cases``)."""
    return NpzCaseRunner(chat_model, case_dir) if is_npz_case(case_dir) else CaseRunner(chat_model, case_dir)


def run_cases(
    case_dirs: list[Path],
    *,
    checkpoint: Path | None = None,
    loader: Callable[[Path], ChatModel],
    report: Callable[[StageResult], None] = lambda r: None,
) -> list[StageResult]:
    """Run every case; models are loaded once per checkpoint directory."""
    models: dict[Path, ChatModel] = {}
    results: list[StageResult] = []
    for case in case_dirs:
        ckpt = (checkpoint or case / ".." / "_checkpoint").resolve()
        if ckpt not in models:
            models[ckpt] = loader(ckpt)
        for r in make_runner(models[ckpt], case).run():
            results.append(r)
            report(r)
    return results


def expand_case_dirs(paths: list[Path]) -> list[Path]:
    """A path may be a case directory or a version directory holding cases."""
    out: list[Path] = []
    for p in paths:
        if (p / "inputs").is_dir() and (p / "expected").is_dir():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(c for c in p.iterdir() if (c / "inputs").is_dir() and (c / "expected").is_dir()))
        else:
            raise MiniCPMVError(f"{p} is neither a conformance case nor a directory of cases")
    return out
