"""Crashes and resume: a run SIGKILLed after a step, or in the middle of writing a checkpoint, and
then resumed, logs exactly the losses of an uninterrupted run (all runs are subprocesses with one
thread, so the arithmetic is the same), keeps every complete checkpoint and leaves no half-written
one; resuming never unpickles anything. Faults are injected by ``crash_run.py`` (a test helper;
the production command line has no crash switch)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minicpmv.cli import build_parser
from minicpmv.errors import CheckpointError
from minicpmv.train.model import TuneSpec
from minicpmv.train.trainer import TrainConfig, train

from .conftest import CKPT, PickleTrap, qa_records, write_data

HELPER = Path(__file__).with_name("crash_run.py")


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines}


def _run(mode: str, n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HELPER), mode, str(n), "--", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The finetune arguments and the losses of an uninterrupted run (6 steps, checkpoints at 2, 4)."""
    root = tmp_path_factory.mktemp("resume")
    data = write_data(root / "data", qa_records(4))
    common = ["finetune", "--model", str(CKPT["2.6"]), "--data", str(data), "--max-steps", "6",
              "--batch-size", "1", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "2",
              "--save-every", "2", "--export-dtype", "float32", "--no-progress", "--tune-resampler"]
    ref = root / "ref"
    done = _run("none", 0, [*common, "--output", str(ref)])
    assert done.returncode == 0, done.stderr[-2000:]
    want = _losses(ref)
    assert sorted(want) == list(range(1, 7)) and len(set(want.values())) > 3  # the losses move
    return common, want


def test_resume_after_kill_matches_uninterrupted(runs, tmp_path):
    common, want = runs
    out = tmp_path / "killed"
    first = _run("after-step", 3, [*common, "--output", str(out)])
    assert first.returncode == -9, first.stderr[-2000:]  # SIGKILL after step 3: step 3 not checkpointed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (out / "model.safetensors").exists()
    second = _run("none", 0, [*common, "--output", str(out), "--resume"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert _losses(out) == want  # step 3 ran twice (killed run, then resumed): the last one counts


def test_kill_while_writing_a_checkpoint_loses_nothing(runs, tmp_path):
    common, want = runs
    out = tmp_path / "killed"
    first = _run("during-checkpoint", 4, [*common, "--output", str(out)])
    assert first.returncode == -9, first.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004.tmp"]
    kept = _digest(ckpts / "step-00000002")
    second = _run("none", 0, [*common, "--output", str(out), "--resume"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]  # no half-written one
    assert _digest(ckpts / "step-00000002") == kept  # the complete checkpoint was not touched
    assert _losses(out) == want


def test_resume_never_unpickles(tmp_path):
    """A checkpoint folder copied from elsewhere cannot run code: a pickle ``state.pt`` (the old
    format) is refused with a clear error, and nothing is unpickled."""
    data = write_data(tmp_path / "data", qa_records(2))
    out = tmp_path / "out"
    cfg = TrainConfig(model=str(CKPT["2.6"]), data=str(data), output=str(out), max_steps=2, save_every=1,
                      progress=False, tune=TuneSpec(lora_r=2))
    train(cfg)
    ckpt = out / "checkpoints" / "step-00000001"
    marker = tmp_path / "unpickled"
    for name in [p.name for p in ckpt.iterdir() if p.name != "trainable.safetensors"]:
        (ckpt / name).unlink()
    for name in ("state.pt", "rng-0.pt"):  # what the old format wrote, carrying a payload
        torch.save(PickleTrap(marker), ckpt / name)
    (out / "metrics.json").unlink()  # a run that has not finished
    with pytest.raises(CheckpointError, match="pickle"):
        train(TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert not marker.exists()


def test_the_production_cli_has_no_crash_switch():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--model", "m", "--data", "d", "--output", "o",
                                   "--exit-after-step", "3"])
    assert "exit_after_step" not in TrainConfig.__dataclass_fields__
