"""The top-level MiniCPM-V / MiniCPM-o module: LLM backbone + vision tower + resampler (+ audio).

``MiniCPMV`` owns the checkpoint children (``llm``, ``vpm``, ``resampler``; for MiniCPM-o also
``apm`` + ``audio_projection_layer`` and the speech head ``tts``), turns image slices into
LLM-width features (``encode_images``) and audio features into LLM rows (``encode_audio``),
merges them into the token embeddings at the placeholder positions (``embed``) and runs the LLM
(``forward``). Which backbone, vision tower and resampler variant are built is data of the
config (``ModelConfig.text.family``, ``vision_tower``, ``resampler.query_pos_embed``). It does
not tokenize, slice images, build prompts, sample tokens or load weights (see ``processing``,
``engine``, ``loading``); speech generation with ``tts`` is run by ``engine/speech.py``. Children may
live on different devices (``loading/device_map.py``): features move to the next child's device
where one hands over to another.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, FeatureNotAvailableError, InputError, PlaceholderMismatchError
from .audio_whisper import (
    AudioProjector,
    WhisperEncoder,
    audio_token_count,
    conv_output_frames,
    encoder_attention_mask,
    pad_segments,
)
from .layers import KVCacheProtocol, module_device
from .llm import build_backbone
from .resampler import build_resampler
from .tts import ConditionalChatTTS
from .vision_idefics2 import Idefics2VisionTransformer
from .vision_siglip import SiglipVisionTransformer
from .vision_siglip_timm import TimmSiglipVisionTransformer

Bounds = Sequence[Sequence[tuple[int, int]]]

# ModelConfig.vision_tower -> the ``vpm`` class (each has ``encode_slices``)
VISION_TOWERS: dict[str, type[nn.Module]] = {
    "navit": SiglipVisionTransformer,
    "idefics2": Idefics2VisionTransformer,
    "timm_siglip": TimmSiglipVisionTransformer,
}


class MiniCPMV(nn.Module):
    """MiniCPM-V / MiniCPM-o model of any release; parameter names equal the checkpoint keys."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.llm = build_backbone(cfg.text)
        tower = VISION_TOWERS.get(cfg.vision_tower)
        if tower is None:
            raise ConfigError(f"vision tower {cfg.vision_tower!r} is not implemented; known: {sorted(VISION_TOWERS)}")
        self.vpm = tower(cfg.vision, cfg.vision_layers_used)
        self.resampler = build_resampler(cfg.resampler)
        if cfg.audio is not None:
            self.apm = WhisperEncoder(cfg.audio)
            self.audio_projection_layer = AudioProjector(cfg.audio.projector_in_dim, cfg.text.hidden_size)
        if cfg.tts is not None:
            self.tts = ConditionalChatTTS(cfg.tts)

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
        """Where token ids are embedded (the input side of the LLM)."""
        return self.llm.model.embed_tokens.weight.device

    @property
    def layer_devices(self) -> list[torch.device]:
        """Each decoder layer's device (its KV cache rows live there)."""
        return [layer.device for layer in self.llm.model.layers]

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
        tgt = torch.as_tensor(tgt_sizes, dtype=torch.long)
        if tgt.dim() != 2 or tgt.shape != (len(pixel_values), 2):
            raise InputError(
                f"tgt_sizes must be [{len(pixel_values)}, 2] for {len(pixel_values)} slices, "
                f"got {tuple(tgt.shape)}"
            )
        feats = self.vpm.encode_slices(pixel_values, tgt, batch_size=self.config.vision_batch_size)
        return self.resampler(feats.to(module_device(self.resampler)), tgt, temporal_ids)  # [N, Q, H]

    # -- audio path (MiniCPM-o) ----------------------------------------------------------------

    def audio_hidden(self, segments: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Log-mel segments [n_mels, F_i] -> encoder last hidden state [n, ceil(Fmax/2), d] and F_i.

        All segments run as one zero-padded batch with the reference's mask (see audio_whisper).
        """
        audio = self.config.audio
        if audio is None:
            raise FeatureNotAvailableError("this checkpoint has no audio encoder (init_audio / audio_config)")
        w = self.apm.conv1.weight
        batch, frames = pad_segments([s.to(device=w.device, dtype=w.dtype) for s in segments])
        chunk = int(audio.chunk_length * 50) if audio.chunk_input else -1
        mask = encoder_attention_mask(frames, conv_output_frames(max(frames)), chunk)  # [n,1,T,T]
        return self.apm(batch, mask), frames  # [n, T, d]

    def encode_audio(self, segments: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Log-mel segments [n_mels, F_i] -> LLM rows per segment [T_i, H] (projected, pooled)."""
        hidden, frames = self.audio_hidden(segments)  # [n, T, d]
        step = self.config.audio.pool_step  # type: ignore[union-attr]
        emb = self.audio_projection_layer(hidden.to(module_device(self.audio_projection_layer)))  # [n, T, H]
        pooled = F.avg_pool1d(emb.transpose(1, 2), step, step).transpose(1, 2)  # [n, T//step, H]
        return [pooled[i, : audio_token_count(f, step)] for i, f in enumerate(frames)]

    def encode_audio_streaming(self, segment: torch.Tensor, cache: KVCacheProtocol) -> torch.Tensor:
        """One log-mel piece [n_mels, F] of a live audio stream -> LLM rows [T, H] (official
        ``get_audio_embedding_streaming``): the encoder continues ``cache`` (earlier pieces of
        the stream), then projection, pooling and the piece's token count as ``encode_audio``."""
        audio = self.config.audio
        if audio is None:
            raise FeatureNotAvailableError("this checkpoint has no audio encoder (init_audio / audio_config)")
        if segment.dim() != 2 or segment.shape[1] < 1:
            raise InputError(f"an audio piece must be log-mel [n_mels, frames], got {tuple(segment.shape)}")
        w = self.apm.conv1.weight
        hidden = self.apm(segment[None].to(device=w.device, dtype=w.dtype), None, cache)  # [1, T, d]
        emb = self.audio_projection_layer(hidden.to(module_device(self.audio_projection_layer)))  # [1, T, H]
        pooled = F.avg_pool1d(emb.transpose(1, 2), audio.pool_step, audio.pool_step).transpose(1, 2)  # [1, T/2, H]
        return pooled[0, : audio_token_count(int(segment.shape[1]), audio.pool_step)]  # [n, H]

    @property
    def audio_positions(self) -> int:
        """Encoder positions a streaming audio cache can hold (the Whisper position table)."""
        return int(self.apm.embed_positions.num_embeddings) if self.config.audio is not None else 0

    # -- embeddings ----------------------------------------------------------------------------

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [..., H] of tokens fed during decoding (the backbone applies any scaling)."""
        return self.llm.embed_input_ids(ids)

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
        emb = self.llm.embed_prompt_ids(input_ids)  # [B, T, H]
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
