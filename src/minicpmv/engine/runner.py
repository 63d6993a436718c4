"""``ModelRunner``: one loaded checkpoint, from processor output to generated ids and text.

The component every front end shares (``ChatModel``, ``ChatSession``, ``BatchEngine``):

* model inputs -> merged embeddings: resampler entries (one slice, or 4.5's frame groups with
  their temporal ids, as the processor lays them out) are looked up in a ``FeatureCache`` and
  only the misses are encoded, a vision batch at a time (pixel tensors are made per chunk);
  MiniCPM-o audio rows follow each conversation's image rows; rows are left-padded with the
  reference's attention mask (``compat``) and the features merged into the token embeddings;
* the token loop over a KV cache (greedy / sampling / beam) with the release's terminators, in
  the runner's ``decode_mode`` (eager by default; static shapes / compiled steps on request);
* the release's answer rules (``compat``) as a ``TextStream`` or a finished string.

It owns no per-conversation state and parses no chat() keywords (``ChatModel`` does).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ContextLengthError, InputError
from ..processing.processor import ModelInputs, Processor
from ..versions import VersionSpec
from . import compat
from .beam import beam_search
from .features import FeatureCache, entry_key, slice_digest
from .generate import DecodeMode, StepOutput, generate_steps
from .kv_cache import KVCache
from .sampling import SamplingParams
from .stream import AnswerRules, TextStream


@dataclass
class PreparedBatch:
    """What the token loop needs for one call, plus what the caller may inspect."""

    inputs: ModelInputs
    input_ids: torch.Tensor  # [B, T] left-padded with 0
    attention_mask: torch.Tensor  # [B, T] 1 = visible key
    inputs_embeds: torch.Tensor  # [B, T, H]
    pad_lengths: list[int]


@dataclass(frozen=True)
class _Entry:
    """One resampler entry of conversation ``conv``: its slice indices, tgt sizes, temporal ids."""

    conv: int
    slices: range
    sizes: list[Any]
    temporal: list[int]


class ModelRunner:
    """See the module docstring. ``model`` is the ``MiniCPMV`` network."""

    def __init__(
        self, model: torch.nn.Module, processor: Processor, version: VersionSpec, config: ModelConfig,
        decode_mode: DecodeMode | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.version = version
        self.config = config
        self.decode_mode = decode_mode if decode_mode is not None else DecodeMode()  # how decode steps run
        self.eos_ids = compat.terminator_ids(version, processor.tokenizer)
        self.encoded_entries = 0  # resampler entries encoded so far; tests assert on it
        self._idle_caches: dict[int, KVCache] = {}  # static mode: one idle cache per row count
        self._pool_lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return int(self.config.text.max_position_embeddings)

    # ------------------------------------------------------------------ inputs -> embeddings
    def encode_features(self, inputs: ModelInputs, cache: FeatureCache | None = None) -> list[torch.Tensor | None]:
        """Per conversation its resampler outputs [n, Q, H] (MiniCPM-o with audio: all rows,
        [n*Q + audio rows, H]) or None; only cache misses are encoded."""
        pvs = inputs.pixel_values
        entries = [e for b in range(len(pvs)) for e in _entries_of(inputs, b)]
        keys = [entry_key([slice_digest(pvs[e.conv], i) for i in e.slices], e.sizes, e.temporal)
                if cache is not None else None for e in entries]
        found = [cache.get(k) if cache is not None and k is not None else None for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        for chunk in _chunks(todo, [len(e.slices) for e in entries], self.config.vision_batch_size):
            group = [entries[j] for j in chunk]
            pv = [torch.from_numpy(pvs[e.conv][i]) for e in group for i in e.slices]  # made here, per chunk
            sizes = torch.tensor([s for e in group for s in e.sizes], dtype=torch.long)  # [S, 2]
            tids = [list(e.temporal) for e in group] if self.config.resampler.temporal else None
            feats = self.model.encode_images(pv, sizes, tids)  # [len(chunk), Q, H]
            self.encoded_entries += len(chunk)
            for n, j in enumerate(chunk):
                found[j] = feats[n]
                if cache is not None:
                    cache.put(keys[j], feats[n])  # type: ignore[arg-type]
        out: list[torch.Tensor | None] = []
        for b in range(len(pvs)):
            mine = [found[i] for i, e in enumerate(entries) if e.conv == b]
            out.append(torch.stack(mine) if mine else None)  # type: ignore[arg-type]  # [n, Q, H]
        return self._append_audio(inputs, out)

    def _append_audio(self, inputs: ModelInputs, feats: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """MiniCPM-o: each conversation's audio rows [T, H] after its image rows, in the order of
        ``image_bounds + audio_bounds``. All clips of the batch are encoded together, as the
        reference does."""
        audio = inputs.audio_features or []
        if not any(audio):
            return feats
        rows = self.model.encode_audio([torch.from_numpy(a) for conv in audio for a in conv])  # [T_i, H]
        out: list[torch.Tensor | None] = []
        k = 0
        for b, f in enumerate(feats):
            n = len(audio[b])
            parts = ([f.reshape(-1, f.shape[-1])] if f is not None else []) + list(rows[k : k + n])
            k += n
            out.append(torch.cat([t.to(device=parts[0].device, dtype=parts[0].dtype) for t in parts])
                       if parts else None)  # [rows, H]; the parts may come from different devices
        return out

    def prepare(
        self, inputs: ModelInputs, *, feature_cache: FeatureCache | None = None, id0_quirk: bool = True,
        features: list[torch.Tensor | None] | None = None,
    ) -> PreparedBatch:
        """Left-padded ids, the reference's attention mask and merged embeddings of a batch
        (``features``: ``encode_features``' result when the caller already has it)."""
        if features is None:
            features = self.encode_features(inputs, feature_cache)
        ids, pads = compat.left_pad(inputs.input_ids)
        if ids.shape[1] >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {ids.shape[1]} tokens but the model's context is {self.context_length} "
                "tokens; shorten the conversation or use fewer/smaller images (max_slice_nums)")
        ids = ids.to(self.device)
        mask = compat.attention_mask(ids, pads, hide_id0=compat.prompt_hides_id0(self.version, id0_quirk))
        audio_bounds = inputs.audio_bounds or [[] for _ in pads]
        bounds = compat.shift_bounds([[*i, *a] for i, a in zip(inputs.image_bounds, audio_bounds, strict=True)], pads)
        embeds = self.model.embed(ids, features, bounds)  # [B, T, H]
        return PreparedBatch(inputs, ids, mask, embeds, pads)

    # ------------------------------------------------------------------ ids
    def new_cache(self, rows: int) -> KVCache:
        """A cache for ``rows`` sequences: dynamic, or static (``decode_mode.capacity``) in a static mode."""
        mode = self.decode_mode
        return KVCache.for_model(self.model, rows, capacity=mode.capacity if mode.static else None)

    def steps(
        self, batch: PreparedBatch, params: SamplingParams, cache: KVCache | None = None, *, reused: int = 0
    ) -> Iterator[StepOutput]:
        """Greedy / sampled steps; ``reused`` leading positions are already in ``cache``.

        Without a ``cache``, a static mode borrows one of the runner's idle static caches and gives
        it back when the steps end: the same buffers serve call after call, so a CUDA graph
        recorded over them is replayed instead of recorded again."""
        embeds = batch.inputs_embeds[:, reused:]  # [B, T_new, H]
        if cache is not None or not self.decode_mode.static:
            return generate_steps(self.model, embeds, batch.attention_mask, params, eos_ids=self.eos_ids,
                                  cache=cache if cache is not None else self.new_cache(embeds.shape[0]),
                                  mode=self.decode_mode)
        return self._pooled_steps(embeds, batch.attention_mask, params)

    def _pooled_steps(self, embeds: torch.Tensor, mask: torch.Tensor, params: SamplingParams) -> Iterator[StepOutput]:
        rows = embeds.shape[0]
        with self._pool_lock:
            cache = self._idle_caches.pop(rows, None)
        if cache is None:
            cache = self.new_cache(rows)
        cache.crop(0)
        try:
            yield from generate_steps(self.model, embeds, mask, params, eos_ids=self.eos_ids, cache=cache,
                                      mode=self.decode_mode)
        finally:
            with self._pool_lock:
                self._idle_caches[rows] = cache

    def generate_ids(self, batch: PreparedBatch, params: SamplingParams) -> list[list[int]]:
        """Generated ids per row (new tokens only; finished rows padded as transformers pads them)."""
        if params.num_beams > 1:
            return beam_search(self.model, batch.inputs_embeds, batch.attention_mask, params,  # beams: dynamic
                               eos_ids=self.eos_ids, cache=KVCache.for_model(self.model, batch.input_ids.shape[0]))
        steps = [s.tokens for s in self.steps(batch, params)]
        return torch.stack(steps, dim=1).tolist()  # [B, steps]

    # ------------------------------------------------------------------ text
    def answer_rules(self, *, id0_quirk: bool) -> AnswerRules:
        return compat.answer_rules(self.version, self.tokenizer, id0_quirk=id0_quirk)

    def text_stream(self, *, id0_quirk: bool, thinking: bool = False, stops: Sequence[str] = ()) -> TextStream:
        """A stream giving the text ``postprocess`` returns (thinking: split at ``</think>``)."""
        return TextStream(self.decode, self.answer_rules(id0_quirk=id0_quirk), thinking=thinking, stops=stops)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def postprocess(self, ids: Sequence[int], *, id0_quirk: bool = True) -> str:
        return compat.postprocess(ids, self.version, self.tokenizer, id0_quirk=id0_quirk)


def _entries_of(inputs: ModelInputs, b: int) -> list[_Entry]:
    """Conversation b's resampler entries as the processor laid them out."""
    sizes, entries = inputs.tgt_sizes[b], inputs.entries[b]
    n_slices = len(inputs.pixel_values[b])
    if len(sizes) != n_slices or sum(n for _, n in entries) != n_slices:
        raise InputError(f"conversation {b} has {n_slices} slices but {len(sizes)} tgt sizes and "
                         f"{sum(n for _, n in entries)} slices in its resampler entries")
    temporal = inputs.temporal_ids[b] if inputs.temporal_ids is not None else [[-1]] * len(entries)
    if len(temporal) != len(entries):
        raise InputError(f"conversation {b} has {len(entries)} resampler entries but {len(temporal)} temporal ids")
    return [_Entry(b, range(start, start + n), list(sizes[start : start + n]), list(t))
            for (start, n), t in zip(entries, temporal, strict=True)]


def _chunks(todo: list[int], slice_counts: list[int], batch: int) -> Iterator[list[int]]:
    """Consecutive runs of ``todo`` entries holding at most ``batch`` slices (at least one entry
    each), so that the vision activations of many images or video frames are never all alive."""
    run: list[int] = []
    held = 0
    for i in todo:
        if run and held + slice_counts[i] > batch:
            yield run
            run, held = [], 0
        run.append(i)
        held += slice_counts[i]
    if run:
        yield run
