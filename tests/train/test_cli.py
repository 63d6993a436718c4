"""`minicpmv finetune` from the command line: --show-sample, eval data, bf16 autocast, full tuning."""

from __future__ import annotations

import json

from minicpmv.cli import main

from .conftest import CKPT, qa_records, write_data


def test_finetune_cli_show_sample_eval_bf16(tmp_path, capsys):
    data = write_data(tmp_path / "data", qa_records(2))
    held = write_data(tmp_path / "data", qa_records(1), name="eval.json")
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(CKPT["4.5"]), "--data", str(data), "--eval-data", str(held),
               "--output", str(out), "--max-steps", "1", "--full", "--precision", "bf16", "--show-sample",
               "--no-progress"])
    assert rc == 0
    shown = capsys.readouterr()
    assert "[[red<|im_end|>]]" in shown.out and "<64 image tokens>" in shown.out and "supervised of" in shown.out
    assert "eval loss" in shown.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["eval_loss"] > 0 and metrics["samples_skipped"] == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (out / "adapter").exists()  # full fine-tuning: no adapter


def test_finetune_cli_reports_library_errors(tmp_path, capsys):
    data = write_data(tmp_path / "data", [{"id": "x", "conversations": [{"role": "user", "content": "q"}]}])
    rc = main(["finetune", "--model", str(CKPT["2.6"]), "--data", str(data), "--output", str(tmp_path / "o")])
    assert rc == 2 and "no assistant message" in capsys.readouterr().err
