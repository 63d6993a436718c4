"""How much of the reading a demo model's picture features carry, without training stage 2.

A linear probe on the frozen output of the tower and resampler (the 32 vectors the LLM reads):
one shared head maps each character slot (``char:0`` .. ``char:11``) to its character or "none",
one head maps slot 0 to the text's length. Fitted on pictures of the training generator, it is
scored on held-out ones and on the independent evaluation's reading pictures, per character and
per whole string. Stage 2 reads these same vectors, so the probe's exact-string rate is roughly
what reading can reach after it (an LLM is not linear, so not a strict bound).

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

from ..errors import MiniCPMVError
from . import demo_eval as de
from . import demo_vision as dv
from . import synthetic as syn
from .demo_world import ALPHABET, MAX_CHARS

FIRST_CHAR_SLOT = syn.SLOT_NAMES.index("char:0")

# picture -> its features [Q, H]
Features = Callable[[Any], torch.Tensor]


def model_features(model: Any) -> Features:
    """The frozen tower + resampler of ``model`` on the single ~224 view the demo model sees."""

    @torch.no_grad()
    def run(img: Any) -> torch.Tensor:
        pixels, tgt = dv.tower_input([syn.view_of(img.convert("RGB"))], torch.device("cpu"))
        patches = model.vpm.encode_slices(pixels, tgt, batch_size=1)  # [1, L, Dv]
        return model.resampler(patches, tgt, None)[0].float()  # [Q, H]

    return run


def _targets(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text: its character ids per slot (0 past its end) [N, 12] and its length [N]."""
    chars = [[1 + ALPHABET.index(c) for c in t] + [0] * (MAX_CHARS - len(t)) for t in texts]
    return torch.tensor(chars), torch.tensor([len(t) for t in texts])


def training_pictures(n: int, seed: int) -> tuple[list[Any], list[str]]:
    """``n`` one-line text pictures of the training generator and their strings."""
    rng = random.Random(seed)
    scenes = [syn.make_scene(rng, "text", lines=1, size=syn.canvas_size(rng)) for _ in range(n)]
    return [syn.render(s) for s in scenes], [s.text or "" for s in scenes]


def evaluation_pictures(n: int, seed: int) -> tuple[list[Any], list[str]]:
    """``n`` reading pictures of the independent evaluation and their strings."""
    rng, fonts = random.Random(seed), de.eval_fonts()
    items = [de._reading_item(rng, fonts) for _ in range(n)]
    return [it.images[0] for it in items], [it.answer for it in items]


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


def fit(feats: torch.Tensor, texts: Sequence[str], steps: int = 1500, seed: int = 0) -> Probe:
    """Fit a probe on features [N, Q, H] of pictures showing ``texts`` (full batch, AdamW)."""
    torch.manual_seed(seed)
    probe = Probe(feats.shape[-1])
    chars, lengths = _targets(texts)
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(steps):
        c, n = probe(feats)
        loss = F.cross_entropy(c.reshape(-1, c.shape[-1]), chars.reshape(-1)) + F.cross_entropy(n, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
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


def reading_probe(features: Features, *, fit_pictures: int = 2000, test_pictures: int = 300, seed: int = 5
                  ) -> dict[str, dict[str, float]]:
    """Fit on ``fit_pictures`` training pictures; score on held-out training and evaluation ones."""
    def encode(pics: list[Any]) -> torch.Tensor:
        return torch.stack([features(p) for p in pics])  # [N, Q, H]

    imgs, texts = training_pictures(fit_pictures, seed)
    probe = fit(encode(imgs), texts)
    held, held_texts = training_pictures(test_pictures, seed + 1)
    ev, ev_texts = evaluation_pictures(test_pictures, seed + 2)
    return {"training generator": score(probe, encode(held), held_texts),
            "evaluation": score(probe, encode(ev), ev_texts)}


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
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = minicpmv.load(args.model, dtype="float32").model.eval()
    except MiniCPMVError as e:
        raise SystemExit(f"error: {e}") from None
    for name, s in reading_probe(model_features(model), fit_pictures=args.fit, test_pictures=args.test).items():
        print(f"{name}: characters {s['chars']:.1%}, length {s['length']:.1%}, exact strings {s['exact']:.1%}")


if __name__ == "__main__":
    main()
