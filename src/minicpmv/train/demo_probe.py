"""How much of the reading a demo model's picture features carry, without training stage 2.

A linear probe on the frozen output of the tower and resampler (the 32 vectors the LLM reads):
one shared head maps each character slot (``char:0`` .. ``char:11``) to its character or "none",
one head maps slot 0 to the text's length. Fitted on pictures of the training generator, it is
scored on held-out ones and on the independent evaluation's reading pictures, per character and
per whole string. Stage 2 reads these same vectors, so the probe's exact-string rate is roughly
what reading can reach after it (an LLM is not linear, so not a strict bound). A second linear
head reads the character under each patch from the tower's output (training-generator pictures,
whose per-patch labels are known): high there and low in the slots means the resampler loses it.

Does not change the model; not part of ``train-demo``. Run: ``python -m minicpmv.train.demo_probe DIR``.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, MiniCPMVError
from . import demo_eval as de
from . import demo_vision as dv
from . import synthetic as syn
from .demo_world import ALPHABET, MAX_CHARS

FIRST_CHAR_SLOT = syn.SLOT_NAMES.index("char:0")

# view (``syn.view_of``) -> its patch features [L, Dv] and slot features [Q, H]
Features = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def model_features(model: Any) -> Features:
    """The frozen tower + resampler of ``model`` on a picture's single ~224 view."""
    slots = model.resampler.query.shape[0]
    if slots < FIRST_CHAR_SLOT + MAX_CHARS:
        raise InputError(f"not a demo model: its resampler has {slots} query slots, the demo's character slots "
                         f"end at {FIRST_CHAR_SLOT + MAX_CHARS}")

    @torch.no_grad()
    def run(view: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, tgt = dv.tower_input([view], torch.device("cpu"))
        patches = model.vpm.encode_slices(pixels, tgt, batch_size=1)  # [1, L, Dv]
        return patches[0].float(), model.resampler(patches, tgt, None)[0].float()  # [L, Dv], [Q, H]

    return run


def _targets(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text: its character ids per slot (0 past its end) [N, 12] and its length [N]."""
    chars = [[1 + ALPHABET.index(c) for c in t] + [0] * (MAX_CHARS - len(t)) for t in texts]
    return torch.tensor(chars), torch.tensor([len(t) for t in texts])


def training_pictures(n: int, seed: int) -> tuple[list[Any], list[str], list[torch.Tensor]]:
    """The views of ``n`` one-line text pictures of the training generator, their strings and the
    character under each patch of the view (0: none) [L]."""
    rng = random.Random(seed)
    views, texts, labels = [], [], []
    for _ in range(n):
        scene = syn.make_scene(rng, "text", lines=1, size=syn.canvas_size(rng))
        img, masks = syn.render(scene, masks=True)
        views.append(syn.view_of(img))
        texts.append(scene.text or "")
        labels.append(torch.from_numpy(syn.patch_labels(scene, masks, views[-1].size)["char"]))
    return views, texts, labels


def evaluation_pictures(n: int, seed: int) -> tuple[list[Any], list[str]]:
    """The views of ``n`` reading pictures of the independent evaluation and their strings."""
    rng, fonts = random.Random(seed), de.eval_fonts()
    items = [de._reading_item(rng, fonts) for _ in range(n)]
    return [syn.view_of(it.images[0].convert("RGB")) for it in items], [it.answer for it in items]


class Probe(nn.Module):
    """A normalisation and two linear heads over frozen slot vectors."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.char = nn.Linear(width, 1 + len(ALPHABET))
        self.length = nn.Linear(width, 1 + MAX_CHARS)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [N, Q, H] -> character logits [N, 12, C], length logits [N, 13]."""
        x = self.norm(feats)
        return self.char(x[:, FIRST_CHAR_SLOT:FIRST_CHAR_SLOT + MAX_CHARS]), self.length(x[:, 0])


def _full_batch(module: nn.Module, loss: Callable[[], torch.Tensor], steps: int) -> None:
    """``steps`` AdamW steps on ``loss()`` (every row at once: the probes' data fits in memory)."""
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(steps):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()


def fit(feats: torch.Tensor, texts: Sequence[str], steps: int = 1500, seed: int = 0) -> Probe:
    """Fit a probe on features [N, Q, H] of pictures showing ``texts``."""
    torch.manual_seed(seed)
    probe = Probe(feats.shape[-1])
    chars, lengths = _targets(texts)

    def loss() -> torch.Tensor:
        c, n = probe(feats)
        return F.cross_entropy(c.reshape(-1, c.shape[-1]), chars.reshape(-1)) + F.cross_entropy(n, lengths)

    _full_batch(probe, loss, steps)
    return probe


@torch.no_grad()
def score(probe: Probe, feats: torch.Tensor, texts: Sequence[str]) -> dict[str, float]:
    """Character accuracy over the real characters, length accuracy and exact strings (the
    predicted characters of the first ``predicted length`` slots, "none" dropped)."""
    c, n = probe(feats)
    chars, lengths = _targets(texts)
    pred, plen = c.argmax(-1), n.argmax(-1)  # [N, 12], [N]
    real = chars > 0
    read = ["".join(ALPHABET[i - 1] for i in row[:k] if i > 0) for row, k in zip(pred.tolist(), plen.tolist(),
                                                                                 strict=True)]
    return {"chars": float((pred == chars)[real].float().mean()), "length": float((plen == lengths).float().mean()),
            "exact": sum(r == t for r, t in zip(read, texts, strict=True)) / max(1, len(texts))}


def patch_characters(fit_rows: tuple[torch.Tensor, torch.Tensor], test_rows: tuple[torch.Tensor, torch.Tensor],
                     steps: int = 1500) -> float:
    """Accuracy of a linear read-out of the character under a patch: fitted on (features [N, Dv],
    characters [N]) of patches that hold one, scored on the other such rows."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.LayerNorm(fit_rows[0].shape[-1]), nn.Linear(fit_rows[0].shape[-1], 1 + len(ALPHABET)))
    _full_batch(head, lambda: F.cross_entropy(head(fit_rows[0]), fit_rows[1]), steps)
    with torch.no_grad():
        return float((head(test_rows[0]).argmax(-1) == test_rows[1]).float().mean())


def reading_probe(features: Features, *, fit_pictures: int = 2000, test_pictures: int = 300, seed: int = 5
                  ) -> dict[str, dict[str, float]]:
    """Fit on ``fit_pictures`` training pictures; score on held-out training and evaluation ones."""
    def encode(views: list[Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = [features(v) for v in views]
        return [o[0] for o in out], torch.stack([o[1] for o in out])  # each [L, Dv]; [N, Q, H]

    def char_rows(patches: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = torch.cat(patches), torch.cat(labels)  # [sum L, Dv], [sum L]
        return x[y > 0], y[y > 0]

    imgs, texts, labels = training_pictures(fit_pictures, seed)
    patches, slots = encode(imgs)
    probe = fit(slots, texts)
    held, held_texts, held_labels = training_pictures(test_pictures, seed + 1)
    held_patches, held_slots = encode(held)
    ev, ev_texts = evaluation_pictures(test_pictures, seed + 2)
    per_patch = patch_characters(char_rows(patches, labels), char_rows(held_patches, held_labels))
    return {"training generator": {**score(probe, held_slots, held_texts), "patch chars": per_patch},
            "evaluation": score(probe, encode(ev)[1], ev_texts)}


def main(argv: Sequence[str] | None = None) -> None:
    import minicpmv

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a demo model folder (a run's init/ after stage 1, or a finished model)")
    p.add_argument("--fit", type=int, default=2000, help="training pictures to fit the probe on")
    p.add_argument("--test", type=int, default=300, help="pictures of each test set")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.fit < 1 or args.test < 1:
        p.error("--fit and --test take a positive number of pictures")
    if args.threads is not None and args.threads < 1:
        p.error("--threads takes a positive number")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        features = model_features(minicpmv.load(args.model, dtype="float32").model.eval())
    except MiniCPMVError as e:
        raise SystemExit(f"error: {e}") from None
    for name, s in reading_probe(features, fit_pictures=args.fit, test_pictures=args.test).items():
        patch = f", characters per patch {s['patch chars']:.1%}" if "patch chars" in s else ""
        print(f"{name}: characters per slot {s['chars']:.1%}, length {s['length']:.1%}, "
              f"exact strings {s['exact']:.1%}{patch}")


if __name__ == "__main__":
    main()
