"""Conformance harness: run golden-vector cases and compare every stage with the reference.

Three case formats exist: ``expected/tensors.safetensors`` (2.6, 4.5; ``safetensors_cases``),
``expected/tensors.npz`` (2.0, 2.5, o2.6; ``npz_cases``) and ``meta.json`` + ``tensors.npz`` at
the case root (o2.6 speech output; ``tts_cases``, whose checkpoint archive is assembled into a
temporary directory first); ``make_runner`` picks by the files. This package is a tool on top
of the public API; nothing in the library imports it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..engine.chat import ChatModel
from ..errors import MiniCPMVError
from .common import StageResult
from .npz_cases import NpzCaseRunner, is_npz_case
from .safetensors_cases import CaseRunner
from .tts_cases import TTSCaseRunner, assemble_tts_checkpoint, is_tts_archive, is_tts_case

__all__ = ["CaseRunner", "NpzCaseRunner", "StageResult", "TTSCaseRunner", "assemble_tts_checkpoint",
           "expand_case_dirs", "make_runner", "run_cases"]


def make_runner(chat_model: ChatModel, case_dir: Path) -> Any:
    """The runner for the case's vector format: ``tensors.safetensors`` (2.6 / 4.5),
    ``expected/tensors.npz`` (2.0 / 2.5 / o2.6, see ``npz_cases``) or o2.6 speech output."""
    if is_tts_case(case_dir):
        return TTSCaseRunner(chat_model, case_dir)
    return NpzCaseRunner(chat_model, case_dir) if is_npz_case(case_dir) else CaseRunner(chat_model, case_dir)


def run_cases(
    case_dirs: list[Path],
    *,
    checkpoint: Path | None = None,
    loader: Callable[[Path], ChatModel],
    report: Callable[[StageResult], None] = lambda r: None,
) -> list[StageResult]:
    """Run every case; models are loaded once per checkpoint directory (a speech-output archive is
    assembled into a temporary directory that lives for the run)."""
    models: dict[Path, ChatModel] = {}
    results: list[StageResult] = []
    with ExitStack() as stack:
        for case in case_dirs:
            ckpt = (checkpoint or case / ".." / "_checkpoint").resolve()
            if ckpt not in models:
                path = ckpt
                if is_tts_archive(ckpt):
                    path = assemble_tts_checkpoint(ckpt, Path(stack.enter_context(tempfile.TemporaryDirectory())))
                models[ckpt] = loader(path)
            for r in make_runner(models[ckpt], case).run():
                results.append(r)
                report(r)
    return results


def expand_case_dirs(paths: list[Path]) -> list[Path]:
    """A path may be a case directory or a version directory holding cases."""
    out: list[Path] = []
    for p in paths:
        if _is_case(p):
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(c for c in p.iterdir() if _is_case(c)))
        else:
            raise MiniCPMVError(f"{p} is neither a conformance case nor a directory of cases")
    return out


def _is_case(p: Path) -> bool:
    return ((p / "inputs").is_dir() and (p / "expected").is_dir()) or is_tts_case(p)
