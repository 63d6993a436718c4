"""Fixtures shared by every test folder: the tiny 2.6 / 4.5 conformance checkpoints in float32.

They are loaded once per test session. Tests may monkeypatch them (pytest restores) but must not
leave state behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parent / "data" / "conformance"


@pytest.fixture(scope="session")
def model26():
    import minicpmv

    return minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32")


@pytest.fixture(scope="session")
def model45():
    import minicpmv

    return minicpmv.load(CONF / "4.5" / "_checkpoint", dtype="float32")


@pytest.fixture(params=["2.6", "4.5"])
def model(request, model26, model45):
    return model26 if request.param == "2.6" else model45
