"""The official chat() preset table and its kwarg-merging rule (spec §9.3)."""

from __future__ import annotations

import logging

import pytest

from minicpmv.engine.compat import official_generation_params
from minicpmv.errors import InputError
from minicpmv.versions import get_version


def _params(version, sampling=True, thinking=False, **kw):
    return official_generation_params(
        get_version(version), sampling=sampling, enable_thinking=thinking, max_new_tokens=kw.pop("max_new_tokens", 20),
        min_new_tokens=kw.pop("min_new_tokens", 0), eos_token_ids=(7, 8), overrides=kw)


def test_sampling_presets():
    p = _params("2.6")
    assert (p.do_sample, p.top_p, p.top_k, p.temperature, p.repetition_penalty) == (True, 0.8, 100, 0.7, 1.05)
    assert _params("4.5").repetition_penalty == 1.03
    t = _params("4.5", thinking=True)
    assert (t.do_sample, t.temperature, t.top_k, t.top_p, t.repetition_penalty) == (True, 0.7, 50, 1.0, 1.0)


def test_non_sampling_is_beam_search_with_version_compat():
    p = _params("2.6", sampling=False)
    assert (p.do_sample, p.num_beams, p.repetition_penalty, p.hf_compat) == (False, 3, 1.2, "4.44")
    assert _params("4.5", sampling=False).hf_compat == "4.55"


def test_only_preset_keys_are_applied(caplog):
    with caplog.at_level(logging.WARNING):
        p = _params("2.6", sampling=False, num_beams=1, repetition_penalty=1.0, top_k=3, temperature=0.1)
    assert (p.num_beams, p.repetition_penalty, p.top_k, p.temperature) == (1, 1.0, 0, 1.0)
    assert "top_k" in caplog.text and "temperature" in caplog.text
    q = _params("2.6", top_k=5, num_beams=4)
    assert q.top_k == 5 and q.num_beams == 1
    # thinking preset: only do_sample / temperature are settable
    r = _params("4.5", thinking=True, temperature=0.3, top_p=0.5)
    assert r.temperature == 0.3 and r.top_p == 1.0


def test_seed_and_token_limits():
    assert _params("2.6", seed=3).seed == 3
    p = _params("2.6", min_new_tokens=4)
    assert p.min_new_tokens == 4 and p.eos_token_ids == (7, 8) and p.pad_token_id == 0
    with pytest.raises(InputError):
        _params("2.6", max_new_tokens=0)
