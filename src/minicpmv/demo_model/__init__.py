"""The bundled demo checkpoint: a small MiniCPM-V-2.6-format model trained by ``minicpmv train-demo``.

This folder holds the checkpoint files (config, bf16 safetensors, tokenizer, preprocessor and
generation config) and ``DEMO_CARD.json`` (how it was trained: command, seed, weight hash, held-out
accuracy per question family, time). ``path()`` is what the CLI falls back to when no ``--model``
is given. Nothing here runs the model.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

_HERE = Path(__file__).resolve().parent


def path() -> Path:
    """Directory of the bundled demo checkpoint; CheckpointError if this installation lacks it."""
    if not (_HERE / "model.safetensors").is_file():
        raise CheckpointError(f"the bundled demo model is missing from {_HERE}; pass --model DIR or a "
                              "Hugging Face repo id (or reinstall minicpmv)")
    return _HERE
