"""The conformance harness fails when it should: expected values tampered with in a numeric, an id,
a text and a settings stage make exactly those stages fail (both case formats), NaN is never
skipped, slice PNGs are matched through ``pixel_values_source_slice``, a trailing id 0 is a real
token unless it follows a terminator, and ``ChatModel.chat()`` itself is compared with the
reference's answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minicpmv
from minicpmv.conformance import CaseRunner, NpzCaseRunner
from minicpmv.conformance.common import unpad, worst_error
from minicpmv.conformance.npz_cases import decoding_settings
from minicpmv.errors import MiniCPMVError

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"


def _copy(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(CONF / case, dst)
    return dst


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _failed(results) -> set[str]:
    return {r.stage for r in results if not r.ok}


# ---------------------------------------------------------------------------- helpers


def test_worst_error_keeps_nan_wherever_it_is():
    ok = (np.zeros(3), np.full(3, 1e-6))
    bad = (np.array([0.0, np.nan]), np.zeros(2))
    assert worst_error([ok]) == pytest.approx(1e-6)
    for pairs in ([ok, bad], [bad, ok], [ok, bad, ok]):
        assert np.isnan(worst_error(pairs))
    assert worst_error([(np.zeros(2), np.zeros(3))]) == float("inf")


def test_unpad_only_after_a_terminator():
    assert unpad([5, 7, 9, 0, 0], [9]) == [5, 7, 9]  # padding of a batched row that finished
    assert unpad([5, 0, 7, 0], [9]) == [5, 0, 7, 0]  # no terminator: every 0 is a real "!" token
    assert unpad([5, 9, 3, 0], [9]) == [5, 9, 3, 0]  # not padding after the end: kept as is


def test_decoding_settings_come_from_params_json():
    params = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.3, "max_new_tokens": 7,
              "beam_call": "model.chat(..., sampling=False, max_new_tokens=9, **chat_kwargs) (official default)"}
    greedy, beam = decoding_settings(params, "case")
    assert greedy == {"sampling": False, "num_beams": 1, "repetition_penalty": 1.3, "max_new_tokens": 7}
    assert beam == {"sampling": False, "max_new_tokens": 9}
    with pytest.raises(MiniCPMVError, match="max_new_tokens"):
        decoding_settings({"sampling": False, "num_beams": 1, "repetition_penalty": 1.0}, "case")


# ---------------------------------------------------------------------------- first format (2.6 / 4.5)


def test_tampered_safetensors_case_fails_exactly_the_tampered_stages(model26, tmp_path):
    case = _copy("2.6/beam_default", tmp_path)
    exp = case / "expected"
    t = load_file(str(exp / "tensors.safetensors"))
    t["step_logits"][0, 0, 5] += 1e-2  # numeric: one logit
    t["vpm_out_001"][0, 0] = np.nan  # NaN in the second slice (max(worst, nan) skipped it)
    t["beam_ids"] = np.concatenate([t["beam_ids"], np.zeros((1, 1), np.int64)], axis=1)  # a real trailing "!"
    save_file(t, str(exp / "tensors.safetensors"))

    def meta(m):
        m["input_ids"][0][3] += 1  # ids
        m["greedy_answer"] += " "  # chat() must return exactly this string
        m["beam_answer"] = m["beam_answer"][:-1]
        m["beam_generate_kwargs"]["repetition_penalty"] = 1.3  # settings

    _edit_json(exp / "meta.json", meta)
    results = list(CaseRunner(model26, case).run())
    assert _failed(results) == {"input_ids", "logits", "vision", "beam_ids", "greedy_text", "chat_greedy", "chat_beam",
                                "beam_generate_kwargs"}
    assert {"generate_kwargs", "greedy_ids", "slices", "resampler"} <= {r.stage for r in results if r.ok}


def test_slice_pngs_are_matched_through_pixel_values_source_slice(model26, tmp_path):
    """PNGs are stored in frame order, pixel_values in processor order: with the two orders
    different (PNGs 1 and 2 swapped, the map saying so) the slices still match; with a map that
    does not say so they do not."""
    case = _copy("2.6/beam_default", tmp_path)
    slices = case / "expected" / "slices"
    (slices / "slice_001.png").rename(slices / "tmp.png")
    (slices / "slice_002.png").rename(slices / "slice_001.png")
    (slices / "tmp.png").rename(slices / "slice_002.png")
    _edit_json(case / "expected" / "meta.json", lambda m: m.update(pixel_values_source_slice=[0, 2, 1]))
    inputs = model26.processor([CaseRunner(model26, case).msgs])

    def slices_stage():
        return [r for r in CaseRunner(model26, case)._pixel_stages(inputs) if r.stage == "slices"][0]

    assert slices_stage().ok
    _edit_json(case / "expected" / "meta.json", lambda m: m.update(pixel_values_source_slice=[0, 1, 2]))
    bad = slices_stage()
    assert not bad.ok and "[1, 2]" in bad.note


# ---------------------------------------------------------------------------- second format (2.0 / 2.5 / o2.6)


@pytest.fixture(scope="module")
def model_o26():
    return minicpmv.load(CONF / "o2.6" / "_checkpoint", dtype="float32")


def test_tampered_npz_case_fails_exactly_the_tampered_stages(model_o26, tmp_path):
    case = _copy("o2.6/img_224x160", tmp_path)
    exp = case / "expected"
    with np.load(exp / "tensors.npz") as npz:
        t = {k: npz[k] for k in npz.files}
    t["prefill_last_logits"][3] += 1e-2  # numeric
    t["resampler"][0, 1, 2] = np.nan  # NaN
    t["greedy_ids"][5] = (t["greedy_ids"][5] + 1) % 400  # ids
    t["beam_ids"] = np.append(t["beam_ids"], 0)  # a trailing 0 is a real token here
    np.savez(exp / "tensors.npz", **t)
    results = list(NpzCaseRunner(model_o26, case).run())
    assert _failed(results) == {"prefill_logits", "resampler", "greedy_ids", "beam_ids"}
    assert {"chat_greedy", "chat_beam", "vision_0"} <= {r.stage for r in results if r.ok}


def test_npz_decoding_settings_are_read_from_params_json(model_o26, tmp_path):
    """params.json says 15 new tokens and a 10-token beam: the runner must decode that (and fail
    against the 16 / 12 tokens the reference really produced)."""
    case = _copy("o2.6/img_224x160", tmp_path)

    def params(p):
        p["max_new_tokens"] = 15
        p["beam_call"] = p["beam_call"].replace("max_new_tokens=12", "max_new_tokens=10")

    _edit_json(case / "inputs" / "params.json", params)
    failed = _failed(NpzCaseRunner(model_o26, case).run())
    assert {"greedy_ids", "greedy_text", "chat_greedy", "beam_ids", "beam_text", "chat_beam"} <= failed
    assert "prefill_logits" not in failed
