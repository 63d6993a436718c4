"""Fixtures of the loading tests: writable copies of the tiny conformance checkpoints.

Test modules never import this file (it would clash with other ``conftest.py`` modules).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
CONF = DATA / "conformance"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture()
def ckpt_copy(tmp_path: Path) -> Callable[..., Path]:
    """Factory: copy ``<version>/_checkpoint`` into a fresh temp dir (optionally without weights)."""

    def make(version: str = "2.6", *, with_weights: bool = True) -> Path:
        dst = tmp_path / f"ckpt-{version}"
        src = CONF / version / "_checkpoint"
        ignore = None if with_weights else shutil.ignore_patterns("*.safetensors")
        shutil.copytree(src, dst, ignore=ignore)
        return dst

    return make
