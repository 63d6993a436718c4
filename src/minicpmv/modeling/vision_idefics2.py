"""MiniCPM-Llama3-V 2.5's vision tower: Idefics2's SigLIP as the 2.5 wrapper calls it (spec 2.5 §3.3).

The weights, layers and numerics are those of the NaViT SigLIP tower (``vision_siglip.py``);
what differs is the call. The 2.5 wrapper hands every slice over as a single row of patches (the
processor's side-by-side layout), pads all slices of the request to the longest one, and builds
its ``patch_attention_mask`` with ``mask[i, :n] = True`` on a ``[B, 1, Lmax]`` tensor — which
indexes the size-1 middle axis and so marks *every* position valid. Measured against the
reference vectors, the consequences are:

* no attention mask: padded (zero-pixel) patches are ordinary keys for the real ones;
* position ids are computed for a ``1 x Lmax`` grid — only the first row of the 70x70 table is
  used, indexed by each patch's fractional position in the padded sequence;
* so a slice's features depend on the longest slice encoded with it (all slices of the call in
  one batch, no ``vision_batch_size`` chunking).

The spec text says padded patches are masked; the vectors show they are not, and this module
follows the vectors. It does not change the slices or the resampler (which gets the real
``h x w`` grids and masks padding properly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .vision_siglip import SiglipVisionTransformer, TgtSizes, _sizes_list, pack_slices


class Idefics2VisionTransformer(SiglipVisionTransformer):
    """``vpm`` of 2.5: NaViT SigLIP run on one unmasked batch of 1 x Lmax patch rows."""

    def encode_slices(
        self, pixel_values: Sequence[torch.Tensor], tgt_sizes: TgtSizes, *, batch_size: int = 16
    ) -> torch.Tensor:
        """All slices in one batch (``batch_size`` is ignored, as by the reference) -> [S, Lmax, Dv]."""
        sizes = _sizes_list(tgt_sizes)
        weight = self.embeddings.patch_embedding.weight
        slices = [pv.to(device=weight.device, dtype=weight.dtype) for pv in pixel_values]
        padded, mask = pack_slices(slices, sizes)  # [S, 3, P, Lmax*P], [S, 1, Lmax]
        lmax = mask.shape[-1]
        visible = torch.ones_like(mask)  # the reference's mask marks every position valid
        return self(padded, visible, [(1, lmax)] * len(sizes))  # [S, Lmax, Dv]
