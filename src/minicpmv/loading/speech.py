"""Read the speech-output side files of a MiniCPM-o checkpoint: the Vocos vocoder and the
ChatTTS tokenizer directory (``assets/`` next to config.json, where the official ``init_tts``
looks for them).

The vocoder is ``assets/vocos.safetensors`` when present, else the official ``assets/Vocos.pt``
read with ``torch.load(weights_only=True)`` (a plain state dict; the restricted unpickler refuses
anything that could run code). Loading is strict: every tensor of the file must fill a
parameter or buffer of ``modeling.vocos.Vocos`` with the same shape, and every one must be
filled. The speech head itself (``tts.*``) loads with the model in ``checkpoint.py``. This
module does not run anything.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, MissingWeightsError, ShapeMismatchError, UnexpectedWeightsError
from ..modeling.vocos import Vocos

log = logging.getLogger(__name__)

VOCOS_FILES = ("assets/vocos.safetensors", "assets/Vocos.pt")
TOKENIZER_DIR = "assets/chattts_tokenizer"


def vocos_file(checkpoint: str | Path) -> Path:
    """The vocoder file of a checkpoint directory (safetensors copy preferred)."""
    root = Path(checkpoint)
    for name in VOCOS_FILES:
        if (root / name).is_file():
            return root / name
    raise CheckpointError(
        f"{root} has no vocoder ({' or '.join(VOCOS_FILES)}); MiniCPM-o speech output needs the "
        "checkpoint's assets/ folder (download it with the model)"
    )


def tokenizer_dir(checkpoint: str | Path) -> Path:
    """The ChatTTS tokenizer directory of a checkpoint."""
    path = Path(checkpoint) / TOKENIZER_DIR
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; MiniCPM-o speech output needs the ChatTTS tokenizer")
    return path


def read_vocos_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a vocoder file, without executing any code."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            return load_file(str(p))
        state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"cannot read vocoder {p}: {e} (only a plain tensor state dict is accepted)"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p} is not a state dict of tensors")
    return state


def load_vocos(path: str | Path, *, device: str | torch.device = "cpu") -> Vocos:
    """A float32 ``Vocos`` filled strictly from ``path`` (``Vocos.pt`` or ``vocos.safetensors``)."""
    state = read_vocos_state(path)
    with torch.device("meta"):
        vocos = Vocos()
    expected = vocos.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise MissingWeightsError(f"vocoder {path} lacks {len(missing)} tensor(s): {', '.join(missing[:10])}")
    if unexpected:
        raise UnexpectedWeightsError(
            f"vocoder {path} holds {len(unexpected)} tensor(s) the vocoder does not use: {', '.join(unexpected[:10])}"
        )
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ShapeMismatchError(
                f"vocoder tensor {k!r} has shape {list(t.shape)}, expected {list(expected[k].shape)}"
            )
    state = {k: t.to(device=device, dtype=torch.float32) for k, t in state.items()}
    vocos.load_state_dict(state, strict=True, assign=True)
    log.info("loaded vocoder %s", path)
    return vocos.eval()
