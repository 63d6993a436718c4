"""Fine-tuning data: official-format records -> token ids, labels and image slices.

A record is ``{"id", "image": path | {"<image_00>": path, ...}, "conversations": [{"role":
"user"|"assistant"|"system", "content": str}]}`` (the official MiniCPM-V fine-tuning format).
``<image>`` / ``<image_NN>`` markers in the text become images; a single image without a marker
goes before the first user text. Images are resolved relative to the data file.

Everything model-specific goes through the inference ``Processor``: the conversation is
processed exactly as chat() would (chat template, placeholder expansion, slicing), and the
generation prompt the processor appends is then cut off again, so the training text is the
template's rendering of the whole conversation. Labels cover only the assistant turns: each turn
starts after the template's own generation prompt (with the empty thinking block of 4.5 when the
answer has no reasoning, after ``<think>\\n`` when it has) and ends with the end-of-turn token
(inclusive). Samples longer than ``max_length`` are cut in text only; a sample whose cut would
fall inside an image span (or remove all supervised tokens) is skipped and counted.

This module does not run the model (see ``trainer.py``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ContextLengthError, InputError, TemplateError, TokenizerError
from ..processing.image import load_image
from ..processing.processor import Processor

log = logging.getLogger(__name__)

IGNORE = -100
_MARKER = re.compile(r"<image(?:_(\d+))?>")


@dataclass
class Sample:
    """One processed training conversation."""

    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE where not supervised
    pixel_values: list[np.ndarray]  # [3, P, L*P] per slice
    tgt_sizes: list[tuple[int, int]]
    bounds: list[tuple[int, int]]  # [start, end) of each image placeholder run
    entries: list[int] = field(default_factory=list)  # slices per resampler entry
    temporal: list[list[int]] = field(default_factory=list)  # temporal ids per entry

    @property
    def n_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class DatasetStats:
    total: int = 0
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON list of records in ``path`` (InputError with the reason otherwise)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"training data {p} cannot be read as JSON: {e}") from e
    if not isinstance(data, list) or not data:
        raise InputError(f"training data {p} must be a non-empty JSON list of records")
    return data


def _images_of(record: dict[str, Any], root: Path) -> dict[str, Image.Image]:
    raw = record.get("image")
    if raw is None:
        return {}
    named = {"<image>": raw} if isinstance(raw, str) else raw
    if not isinstance(named, dict):
        raise InputError(f"record {record.get('id')!r}: 'image' must be a path or a {{'<image_NN>': path}} dict")
    return {k: load_image(str(root / v)) for k, v in named.items()}


def _content_items(text: str, images: dict[str, Image.Image], used: set[str], rid: Any) -> list[Any]:
    items: list[Any] = []
    pos = 0
    for m in _MARKER.finditer(text):
        key = m.group(0)
        if key not in images:
            raise InputError(f"record {rid!r}: the text has {key} but the record has no such image")
        items.append(text[pos : m.start()].strip("\n"))
        items.append(images[key])
        used.add(key)
        pos = m.end()
    items.append(text[pos:].strip("\n") if items else text)
    return [x for x in items if not (isinstance(x, str) and x == "")]


def record_to_messages(record: dict[str, Any], root: Path) -> tuple[list[dict[str, Any]], str]:
    """Official record -> (chat() messages with PIL images, system prompt)."""
    rid = record.get("id")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise InputError(f"record {rid!r}: 'conversations' must be a non-empty list")
    images = _images_of(record, root)
    system = ""
    if conv[0].get("role") == "system":
        system, conv = str(conv[0].get("content", "")), conv[1:]
    used: set[str] = set()
    msgs = []
    for i, m in enumerate(conv):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise InputError(f"record {rid!r}: message {i} needs role user/assistant and string content")
        if role == "assistant" and _MARKER.search(content):
            raise InputError(f"record {rid!r}: image markers are only allowed in user messages")
        items = _content_items(content, images, used, rid) if role == "user" else [content]
        msgs.append({"role": role, "content": items})
    if len(images) == 1 and not used:  # the official rule: a lone image goes first
        msgs[0]["content"] = [next(iter(images.values())), *msgs[0]["content"]]
        used.update(images)
    if set(images) - used:
        raise InputError(f"record {rid!r}: images {sorted(set(images) - used)} are not referenced in the text")
    if not any(m["role"] == "assistant" for m in msgs):
        raise InputError(f"record {rid!r}: no assistant message to learn from")
    return msgs, system


class LabelBuilder:
    """Assistant-turn spans of a rendered conversation, derived from the checkpoint's template."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        tok = processor.tokenizer
        probe = [{"role": "user", "content": "x"}]
        kw = dict(tok.special_tokens_map)
        base = processor.template.render(probe, add_generation_prompt=False, **kw)
        heads = {self._suffix(processor.template.render(probe, add_generation_prompt=True, **kw), base)}
        if processor.version.supports_thinking:
            for flag in (False, True):
                text = processor.template.render(probe, add_generation_prompt=True, enable_thinking=flag, **kw)
                heads.add(self._suffix(text, base))
        self.header = min(heads, key=len)  # the bare assistant header
        self.heads = sorted(heads, key=len, reverse=True)  # longest match first
        self.gen_prompt = self._suffix(processor.render(probe), base)  # what the processor appends
        self.eot = [t for t in processor.version.terminators if tok.token_to_id(t) is not None]

    @staticmethod
    def _suffix(text: str, base: str) -> str:
        if not text.startswith(base) or len(text) == len(base):
            raise TemplateError("the chat template's generation prompt is not a suffix of the rendered history")
        return text[len(base):]

    def spans(self, text: str, n_assistant: int) -> list[tuple[int, int]]:
        """[start, end) character spans to supervise (assistant text + end-of-turn token)."""
        out = []
        pos = text.find(self.header)
        while pos >= 0:
            head = next(h for h in self.heads if text.startswith(h, pos))
            start = pos + len(head)
            ends = [(text.find(t, start), t) for t in self.eot]
            ends = [(e, t) for e, t in ends if e >= 0]
            if not ends:
                raise TemplateError("an assistant turn has no end-of-turn token in the rendered conversation")
            e, t = min(ends)
            out.append((start, e + len(t)))
            pos = text.find(self.header, e)
        if len(out) != n_assistant:
            raise TemplateError(f"found {len(out)} assistant turns in the rendered text, expected {n_assistant}")
        return out


def token_offsets(processor: Processor, ids: Sequence[int], expected: str) -> list[int]:
    """Character offset where each token starts in ``expected`` (the text ``ids`` encode)."""
    pieces = [processor.tokenizer.decode_bytes([i]) for i in ids]
    text = b"".join(pieces).decode("utf-8", errors="replace")
    if text != expected:
        raise TokenizerError("the tokens do not decode back to the training text, so label spans cannot be "
                             f"mapped to tokens ({processor.version.title})")
    starts, nbytes = [], 0
    byte_to_char = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])
    for piece in pieces:
        starts.append(int(np.searchsorted(byte_to_char, nbytes, side="right") - 1))
        nbytes += len(piece)
    return starts


def build_sample(processor: Processor, labels: LabelBuilder, record: dict[str, Any], root: Path,
                 max_length: int, max_slice_nums: int | None = None) -> Sample:
    """Process one record; raises ContextLengthError when it cannot fit ``max_length``."""
    msgs, system = record_to_messages(record, root)
    inputs = processor([msgs], system_prompt=system, max_length=10**9, max_slice_nums=max_slice_nums)
    ids, text = list(inputs.input_ids[0]), inputs.expanded_prompts[0]
    gen = processor.tokenizer.encode(labels.gen_prompt)
    if not text.endswith(labels.gen_prompt) or ids[-len(gen):] != gen:
        raise TemplateError("the processor's generation prompt could not be removed from the training text")
    ids, text = ids[: -len(gen)], text[: -len(labels.gen_prompt)]
    offsets = token_offsets(processor, ids, text)
    spans = labels.spans(text, sum(m["role"] == "assistant" for m in msgs))
    lab = [t if any(s <= o < e for s, e in spans) else IGNORE for t, o in zip(ids, offsets, strict=True)]
    bounds = [tuple(b) for b in inputs.image_bounds[0]]
    if len(ids) > max_length:
        if any(e > max_length for _, e in bounds):
            raise ContextLengthError(f"record {record.get('id')!r}: {len(ids)} tokens; cutting to "
                                     f"{max_length} would cut an image")
        ids, lab = ids[:max_length], lab[:max_length]
    if all(t == IGNORE for t in lab[1:]):
        raise ContextLengthError(f"record {record.get('id')!r}: no supervised token within {max_length} tokens")
    temporal = inputs.temporal_ids[0] if inputs.temporal_ids is not None else [[-1]] * len(bounds)
    return Sample(id=str(record.get("id", "")), input_ids=ids, labels=lab,
                  pixel_values=list(inputs.pixel_values[0]), tgt_sizes=list(inputs.tgt_sizes[0]),
                  bounds=bounds, entries=[len(t) for t in temporal], temporal=[list(t) for t in temporal])


def iter_samples(processor: Processor, path: str | Path, max_length: int, stats: DatasetStats, *,
                 max_slice_nums: int | None = None) -> Iterator[Sample]:
    """The samples of a data file one by one (the pictures of the ones not yet read are not held in
    memory); the ones too long for ``max_length`` are skipped and counted in ``stats``."""
    path = Path(path)
    records = read_records(path)
    lb = LabelBuilder(processor)
    stats.total += len(records)
    for rec in records:
        try:
            yield build_sample(processor, lb, rec, path.parent, max_length, max_slice_nums)
        except ContextLengthError as e:
            stats.skipped += 1
            stats.skipped_ids.append(str(rec.get("id")))
            log.warning("skipping sample: %s", e)


def check_skipped(stats: DatasetStats, max_length: int, max_skip_ratio: float = 0.05) -> None:
    """InputError if more than ``max_skip_ratio`` of the samples were skipped."""
    if stats.skipped > max_skip_ratio * stats.total:
        raise InputError(f"{stats.skipped} of {stats.total} samples do not fit max_length={max_length} "
                         f"(more than max_skip_ratio={max_skip_ratio}); raise --max-length or lower "
                         "--max-slice-nums")


def build_dataset(processor: Processor, path: str | Path, max_length: int, *, max_skip_ratio: float = 0.05,
                  max_slice_nums: int | None = None) -> tuple[list[Sample], DatasetStats]:
    """All samples of a data file; skipped ones counted; InputError if too many are skipped."""
    stats = DatasetStats()
    out = list(iter_samples(processor, path, max_length, stats, max_slice_nums=max_slice_nums))
    check_skipped(stats, max_length, max_skip_ratio)
    return out, stats


def format_sample(processor: Processor, sample: Sample) -> str:
    """The sample's text with supervised parts in ``[[...]]`` (image runs collapsed)."""
    tok = processor.tokenizer
    parts: list[str] = []
    i, n = 0, len(sample.input_ids)
    starts = {s: e for s, e in sample.bounds}
    while i < n:
        if i in starts:
            parts.append(f"<{starts[i] - i} image tokens>")
            i = starts[i]
            continue
        sup = sample.labels[i] != IGNORE
        j = i
        while j < n and (sample.labels[j] != IGNORE) == sup and j not in starts:
            j += 1
        chunk = tok.decode(sample.input_ids[i:j])
        parts.append(f"[[{chunk}]]" if sup else chunk)
        i = j
    return "".join(parts) + f"\n({sample.n_supervised} supervised of {n} tokens)"
