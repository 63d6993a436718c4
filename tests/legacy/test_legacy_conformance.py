"""Every public conformance case of 2.0, 2.5 and o2.6 passes every stage of the harness."""

from __future__ import annotations

import json
import shutil

import pytest

from minicpmv.conformance import expand_case_dirs, make_runner
from minicpmv.conformance.npz_cases import NpzCaseRunner

from .conftest import CONF, LEGACY

CASES = [(v, c) for v in LEGACY for c in expand_case_dirs([CONF / v])]
PUBLIC = {
    "2.0": {"img_224x160", "img_448x448", "img_1000x400", "img_1344x1008", "text_only", "multi_turn"},
    "2.5": {"img_224x160", "img_448x448", "img_1000x400", "img_1344x1008", "text_only", "system_prompt",
            "multi_turn"},
    "o2.6": {"img_224x160", "img_1000x400", "text_only", "system_prompt", "multi_image", "multi_turn",
             "audio_1p3s"},
}


@pytest.mark.parametrize("version,case", CASES, ids=[f"{v}/{c.name}" for v, c in CASES])
def test_case(version, case, legacy_models):
    runner = make_runner(legacy_models(version), case)
    assert isinstance(runner, NpzCaseRunner)
    results = list(runner.run())
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    stages = {r.stage for r in results}
    assert {"expanded", "input_ids", "image_bound", "prefill_logits", "greedy_ids", "greedy_text",
            "beam_ids", "beam_text"} <= stages
    summary = json.loads((CONF / version / "cases_summary.json").read_text())[case.name]
    if summary["n_slices"]:
        assert {"slices", "vision_0", "resampler"} <= stages
    if case.name.startswith("audio"):
        assert {"audio_features", "audio_feature_lens", "apm_last_hidden", "audio_embeds", "audio_bounds"} <= stages
    if version != "2.0":
        assert "template" in stages
    official_chat_raised = bool(json.loads((case / "expected" / "meta.json").read_text()).get("official_chat_error"))
    assert ({"chat_greedy", "chat_beam"} <= stages) is not official_chat_raised  # chat() itself


def test_all_public_cases_present():
    for version, names in PUBLIC.items():
        assert {c.name for v, c in CASES if v == version} == names


def test_cli_runs_the_second_format_and_fails_on_tampering(tmp_path, capsys):
    from minicpmv.cli import main

    assert main(["conformance", str(CONF / "o2.6" / "text_only")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 failed" in out
    case = tmp_path / "o2.6" / "text_only"
    shutil.copytree(CONF / "o2.6" / "text_only", case)
    meta = case / "expected" / "meta.json"
    data = json.loads(meta.read_text())
    data["greedy_text"] = data["greedy_text"] + "x"
    meta.write_text(json.dumps(data))
    assert main(["conformance", str(case), "--checkpoint", str(CONF / "o2.6" / "_checkpoint")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "greedy_text" in out
