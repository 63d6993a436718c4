"""The local runner: a mixed folder and a Parquet table end to end, answers equal to ``chat()``,
per-row errors, resume, and a ``minicpmv batch`` process killed mid-job then rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from PIL import Image

from minicpmv.batch.output import read_output
from minicpmv.batch.runner import run_batch
from minicpmv.processing.video import Video

from .conftest import TINY26, by_id, greedy_job

CHAT_GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "id0_quirk": False}


def _chat(model, media, prompt: str, max_new_tokens: int = 8) -> str:
    return model.chat([{"role": "user", "content": [*media, prompt]}], max_new_tokens=max_new_tokens,
                      max_inp_length=2**31, **CHAT_GREEDY)


def test_mixed_folder_answers_equal_chat_and_bad_files_are_row_errors(local_mixed, mixed_folder, model26):
    assert sorted(local_mixed) == ["a.png", "b.png", "broken.jpg", "clip.mp4", "corrupt.png", "sub/c.png"]
    for bad in ("broken.jpg", "corrupt.png"):
        rec = local_mixed[bad]
        assert rec["error"].startswith("ImageError: ") and bad in rec["error"]
        assert rec["answer"] is None and rec["prompt_tokens"] is None
    for rid in ("a.png", "b.png", "sub/c.png"):
        img = Image.open(mixed_folder / rid).convert("RGB")
        assert local_mixed[rid]["answer"] == _chat(model26, [img], "Describe this image.")
    video = local_mixed["clip.mp4"]
    assert video["answer"] == _chat(model26, [Video(str(mixed_folder / "clip.mp4"))], "Describe this video.")
    for rid, rec in local_mixed.items():
        if rid not in ("broken.jpg", "corrupt.png"):
            assert rec["error"] is None and rec["reasoning"] is None and rec["finish_reason"] in ("stop", "length")
            assert rec["prompt_tokens"] > 64 and 1 <= rec["completion_tokens"] <= 8


def test_table_rows_use_their_prompts_and_settings(local_table, parquet_table, model26):
    assert sorted(local_table) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    img = Image.open(parquet_table.parent / "img" / "1.png").convert("RGB")
    assert local_table["r1"]["answer"] == _chat(model26, [img], "Describe it.", max_new_tokens=5)
    assert local_table["r1"]["completion_tokens"] <= 5 and local_table["r2"]["completion_tokens"] <= 12
    assert local_table["r3"]["answer"] == _chat(model26, [], "Say hello.")
    assert local_table["r4"]["error"].startswith("ImageError: ") and "missing.png" in local_table["r4"]["error"]


def test_rerun_skips_rows_already_written(mixed_folder, tmp_path):
    out = tmp_path / "out.jsonl"
    first = run_batch(greedy_job(mixed_folder, out, max_batch_size=2, chunk_rows=2))
    assert (first.rows, first.written, first.failed, first.already_done, first.skipped_files) == (6, 6, 2, 0, 1)
    content = out.read_bytes()
    second = run_batch(greedy_job(mixed_folder, out))
    assert (second.written, second.already_done) == (0, 6)
    assert out.read_bytes() == content


def _count_table(tmp_path, n: int):
    table = tmp_path / "count.jsonl"
    table.write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": f"Count to {i}."}) + "\n" for i in range(n)),
                     encoding="utf-8")
    return table


def test_killed_process_then_rerun_writes_every_row_exactly_once(tmp_path):
    n = 40
    table = _count_table(tmp_path, n)
    reference = tmp_path / "reference.jsonl"
    run_batch(greedy_job(table, reference, defaults={"temperature": 0.0, "max_new_tokens": 24}, max_batch_size=2))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "minicpmv.cli", "batch", "--model", str(TINY26), "--dtype", "float32",
           "--input", str(table), "--output", str(out), "--greedy", "--max-new-tokens", "24",
           "--max-batch-size", "2", "--chunk-rows", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    before = read_output(out)
    assert 3 <= len(before) < n, "the job was not killed mid-way"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n - len(before)} row(s) written (0 with an error), {len(before)} already done" in rerun.stderr
    assert by_id(read_output(out)) == by_id(read_output(reference))
