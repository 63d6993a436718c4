"""The token loop: prefill, then one token per row per step, with transformers' semantics.

Two pieces every decoding path shares:

* ``choose_tokens(logits, rows, eos_ids)``: the step of each running sequence (a ``DecodeRow``:
  its settings, random generator and generated ids): logits processors, greedy choice or a draw,
  and whether the row finished (a terminator, a stop id, or its token limit). Rows sharing their
  settings are processed as one ``[R, V]`` batch.
* a decoder that turns chosen tokens into the next logits over a KV cache: ``DenseDecoder`` here
  (all rows share one length, left-padded, the layout of ``generate(inputs_embeds=...,
  attention_mask=...)``), ``StaticDecoder`` (the same layout with shapes that never change between
  tokens), the slot decoder of ``batch.py`` for continuous batching. All of them run the same
  ``decode_logits`` step.

``DecodeMode`` says how decode steps run. Default: eager, the key mask grows by one column per
token. ``static``: a preallocated ``StaticKVCache``, a preallocated key mask updated in place, the
write index and positions as device tensors, every step attending over the whole capacity (hidden
keys get exactly zero weight). ``compile``: that same step through ``torch.compile`` (mode
"reduce-overhead" captures CUDA graphs on CUDA). Tokens are chosen on the device; the one host
synchronisation per step is reading the chosen ids (``pick_tokens`` then ``.tolist()``).

``generate_steps`` is the loop of a fixed batch (``chat()``, ``ChatSession``); finished rows keep
emitting ``PAD_ID`` as transformers does. ``BatchEngine`` runs the same ``choose_tokens`` over its
changing rows; beam search (``beam.py``) uses ``DenseDecoder`` and the same processors.

Positions follow transformers: prefill ``cumsum(mask) - 1`` with masked positions set to 1; each
later step appends a visible key and takes position ``(#visible so far) - 1``. Only embeddings
are given to the model, so the running ids start empty: processors see generated tokens only.
This module builds no attention masks inside the model, loads nothing and decodes no text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ContextLengthError, InputError
from .kv_cache import KVCache, StaticKVCache
from .sampling import SamplingParams, greedy_choice, make_generator, process_logits, sample_choice
from .stream import FinishReason

log = logging.getLogger(__name__)

PAD_ID = 0  # what finished rows emit (the reference passes pad_token_id 0)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64  # compiled shapes kept per step function (batch buckets x capacities x models)


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
    return pick_tokens(logits, rows, eos_ids).tolist()


def pick_tokens(logits: torch.Tensor, rows: Sequence[DecodeRow], eos_ids: Sequence[int]) -> torch.Tensor:
    """``choose_tokens`` without reading the result: int64 ``[R]`` on the logits' device."""
    if _shared(rows):
        scores = process_logits(logits, _history(rows, logits.device), rows[0].params, eos_ids)  # [R, V]
        chosen = _pick(scores, rows)
    else:
        parts = []
        for i, r in enumerate(rows):
            scores = process_logits(logits[i : i + 1], _history([r], logits.device), r.params, eos_ids)  # [1, V]
            parts.append(_pick(scores, [r]))
        chosen = torch.cat(parts)  # [R]
    if any(r.finished for r in rows):
        done = torch.tensor([r.finished for r in rows], device=chosen.device)  # [R]
        chosen = chosen.masked_fill(done, PAD_ID)
    return chosen


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


def _pick(scores: torch.Tensor, rows: Sequence[DecodeRow]) -> torch.Tensor:
    """Argmax, or draws: rows sharing one generator (or torch's global one) draw together in
    row order, as transformers does for a batch; rows with their own generators draw alone."""
    if not rows[0].params.do_sample:
        return greedy_choice(scores)  # [R]
    if all(r.generator is rows[0].generator for r in rows):
        return sample_choice(scores, rows[0].generator)
    return torch.cat([sample_choice(scores[i : i + 1], r.generator) for i, r in enumerate(rows)])


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


def decode_logits(
    model: Any, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
) -> torch.Tensor:
    """One decode step, the function every decoder runs (eager or compiled): token ids [R],
    positions [R, 1], key mask [R, W] -> float32 logits [R, V]; the cache stores the new keys."""
    embeds = model.embed_tokens(tokens[:, None])  # [R, 1, H]
    return model.forward(embeds, positions, mask, cache=cache, last_only=True)[:, -1, :].float()  # [R, V]


@dataclass(frozen=True)
class DecodeMode:
    """How decode steps run (the module docstring); prefill is the same in every mode.

    ``capacity``: a static cache holds a multiple of this many positions (the smallest that fits
    prompt + ``max_new_tokens``), so most calls share one shape and one compiled graph.
    ``compile`` (a ``torch.compile`` mode) implies ``static``.
    """

    static: bool = False
    compile: str | None = None
    capacity: int = 4096

    def __post_init__(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise InputError(f"unknown compile mode {self.compile!r}; use one of {', '.join(COMPILE_MODES)}")
        if self.compile is not None:
            object.__setattr__(self, "static", True)
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise InputError(f"the static cache capacity must be a positive integer, got {self.capacity!r}")

    @classmethod
    def from_compile(cls, compile: bool | str | None, device: torch.device | str, capacity: int = 4096) -> DecodeMode:
        """``load(compile=...)``: False/None = eager; True (or "auto") = "reduce-overhead" (CUDA
        graphs) on CUDA, "default" elsewhere; a string names the ``torch.compile`` mode; "static" =
        the static-shape step without compiling."""
        if compile is None or compile is False:
            return cls(capacity=capacity)
        if compile == "static":
            return cls(static=True, capacity=capacity)
        if compile is True or compile == "auto":
            compile = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
        if not isinstance(compile, str):
            raise InputError(f"compile must be True, False, 'static' or a torch.compile mode, got {compile!r}")
        return cls(compile=compile, capacity=capacity)

    def capacity_for(self, needed: int) -> int:
        """The static cache size for ``needed`` positions."""
        return -(-needed // self.capacity) * self.capacity

    def step(self, *, dynamic_rows: bool = False) -> Callable[..., torch.Tensor]:
        """The step function: ``decode_logits`` itself, or its compiled form. ``dynamic_rows``:
        one graph for any number of rows (the caller marks the row dimension of its inputs with
        ``mark_rows``; CUDA graphs are still recorded per row count), else every shape is static."""
        return decode_logits if self.compile is None else _compiled(self.compile, dynamic_rows)


_COMPILED: dict[tuple[str, bool], Callable[..., torch.Tensor]] = {}


def _compiled(mode: str, dynamic_rows: bool) -> Callable[..., torch.Tensor]:
    """``decode_logits`` compiled for ``mode`` (cached: dynamo keeps one graph per guarded shape)."""
    fn = _COMPILED.get((mode, dynamic_rows))
    if fn is None:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        fn = torch.compile(decode_logits, mode=mode, dynamic=None if dynamic_rows else False)
        _COMPILED[(mode, dynamic_rows)] = fn
        log.info("decode steps compiled with torch.compile(mode=%r, dynamic rows: %s)", mode, dynamic_rows)
    return fn


def mark_rows(*tensors: torch.Tensor) -> None:
    """Mark dimension 0 (rows) of a compiled step's inputs as dynamic (see ``DecodeMode.step``)."""
    import torch._dynamo

    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def run_step(
    step: Callable[..., torch.Tensor], model: Any, tokens: torch.Tensor, positions: torch.Tensor,
    mask: torch.Tensor, cache: Any,
) -> torch.Tensor:
    """Call a step function without gradients; a compiled step's output is copied out of the
    compiler's buffers (CUDA graphs reuse them on the next replay)."""
    with torch.no_grad():
        if step is decode_logits:
            return decode_logits(model, tokens, positions, mask, cache)
        if tokens.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return step(model, tokens, positions, mask, cache).clone()  # [R, V]


def _checked_start(
    model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
) -> tuple[KVCache, torch.Tensor, int]:
    """Validate a prefill's shapes; the cache (made if None), the mask [B, past+T] and past."""
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
    return cache, mask, past


class DenseDecoder:
    """Rows of one length in a ``KVCache`` with a growing key mask ``[B, L]`` (1 = visible)."""

    def __init__(self, model: Any, cache: KVCache, mask: torch.Tensor) -> None:
        self.model, self.cache, self.mask = model, cache, mask

    @classmethod
    def start(
        cls, model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> tuple[DenseDecoder, torch.Tensor]:
        """Check shapes, make the cache if needed, prefill; return (decoder, logits [B, V])."""
        cache, mask, past = _checked_start(model, inputs_embeds, attention_mask, cache)
        pos = prefill_positions(mask)[:, past:]  # [B, T]
        return cls(model, cache, mask), forward_last(model, inputs_embeds, pos, mask, cache)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B]); return the next logits [B, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)  # [B, L+1]
        pos = self.mask.sum(-1, keepdim=True) - 1  # [B, 1]
        return run_step(decode_logits, self.model, tokens.to(self.mask.device), pos, self.mask, self.cache)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (repeats allowed) of the cache and the mask, e.g. to expand beams."""
        self.cache.select_rows(rows)
        self.mask = self.mask[rows.to(self.mask.device)]


class StaticDecoder:
    """``DenseDecoder``'s layout with shapes fixed for the whole generation: a ``StaticKVCache``,
    a preallocated key mask ``[B, capacity]`` whose next column is set in place, and the write
    index on the device, so every step calls ``mode.step()`` with the same shapes. The prefill is
    the dense one (the cache appends and returns exactly the filled positions)."""

    def __init__(self, model: Any, cache: StaticKVCache, mask: torch.Tensor, length: int, mode: DecodeMode) -> None:
        self.model, self.cache, self.mask, self.length = model, cache, mask, length
        self.write = torch.tensor([length], dtype=torch.long, device=mask.device)  # [1]
        self.step = mode.step()

    @classmethod
    def start(
        cls, model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
        cache: StaticKVCache | None, mode: DecodeMode, max_new_tokens: int,
    ) -> tuple[StaticDecoder, torch.Tensor]:
        """Prefill into ``cache`` (made, or grown, to hold ``max_new_tokens`` more positions)."""
        b, t = inputs_embeds.shape[0], inputs_embeds.shape[1]
        past = 0 if cache is None else cache.get_seq_length()
        capacity = mode.capacity_for(past + t + max_new_tokens)
        if cache is None:
            cache = KVCache.for_model(model, b, capacity=capacity)  # type: ignore[assignment]
        assert isinstance(cache, StaticKVCache)
        cache.append().reserve(capacity)
        if mode.compile is not None:
            cache.mark_static()
        cache, mask, past = _checked_start(model, inputs_embeds, attention_mask, cache)  # type: ignore[assignment]
        pos = prefill_positions(mask)[:, past:]  # [B, T]
        logits = forward_last(model, inputs_embeds, pos, mask, cache)
        full = mask.new_zeros(b, cache.capacity)  # [B, C]
        full[:, : past + t] = mask
        return cls(model, cache, full, past + t, mode), logits  # type: ignore[arg-type]

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B]); return the next logits [B, V]."""
        if self.length >= self.cache.capacity:
            raise ContextLengthError(f"the static KV cache of {self.cache.capacity} positions is full")
        self.mask.index_fill_(1, self.write, 1)  # this step's key becomes visible
        pos = self.mask.sum(-1, keepdim=True) - 1  # [B, 1]
        try:
            logits = run_step(self.step, self.model, tokens.to(self.mask.device), pos, self.mask,
                              self.cache.decode(self.write))
        finally:
            self.cache.append()
        self.write += 1
        self.length += 1
        self.cache.set_length(self.length)
        return logits


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
    mode: DecodeMode | None = None,
) -> Iterator[StepOutput]:
    """Greedy or sampled decoding of a fixed batch, one ``StepOutput`` per step.

    ``inputs_embeds`` [B, T, H] are the new positions; ``attention_mask`` [B, past+T] covers what
    ``cache`` already holds plus them (None = all visible). The rows share one generator seeded
    with ``params.seed`` (torch's global one without a seed), so a seeded call draws what
    transformers draws after ``torch.manual_seed(seed)``. Stops after ``max_new_tokens`` or once
    every row finished; the last token is not fed back to the cache. ``mode`` (default eager):
    a static mode decodes with ``StaticDecoder`` when ``cache`` is None or a ``StaticKVCache``.
    Steps' ``tokens`` and ``finished`` are CPU tensors (read once per step from the device).
    """
    if params.num_beams != 1:
        raise InputError("generate_steps decodes with num_beams=1; use beam_search for beams")
    decoder: DenseDecoder | StaticDecoder
    if mode is not None and mode.static and (cache is None or isinstance(cache, StaticKVCache)):
        decoder, logits = StaticDecoder.start(model, inputs_embeds, attention_mask, cache, mode, params.max_new_tokens)
    else:
        decoder, logits = DenseDecoder.start(model, inputs_embeds, attention_mask, cache)
    generator = make_generator(params, logits.device)
    rows = [DecodeRow(params, generator) for _ in range(logits.shape[0])]
    while True:
        picked = pick_tokens(logits, rows, eos_ids)  # [B] on the device
        chosen = picked.tolist()  # the step's one host synchronisation
        for r, t in zip(rows, chosen, strict=True):
            if r.finished:
                r.generated.append(t)  # transformers keeps padding finished rows
            else:
                r.accept(t, eos_ids)
        finished = [r.finished for r in rows]
        yield StepOutput(torch.tensor(chosen, dtype=torch.long), logits, torch.tensor(finished),
                         tuple(r.finish_reason for r in rows))
        if all(finished) or len(rows[0].generated) >= params.max_new_tokens:
            return
        logits = decoder.advance(picked)


def generate_tokens(
    model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, params: SamplingParams,
    *, eos_ids: Sequence[int] = (), cache: KVCache | None = None, mode: DecodeMode | None = None,
) -> Iterator[torch.Tensor]:
    """Like ``generate_steps`` but yields only the chosen tokens, ``LongTensor [B]`` per step."""
    for step in generate_steps(model, inputs_embeds, attention_mask, params, eos_ids=eos_ids, cache=cache,
                               mode=mode):
        yield step.tokens
