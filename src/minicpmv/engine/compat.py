"""The one seam for the official implementation's quirks (spec §7, §9, §16).

Everything the reference ``chat()`` does that a clean design would not, in one place, so the
rest of the engine stays plain:

* the id-0 quirk, switched by ``id0_quirk`` everywhere (``chat()``, ``ChatSession``, the server
  config, the CLI): the prompt's attention mask hides every token with id 0 (in releases whose
  ``VersionSpec.prompt_masks_id0`` says so) and answers drop every generated id 0;
* answer post-processing (``postprocess``: drop id 0, a leading bos, a trailing terminator;
  decode; remove the release's ``strip_from_answer`` strings; ``.strip()`` where the release
  does) and the matching ``AnswerRules`` for streams;
* the rules of the reference's ``chat(stream=True)`` (word chunks, terminator strings removed,
  no id-0 handling, no strip);
* thinking mode: the guard (``thinking_flag``: what the chat template is told), the check that
  the release has it, and the ``<think>\\n`` prefix of answers.

The official sampling presets and their merge rule are ``SamplingParams.from_official``.
Nothing here runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError
from ..versions import VersionSpec
from .stream import AnswerRules


def prompt_hides_id0(version: VersionSpec, id0_quirk: bool) -> bool:
    """Whether the prompt's attention mask hides id-0 tokens for this release and switch."""
    return id0_quirk and version.prompt_masks_id0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Left-pad token rows into one LongTensor [B, T] (the reference pads with id 0); returns the
    pad length of each row."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    pads = []
    for b, row in enumerate(rows):
        pad = width - len(row)
        pads.append(pad)
        if row:
            out[b, pad:] = torch.tensor(list(row), dtype=torch.long)
    return out, pads


def shift_bounds(
    bounds: Sequence[Sequence[tuple[int, int]]], pad_lengths: Sequence[int]
) -> list[list[tuple[int, int]]]:
    """[start, end) placeholder spans of each row moved right by the row's left padding."""
    return [[(s + pad, e + pad) for s, e in row] for row, pad in zip(bounds, pad_lengths, strict=True)]


def attention_mask(input_ids: torch.Tensor, pad_lengths: Sequence[int], *, hide_id0: bool) -> torch.Tensor:
    """1 for visible tokens; 0 for left padding and, with ``hide_id0``, every token with id 0."""
    mask = torch.ones_like(input_ids)  # [B, T]
    for b, pad in enumerate(pad_lengths):
        mask[b, :pad] = 0
    if hide_id0:
        mask = mask * (input_ids != 0).long()
    return mask


def terminator_ids(version: VersionSpec, tokenizer: Any) -> tuple[int, ...]:
    """Ids of the release's terminator tokens that the vocabulary has (at least one)."""
    ids = tuple(i for i in (tokenizer.token_to_id(t) for t in version.terminators) if i is not None)
    if not ids:
        raise InputError(f"none of the terminator tokens {version.terminators} is in the vocabulary")
    return ids


def answer_rules(version: VersionSpec, tokenizer: Any, *, id0_quirk: bool) -> AnswerRules:
    """Stream rules that give the text ``postprocess`` returns for a finished answer."""
    hidden = set(terminator_ids(version, tokenizer))
    if id0_quirk:
        hidden.add(0)
    bos = tokenizer.bos_token_id
    return AnswerRules(
        hidden_ids=frozenset(hidden), leading_ids=frozenset() if bos is None else frozenset({bos}),
        strip_texts=tuple(version.strip_from_answer), strip=version.strip_answer,
    )


def official_stream_rules(version: VersionSpec, tokenizer: Any) -> AnswerRules:
    """The reference ``chat(stream=True)``: terminator strings removed from each chunk, no strip."""
    terms = terminator_ids(version, tokenizer)
    texts = [tokenizer.id_to_token(t) for t in terms] + list(version.strip_from_answer)
    return AnswerRules(hidden_ids=frozenset(terms), strip_texts=tuple(texts))


def postprocess(ids: Sequence[int], version: VersionSpec, tokenizer: Any, *, id0_quirk: bool) -> str:
    """The reference's returned text for one row of generated ids (spec §9.4)."""
    ids = [int(i) for i in ids if not (id0_quirk and int(i) == 0)]
    bos = tokenizer.bos_token_id
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    if ids and ids[-1] in terminator_ids(version, tokenizer):
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for needle in version.strip_from_answer:
        text = text.replace(needle, "")
    return text.strip() if version.strip_answer else text


def check_thinking(version: VersionSpec, enable_thinking: bool) -> None:
    """InputError when thinking mode is asked of a release without it."""
    if enable_thinking and not version.supports_thinking:
        raise InputError(f"{version.title} has no thinking mode (enable_thinking=True)")


def thinking_flag(version: VersionSpec, enable_thinking: bool) -> bool | None:
    """What the chat template is told: the flag for releases with thinking, None otherwise."""
    return bool(enable_thinking) if version.supports_thinking else None


def thinking_prefix(version: VersionSpec, enable_thinking: bool) -> str:
    """Text the reference puts before a thinking-mode answer (the prompt's ``<think>\\n``)."""
    return version.thinking_prefix if enable_thinking and version.supports_thinking else ""
