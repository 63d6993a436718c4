"""Stage 2 of the demo recipe: train the LLM on question/answer chats over frozen vision features.

Stage 1 leaves its weights in the run's ``init`` checkpoint; they are loaded with
``minicpmv.load``, so the data goes through the inference ``Processor`` exactly as a user's
fine-tuning data would (``data.iter_samples``: chat template, placeholders, assistant-only
labels). The tower and resampler stay frozen, so each picture's 32 resampler vectors are
computed once (``cache_features``) and the LLM (embeddings, layers, head) is trained on them with
the fine-tuning loss (``model.LossModule``), in length-sorted shuffled batches. The checkpoint is
written by ``model.save_checkpoint_dir`` in bf16. Does not draw pictures or evaluate.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from ..api import load
from .data import DatasetStats, Sample, check_skipped, iter_samples
from .model import LossModule, collate, save_checkpoint_dir

log = logging.getLogger(__name__)


class CachedFeatures(LossModule):
    """``LossModule`` whose image features come from a per-sample cache (frozen vision)."""

    def __init__(self, core: Any, cache: dict[str, torch.Tensor | None]) -> None:
        super().__init__(core)
        self.cache = cache

    def features(self, samples: list[Sample]) -> list[torch.Tensor | None]:
        return [self.cache[s.id] for s in samples]


@torch.no_grad()
def cache_features(core: Any, samples: list[Sample], batch: int = 32) -> dict[str, torch.Tensor | None]:
    """Resampler output [n_images, Q, H] of every sample (None for text-only samples)."""
    module = LossModule(core)
    out: dict[str, torch.Tensor | None] = {}
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        with torch.autocast(device_type=core.device.type, dtype=torch.bfloat16):
            feats = module.features(chunk)
        for s, f in zip(chunk, feats, strict=True):
            out[s.id] = None if f is None else f.float()
    return out


def cached_dataset(core: Any, processor: Any, data: Path, max_length: int, chunk: int = 256
                   ) -> tuple[list[Sample], dict[str, torch.Tensor | None]]:
    """The samples of ``data`` without their pixels, and their features (``cache_features``). Read
    and encoded ``chunk`` samples at a time: the pixels of all of them (0.6 MB a picture) did not
    fit 24 GB at 36,000 pictures."""
    stats = DatasetStats()
    samples: list[Sample] = []
    cache: dict[str, torch.Tensor | None] = {}
    stream = iter_samples(processor, data, max_length, stats)
    while part := list(itertools.islice(stream, chunk)):
        cache.update(cache_features(core, part))
        samples.extend(dataclasses.replace(s, pixel_values=[]) for s in part)  # features cached: pixels unused
    check_skipped(stats, max_length)
    log.info("stage 2: %d samples (%d skipped), vision features cached", len(samples), stats.skipped)
    return samples, cache


def _batches(samples: list[Sample], size: int, rng: random.Random) -> list[list[Sample]]:
    """Shuffled batches of samples of similar length (less padding)."""
    order = sorted(samples, key=lambda s: (len(s.input_ids), rng.random()))
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(groups)
    return groups


def save_weights(model: torch.nn.Module, ckpt: Path, dtype: torch.dtype = torch.float32) -> None:
    """All of ``model``'s tensors as ``ckpt/model.safetensors`` (the run's ``init`` checkpoint)."""
    from safetensors.torch import save_file

    state = {n: t.detach().to(dtype).contiguous() for n, t in model.state_dict().items()}
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def train_llm(init: Path, data: Path, final: Path, cfg: Any, device: torch.device) -> float:
    """Stage 2 from the stage-1 checkpoint ``init``; writes the checkpoint to ``final`` and returns
    the last running loss."""
    chat = load(str(init), dtype="float32", device=device)
    core = chat.model
    core.eval()
    samples, cache = cached_dataset(core, chat.processor, data, max_length=1024)
    core.requires_grad_(False)
    core.llm.requires_grad_(True)
    core.llm.train()
    module = CachedFeatures(core, cache)
    params = [p for p in core.llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.stage2_lr, weight_decay=0.01)
    rng = random.Random(cfg.seed + 202)
    torch.manual_seed(cfg.seed + 202)
    per_epoch = math.ceil(len(samples) / cfg.stage2_batch)
    total = per_epoch * cfg.stage2_epochs
    warm = max(1, total // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total))))
    running, step = None, 0
    for _ in range(cfg.stage2_epochs):
        for group in _batches(samples, cfg.stage2_batch, rng):
            batch = collate(group)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                ce, n = module(batch)
            loss = ce / max(n, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 50 == 0 or step == total - 1:
                log.info("stage 2 step %d/%d loss %.4f", step, total, running)
            step += 1
    core.eval()
    save_checkpoint_dir(core, init, final, torch.bfloat16)
    return float(running or 0.0)
