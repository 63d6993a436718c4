"""The processor: official-format conversations -> token ids, image bounds and pixel tensors.

For each conversation (spec §6-§8): flatten the messages (``flatten_messages``), render the
chat template, replace the k-th ``(<image>./</image>)`` tag by image k's placeholder, tokenize,
truncate, locate the ``<unk>`` runs (``image_bounds``), and slice + patchify every image in
processor order. 4.5 ``temporal_ids`` group consecutive video frames: only a group's first frame
gets a placeholder (the text before a skipped frame is ``.strip()``-ed, as in the reference),
slices are emitted group -> slice index -> frame, and one temporal id list is output per
(group, slice index); without ``temporal_ids`` 4.5 outputs ``[-1]`` per slice.

Video items (``Video`` / ``{"type": "video"}``) are expanded by ``flatten_conversation`` into
their sampled frames; the frames are sliced with the video's ``max_slice_nums`` and placed
without image ids (video override, else the call's explicit value, else the version's
``VideoPolicy``), and on 4.5 the recipe's frame groups become the temporal ids (other images of
the same conversation get ``[-1]``, as without temporal ids).

Deliberate difference from the reference: when truncation to ``max_length`` would cut into or
drop an image placeholder, a ContextLengthError is raised instead of silently producing
inputs whose image features no longer fit (text-only truncation is kept, with a warning).
Unbalanced image markers typed in the text raise PlaceholderMismatchError.

Each conversation's slices come with their resampler *entries* (``ModelInputs.entries``): one
slice each, or 4.5's frame groups (a group's frames, per slice index, are encoded together with
the group's temporal ids), computed here where the groups are known. Padding, attention masks
and the reference's id-0 quirk belong to the engine (``engine/compat.py``). No torch here; the
model side turns these lists into tensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..checks import is_int
from ..config import ProcessorConfig, read_json_object
from ..errors import (
    ConfigError,
    ContextLengthError,
    FeatureNotAvailableError,
    InputError,
    PlaceholderMismatchError,
    TokenizerError,
)
from ..versions import VersionSpec
from .audio import (
    AudioFeatureConfig,
    audio_token_count,
    check_waveform,
    clip_features,
    expand_audio_tags,
    extract_audio,
)
from .chat_template import IMAGE_TAG, ChatTemplate, FlatConversation, flatten_conversation
from .image import PatchList, image_content_hash, make_slices
from .placeholders import image_placeholder, placeholder_scheme
from .slicing import SlicePlan, plan_slices
from .tokenizer import Tokenizer
from .video import ImageChain

log = logging.getLogger(__name__)

Bound = tuple[int, int]
Entry = tuple[int, int]  # (first slice index, number of slices) of one resampler entry


@dataclass
class ModelInputs:
    """Processor output, one entry per conversation (lists are unpadded)."""

    input_ids: list[list[int]]
    pixel_values: list[Sequence[np.ndarray]]  # each [3, P, L*P] float32, processor order (PatchList)
    tgt_sizes: list[list[tuple[int, int]]]  # (h, w) in patches, one per pixel_values entry
    image_bounds: list[list[Bound]]  # [start, end) of each <unk> run
    temporal_ids: list[list[list[int]]] | None  # one id list per resampler entry (4.5 only)
    # (first slice, slice count) of each resampler entry, in placeholder order
    entries: list[list[Entry]]
    prompts: list[str]  # chat-template output, images as (<image>./</image>)
    expanded_prompts: list[str]  # the text that was tokenized
    slices: list[list[Image.Image]] = field(default_factory=list)  # per pixel_values entry
    image_hashes: list[list[str]] = field(default_factory=list)  # per image, message order
    # MiniCPM-o: log-mel segments [n_mels, frames] (30-s pieces of every clip, message order) and
    # the [start, end) rows of the audio placeholder groups; empty lists without audio
    audio_features: list[list[np.ndarray]] = field(default_factory=list)
    audio_bounds: list[list[Bound]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------- temporal ids


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
        if not all(is_int(t) and t >= 0 for t in group):
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
    slice_nums_given: int | None = None  # the call's explicit values (video frames follow them)
    image_id_given: bool | None = None
    tts_template: bool = False  # o2.6 use_tts_template (also implied by audio in the messages)
    chunk_input: bool = True  # o2.6: audio placeholders in 1-s groups


@dataclass
class _Conversation:
    prompt: str
    expanded: str
    ids: list[int]
    bounds: list[Bound]
    pixel_values: PatchList
    tgt_sizes: list[tuple[int, int]]
    temporal: list[list[int]]
    entries: list[Entry]
    slices: list[Image.Image]
    hashes: list[str]
    audio_features: list[np.ndarray] = field(default_factory=list)
    audio_bounds: list[Bound] = field(default_factory=list)


def expand_placeholders(
    prompt: str, plans: list[SlicePlan], groups: list[range], cfg: ProcessorConfig,
    use_image_id: bool | Sequence[bool], render: Any = image_placeholder,
) -> str:
    """Replace the k-th image tag by image k's placeholder (empty for skipped video frames).

    ``use_image_id`` is one flag for all images or one per image."""
    chunks = prompt.split(IMAGE_TAG)
    if len(chunks) - 1 != len(plans):
        raise PlaceholderMismatchError(
            f"the prompt has {len(chunks) - 1} '{IMAGE_TAG}' tag(s) but {len(plans)} image(s) were "
            "given; do not type the tag in message text, pass images as content items"
        )
    skipped = {i for frames in groups for i in frames if i != frames.start}
    with_ids = [use_image_id] * len(plans) if isinstance(use_image_id, bool) else list(use_image_id)
    parts = []
    for k, plan in enumerate(plans):
        if k in skipped:
            parts.append(chunks[k].strip())
            continue
        parts.append(chunks[k])
        parts.append(render(plan, cfg, image_index=k if with_ids[k] else None))
    parts.append(chunks[-1])
    return "".join(parts)


class Processor:
    """Turns conversations into ``ModelInputs`` for one checkpoint (tokenizer + template + cfg)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | str, version: VersionSpec,
                 cfg: ProcessorConfig | None = None, audio_cfg: AudioFeatureConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
        self.version = version
        self.cfg = cfg if cfg is not None else ProcessorConfig()
        if not self.cfg.slice.slice_mode:
            raise FeatureNotAvailableError("preprocessor_config.json slice_mode=false is not supported")
        self.scheme = placeholder_scheme(version.placeholder_scheme)
        self._start_ids = {self._marker_id(t) for t in self.scheme.start_markers(self.cfg)}
        self._end_ids = {self._marker_id(t) for t in self.scheme.end_markers(self.cfg)}
        self.audio_cfg = audio_cfg if audio_cfg is not None else AudioFeatureConfig()
        self.audio_template = ChatTemplate(version.audio_chat_template) if version.audio_chat_template else None

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
        audio_cfg = _read_audio_config(root / "preprocessor_config.json") if version.audio_input else None
        return cls(tokenizer, ChatTemplate(source), version, cfg, audio_cfg)

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
        use_tts_template: bool = False,
        chunk_input: bool = True,
    ) -> ModelInputs:
        """Process a batch of official-format conversations (each a list of messages).

        ``use_tts_template`` / ``chunk_input`` are MiniCPM-o's (speech template; 1-s audio groups)."""
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise InputError("conversations must be a non-empty list of message lists")
        if isinstance(conversations[0], dict):
            raise InputError("conversations must be a list of conversations (each a list of messages); "
                             "wrap a single conversation in a list: processor([msgs])")
        opts = self._options(system_prompt, max_slice_nums, use_image_id, enable_thinking, max_length)
        opts.tts_template, opts.chunk_input = bool(use_tts_template), bool(chunk_input)
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
        if not is_int(length) or length < 1:
            raise InputError(f"max_length must be a positive integer, got {length!r}")
        return _Options(
            system_prompt=system_prompt,
            max_slice_nums=self.cfg.slice.max_slice_nums if max_slice_nums is None else max_slice_nums,
            use_image_id=self.cfg.use_image_id if use_image_id is None else bool(use_image_id),
            enable_thinking=enable_thinking,
            max_length=int(length),
            slice_nums_given=max_slice_nums,
            image_id_given=use_image_id,
        )

    def render(self, messages: list[dict[str, str]], enable_thinking: bool | None = None,
               audio: bool = False, *, add_generation_prompt: bool = True) -> str:
        """The chat-template text, called as chat() calls apply_chat_template (``audio``: the
        release's audio template, o2.6's speech framing)."""
        kwargs: dict[str, Any] = dict(self.tokenizer.special_tokens_map)
        if self.version.supports_thinking:
            kwargs["enable_thinking"] = bool(enable_thinking)  # chat() always passes it (False)
        template = self.audio_template if audio and self.audio_template is not None else self.template
        return template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def _plan(self, size: tuple[int, int], max_slice_nums: int) -> SlicePlan:
        s = self.cfg.slice
        return plan_slices(size[0], size[1], max_slice_nums=max_slice_nums,
                           scale_resolution=s.scale_resolution, patch_size=s.patch_size)

    def prompt_inputs(
        self, prompt: str, images: Sequence[Image.Image] = (), clips: Sequence[np.ndarray] = (), *,
        max_slice_nums: int | None = None, use_image_id: bool | None = None, chunk_input: bool = True,
        max_length: int | None = None,
    ) -> ModelInputs:
        """One already-framed prompt (no chat template is applied) with its images and 16 kHz
        clips in the order of its ``(<image>./</image>)`` / ``(<audio>./</audio>)`` tags: the
        pieces of a live session (the official ``streaming_prefill`` calls the processor on its
        framed text). Placeholders, slicing, audio features and bounds as for a conversation."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        opts = self._options("", max_slice_nums, use_image_id, None, max_length)
        opts.chunk_input = bool(chunk_input)
        checked = [check_waveform(c, None, self.audio_cfg, f"audio clip {i}") for i, c in enumerate(clips)]
        if checked and not self.version.audio_input:
            raise InputError(f"{self.version.title} does not take audio input; use a MiniCPM-o checkpoint")
        flat = FlatConversation(messages=[], images=ImageChain([img.convert("RGB") for img in images]))
        self._check_image_count(len(flat.images), 0)
        return self._collect([self._expand(prompt, flat, checked, opts, None, 0)])

    def _one(self, conv: Any, opts: _Options, groups: list[list[int]] | None, index: int) -> _Conversation:
        conv, clips, system = self._split_inputs(conv, opts.system_prompt, index)
        flat = flatten_conversation(conv, system_prompt=system, video_policy=self.version.video)
        self._check_image_count(len(flat.images), index)
        prompt = self.render(flat.messages, opts.enable_thinking, audio=bool(clips) or opts.tts_template)
        return self._expand(prompt, flat, clips, opts, groups, index)

    def _expand(self, prompt: str, flat: FlatConversation, clips: list[np.ndarray], opts: _Options,
                groups: list[list[int]] | None, index: int) -> _Conversation:
        """A rendered prompt with its media -> placeholders, ids, bounds, slices, audio features."""
        images = flat.images
        slice_nums, with_ids = self._media_settings(flat, opts)
        plans = [self._plan(size, n) for size, n in zip(images.sizes(), slice_nums, strict=True)]
        groups = self._video_groups(flat, groups, index)
        frames = _frame_groups(groups, plans, index)
        expanded = expand_placeholders(prompt, plans, frames, self.cfg, with_ids, self.scheme.render)
        if clips:
            expanded = expand_audio_tags(expanded, clips, self.audio_cfg, chunked=opts.chunk_input)
        order = [(i, s) for fr in frames for s in range(plans[fr.start].num_slices) for i in fr]
        ids = self._truncate(self.tokenizer.encode(expanded), opts.max_length, index, _video_hint(flat))
        bounds = self.image_bounds(ids, expected=sum(plans[fr.start].num_slices for fr in frames))
        cut, hashes = [], []
        for img, plan in zip(images, plans, strict=True):  # one pass: video frames decode here
            cut.append(make_slices(img, plan))
            hashes.append(image_content_hash(img))
        cfg, s = self.cfg, self.cfg.slice
        slices = [cut[i][k] for i, k in order]
        return _Conversation(
            prompt=prompt,
            expanded=expanded,
            ids=ids,
            bounds=bounds,
            pixel_values=PatchList(slices, s.patch_size, cfg.norm_mean, cfg.norm_std),
            tgt_sizes=[plans[i].tgt_sizes[k] for i, k in order],
            temporal=_temporal_output(groups, frames, plans),
            entries=_entries(frames, plans),
            slices=slices,
            hashes=hashes,
            audio_features=[seg for clip in clips for seg in clip_features(clip, self.audio_cfg)],
            audio_bounds=self.audio_bounds(ids, clips, index),
        )

    # ------------------------------------------------------------------ older releases, audio
    def _split_inputs(self, conv: Any, system_prompt: str, index: int) -> tuple[Any, list[np.ndarray], str]:
        """Audio items out of the messages (o2.6), a leading system message into the system
        prompt (o2.6), and the version's system-prompt and audio rules."""
        if isinstance(conv, str):
            try:
                conv = json.loads(conv)
            except json.JSONDecodeError as e:
                raise InputError(f"conversation {index} is a string but not valid JSON: {e}") from e
        if not isinstance(conv, (list, tuple)):
            return conv, [], system_prompt  # flatten_conversation reports the error
        conv, clips = extract_audio(list(conv), self.audio_cfg)
        if clips and not self.version.audio_input:
            raise InputError(f"{self.version.title} does not take audio input; use a MiniCPM-o checkpoint")
        first = conv[0] if conv else None
        if self.version.system_role_in_msgs and isinstance(first, dict) and first.get("role") == "system":
            if system_prompt:
                raise InputError("give the system prompt as a system message or as system_prompt=..., not both")
            system_prompt = _system_text(first.get("content"), index)
            conv = conv[1:]
        if system_prompt and not self.version.system_prompt:
            raise InputError(f"{self.version.title} has no system prompt; put instructions in the user message")
        return conv, clips, system_prompt

    def _check_image_count(self, n: int, index: int) -> None:
        limit = self.version.max_images
        if limit is not None and n > limit:
            raise InputError(
                f"conversation {index} has {n} images but {self.version.title} accepts at most {limit} "
                "per conversation; ask about one image at a time"
            )

    def audio_bounds(self, ids: list[int], clips: list[np.ndarray], index: int) -> list[Bound]:
        """[start, end) of each audio placeholder group, checked against the clips' token counts."""
        if not clips:
            return []
        cfg = self.audio_cfg
        start, end = self._marker_id(cfg.audio_start), self._marker_id(cfg.audio_end)
        starts = [i + 1 for i, t in enumerate(ids) if t == start]
        ends = [i for i, t in enumerate(ids) if t == end]
        want = sum(audio_token_count(c.shape[0], cfg) for c in clips)
        got = sum(e - s for s, e in zip(starts, ends, strict=False))
        if len(starts) != len(ends) or got != want:
            raise PlaceholderMismatchError(
                f"conversation {index}: the prompt's audio placeholders hold {got} positions "
                f"({len(starts)} opening / {len(ends)} closing markers) but the audio needs {want}; "
                f"was the prompt truncated, or does the text contain {cfg.audio_start!r}?"
            )
        return list(zip(starts, ends, strict=True))

    def _media_settings(self, flat: FlatConversation, opts: _Options) -> tuple[list[int], list[bool]]:
        """max_slice_nums and use_image_id per image (video frames: see the module docstring)."""
        slice_nums = [opts.max_slice_nums] * len(flat.images)
        with_ids = [opts.use_image_id] * len(flat.images)
        policy = self.version.video
        for span in flat.videos:
            v, n = span.video, span.stop - span.start
            s = next(x for x in (v.max_slice_nums, opts.slice_nums_given, policy.max_slice_nums) if x is not None)
            u = next(x for x in (v.use_image_id, opts.image_id_given, policy.use_image_id) if x is not None)
            slice_nums[span.start : span.stop] = [int(s)] * n
            with_ids[span.start : span.stop] = [bool(u)] * n
        return slice_nums, with_ids

    def _video_groups(self, flat: FlatConversation, groups: list[list[int]] | None,
                      index: int) -> list[list[int]] | None:
        """4.5: the videos' frame groups, ``[-1]`` for every other image; else ``groups``."""
        if not flat.videos or not self.version.temporal_resampler:
            return groups
        if groups is not None:
            raise InputError(
                f"conversation {index}: temporal_ids cannot be combined with video items (the video "
                "recipe sets them); pass the frames as images to give your own temporal_ids"
            )
        out: list[list[int]] = []
        pos = 0
        for span in flat.videos:
            out.extend([-1] for _ in range(pos, span.start))
            n = span.stop - span.start
            out.extend(list(g) for g in (span.video.temporal_ids or [[-1]] * n))
            pos = span.stop
        out.extend([-1] for _ in range(pos, len(flat.images)))
        return out

    # ------------------------------------------------------------------ ids and bounds
    def _truncate(self, ids: list[int], max_length: int, index: int, hint: str | None = None) -> list[int]:
        if len(ids) <= max_length:
            return ids
        spans = self._raw_bounds(ids)
        cut = [b for b in spans if b[1] >= max_length]
        if cut:
            raise ContextLengthError(
                f"conversation {index}: the prompt is {len(ids)} tokens but max_length is "
                f"{max_length}, and truncating would cut {len(cut)} of its {len(spans)} image "
                "placeholder block(s); "
                + (hint or "shorten the text, use fewer images or a lower max_slice_nums, or raise max_length")
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
            pixel_values=[r.pixel_values for r in results],
            tgt_sizes=[r.tgt_sizes for r in results],
            image_bounds=[r.bounds for r in results],
            temporal_ids=temporal,
            entries=[r.entries for r in results],
            prompts=[r.prompt for r in results],
            expanded_prompts=[r.expanded for r in results],
            slices=[r.slices for r in results],
            image_hashes=[r.hashes for r in results],
            audio_features=[r.audio_features for r in results],
            audio_bounds=[r.audio_bounds for r in results],
        )


def _video_hint(flat: FlatConversation) -> str | None:
    if not flat.videos:
        return None
    n = sum(span.stop - span.start for span in flat.videos)
    return (f"its video(s) give {n} frames: lower the video's max_frames or fps, or its max_slice_nums "
            "(CLI: --max-frames, --fps, --max-slice-nums), or raise max_inp_length")


def _temporal_output(groups: list[list[int]] | None, frames: list[range],
                     plans: list[SlicePlan]) -> list[list[int]]:
    """One id list per resampler entry: the group's ids per (group, slice), else [-1] per slice."""
    if groups is None:
        return [[-1] for fr in frames for _ in range(plans[fr.start].num_slices)]
    return [list(g) for g, fr in zip(groups, frames, strict=True)
            for _ in range(plans[fr.start].num_slices)]


def _entries(frames: list[range], plans: list[SlicePlan]) -> list[Entry]:
    """Resampler entries in slice order (group -> slice index -> frame): each (group, slice
    index) is one entry of len(group) consecutive slices."""
    out, start = [], 0
    for fr in frames:
        for _ in range(plans[fr.start].num_slices):
            out.append((start, len(fr)))
            start += len(fr)
    return out


def _system_text(content: Any, index: int) -> str:
    """A system message's content (string, or strings / audio tags joined with "\n")."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and all(isinstance(c, str) for c in content):
        return "\n".join(content)
    raise InputError(f"conversation {index}: a system message may hold text and audio only")


def _read_audio_config(path: Path) -> AudioFeatureConfig:
    if not path.is_file():
        return AudioFeatureConfig()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} cannot be read as JSON: {e}") from e
    return AudioFeatureConfig.from_hf_dict(data if isinstance(data, dict) else {})


def _read_processor_config(path: Path, default: ProcessorConfig | None) -> ProcessorConfig:
    data = read_json_object(path)
    if data is None:
        log.info("no %s; using default preprocessing settings", path.name)
        return default if default is not None else ProcessorConfig()
    return ProcessorConfig.from_hf_dict(data)
