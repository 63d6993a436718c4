"""Keeps the weights of a checkpoint part that minicpmv loads but does not run (MiniCPM-o TTS).

MiniCPM-o 2.6 checkpoints carry a ConditionalChatTTS head (``tts.*``: a Llama decoder over audio
codebooks, a DVAE, projectors; spec o2.6 §4.8). Speech output is not implemented yet, but such
checkpoints must still load strictly and round-trip through ``state_dict``. ``OpaqueWeights``
is an empty module that the loader fills with one parameter (floating tensors) or buffer
(integer tensors) per checkpoint key under its prefix, nesting submodules by the dotted names,
so the keys stay identical. It has no forward. Nothing here knows the TTS architecture.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError


class OpaqueWeights(nn.Module):
    """A container for named tensors of a checkpoint subtree; see the module docstring."""

    def adopt(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Register meta tensors for ``{relative key: (shape, dtype)}`` (loading fills them)."""
        for name, (shape, dtype) in sorted(shapes.items()):
            *path, leaf = name.split(".")
            holder = self._child(path, name)
            t = torch.empty(shape, dtype=dtype, device="meta")
            try:
                if dtype.is_floating_point:
                    holder.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
                else:
                    holder.register_buffer(leaf, t)
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"cannot keep checkpoint tensor {name!r}: {e}") from e

    def _child(self, path: list[str], name: str) -> nn.Module:
        mod: nn.Module = self
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                try:
                    child = nn.Module()
                    mod.add_module(part, child)
                except (KeyError, ValueError) as e:
                    raise CheckpointError(f"cannot keep checkpoint tensor {name!r}: {e}") from e
            mod = child
        return mod
