"""Fixtures of the quant tests: forcing the prefill GEMM of quant/wide_gemm.py."""

from __future__ import annotations

import pytest

from minicpmv.quant import wide_gemm


@pytest.fixture
def choice(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Set MINICPMV_BF16_GEMM for one test (the cached choice is recomputed before and after; the
    choice this machine remembers is kept in a temporary cache)."""

    monkeypatch.setattr(wide_gemm, "MIN_MACS", 0)  # the tests' products are small
    monkeypatch.setenv("MINICPMV_CACHE", str(tmp_path))

    def force(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("MINICPMV_BF16_GEMM", raising=False)
        else:
            monkeypatch.setenv("MINICPMV_BF16_GEMM", value)
        wide_gemm.gemm_choice.cache_clear()

    yield force
    monkeypatch.delenv("MINICPMV_BF16_GEMM", raising=False)
    wide_gemm.gemm_choice.cache_clear()
