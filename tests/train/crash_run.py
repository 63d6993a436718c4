"""Test helper (not a test module): run ``minicpmv finetune`` in this process with a crash injected.

    python tests/train/crash_run.py after-step N -- finetune ARGS...
    python tests/train/crash_run.py during-checkpoint N -- finetune ARGS...

``after-step N`` SIGKILLs the process once step N is logged; ``during-checkpoint N`` SIGKILLs it
in the middle of writing ``checkpoints/step-N`` (the trainable weights half written, the
optimizer state not yet). The faults are injected by replacing trainer functions here, so the
production command line has no crash switch. ``none 0`` runs the command unchanged.
"""

from __future__ import annotations

import os
import signal
import sys

from minicpmv.cli import main
from minicpmv.train import trainer


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after_step(n: int) -> None:
    real = trainer._log_line

    def log_line(out, record):
        real(out, record)
        if record.get("step") == n:
            _kill()

    trainer._log_line = log_line


def _during_checkpoint(n: int) -> None:
    real = trainer.save_safetensors

    def half_written(tensors, path, **kw):
        real(tensors, path, **kw)
        if f"step-{n:08d}.tmp" in str(path):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            _kill()

    trainer.save_safetensors = half_written


if __name__ == "__main__":
    mode, n, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: crash_run.py MODE N -- finetune ARGS..."
    {"after-step": _after_step, "during-checkpoint": _during_checkpoint, "none": lambda n: None}[mode](int(n))
    raise SystemExit(main(args))
