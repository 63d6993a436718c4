"""Shared helpers: full-sequence logits of a model on processed samples."""

from __future__ import annotations

import torch

from minicpmv.train.model import LossModule, collate


def logits_of(core, samples) -> torch.Tensor:
    """[B, T, V] float32 logits of the collated samples (eval mode, no grad)."""
    core.eval()
    batch = collate(samples)
    module = LossModule(core)
    with torch.no_grad():
        emb = core.embed(batch["ids"], module.features(samples), [s.bounds for s in samples])  # [B, T, H]
        return core.forward(emb, None, batch["mask"], last_only=False)  # [B, T, V]
