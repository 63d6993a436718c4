"""The top-level MiniCPM-V module: LLM backbone + SigLIP vision tower + resampler (spec §1, §9.1).

``MiniCPMV`` owns the three checkpoint children (``llm``, ``vpm``, ``resampler``), turns image
slices into LLM-width features (``encode_images``), merges them into the token embeddings at the
placeholder positions (``embed``) and runs the LLM (``forward``). It does not tokenize, slice
images, build prompts, sample tokens or load weights (see ``processing``, ``engine``,
``loading``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import InputError, PlaceholderMismatchError
from .layers import KVCacheProtocol
from .llm import build_backbone
from .resampler import Resampler
from .vision_siglip import SiglipVisionTransformer, pack_slices

Bounds = Sequence[Sequence[tuple[int, int]]]


class MiniCPMV(nn.Module):
    """MiniCPM-V 2.6 / 4.5 model; parameter names equal the official checkpoint keys."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.llm = build_backbone(cfg.text)
        self.vpm = SiglipVisionTransformer(cfg.vision, cfg.vision_layers_used)
        self.resampler = Resampler(cfg.resampler)

    # -- properties used by the engine ---------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.config.text.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.text.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.config.text.head_dim

    @property
    def vocab_size(self) -> int:
        return self.config.text.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.text.hidden_size

    @property
    def query_num(self) -> int:
        return self.config.query_num

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    # -- vision path ---------------------------------------------------------------------------

    def encode_images(
        self,
        pixel_values: Sequence[torch.Tensor],
        tgt_sizes: torch.Tensor,
        temporal_ids: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Slices [3, P, L*P] (any dtype/device) + tgt_sizes [S, 2] (h, w) -> features [N, Q, H].

        All slices are padded to one Lmax and run through the vision tower in chunks of
        ``vision_batch_size``; the resampler then runs once on all of them (N = S, or the
        number of ``temporal_ids`` entries for 4.5 temporal grouping).
        """
        if len(pixel_values) == 0:
            raise InputError("encode_images needs at least one slice")
        vis_w = self.vpm.embeddings.patch_embedding.weight
        tgt = torch.as_tensor(tgt_sizes, dtype=torch.long)
        if tgt.dim() != 2 or tgt.shape != (len(pixel_values), 2):
            raise InputError(
                f"tgt_sizes must be [{len(pixel_values)}, 2] for {len(pixel_values)} slices, "
                f"got {tuple(tgt.shape)}"
            )
        slices = [pv.to(device=vis_w.device, dtype=vis_w.dtype) for pv in pixel_values]
        padded, mask = pack_slices(slices, tgt)  # [S, 3, P, Lmax*P], [S, 1, Lmax]
        step = max(int(self.config.vision_batch_size), 1)
        chunks = [
            self.vpm(padded[i : i + step], mask[i : i + step], tgt[i : i + step])  # [s, Lmax, Dv]
            for i in range(0, padded.shape[0], step)
        ]
        feats = torch.cat(chunks) if len(chunks) > 1 else chunks[0]  # [S, Lmax, Dv]
        return self.resampler(feats, tgt, temporal_ids)  # [N, Q, H]

    # -- embeddings ----------------------------------------------------------------------------

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., H] (no scaling, as Qwen2/Qwen3)."""
        emb = self.llm.model.embed_tokens
        return emb(ids.to(emb.weight.device))

    def embed(
        self,
        input_ids: torch.Tensor,
        features: Sequence[torch.Tensor | None],
        bounds: Bounds,
    ) -> torch.Tensor:
        """input_ids [B, T] -> embeddings [B, T, H] with image features scattered in.

        ``features[b]`` ([n_b, Q, H] or [n_b*Q, H], or None for a text-only row) replaces, in
        order, the rows ``concat(range(s, e) for (s, e) in bounds[b])``. Out-of-place, so
        gradients flow to both the token embeddings and the features.
        """
        emb = self.embed_tokens(input_ids)  # [B, T, H]
        if len(features) != emb.shape[0] or len(bounds) != emb.shape[0]:
            raise InputError(
                f"embed got {len(features)} feature entries and {len(bounds)} bound lists for a "
                f"batch of {emb.shape[0]}"
            )
        rows = []
        for b in range(emb.shape[0]):
            rows.append(self._scatter_row(emb[b], features[b], bounds[b], b))  # [T, H]
        return torch.stack(rows)  # [B, T, H]

    @staticmethod
    def _scatter_row(
        row: torch.Tensor, feats: torch.Tensor | None, bounds: Sequence[tuple[int, int]], b: int
    ) -> torch.Tensor:
        t, h = row.shape  # [T, H]
        positions = [p for s, e in bounds for p in range(int(s), int(e))]
        n_feat = 0 if feats is None else feats.numel() // h
        if feats is not None and feats.shape[-1] != h:
            raise InputError(f"conversation {b}: features have width {feats.shape[-1]}, LLM needs {h}")
        if len(positions) != n_feat:
            raise PlaceholderMismatchError(
                f"conversation {b}: {len(positions)} image placeholder positions but {n_feat} "
                "image feature rows; the prompt's placeholders do not match the images (was the "
                "prompt truncated, or does the text contain literal <image>/<slice> markers?)"
            )
        if n_feat == 0:
            return row
        if min(positions) < 0 or max(positions) >= t:
            raise InputError(f"conversation {b}: image bounds {list(bounds)} outside 0..{t}")
        idx = torch.tensor(positions, dtype=torch.long, device=row.device)  # [n_feat]
        flat = feats.reshape(n_feat, h).to(device=row.device, dtype=row.dtype)  # [n_feat, H]
        return row.index_put((idx,), flat)  # [T, H]

    # -- LLM -----------------------------------------------------------------------------------

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: KVCacheProtocol | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Run the LLM: inputs_embeds [B, T, H] -> float32 logits [B, 1 or T, V]."""
        return self.llm(inputs_embeds, position_ids, attention_mask, cache=cache, last_only=last_only)

    def forward_hidden(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: KVCacheProtocol | None = None,
    ) -> torch.Tensor:
        """Final LLM hidden states [B, T, H] (before ``lm_head``)."""
        return self.llm.forward_hidden(inputs_embeds, position_ids, attention_mask, cache)
