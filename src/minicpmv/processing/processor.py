"""The processor: official-format conversations -> token ids, image bounds and pixel tensors.

For each conversation (spec §6-§8): flatten the messages (``flatten_messages``), render the
chat template, replace the k-th ``(<image>./</image>)`` tag by image k's placeholder, tokenize,
truncate, locate the ``<unk>`` runs (``image_bounds``), and slice + patchify every image in
processor order. 4.5 ``temporal_ids`` group consecutive video frames: only a group's first frame
gets a placeholder (the text before a skipped frame is ``.strip()``-ed, as in the reference),
slices are emitted group -> slice index -> frame, and one temporal id list is output per
(group, slice index); without ``temporal_ids`` 4.5 outputs ``[-1]`` per slice.

Deliberate difference from the reference: when truncation to ``max_length`` would cut into or
drop an image placeholder, a ContextLengthError is raised instead of silently producing
inputs whose image features no longer fit (text-only truncation is kept, with a warning).
Unbalanced image markers typed in the text raise PlaceholderMismatchError.

Batching helper: ``pad_left`` left-pads with id 0 and shifts the bounds (what the reference
does for batched chat()). No torch here; the model side turns these lists into tensors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import ProcessorConfig
from ..errors import (
    ConfigError,
    ContextLengthError,
    FeatureNotAvailableError,
    InputError,
    PlaceholderMismatchError,
    TokenizerError,
)
from ..versions import VersionSpec
from .chat_template import IMAGE_TAG, ChatTemplate, flatten_messages
from .image import image_content_hash, make_slices, to_patches
from .placeholders import image_placeholder
from .slicing import SlicePlan, plan_slices
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

Bound = tuple[int, int]


@dataclass
class ModelInputs:
    """Processor output, one entry per conversation (lists are unpadded; see ``pad_left``)."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]  # ids != 0 (the reference's id-0 quirk, spec §7)
    pixel_values: list[list[np.ndarray]]  # each [3, P, L*P] float32, processor order
    tgt_sizes: list[list[tuple[int, int]]]  # (h, w) in patches, one per pixel_values entry
    image_bounds: list[list[Bound]]  # [start, end) of each <unk> run
    temporal_ids: list[list[list[int]]] | None  # one id list per resampler entry (4.5 only)
    prompts: list[str]  # chat-template output, images as (<image>./</image>)
    expanded_prompts: list[str]  # the text that was tokenized
    slices: list[list[Image.Image]] = field(default_factory=list)  # per pixel_values entry
    image_hashes: list[list[str]] = field(default_factory=list)  # per image, message order

    def __len__(self) -> int:
        return len(self.input_ids)

    def padded(self, pad_id: int = 0) -> tuple[list[list[int]], list[list[int]], list[list[Bound]]]:
        """Left-padded ids, attention mask and shifted bounds of the whole batch."""
        return pad_left(self.input_ids, self.image_bounds, pad_id=pad_id)


def pad_left(
    input_ids: list[list[int]], image_bounds: list[list[Bound]] | None = None, *, pad_id: int = 0
) -> tuple[list[list[int]], list[list[int]], list[list[Bound]]]:
    """Left-pad every row to the longest one; return (ids, attention_mask, shifted bounds).

    The mask is 0 on padding and, as in the reference, on real tokens whose id is 0.
    """
    if image_bounds is not None and len(image_bounds) != len(input_ids):
        raise InputError(f"{len(input_ids)} id rows but {len(image_bounds)} bound rows")
    bounds_in = image_bounds if image_bounds is not None else [[] for _ in input_ids]
    longest = max((len(r) for r in input_ids), default=0)
    ids_out, mask_out, bounds_out = [], [], []
    for row, bounds in zip(input_ids, bounds_in, strict=True):
        pad = longest - len(row)
        ids_out.append([pad_id] * pad + list(row))
        mask_out.append([0] * pad + [int(t != 0) for t in row])
        bounds_out.append([(s + pad, e + pad) for s, e in bounds])
    return ids_out, mask_out, bounds_out


# ---------------------------------------------------------------------------- temporal ids


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def split_temporal_ids(temporal_ids: Any, n_conv: int) -> list[list[list[int]] | None]:
    """Per-conversation frame groups. A depth-2 list (groups of ints) means one conversation."""
    if temporal_ids is None:
        return [None] * n_conv
    if not isinstance(temporal_ids, (list, tuple)) or not temporal_ids:
        raise InputError(f"temporal_ids must be a non-empty list of frame groups, got {temporal_ids!r:.80}")
    depth3 = any(e is None or (isinstance(e, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in e))
                 for e in temporal_ids)
    per_conv = list(temporal_ids) if depth3 else [temporal_ids]
    if len(per_conv) != n_conv:
        raise InputError(
            f"temporal_ids has entries for {len(per_conv)} conversation(s) but {n_conv} were given; "
            "pass one list of frame groups per conversation"
        )
    return [None if groups is None else _check_groups(groups, i) for i, groups in enumerate(per_conv)]


def _check_groups(groups: Any, conv: int) -> list[list[int]]:
    where = f"temporal_ids of conversation {conv}"
    if not isinstance(groups, (list, tuple)):
        raise InputError(f"{where} must be a list of frame groups (lists of ints), got {groups!r:.80}")
    out = []
    for g, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or not group:
            raise InputError(f"{where}: group {g} must be a non-empty list of ints, got {group!r:.80}")
        if not all(_is_int(t) and t >= 0 for t in group):
            raise InputError(f"{where}: group {g} must hold non-negative integer time ids, got {group!r:.80}")
        out.append([int(t) for t in group])
    return out


def _frame_groups(groups: list[list[int]] | None, plans: list[SlicePlan], conv: int) -> list[range]:
    """Consecutive image index ranges, one per frame group (one per image without groups)."""
    if groups is None:
        return [range(i, i + 1) for i in range(len(plans))]
    total = sum(len(g) for g in groups)
    if total != len(plans):
        raise InputError(
            f"temporal_ids of conversation {conv} hold {total} frame ids but the conversation has "
            f"{len(plans)} image(s); give exactly one time id per image"
        )
    out, start = [], 0
    for g, group in enumerate(groups):
        frames = range(start, start + len(group))
        counts = {plans[i].num_slices for i in frames}
        if len(counts) != 1:
            raise InputError(
                f"temporal_ids of conversation {conv}: frames of group {g} yield different slice "
                f"counts {sorted(counts)}; use frames of one size or max_slice_nums=1"
            )
        out.append(frames)
        start += len(group)
    return out


# ---------------------------------------------------------------------------- per conversation


@dataclass
class _Options:
    system_prompt: str
    max_slice_nums: int
    use_image_id: bool
    enable_thinking: bool | None
    max_length: int


@dataclass
class _Conversation:
    prompt: str
    expanded: str
    ids: list[int]
    bounds: list[Bound]
    pixel_values: list[np.ndarray]
    tgt_sizes: list[tuple[int, int]]
    temporal: list[list[int]]
    slices: list[Image.Image]
    hashes: list[str]


def expand_placeholders(
    prompt: str, plans: list[SlicePlan], groups: list[range], cfg: ProcessorConfig, use_image_id: bool
) -> str:
    """Replace the k-th image tag by image k's placeholder (empty for skipped video frames)."""
    chunks = prompt.split(IMAGE_TAG)
    if len(chunks) - 1 != len(plans):
        raise PlaceholderMismatchError(
            f"the prompt has {len(chunks) - 1} '{IMAGE_TAG}' tag(s) but {len(plans)} image(s) were "
            "given; do not type the tag in message text, pass images as content items"
        )
    skipped = {i for frames in groups for i in frames if i != frames.start}
    parts = []
    for k, plan in enumerate(plans):
        if k in skipped:
            parts.append(chunks[k].strip())
            continue
        parts.append(chunks[k])
        parts.append(image_placeholder(plan, cfg, image_index=k if use_image_id else None))
    parts.append(chunks[-1])
    return "".join(parts)


class Processor:
    """Turns conversations into ``ModelInputs`` for one checkpoint (tokenizer + template + cfg)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | str, version: VersionSpec,
                 cfg: ProcessorConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
        self.version = version
        self.cfg = cfg if cfg is not None else ProcessorConfig()
        if not self.cfg.slice.slice_mode:
            raise FeatureNotAvailableError("preprocessor_config.json slice_mode=false is not supported")
        self._start_ids = {self._marker_id(self.cfg.im_start), self._marker_id(self.cfg.slice_start)}
        self._end_ids = {self._marker_id(self.cfg.im_end), self._marker_id(self.cfg.slice_end)}

    def _marker_id(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"image marker token {token!r} is not in the tokenizer vocabulary")
        return idx

    @classmethod
    def from_dir(cls, path: str | Path, version: VersionSpec,
                 default_cfg: ProcessorConfig | None = None) -> Processor:
        """Tokenizer files + preprocessor_config.json of a checkpoint (``default_cfg`` if absent)."""
        root = Path(path)
        tokenizer = Tokenizer.from_dir(root)
        cfg = _read_processor_config(root / "preprocessor_config.json", default_cfg)
        source = tokenizer.chat_template
        if source is None:
            log.info("%s has no chat template; using the built-in %s template", root, version.name)
            source = version.fallback_chat_template
        return cls(tokenizer, ChatTemplate(source), version, cfg)

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        conversations: list[Any],
        *,
        system_prompt: str = "",
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        temporal_ids: Any = None,
        enable_thinking: bool | None = None,
        max_length: int | None = None,
    ) -> ModelInputs:
        """Process a batch of official-format conversations (each a list of messages)."""
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise InputError("conversations must be a non-empty list of message lists")
        if isinstance(conversations[0], dict):
            raise InputError("conversations must be a list of conversations (each a list of messages); "
                             "wrap a single conversation in a list: processor([msgs])")
        opts = self._options(system_prompt, max_slice_nums, use_image_id, enable_thinking, max_length)
        if temporal_ids is not None and not self.version.temporal_resampler:
            raise InputError(f"temporal_ids are not supported by MiniCPM-V {self.version.name}")
        per_conv = split_temporal_ids(temporal_ids, len(conversations))
        results = [self._one(conv, opts, groups, i)
                   for i, (conv, groups) in enumerate(zip(conversations, per_conv, strict=True))]
        return self._collect(results)

    def _options(self, system_prompt: str, max_slice_nums: int | None, use_image_id: bool | None,
                 enable_thinking: bool | None, max_length: int | None) -> _Options:
        if enable_thinking and not self.version.supports_thinking:
            raise InputError(f"MiniCPM-V {self.version.name} has no thinking mode (enable_thinking)")
        length = self.version.max_inp_length if max_length is None else max_length
        if not _is_int(length) or length < 1:
            raise InputError(f"max_length must be a positive integer, got {length!r}")
        return _Options(
            system_prompt=system_prompt,
            max_slice_nums=self.cfg.slice.max_slice_nums if max_slice_nums is None else max_slice_nums,
            use_image_id=self.cfg.use_image_id if use_image_id is None else bool(use_image_id),
            enable_thinking=enable_thinking,
            max_length=int(length),
        )

    def render(self, messages: list[dict[str, str]], enable_thinking: bool | None = None) -> str:
        """The chat-template text, called as chat() calls apply_chat_template."""
        kwargs: dict[str, Any] = dict(self.tokenizer.special_tokens_map)
        if self.version.supports_thinking:
            kwargs["enable_thinking"] = bool(enable_thinking)  # chat() always passes it (False)
        return self.template.render(messages, add_generation_prompt=True, **kwargs)

    def _plan(self, img: Image.Image, max_slice_nums: int) -> SlicePlan:
        s = self.cfg.slice
        return plan_slices(img.size[0], img.size[1], max_slice_nums=max_slice_nums,
                           scale_resolution=s.scale_resolution, patch_size=s.patch_size)

    def _one(self, conv: Any, opts: _Options, groups: list[list[int]] | None, index: int) -> _Conversation:
        messages, images = flatten_messages(conv, system_prompt=opts.system_prompt)
        prompt = self.render(messages, opts.enable_thinking)
        plans = [self._plan(img, opts.max_slice_nums) for img in images]
        frames = _frame_groups(groups, plans, index)
        expanded = expand_placeholders(prompt, plans, frames, self.cfg, opts.use_image_id)
        order = [(i, s) for fr in frames for s in range(plans[fr.start].num_slices) for i in fr]
        ids = self._truncate(self.tokenizer.encode(expanded), opts.max_length, index)
        bounds = self.image_bounds(ids, expected=sum(plans[fr.start].num_slices for fr in frames))
        cut = [make_slices(img, plan) for img, plan in zip(images, plans, strict=True)]
        cfg, s = self.cfg, self.cfg.slice
        slices = [cut[i][k] for i, k in order]
        return _Conversation(
            prompt=prompt,
            expanded=expanded,
            ids=ids,
            bounds=bounds,
            pixel_values=[to_patches(im, s.patch_size, cfg.norm_mean, cfg.norm_std) for im in slices],
            tgt_sizes=[plans[i].tgt_sizes[k] for i, k in order],
            temporal=_temporal_output(groups, frames, plans),
            slices=slices,
            hashes=[image_content_hash(img) for img in images],
        )

    # ------------------------------------------------------------------ ids and bounds
    def _truncate(self, ids: list[int], max_length: int, index: int) -> list[int]:
        if len(ids) <= max_length:
            return ids
        spans = self._raw_bounds(ids)
        cut = [b for b in spans if b[1] >= max_length]
        if cut:
            raise ContextLengthError(
                f"conversation {index}: the prompt is {len(ids)} tokens but max_length is "
                f"{max_length}, and truncating would cut {len(cut)} of its {len(spans)} image "
                "placeholder block(s); shorten the text, use fewer images or a lower "
                "max_slice_nums, or raise max_length"
            )
        log.warning("conversation %d: prompt of %d tokens truncated to max_length=%d (text only)",
                    index, len(ids), max_length)
        return ids[:max_length]

    def _raw_bounds(self, ids: list[int]) -> list[Bound]:
        starts = [i + 1 for i, t in enumerate(ids) if t in self._start_ids]
        ends = [i for i, t in enumerate(ids) if t in self._end_ids]
        if len(starts) != len(ends) or any(s > e for s, e in zip(starts, ends, strict=True)):
            raise PlaceholderMismatchError(
                f"unbalanced image markers in the prompt ({len(starts)} opening, {len(ends)} "
                f"closing); the message text must not contain {self.cfg.im_start!r}, "
                f"{self.cfg.im_end!r}, {self.cfg.slice_start!r} or {self.cfg.slice_end!r}"
            )
        return list(zip(starts, ends, strict=True))

    def image_bounds(self, ids: list[int], *, expected: int | None = None) -> list[Bound]:
        """[start, end) of each <unk> run (spec §7), checked against the expected count and Q."""
        bounds = self._raw_bounds(ids)
        q = self.cfg.image_feature_size
        bad = [b for b in bounds if b[1] - b[0] != q]
        if (expected is not None and len(bounds) != expected) or bad:
            raise PlaceholderMismatchError(
                f"the prompt has {len(bounds)} image placeholder block(s) (expected {expected}, "
                f"each {q} tokens; wrong lengths: {bad[:3]}); the message text must not contain "
                "image marker tokens such as "
                f"{self.cfg.im_start!r} or {self.cfg.slice_start!r}"
            )
        return bounds

    # ------------------------------------------------------------------ batch
    def _collect(self, results: list[_Conversation]) -> ModelInputs:
        temporal = [r.temporal for r in results] if self.version.processor_temporal_ids else None
        return ModelInputs(
            input_ids=[r.ids for r in results],
            attention_mask=[[int(t != 0) for t in r.ids] for r in results],
            pixel_values=[r.pixel_values for r in results],
            tgt_sizes=[r.tgt_sizes for r in results],
            image_bounds=[r.bounds for r in results],
            temporal_ids=temporal,
            prompts=[r.prompt for r in results],
            expanded_prompts=[r.expanded for r in results],
            slices=[r.slices for r in results],
            image_hashes=[r.hashes for r in results],
        )


def _temporal_output(groups: list[list[int]] | None, frames: list[range],
                     plans: list[SlicePlan]) -> list[list[int]]:
    """One id list per resampler entry: the group's ids per (group, slice), else [-1] per slice."""
    if groups is None:
        return [[-1] for fr in frames for _ in range(plans[fr.start].num_slices)]
    return [list(g) for g, fr in zip(groups, frames, strict=True)
            for _ in range(plans[fr.start].num_slices)]


def _read_processor_config(path: Path, default: ProcessorConfig | None) -> ProcessorConfig:
    if not path.is_file():
        log.info("no %s; using default preprocessing settings", path.name)
        return default if default is not None else ProcessorConfig()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} cannot be read as JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return ProcessorConfig.from_hf_dict(data)
