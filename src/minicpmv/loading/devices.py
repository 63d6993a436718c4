"""Turning a device name from the user into a ``torch.device`` that exists on this machine.

``resolve_device("cuda:1")`` checks the name and the hardware before anything loads, so a typo
(``gpu``) or a CUDA device on a CPU-only PyTorch is one clear ``InputError`` instead of a torch
traceback later. It does not pick a device for the caller (the trainer's ``auto`` does that).
"""

from __future__ import annotations

import torch

from ..errors import InputError

KNOWN = "cpu, cuda, cuda:N, mps"


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``name``; InputError when unknown or not available here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"unknown device {str(name)!r}; use one of {KNOWN}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA device is visible" if torch.version.cuda else "this PyTorch build has no CUDA support"
            raise InputError(f"device {str(name)!r}: CUDA is not available ({why}, torch {torch.__version__}); "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"device {str(name)!r}: this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {str(name)!r}: Apple MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise InputError(f"device {str(name)!r} is not supported; use one of {KNOWN}")
    return device
