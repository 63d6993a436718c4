"""The token loop: prefill, then one token per row per step, with transformers' semantics.

Two pieces every decoding path shares:

* ``choose_tokens(logits, rows, eos_ids)``: the step of each running sequence (a ``DecodeRow``:
  its settings, random generator and generated ids): logits processors, greedy choice or a draw,
  and whether the row finished (a terminator, a stop id, or its token limit). Rows sharing their
  settings are processed as one ``[R, V]`` batch.
* a decoder that turns chosen tokens into the next logits over a KV cache: ``DenseDecoder`` here
  (all rows share one length, left-padded, the layout of ``generate(inputs_embeds=...,
  attention_mask=...)``), the slot decoder of ``batch.py`` for continuous batching.

``generate_steps`` is the loop of a fixed batch (``chat()``, ``ChatSession``); finished rows keep
emitting ``PAD_ID`` as transformers does. ``BatchEngine`` runs the same ``choose_tokens`` over its
changing rows; beam search (``beam.py``) uses ``DenseDecoder`` and the same processors.

Positions follow transformers: prefill ``cumsum(mask) - 1`` with masked positions set to 1; each
later step appends a visible key and takes position ``(#visible so far) - 1``. Only embeddings
are given to the model, so the running ids start empty: processors see generated tokens only.
This module builds no attention masks inside the model, loads nothing and decodes no text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from .kv_cache import KVCache
from .sampling import SamplingParams, greedy_choice, make_generator, process_logits, sample_choice
from .stream import FinishReason

PAD_ID = 0  # what finished rows emit (the reference passes pad_token_id 0)


@dataclass
class DecodeRow:
    """One sequence being decoded: its settings, generator and what it generated so far."""

    params: SamplingParams
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int, eos_ids: Sequence[int]) -> FinishReason | None:
        """Record ``token``; return why the row finished with it (None: it goes on)."""
        self.generated.append(token)
        if token in eos_ids or token in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason


def choose_tokens(logits: torch.Tensor, rows: Sequence[DecodeRow], eos_ids: Sequence[int]) -> list[int]:
    """One token for each row from its raw logits ``[R, V]`` (float32); finished rows get
    ``PAD_ID`` (and keep their history aligned). Does not call ``accept``."""
    if _shared(rows):
        scores = process_logits(logits, _history(rows, logits.device), rows[0].params, eos_ids)  # [R, V]
        chosen = _pick(scores, rows)
    else:
        chosen = []
        for i, r in enumerate(rows):
            scores = process_logits(logits[i : i + 1], _history([r], logits.device), r.params, eos_ids)  # [1, V]
            chosen += _pick(scores, [r])
    return [PAD_ID if r.finished else t for r, t in zip(rows, chosen, strict=True)]


def _shared(rows: Sequence[DecodeRow]) -> bool:
    """True when one processor call serves every row (same settings, same history length)."""
    p, n = rows[0].params, len(rows[0].generated)
    if len(rows) > 1 and (p.presence_penalty or p.frequency_penalty):
        return False  # those penalties are computed one row at a time
    return all(r.params == p and len(r.generated) == n for r in rows)


def _history(rows: Sequence[DecodeRow], device: torch.device) -> torch.Tensor:
    """Generated ids [R, n] of rows of equal length; only the shape when no processor reads ids."""
    p, n = rows[0].params, len(rows[0].generated)
    if p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty:
        return torch.empty(len(rows), n, dtype=torch.long, device=device)  # min_new_tokens reads n only
    return torch.tensor([r.generated for r in rows], dtype=torch.long, device=device)


def _pick(scores: torch.Tensor, rows: Sequence[DecodeRow]) -> list[int]:
    """Argmax, or draws: rows sharing one generator (or torch's global one) draw together in
    row order, as transformers does for a batch; rows with their own generators draw alone."""
    if not rows[0].params.do_sample:
        return greedy_choice(scores).tolist()
    if all(r.generator is rows[0].generator for r in rows):
        return sample_choice(scores, rows[0].generator).tolist()
    return [int(sample_choice(scores[i : i + 1], r.generator)[0]) for i, r in enumerate(rows)]


def prefill_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF position ids for a (possibly padded) mask [B, L]: ``cumsum - 1``, masked entries = 1."""
    mask = attention_mask.long()
    pos = mask.cumsum(-1) - 1  # [B, L]
    return pos.masked_fill(mask == 0, 1)


def forward_last(model: Any, embeds: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """The model's float32 logits at the last position of each row: [B, V]."""
    with torch.no_grad():
        out = model.forward(embeds, pos, mask, cache=cache, last_only=True)  # [B, 1, V]
    return out[:, -1, :].float()


class DenseDecoder:
    """Rows of one length in a ``KVCache`` with a growing key mask ``[B, L]`` (1 = visible)."""

    def __init__(self, model: Any, cache: KVCache, mask: torch.Tensor) -> None:
        self.model, self.cache, self.mask = model, cache, mask

    @classmethod
    def start(
        cls, model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[DenseDecoder, torch.Tensor]:
        """Check shapes, make the cache if needed, prefill; return (decoder, logits [B, V])."""
        if inputs_embeds.dim() != 3:
            raise InputError(f"inputs_embeds must be [B, T, H], got shape {tuple(inputs_embeds.shape)}")
        b, t, _ = inputs_embeds.shape
        if t == 0:
            raise InputError("inputs_embeds holds no positions: nothing to generate from")
        cache = KVCache.for_model(model, b) if cache is None else cache
        past = cache.get_seq_length()
        if past and cache.batch_size not in (None, b):
            raise InputError(f"the cache holds {cache.batch_size} rows but inputs_embeds has {b}")
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=inputs_embeds.device)
        mask = attention_mask.to(device=inputs_embeds.device, dtype=torch.long)  # [B, past+T]
        if mask.shape != (b, past + t):
            raise InputError(
                f"attention_mask must be [B={b}, cached {past} + new {t}] but has shape {tuple(mask.shape)}")
        pos = prefill_positions(mask)[:, past:]  # [B, T]
        return cls(model, cache, mask), forward_last(model, inputs_embeds, pos, mask, cache)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B]); return the next logits [B, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)  # [B, L+1]
        pos = self.mask.sum(-1, keepdim=True) - 1  # [B, 1]
        with torch.no_grad():
            embeds = self.model.embed_tokens(tokens.to(self.mask.device)[:, None])  # [B, 1, H]
        return forward_last(self.model, embeds, pos, self.mask, self.cache)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (repeats allowed) of the cache and the mask, e.g. to expand beams."""
        self.cache.select_rows(rows)
        self.mask = self.mask[rows.to(self.mask.device)]


@dataclass(frozen=True)
class StepOutput:
    """One step of ``generate_steps``: the chosen ``tokens`` [B], the raw float32 ``logits``
    [B, V] they were chosen from, which rows are ``finished`` [B] after this step, and why each
    row finished (``reasons``, None while it runs)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    finished: torch.Tensor
    reasons: tuple[FinishReason | None, ...] = ()


def generate_steps(
    model: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: SamplingParams,
    *,
    eos_ids: Sequence[int] = (),
    cache: KVCache | None = None,
) -> Iterator[StepOutput]:
    """Greedy or sampled decoding of a fixed batch, one ``StepOutput`` per step.

    ``inputs_embeds`` [B, T, H] are the new positions; ``attention_mask`` [B, past+T] covers what
    ``cache`` already holds plus them (None = all visible). The rows share one generator seeded
    with ``params.seed`` (torch's global one without a seed), so a seeded call draws what
    transformers draws after ``torch.manual_seed(seed)``. Stops after ``max_new_tokens`` or once
    every row finished; the last token is not fed back to the cache.
    """
    if params.num_beams != 1:
        raise InputError("generate_steps decodes with num_beams=1; use beam_search for beams")
    decoder, logits = DenseDecoder.start(model, inputs_embeds, attention_mask, cache)
    generator = make_generator(params, logits.device)
    rows = [DecodeRow(params, generator) for _ in range(logits.shape[0])]
    while True:
        chosen = choose_tokens(logits, rows, eos_ids)
        for r, t in zip(rows, chosen, strict=True):
            if r.finished:
                r.generated.append(t)  # transformers keeps padding finished rows
            else:
                r.accept(t, eos_ids)
        tokens = torch.tensor(chosen, dtype=torch.long, device=logits.device)  # [B]
        finished = torch.tensor([r.finished for r in rows], device=logits.device)  # [B]
        yield StepOutput(tokens, logits, finished, tuple(r.finish_reason for r in rows))
        if bool(finished.all()) or len(rows[0].generated) >= params.max_new_tokens:
            return
        logits = decoder.advance(tokens)


def generate_tokens(
    model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, params: SamplingParams,
    *, eos_ids: Sequence[int] = (), cache: KVCache | None = None,
) -> Iterator[torch.Tensor]:
    """Like ``generate_steps`` but yields only the chosen tokens, ``LongTensor [B]`` per step."""
    for step in generate_steps(model, inputs_embeds, attention_mask, params, eos_ids=eos_ids, cache=cache):
        yield step.tokens
