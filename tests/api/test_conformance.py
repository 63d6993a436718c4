"""Every public conformance case of 2.6 and 4.5 passes every stage (the official outputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minicpmv.conformance import CaseRunner, expand_case_dirs
from minicpmv.conformance.safetensors_cases import TOL_TENSOR

from .conftest import CONF

CASES = [(v, c) for v in ("2.6", "4.5") for c in expand_case_dirs([CONF / v])]


@pytest.fixture(scope="session")
def case_features():
    """Resampler outputs of the cases, shared by the eager and compiled runs of each case (both use
    the same weights; the vision stage itself is checked against the vectors by ``test_case``)."""
    from minicpmv.engine.features import FeatureCache

    return {"2.6": FeatureCache(), "4.5": FeatureCache()}


@pytest.mark.parametrize("version,case", CASES, ids=[f"{v}/{c.name}" for v, c in CASES])
def test_case(version, case, model26, model45, case_features):
    cm = model26 if version == "2.6" else model45
    runner = CaseRunner(cm, case, feature_cache=case_features[version])
    results = list(runner.run())
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    stages = {r.stage for r in results}
    if any(k.startswith("vpm_out_") for k in runner.expected):  # image cases: the tower's stages ran
        assert {"vision", "vision_colsum", "resampler"} <= stages
    assert {"template", "expanded", "input_ids", "logits", "greedy_ids", "chat_greedy", "generate_kwargs"} <= stages
    if json.loads((case / "inputs" / "params.json").read_text()).get("beam_kwargs"):
        assert {"beam_ids", "chat_beam", "beam_generate_kwargs"} <= stages  # chat() itself, beam search


def test_all_public_cases_present():
    names = {f"{v}/{c.name}" for v, c in CASES}
    assert len([n for n in names if n.startswith("2.6/")]) == 11
    assert len([n for n in names if n.startswith("4.5/")]) == 11
    assert {"2.6/beam_default", "4.5/video_temporal_2x3", "4.5/text_only_thinking"} <= names


def test_cli_conformance_exit_codes(tmp_path, capsys):
    from minicpmv.cli import main

    assert main(["conformance", str(CONF / "2.6" / "text_only")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 failed" in out
    # A tampered expectation must make the harness fail.
    import shutil

    case = tmp_path / "2.6" / "text_only"
    shutil.copytree(CONF / "2.6" / "text_only", case)
    meta = case / "expected" / "meta.json"
    meta.write_text(meta.read_text().replace("You are a helpful assistant.", "You are helpful."))
    assert main(["conformance", str(case), "--checkpoint", str(CONF / "2.6" / "_checkpoint")]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.fixture(scope="session")
def compiled_runners(model26, model45):
    """Per model a runner sharing its weights whose decode step is compiled (torch.compile, mode
    "default" on the CPU); the fixed cache capacity makes one graph per model for every case."""
    from minicpmv.engine.generate import DecodeMode
    from minicpmv.engine.runner import ModelRunner

    return {v: ModelRunner(cm.model, cm.processor, cm.version, cm.config, DecodeMode(compile="default"))
            for v, cm in (("2.6", model26), ("4.5", model45))}


@pytest.mark.parametrize("version,case", CASES, ids=[f"{v}/{c.name}" for v, c in CASES])
def test_case_compiled_decode(version, case, model26, model45, compiled_runners, case_features):
    """The compiled static-shape decode step gives the eager step's greedy tokens, which are the
    reference's, and its logits to the vectors' tolerance."""
    cm = model26 if version == "2.6" else model45
    cases = CaseRunner(cm, case, feature_cache=case_features[version])
    batch, params = cases.greedy_setup()
    with torch.inference_mode():
        eager = list(cm.runner.steps(batch, params))
        compiled = list(compiled_runners[version].steps(batch, params))
    tokens = torch.stack([s.tokens for s in compiled], 1)  # [B, n]
    assert torch.equal(tokens, torch.stack([s.tokens for s in eager], 1))
    want = cases.expected["greedy_ids"]
    assert tokens.tolist() == want[:, : tokens.shape[1]].tolist() and not want[:, tokens.shape[1]:].any()
    logits = torch.stack([s.logits for s in compiled], 1).numpy()
    assert np.abs(logits - cases.expected["step_logits"][:, : tokens.shape[1]]).max() <= TOL_TENSOR


def test_vision_stages_run_when_the_feature_cache_already_holds_the_case(model26):
    """A shared feature cache (the compiled-decode check reuses the resampler outputs) must not
    make the vision stages vanish on a second run of the same case."""
    case = CONF / "2.6" / "beam_default"
    from minicpmv.engine.features import FeatureCache

    cache = FeatureCache()
    for _ in range(2):
        results = list(CaseRunner(model26, case, feature_cache=cache).run())
        assert {r.stage for r in results if r.ok} >= {"vision", "vision_colsum", "resampler"}
    assert len(cache) > 0
