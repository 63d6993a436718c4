"""``ChatModel``: the official ``chat()`` contract on top of processor, model and generator.

This file wires the layers together: messages → ``Processor`` → image features → merged
embeddings → token generator → text, reproducing the reference's observable behaviour (spec
§8.2, §9): presets, the id-0 quirk (switchable), output post-processing, the thinking prefix and
streaming. It owns no per-conversation state (``ChatSession`` in ``session.py`` does). It does
not parse CLI arguments or HTTP requests.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..config import ModelConfig
from ..errors import ContextLengthError, FeatureNotAvailableError, InputError
from ..processing.processor import ModelInputs, Processor
from ..versions import VersionSpec
from .compat import official_generation_params
from .features import FeatureCache, entry_key, slice_digest
from .generate import GenerationParams, beam_search, generate_tokens
from .kv_cache import KVCache
from .stream import StreamDecoder

log = logging.getLogger(__name__)


@dataclass
class PreparedBatch:
    """Everything the generator needs for one call, plus what the caller may inspect."""

    inputs: ModelInputs
    input_ids: torch.Tensor  # [B, T] left-padded with 0
    attention_mask: torch.Tensor  # [B, T] 1 = visible key
    inputs_embeds: torch.Tensor  # [B, T, H]
    pad_lengths: list[int]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Left-pad token rows into one LongTensor [B, T]; returns the pad length of each row."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    pads = []
    for b, row in enumerate(rows):
        pad = width - len(row)
        pads.append(pad)
        if row:
            out[b, pad:] = torch.tensor(list(row), dtype=torch.long)
    return out, pads


def build_attention_mask(
    input_ids: torch.Tensor, pad_lengths: Sequence[int], *, mask_bang_token: bool
) -> torch.Tensor:
    """1 for visible tokens; 0 for left padding and (official quirk) every token with id 0."""
    mask = torch.ones_like(input_ids)  # [B, T]
    for b, pad in enumerate(pad_lengths):
        mask[b, :pad] = 0
    if mask_bang_token:
        mask = mask * (input_ids != 0).long()
    return mask


class ChatModel:
    """A loaded checkpoint: model weights, processor and version, with the official chat()."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Processor,
        version: VersionSpec,
        config: ModelConfig,
        *,
        path: str = "",
    ) -> None:
        self.model = model
        self.processor = processor
        self.version = version
        self.config = config
        self.path = path
        self.encoded_entries = 0  # resampler entries encoded so far; tests assert on it

    # ------------------------------------------------------------------ helpers
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def terminator_ids(self) -> tuple[int, ...]:
        ids = []
        for tok in self.version.terminators:
            tid = self.tokenizer.token_to_id(tok)
            if tid is not None:
                ids.append(tid)
        if not ids:
            raise InputError(f"none of the terminator tokens {self.version.terminators} is in the vocabulary")
        return tuple(ids)

    def encode_features(
        self, inputs: ModelInputs, cache: FeatureCache | None = None
    ) -> list[torch.Tensor | None]:
        """Resampler outputs per conversation ([n_b, Q, H] or None), encoding only cache misses.

        Keys come from the slices' digests (``slice_digest``). With the processor's lazy
        ``PatchList`` the float pixel tensors are made one vision chunk at a time, for the entries
        that miss only (other sequences already hold theirs).
        """
        pvs = inputs.pixel_values
        per_conv = [_entries_of(inputs, b) for b in range(len(pvs))]
        entries = [e for conv in per_conv for e in conv]
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
        start = 0
        for conv in per_conv:
            n = len(conv)
            out.append(torch.stack(found[start : start + n]) if n else None)  # type: ignore[misc]  # [n, Q, H]
            start += n
        return self._append_audio(inputs, out)

    def _append_audio(self, inputs: ModelInputs, feats: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """MiniCPM-o: each conversation's audio rows [T, H] after its image rows (flattened to
        [n*Q + T, H]), in the order of ``image_bounds + audio_bounds``. All clips of the batch are
        encoded together, as the reference does."""
        audio = getattr(inputs, "audio_features", None) or []
        if not any(audio):
            return feats
        rows = self.model.encode_audio([torch.from_numpy(a) for conv in audio for a in conv])  # [T_i, H]
        out: list[torch.Tensor | None] = []
        k = 0
        for b, f in enumerate(feats):
            n = len(audio[b])
            parts = ([f.reshape(-1, f.shape[-1])] if f is not None else []) + list(rows[k : k + n])
            k += n
            out.append(torch.cat([t.to(parts[0].dtype) for t in parts]) if parts else None)  # [rows, H]
        return out

    def prepare(
        self, conversations: list[list[dict[str, Any]]], *, mask_bang_token: bool = True, **proc_kwargs: Any
    ) -> PreparedBatch:
        inputs = self.processor(conversations, **proc_kwargs)
        features = self.encode_features(inputs)
        return self.prepare_from(inputs, features, mask_bang_token=mask_bang_token)

    def prepare_from(
        self, inputs: ModelInputs, features: list[torch.Tensor | None], *, mask_bang_token: bool = True
    ) -> PreparedBatch:
        ids, pads = left_pad(inputs.input_ids)
        limit = self.config.text.max_position_embeddings
        if ids.shape[1] >= limit:
            raise ContextLengthError(
                f"the prompt has {ids.shape[1]} tokens but the model's context is {limit} tokens; "
                "shorten the conversation or use fewer/smaller images (max_slice_nums)"
            )
        ids = ids.to(self.device)
        # 2.0 / 2.5 call generate() without an attention mask: no id-0 quirk there
        mask_bang_token = mask_bang_token and self.version.prompt_masks_id0
        mask = build_attention_mask(ids, pads, mask_bang_token=mask_bang_token)
        audio_bounds = getattr(inputs, "audio_bounds", None) or [[] for _ in pads]
        bounds = [[(s + pad, e + pad) for s, e in [*inputs.image_bounds[b], *audio_bounds[b]]]
                  for b, pad in enumerate(pads)]
        embeds = self.model.embed(ids, features, bounds)  # [B, T, H]
        return PreparedBatch(inputs, ids, mask, embeds, pads)

    def postprocess(self, ids: Sequence[int], *, mask_bang_token: bool = True) -> str:
        """Spec §9.4: drop id 0, a leading bos, a trailing terminator; decode; strip."""
        ids = [int(i) for i in ids if not (mask_bang_token and int(i) == 0)]
        bos = self.tokenizer.bos_token_id
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        if ids and ids[-1] in self.terminator_ids():
            ids = ids[:-1]
        text = _strip_all(self.tokenizer.decode(ids, skip_special_tokens=False), self.version.strip_from_answer)
        return text.strip() if self.version.strip_answer else text

    # ------------------------------------------------------------------ chat
    def chat(
        self,
        msgs: Any,
        image: Any = None,
        *,
        max_new_tokens: int = 2048,
        min_new_tokens: int = 0,
        sampling: bool = True,
        max_inp_length: int | None = None,
        system_prompt: str = "",
        stream: bool = False,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        temporal_ids: Any = None,
        enable_thinking: bool = False,
        mask_bang_token: bool = True,
        use_tts_template: bool = False,
        generate_audio: bool = False,
        **gen_kwargs: Any,
    ) -> str | list[str] | Iterator[str]:
        """Answer one conversation (a list of messages) or a batch (a list of conversations).

        Keyword arguments follow the official ``MiniCPMV.chat``; ``mask_bang_token=False`` turns
        off the reference's id-0 quirk (spec §16.1). Extra generation kwargs are merged like the
        reference does (see ``compat.py``); ``seed`` makes sampling reproducible. MiniCPM-o:
        ``msgs`` may hold audio clips (16 kHz mono numpy arrays or ``{"type": "audio", ...}``),
        ``use_tts_template`` selects the speech template, and ``generate_audio=True`` raises
        ``FeatureNotAvailableError`` (speech output is not implemented).
        """
        conversations, batched = normalise_msgs(msgs, image)
        if generate_audio:
            raise FeatureNotAvailableError(
                f"speech output (generate_audio=True) is not available yet for {self.version.title}: the TTS "
                "weights load but are not run; call chat() without generate_audio to get the text answer"
            )
        if enable_thinking and not self.version.supports_thinking:
            raise InputError(f"MiniCPM-V {self.version.name} has no thinking mode (enable_thinking=True)")
        params = official_generation_params(
            self.version,
            sampling=sampling,
            enable_thinking=enable_thinking,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_ids=self.terminator_ids(),
            overrides=gen_kwargs,
        )
        proc_kwargs = dict(
            system_prompt=system_prompt,
            max_slice_nums=max_slice_nums,
            use_image_id=use_image_id,
            temporal_ids=temporal_ids,
            enable_thinking=enable_thinking if self.version.supports_thinking else None,
            max_length=max_inp_length,
        )
        if use_tts_template:
            proc_kwargs["use_tts_template"] = True
        if stream:
            if batched:
                raise InputError("stream=True supports a single conversation, not a batch")
            # The reference's streaming path passes no attention mask, so the id-0 quirk is off there.
            return self._stream(conversations, params, proc_kwargs, enable_thinking)
        with torch.inference_mode():
            batch = self.prepare(conversations, mask_bang_token=mask_bang_token, **proc_kwargs)
            rows = self.generate_ids(batch, params)
        prefix = self.version.thinking_prefix if enable_thinking else ""
        answers = [prefix + self.postprocess(r, mask_bang_token=mask_bang_token) for r in rows]
        return answers if batched else answers[0]

    def generate_ids(
        self, batch: PreparedBatch, params: GenerationParams, cache: KVCache | None = None
    ) -> list[list[int]]:
        """Generated ids per row (new tokens only, finished rows padded with pad id like HF)."""
        if cache is None:
            cache = KVCache.for_model(self.model, batch.input_ids.shape[0])
        if params.num_beams > 1:
            return beam_search(self.model, batch.inputs_embeds, batch.attention_mask, params, cache=cache)
        steps = list(generate_tokens(self.model, batch.inputs_embeds, batch.attention_mask, params, cache=cache))
        if not steps:
            return [[] for _ in range(batch.input_ids.shape[0])]
        return torch.stack(steps, dim=1).tolist()  # [B, steps]

    def _stream(
        self,
        conversations: list[list[dict[str, Any]]],
        params: GenerationParams,
        proc_kwargs: dict[str, Any],
        enable_thinking: bool,
    ) -> Iterator[str]:
        terminators = set(self.terminator_ids())
        term_text = [self.tokenizer.id_to_token(t) for t in terminators] + list(self.version.strip_from_answer)

        def run() -> Iterator[str]:
            if enable_thinking:
                yield from self.version.thinking_prefix  # the reference streams it char by char
            with torch.inference_mode():
                batch = self.prepare(conversations, mask_bang_token=False, **proc_kwargs)
                cache = KVCache.for_model(self.model, 1)
                # word-boundary chunks, like the reference's TextIteratorStreamer
                decoder = StreamDecoder(
                    lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False), chunking="word"
                )
                for step in generate_tokens(
                    self.model, batch.inputs_embeds, batch.attention_mask, params, cache=cache
                ):
                    tok = int(step[0])
                    if tok in terminators:
                        break
                    delta = decoder.feed([tok])
                    if delta:
                        yield _strip_all(delta, term_text)
                tail = decoder.flush()
                if tail:
                    yield _strip_all(tail, term_text)

        return run()


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


class _Entry(NamedTuple):
    """One resampler entry of conversation ``conv``: its slice indices into ``pixel_values[conv]``,
    their tgt sizes and temporal ids."""

    conv: int
    slices: list[int]
    sizes: list[Any]
    temporal: list[int]


def _entries_of(inputs: ModelInputs, b: int) -> list[_Entry]:
    """Split conversation b's slices into resampler entries (one slice each, or 4.5's temporal groups)."""
    n_slices, sizes = len(inputs.pixel_values[b]), inputs.tgt_sizes[b]
    if len(sizes) != n_slices:
        raise InputError(f"conversation {b} has {n_slices} slices but {len(sizes)} tgt sizes")
    if inputs.temporal_ids is None:
        return [_Entry(b, [i], [sizes[i]], [-1]) for i in range(n_slices)]
    out, pos = [], 0
    for ids in inputs.temporal_ids[b] if n_slices else []:
        n = len(ids)
        out.append(_Entry(b, list(range(pos, pos + n)), list(sizes[pos : pos + n]), list(ids)))
        pos += n
    if pos != n_slices:
        raise InputError(f"temporal ids cover {pos} slices but the conversation has {n_slices}")
    return out


def _strip_all(text: str, needles: Sequence[str]) -> str:
    for n in needles:
        text = text.replace(n, "")
    return text


def normalise_msgs(msgs: Any, image: Any) -> tuple[list[list[dict[str, Any]]], bool]:
    """Official chat() input forms → a list of conversations (deep-copied) and a batched flag."""
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise InputError(f"msgs is a string but not valid JSON: {e}") from e
    if not isinstance(msgs, list) or not msgs:
        raise InputError("msgs must be a non-empty list of messages (or a list of such lists)")
    batched = isinstance(msgs[0], list)
    if batched and image is not None:
        raise InputError("image=... cannot be combined with a batch of conversations; put images in msgs")
    conversations = copy.deepcopy(msgs) if batched else [copy.deepcopy(msgs)]
    for conv in conversations:
        if not isinstance(conv, list) or not conv:
            raise InputError("every conversation must be a non-empty list of messages")
        for m in conv:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"a message must be a dict with 'role' and 'content', got {m!r:.80}")
    if image is not None and isinstance(conversations[0][0]["content"], str):
        conversations[0][0]["content"] = [image, conversations[0][0]["content"]]
    return conversations, batched
