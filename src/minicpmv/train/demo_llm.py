"""Stage 2 of the demo recipe: train the LLM on question/answer chats over frozen vision features.

Stage 1 leaves its weights in the run's ``init`` checkpoint; they are loaded with
``minicpmv.load``, so the data goes through the inference ``Processor`` exactly as a user's
fine-tuning data would (``data.iter_samples``: chat template, placeholders, assistant-only
labels). The tower and resampler stay frozen, so each picture's 32 resampler vectors are
computed once (``cache_features``) and the LLM (embeddings, layers, head) is trained on them with
the fine-tuning loss (``model.LossModule``), in length-sorted shuffled batches, optionally on the
shape questions alone first (``train_llm``). The checkpoint is
written by ``model.save_checkpoint_dir`` in bf16. Does not draw pictures or evaluate.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..api import load
from ..errors import InputError
from .data import DatasetStats, Sample, check_skipped, iter_samples
from .model import LossModule, collate, save_checkpoint_dir
from .schedule import warm_cosine

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


def _steps(module: CachedFeatures, params: list[torch.nn.Parameter], groups: Iterator[list[Sample]], total: int,
           lr: float, warm: int, running: float | None, tag: str) -> float | None:
    """``total`` optimiser steps over ``groups`` (AdamW, ``lr`` after a linear warm-up of ``warm``
    steps, cosine down to 0); returns the running loss."""
    if total <= 0:
        return running
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cosine(warm, total))
    device = params[0].device
    for step, group in enumerate(itertools.islice(groups, total)):
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
            log.info("stage 2 %s step %d/%d loss %.4f", tag, step, total, running)
    return running


def _epochs(samples: list[Sample], size: int, rng: random.Random, epochs: int | None) -> Iterator[list[Sample]]:
    """Batches of ``epochs`` passes over ``samples`` (endless with None), reshuffled each pass."""
    for _ in itertools.count() if epochs is None else range(epochs):
        yield from _batches(samples, size, rng)


def text_picture_ids(data: Path) -> set[str]:
    """Ids of the records of ``data`` whose picture is text (``kind`` "text")."""
    return {r["id"] for r in json.loads(Path(data).read_text()) if r.get("kind") == "text"}


def train_llm(init: Path, data: Path, final: Path, cfg: Any, device: torch.device) -> float:
    """Stage 2 from the stage-1 checkpoint ``init``; writes the checkpoint to ``final`` and returns
    the last running loss.

    With ``cfg.stage2_first_steps``, the LLM first learns the shape questions alone (every record
    but the text pictures) for that many steps at ``stage2_lr``, then ``stage2_epochs`` passes over
    the whole mix at ``stage2_mix_lr``: trained on the whole mix from the start, the reading
    answers (which the tower cannot yet support) crowd out positions and attribute binding.
    Without it, ``stage2_epochs`` passes over the whole mix at ``stage2_lr``."""
    chat = load(str(init), dtype="float32", device=device)
    core = chat.model
    core.eval()
    samples, cache = cached_dataset(core, chat.processor, data, max_length=1024)
    core.requires_grad_(False)
    core.llm.requires_grad_(True)
    core.llm.train()
    module = CachedFeatures(core, cache)
    params = [p for p in core.llm.parameters() if p.requires_grad]
    rng = random.Random(cfg.seed + 202)
    torch.manual_seed(cfg.seed + 202)
    running, lr = None, cfg.stage2_lr
    if cfg.stage2_first_steps:
        text = text_picture_ids(data)
        shapes = [s for s in samples if s.id not in text]
        if not shapes:
            raise InputError(f"{data} holds only text pictures: nothing for stage2_first_steps (set it to 0)")
        first = cfg.stage2_first_steps
        running = _steps(module, params, _epochs(shapes, cfg.stage2_batch, rng, None), first, lr,
                         max(1, first // 30), running, "shapes")
        lr = cfg.stage2_mix_lr
    total = math.ceil(len(samples) / cfg.stage2_batch) * cfg.stage2_epochs
    warm = 1 if cfg.stage2_first_steps else max(1, total // 30)
    running = _steps(module, params, _epochs(samples, cfg.stage2_batch, rng, cfg.stage2_epochs), total, lr, warm,
                     running, "mix")
    core.eval()
    save_checkpoint_dir(core, init, final, torch.bfloat16)
    return float(running or 0.0)
