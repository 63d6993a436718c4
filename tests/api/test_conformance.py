"""Every public conformance case of 2.6 and 4.5 passes every stage (the official outputs)."""

from __future__ import annotations

import json

import pytest

from minicpmv.conformance import CaseRunner, expand_case_dirs

from .conftest import CONF

CASES = [(v, c) for v in ("2.6", "4.5") for c in expand_case_dirs([CONF / v])]


@pytest.mark.parametrize("version,case", CASES, ids=[f"{v}/{c.name}" for v, c in CASES])
def test_case(version, case, model26, model45):
    cm = model26 if version == "2.6" else model45
    results = list(CaseRunner(cm, case).run())
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    stages = {r.stage for r in results}
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
