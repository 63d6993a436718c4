"""Checkpoints: a run SIGKILLed mid-way and resumed reaches the same losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from minicpmv.train.model import TuneSpec
from minicpmv.train.trainer import TrainConfig, train

from .conftest import CKPT, qa_records, write_data


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines}


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "minicpmv.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    data = write_data(tmp_path / "data", qa_records(4))
    common = ["finetune", "--model", str(CKPT["2.6"]), "--data", str(data), "--max-steps", "6",
              "--batch-size", "1", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "2",
              "--save-every", "2", "--export-dtype", "float32", "--no-progress", "--tune-resampler"]
    out = tmp_path / "killed"
    first = _cli([*common, "--output", str(out), "--exit-after-step", "3"])
    assert first.returncode == -9, first.stderr[-2000:]  # SIGKILL after step 3: step 3 not checkpointed
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"] and not (out / "model.safetensors").exists()
    second = _cli([*common, "--output", str(out), "--resume"])
    assert second.returncode == 0, second.stderr[-2000:]
    # uninterrupted reference, in this process (same seed, fp32); 2 epochs of 2 steps + 2 more
    ref = tmp_path / "ref"
    train(TrainConfig(model=str(CKPT["2.6"]), data=str(data), output=str(ref), max_steps=6, grad_accum=2,
                      lr=3e-3, warmup_steps=2, save_every=2, export_dtype="float32", progress=False,
                      tune=TuneSpec(tune_resampler=True)))
    want, got = _losses(ref), _losses(out)
    assert sorted(want) == list(range(1, 7))
    assert [round(got[k], 5) for k in (1, 2)] == [round(want[k], 5) for k in (1, 2)]
    for step in range(3, 7):  # step 3 ran twice in `out` (killed run, then resumed): the last one counts
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    assert len(set(want.values())) > 3  # the losses move, so a wrong data position would show
