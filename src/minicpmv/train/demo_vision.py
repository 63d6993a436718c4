"""Stage 1 of the demo recipe: pretrain the vision tower and resampler on dense targets.

Each step draws a fresh batch of training pictures (``synthetic.py``) on one canvas size, so
every picture in the batch has the same view and the tower runs without padding. Linear heads
read the targets the generator knows exactly:

- per patch of the tower's output (``synthetic.PATCH_HEADS``): the colour, shape, position bin,
  size bin and same-shape / same-colour counts of the object covering it, the character there
  and its index in its line, the kind of picture and its number of shapes;
- per resampler slot (``synthetic.SLOT_NAMES``): slot 0 the picture's kind and counts (all, per
  shape, per colour) and text length; the largest / smallest object; one slot per shape name and
  per colour name holding that object's attributes and count; slot 12+i the i-th character.
  A head is shared by every slot it applies to, so a fact has one code wherever it appears.

Before that, the patch embedding starts as PCA whitening of training patches
(``whitened_patch_init``) and the tower is trained on the per-patch shape target alone
(``shape_warmup``): shapes are told apart by outlines spanning several patches, which the
multi-task phase did not learn from a random tower. ``char_warmup`` (off unless
``char_warmup_steps`` is set) does the same for characters, from centred ones to misaligned;
``text_warmup`` (off unless ``text_warmup_steps`` is set) on the text pictures' own characters.
Loss weights per head: ``HEAD_WEIGHTS``. After the mixed phase, ``slot_text_phase`` (off unless
``slot_text_steps`` is set) trains the resampler alone on the text pictures' character slots.

The heads are dropped afterwards: what stays is a tower and resampler whose 32 output vectors
carry these facts at fixed places, for the LLM to read in stage 2. Does not touch the LLM.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.vlm import MiniCPMV
from ..processing.image import to_patches
from . import synthetic as syn
from .demo_world import COLOURS, MAX_CHARS, MAX_OBJECTS, SHAPES
from .schedule import warm_cosine

log = logging.getLogger(__name__)

SLOT_HEADS = {"world": len(syn.WORLD), "count": 1 + MAX_OBJECTS, "nchars": 1 + MAX_CHARS,
              **{f"n:{s}": 1 + MAX_OBJECTS for s in (*SHAPES, *COLOURS)}, "present": 2,
              "colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "xbin": 1 + syn.XBINS, "ybin": 1 + syn.XBINS,
              "size": 2 + len(syn.SIZE_EDGES), "char": 1 + len(syn.ALPHABET)}
KIND_MIX = {"shapes": 0.45, "text": 0.3, "lines": 0.1, "other": 0.15}
# Loss weights of the heads (1 if absent). Shapes are told apart by their outlines, which span
# several patches; with every head weighted 1 the easy ones (colour, counts) took the shared
# tower and the shape heads stayed at the majority class for 1,000 steps.
HEAD_WEIGHTS = {"p_shape": 4.0, "s_shape": 2.0}


class DenseHeads(nn.Module):
    """Linear read-outs of the patch features and of the resampler slots (shared per fact)."""

    def __init__(self, vision_width: int, width: int) -> None:
        super().__init__()
        self.patch = nn.ModuleDict({k: nn.Linear(vision_width, c) for k, c in syn.PATCH_HEADS.items()})
        self.norm = nn.LayerNorm(width)
        self.slot = nn.ModuleDict({k.replace(":", "_"): nn.Linear(width, c) for k, c in SLOT_HEADS.items()})

    def forward(self, patches: torch.Tensor, feats: torch.Tensor, labels: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """patches [B, L, Dv], feats [B, Q, H] -> losses and accuracies per head."""
        out: dict[str, torch.Tensor] = {}
        for k, head in self.patch.items():
            target = labels["p_" + k]  # [B, L]
            logits = head(patches.float())  # [B, L, C]
            # background patches (0) carry no object/character fact; kind and count are everywhere
            ignore = 0 if k not in ("world", "count") else syn.IGNORE
            out["p_" + k] = _ce(logits, target, ignore)
            out["p_" + k + "_acc"] = _acc(logits, target, ignore)
        return {**out, **self.slots(feats, labels)}

    def slots(self, feats: torch.Tensor, labels: dict[str, torch.Tensor], only: Sequence[str] = tuple(SLOT_HEADS)
              ) -> dict[str, torch.Tensor]:
        """feats [B, Q, H] -> losses and accuracies of the slot heads named in ``only``."""
        out: dict[str, torch.Tensor] = {}
        tokens = self.norm(feats.float())  # [B, Q, H]
        for k in only:
            target = labels["s_" + k]  # [B, Q]
            logits = self.slot[k.replace(":", "_")](tokens)  # [B, Q, C]
            out["s_" + k] = _ce(logits, target, syn.IGNORE)
            out["s_" + k + "_acc"] = _acc(logits, target, syn.IGNORE)
            if k == "char":  # most character targets are "none": the slots of an actual character
                out["s_char_real_acc"] = _acc(logits, torch.where(target > 0, target, syn.IGNORE), syn.IGNORE)
        return out


def _ce(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
    if not (target != ignore).any():
        return logits.sum() * 0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore)


def _weighted_loss(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The heads' losses in ``parts`` (its ``*_acc`` entries left out), weighted by ``HEAD_WEIGHTS``."""
    return sum(v * HEAD_WEIGHTS.get(k, 1.0) for k, v in parts.items() if not k.endswith("_acc"))


def _acc(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
    keep = target != ignore
    if not keep.any():
        return torch.tensor(float("nan"))
    return (logits.detach().argmax(-1) == target)[keep].float().mean()


def picture(rng: random.Random, size: tuple[int, int], kind: str | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """One training picture's view and its targets (patch ``p_*`` [L], slot ``s_*`` [Q]); its kind
    is drawn from ``KIND_MIX`` unless given."""
    kind = kind or rng.choices(list(KIND_MIX), weights=list(KIND_MIX.values()))[0]
    lines = rng.randint(2, 5) if kind == "lines" else 1
    scene = syn.make_scene(rng, "text" if kind == "lines" else kind, lines=lines, size=size)
    img, masks = syn.render(scene, masks=True)
    view = syn.view_of(img)
    labels = {"p_" + k: v for k, v in syn.patch_labels(scene, masks, view.size).items()}
    slots = syn.slot_labels(scene)
    for k in SLOT_HEADS:
        labels["s_" + k] = np.asarray([s.get(k, syn.IGNORE) for s in slots], np.int64)
    return view, labels


def batch(rng: random.Random, n: int, device: torch.device, kind: str | None = None
          ) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    size = syn.canvas_size(rng)
    views, labs = zip(*(picture(rng, size, kind) for _ in range(n)), strict=True)
    pixels, tgt = tower_input(views, device)
    labels = {k: torch.from_numpy(np.stack([lab[k] for lab in labs])).to(device) for k in labs[0]}
    return pixels, tgt, labels


def tower_input(views: Sequence[Any], device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Equal-size views -> the tower's patch rows (each [3, 14, L*14]) and their patch grids [B, 2]."""
    w, h = views[0].size
    pixels = [torch.from_numpy(to_patches(v)).to(device) for v in views]  # each [3, 14, L*14]
    return pixels, torch.tensor([[h // syn.PATCH, w // syn.PATCH]] * len(views))  # [B, 2]


@torch.no_grad()
def whitened_patch_init(model: MiniCPMV, rng: random.Random, pictures: int = 96) -> None:
    """Start the patch embedding as PCA whitening of training patches: output channel i projects a
    patch (normalised pixels, [3*14*14]) on its i-th principal direction, scaled to a standard
    deviation of 0.5, with the mean patch removed by the bias. From random weights the tower
    learned colour and position but not shapes or characters (per-patch accuracy at chance after
    2,000 steps); the principal directions hand it edges, strokes and corners from the first step."""
    conv = model.vpm.embeddings.patch_embedding  # weight [Dv, 3, P, P]
    rows = []
    for _ in range(pictures):
        view, _ = picture(rng, syn.canvas_size(rng))
        pix = torch.from_numpy(to_patches(view))  # [3, P, L*P]
        p = pix.shape[1]
        rows.append(pix.reshape(3, p, -1, p).permute(2, 0, 1, 3).reshape(-1, 3 * p * p))  # [L, 3*P*P]
    data = torch.cat(rows).double()  # [N, 3*P*P]
    mean = data.mean(0)
    cov = torch.cov((data - mean).T)  # [3PP, 3PP]
    eig, vec = torch.linalg.eigh(cov)  # ascending
    width = min(conv.weight.shape[0], data.shape[1])  # channels past 3*P*P keep their random start
    eig, vec = eig.flip(0)[:width].clamp_min(0), vec.flip(1)[:, :width]  # [W], [3PP, W]
    scale = 0.5 / torch.sqrt(eig + eig.mean() * 0.05)  # [W]; the floor keeps noise directions small
    weight = (vec * scale).T  # [W, 3PP]
    conv.weight[:width].copy_(weight.reshape(width, *conv.weight.shape[1:]).to(conv.weight.dtype))
    conv.bias[:width].copy_((-weight @ mean).to(conv.bias.dtype))


def _clipped_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor) -> None:
    """One optimizer step on ``loss`` with the gradient norm clipped to 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


# step -> pixels, sizes [B, 2], per-patch target [B, L]
Draw = Callable[[int], tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]


def _one_head_warmup(model: MiniCPMV, head: nn.Module, steps: int, lr: float, draw: Draw, what: str) -> None:
    """Train the tower and one per-patch head alone on ``steps`` batches of ``draw``, at a constant
    rate (patches labelled 0 are ignored; the running accuracy is logged)."""
    params = list(model.vpm.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    running = 0.0
    model.train()
    for step in range(steps):
        pixels, tgt, target = draw(step)
        with torch.autocast(device_type=target.device.type, dtype=torch.bfloat16):
            patches = model.vpm.encode_slices(pixels, tgt, batch_size=len(pixels))  # [B, L, Dv]
        logits = head(patches.float())  # [B, L, C]
        loss = _ce(logits, target, 0)
        _clipped_step(opt, params, loss)
        running = 0.95 * running + 0.05 * _acc(logits, target, 0).item()
        if step % 50 == 0 or step == steps - 1:
            log.info("stage 1 %s warm-up step %d/%d loss %.3f accuracy %.3f", what, step, steps, loss.item(), running)


def shape_warmup(model: MiniCPMV, heads: DenseHeads, cfg: Any, device: torch.device) -> None:
    """Train the tower on one target first: the shape of the object under each patch, on shapes
    pictures, at a constant rate. Mixed with every other head from the start, the shape heads
    stayed at the majority class for 1,000 steps; alone they reach 47% in 350 steps (measured),
    and the multi-task phase then starts from a tower that already sees outlines."""
    rng = random.Random(cfg.seed + 103)

    def draw(_step: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        pixels, tgt, labels = batch(rng, cfg.stage1_batch, device, kind="shapes")
        return pixels, tgt, labels["p_shape"]  # target [B, L]

    _one_head_warmup(model, heads.patch["shape"], cfg.shape_warmup_steps, cfg.shape_warmup_lr, draw, "shape")


def char_warmup(model: MiniCPMV, heads: DenseHeads, cfg: Any, device: torch.device) -> None:
    """Train the tower on per-patch characters of ``syn.char_grid`` pictures, the centres' offset
    growing from 0 (first quarter of the steps) to half a patch. Measured (2026-12-06): the tower
    reached 89% on centred characters in 400 steps, stayed at chance on the text pictures for
    900, and kept 39% at full offset after this schedule's 800 steps. Off (0 steps) in the bundled
    recipe, whose card must match the run that made it."""
    rng = random.Random(cfg.seed + 107)
    steps = cfg.char_warmup_steps

    def draw(step: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        jitter = round(syn.PATCH // 2 * max(0.0, (step / steps - 0.25) / 0.75))
        views, labs = zip(*(syn.char_grid(rng, jitter) for _ in range(cfg.stage1_batch)), strict=True)
        return *tower_input(views, device), torch.from_numpy(np.stack(labs)).to(device)  # target [B, L]

    _one_head_warmup(model, heads.patch["char"], steps, cfg.shape_warmup_lr, draw, "character")


def text_warmup(model: MiniCPMV, heads: DenseHeads, cfg: Any, device: torch.device) -> None:
    """Train the tower on per-patch characters of the text pictures themselves (one line of 1-12
    letters and digits, the sizes and fonts of the mixed phase), ``text_warmup_steps`` steps at the
    constant warm-up rate. Measured (2026-12-07): the tower of a finished curriculum stage 1
    reached 54% like this after 2,400 steps, the tower of the shape warm-up alone only 14.4%
    after 2,100 (so ``char_warmup`` goes first); with every dense head on the same text
    pictures, 9.8% after 1,750. Off (0 steps) in the bundled recipe."""
    rng = random.Random(cfg.seed + 109)

    def draw(_step: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        pixels, tgt, labels = batch(rng, cfg.stage1_batch, device, kind="text")
        return pixels, tgt, labels["p_char"]  # target [B, L]

    _one_head_warmup(model, heads.patch["char"], cfg.text_warmup_steps, cfg.shape_warmup_lr, draw, "text character")


def slot_text_phase(model: MiniCPMV, heads: DenseHeads, cfg: Any, device: torch.device) -> float:
    """Train the resampler alone (the tower frozen) ``slot_text_steps`` steps at the warm-up rate,
    every other batch text pictures with the character-slot and length heads only, the others the
    mixed kinds with every slot head (which keeps the other slots); returns the running accuracy
    of the slots that hold a character. In the mixed phase most character-slot targets are "none"
    (every shapes picture, and the slots past a string's end), so the slots learned to tell text
    from no text more than which character. Measured (2026-12-07, 1,500 steps on a finished
    stage 1 whose tower reads 32% of the characters per patch, fresh heads): with text batches
    only, the linear probe per character slot rose from 12.0% to 20.5%, but the other slots lost
    much (refitted linear probes: colour 93% -> 80%, x bin 67% -> 36%); with the mixed batches
    15.6%, the other slots within 3 points (colour 92.6%, x bin 64.2%). Off (0 steps)."""
    rng = random.Random(cfg.seed + 113)
    params = [*model.resampler.parameters(), *heads.norm.parameters(), *heads.slot.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.shape_warmup_lr, weight_decay=0.05)
    running = 0.0
    model.train()
    for step in range(cfg.slot_text_steps):
        text = step % 2 == 0
        pixels, tgt, labels = batch(rng, cfg.stage1_batch, device, kind="text" if text else None)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                patches = model.vpm.encode_slices(pixels, tgt, batch_size=len(pixels))  # [B, L, Dv]
            feats = model.resampler(patches, tgt, None)  # [B, Q, H]
        parts = heads.slots(feats, labels, ("char", "nchars") if text else tuple(SLOT_HEADS))
        loss = _weighted_loss(parts)
        _clipped_step(opt, params, loss)
        if text and not torch.isnan(parts["s_char_real_acc"]):  # nan: no actual character in the batch
            running = 0.95 * running + 0.05 * parts["s_char_real_acc"].item()
        if step % 50 == 0 or step == cfg.slot_text_steps - 1:
            log.info("stage 1 slot text step %d/%d loss %.3f characters %.3f", step, cfg.slot_text_steps,
                     loss.item(), running)
    return running


def pretrain_vision(model: MiniCPMV, cfg: Any, device: torch.device) -> dict[str, float]:
    """Stage 1; returns the final running accuracies of the heads."""
    whitened_patch_init(model, random.Random(cfg.seed + 99))
    heads = DenseHeads(cfg.vision_width, model.config.text.hidden_size).to(device)
    shape_warmup(model, heads, cfg, device)
    char_warmup(model, heads, cfg, device)
    text_warmup(model, heads, cfg, device)
    params = list(model.vpm.parameters()) + list(model.resampler.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=0.05)
    warm = max(1, cfg.stage1_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cosine(warm, cfg.stage1_steps))
    rng = random.Random(cfg.seed + 101)
    running: dict[str, float] = {}
    model.train()
    for step in range(cfg.stage1_steps):
        pixels, tgt, labels = batch(rng, cfg.stage1_batch, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            patches = model.vpm.encode_slices(pixels, tgt, batch_size=len(pixels))  # [B, L, Dv]
            feats = model.resampler(patches, tgt, None)  # [B, Q, H]
            parts = heads(patches, feats, labels)
        loss = _weighted_loss(parts)
        _clipped_step(opt, params, loss)
        sched.step()
        for k, v in parts.items():
            if not torch.isnan(v):
                running[k] = 0.95 * running.get(k, v.item()) + 0.05 * v.item()
        if step % 50 == 0 or step == cfg.stage1_steps - 1:
            accs = {k.removesuffix("_acc"): round(v, 3) for k, v in running.items() if k.endswith("_acc")}
            log.info("stage 1 step %d/%d loss %.3f %s", step, cfg.stage1_steps, loss.item(), accs)
    if cfg.slot_text_steps:
        running["slot_text_char_acc"] = slot_text_phase(model, heads, cfg, device)
    model.eval()
    return running
