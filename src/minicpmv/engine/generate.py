"""Token generation with Hugging Face ``generate(inputs_embeds=..., attention_mask=...)`` semantics.

``generate_steps`` / ``generate_tokens`` run greedy decoding or sampling one step at a time
(per-row finish; finished rows keep emitting ``pad_token_id``), ``beam_search`` runs beam
search and returns HF's padded output rows. Only embeddings are given to the model, so the
running ``input_ids`` start empty: logits processors (repetition penalty) see generated tokens
only and beam hypotheses are normalised by the generated length (spec §9.2).

Positions follow HF: prefill ``cumsum(mask) - 1`` with masked positions set to 1; each later
step appends a visible key and takes position ``(#ones so far) - 1``.

transformers 4.44 (used for the 2.6 reference) and >= 4.50 (4.55 for 4.5) implement beam search
differently; they can stop at different steps (the early-stop heuristic compares with the best
candidate, eos included, in 4.44 but with the best *running* beam in 4.55) and lay the output
out differently. ``GenerationParams.hf_compat`` picks which one is reproduced.

This module builds no attention masks inside the model, loads nothing and decodes no text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import InputError
from .kv_cache import KVCache
from .sampling import greedy_choice, process_scores, sample_choice

HfCompat = Literal["4.44", "4.55"]
_NEG = -1.0e9  # HF's "impossible" beam score


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings (names and defaults as transformers' GenerationConfig where shared).

    ``top_k`` None or 0 disables top-k (transformers' own default is 50: pass it explicitly).
    ``hf_compat`` selects the transformers beam-search implementation to reproduce.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int | None = None
    hf_compat: HfCompat = "4.55"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        _validate(self)


def _validate(p: GenerationParams) -> None:
    def bad(msg: str) -> None:
        raise InputError(f"invalid generation parameter: {msg}")

    if not _is_int(p.max_new_tokens) or p.max_new_tokens < 1:
        bad(f"max_new_tokens must be an integer >= 1, got {p.max_new_tokens!r}")
    if not _is_int(p.min_new_tokens) or p.min_new_tokens < 0:
        bad(f"min_new_tokens must be an integer >= 0, got {p.min_new_tokens!r}")
    if not _finite(p.temperature) or p.temperature <= 0:
        bad(f"temperature must be > 0 (use do_sample=False for greedy), got {p.temperature!r}")
    if p.top_k is not None and (not _is_int(p.top_k) or p.top_k < 0):
        bad(f"top_k must be None or an integer >= 0, got {p.top_k!r}")
    if not _finite(p.top_p) or not 0.0 <= p.top_p <= 1.0:
        bad(f"top_p must be in [0, 1], got {p.top_p!r}")
    if not _finite(p.repetition_penalty) or p.repetition_penalty <= 0:
        bad(f"repetition_penalty must be > 0, got {p.repetition_penalty!r}")
    if not _is_int(p.num_beams) or p.num_beams < 1:
        bad(f"num_beams must be an integer >= 1, got {p.num_beams!r}")
    if p.num_beams > 1 and p.do_sample:
        bad("beam sampling (num_beams > 1 with do_sample=True) is not supported")
    if not _finite(p.length_penalty):
        bad(f"length_penalty must be a finite number, got {p.length_penalty!r}")
    if p.early_stopping not in (True, False, "never"):
        bad(f"early_stopping must be True, False or 'never', got {p.early_stopping!r}")
    if any(i < 0 for i in p.eos_token_ids):
        bad(f"eos_token_ids must be non-negative, got {p.eos_token_ids}")
    if not _is_int(p.pad_token_id) or p.pad_token_id < 0:
        bad(f"pad_token_id must be an integer >= 0, got {p.pad_token_id!r}")
    if p.seed is not None and not _is_int(p.seed):
        bad(f"seed must be None or an integer, got {p.seed!r}")
    if p.hf_compat not in ("4.44", "4.55"):
        bad(f"hf_compat must be '4.44' or '4.55', got {p.hf_compat!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    return abs(float(x)) != float("inf") and x == x


@dataclass(frozen=True)
class StepOutput:
    """One decoding step: chosen ``tokens`` [B], the ``logits`` [B, V] (raw float32, before any
    processor) they were chosen from, and which rows are ``finished`` [B] after this step."""

    tokens: torch.Tensor
    logits: torch.Tensor
    finished: torch.Tensor


# -- shared plumbing ---------------------------------------------------------------------------
def prefill_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF position ids for a (possibly padded) mask [B, L]: ``cumsum - 1``, masked entries = 1."""
    mask = attention_mask.long()
    pos = mask.cumsum(-1) - 1  # [B, L]
    return pos.masked_fill(mask == 0, 1)


def _start(
    model: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Check shapes, create the cache if needed, run the prefill; return (cache, mask, logits [B,V])."""
    if inputs_embeds.dim() != 3:
        raise InputError(f"inputs_embeds must be [B, T, H], got shape {tuple(inputs_embeds.shape)}")
    b, t, _ = inputs_embeds.shape
    if t == 0:
        raise InputError("inputs_embeds holds no positions: nothing to generate from")
    if cache is None:
        cache = KVCache.for_model(model, b)
    past = cache.get_seq_length()
    if past and cache.batch_size not in (None, b):
        raise InputError(f"the cache holds {cache.batch_size} rows but inputs_embeds has {b}")
    if attention_mask is None:
        attention_mask = torch.ones(b, past + t, dtype=torch.long, device=inputs_embeds.device)
    mask = attention_mask.to(device=inputs_embeds.device, dtype=torch.long)  # [B, past+T]
    if mask.shape != (b, past + t):
        raise InputError(
            f"attention_mask must be [B={b}, cached {past} + new {t}] but has shape {tuple(mask.shape)}"
        )
    pos = prefill_positions(mask)[:, past:]  # [B, T]
    logits = _forward(model, inputs_embeds, pos, mask, cache)
    return cache, mask, logits


def _forward(
    model: Any, embeds: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    with torch.no_grad():
        out = model.forward(embeds, pos, mask, cache=cache, last_only=True)  # [B, 1, V]
    return out[:, -1, :].float()  # [B, V]


def _advance(
    model: Any, tokens: torch.Tensor, mask: torch.Tensor, cache: KVCache
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed one new token per row; return (grown mask, logits [B, V])."""
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [B, L+1]
    pos = mask.sum(-1, keepdim=True) - 1  # [B, 1]
    with torch.no_grad():
        embeds = model.embed_tokens(tokens[:, None])  # [B, 1, H]
    return mask, _forward(model, embeds, pos, mask, cache)


def _process(
    scores: torch.Tensor, generated: torch.Tensor, p: GenerationParams, sample: bool
) -> torch.Tensor:
    return process_scores(
        scores, generated,
        repetition_penalty_value=p.repetition_penalty, min_new_tokens=p.min_new_tokens,
        eos_ids=p.eos_token_ids, do_sample=sample, temperature_value=p.temperature,
        top_k=p.top_k, top_p=p.top_p,
    )


# -- greedy / sampling --------------------------------------------------------------------------
def generate_steps(
    model: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: GenerationParams,
    cache: KVCache | None = None,
) -> Iterator[StepOutput]:
    """Greedy or sampled decoding, one ``StepOutput`` per step (HF ``_sample`` semantics).

    ``inputs_embeds`` [B, T, H] are the new positions; ``attention_mask`` [B, past+T] covers what
    ``cache`` already holds plus them (None = all visible). Stops after ``max_new_tokens`` or
    once every row has emitted an eos; the last token is not fed back into the cache.
    """
    if params.num_beams != 1:
        raise InputError("generate_steps decodes with num_beams=1; use beam_search for beams")
    cache, mask, logits = _start(model, inputs_embeds, attention_mask, cache)
    device = inputs_embeds.device
    generator = None
    if params.do_sample and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
    generated = torch.zeros(inputs_embeds.shape[0], 0, dtype=torch.long, device=device)  # [B, 0]
    unfinished = torch.ones(inputs_embeds.shape[0], dtype=torch.bool, device=device)
    for step in range(params.max_new_tokens):
        scores = _process(logits, generated, params, params.do_sample)
        chosen = sample_choice(scores, generator) if params.do_sample else greedy_choice(scores)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, params.pad_token_id))  # [B]
        generated = torch.cat([generated, chosen[:, None]], dim=1)
        unfinished = unfinished & ~torch.isin(chosen, eos)
        yield StepOutput(tokens=chosen, logits=logits, finished=~unfinished)
        if step + 1 == params.max_new_tokens or not bool(unfinished.any()):
            return
        mask, logits = _advance(model, chosen, mask, cache)


def generate_tokens(
    model: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: GenerationParams,
    cache: KVCache | None = None,
) -> Iterator[torch.Tensor]:
    """Like ``generate_steps`` but yields only the chosen tokens, ``LongTensor [B]`` per step."""
    for step in generate_steps(model, inputs_embeds, attention_mask, params, cache):
        yield step.tokens


# -- beam search -------------------------------------------------------------------------------
def beam_search(
    model: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: GenerationParams,
    cache: KVCache | None = None,
) -> list[list[int]]:
    """HF beam search (no sampling); returns one row of generated ids per batch row.

    Rows are laid out as the chosen transformers version returns them (``hf_compat``), all of
    the same length. The cache is expanded to ``B * num_beams`` rows and reordered in place, so
    it is not reusable for the next turn afterwards.
    """
    nb = params.num_beams
    cache, mask, logits = _start(model, inputs_embeds, attention_mask, cache)
    b, vocab = logits.shape
    keep = max(2, 1 + len(params.eos_token_ids)) * nb
    if keep > nb * vocab:
        raise InputError(f"beam search needs {keep} candidates but only {nb * vocab} exist")
    rows = torch.arange(b, device=logits.device).repeat_interleave(nb)  # [B*nb]
    cache.select_rows(rows)
    logits, mask = logits[rows], mask[rows]
    state: _LegacyBeams | _VectorBeams = (_LegacyBeams if params.hf_compat == "4.44" else _VectorBeams)(
        params, b, keep
    )
    seqs = torch.zeros(b * nb, 0, dtype=torch.long, device=logits.device)  # [B*nb, 0]
    beam_scores = torch.zeros(b, nb, dtype=torch.float32, device=logits.device)
    beam_scores[:, 1:] = _NEG
    beam_scores = beam_scores.view(-1)  # [B*nb]
    for step in range(params.max_new_tokens):
        logp = torch.log_softmax(logits, dim=-1)  # [B*nb, V]
        total = _process(logp, seqs, params, False) + beam_scores[:, None]
        top_s, top_i = torch.topk(total.view(b, nb * vocab), keep, dim=1, largest=True, sorted=True)
        src_beam = torch.div(top_i, vocab, rounding_mode="floor")  # [B, keep]
        beam_scores, tokens, src_rows, stop = state.step(top_s, top_i % vocab, src_beam, seqs, step)
        seqs = torch.cat([seqs[src_rows], tokens[:, None]], dim=1)  # [B*nb, step+1]
        if stop or step + 1 == params.max_new_tokens:
            break
        cache.reorder(src_rows)
        mask, logits = _advance(model, tokens, mask, cache)
    return state.finalize(seqs, beam_scores)


class _LegacyBeams:
    """transformers 4.44: BeamSearchScorer with per-row BeamHypotheses (python floats)."""

    def __init__(self, p: GenerationParams, batch: int, keep: int) -> None:
        self.p, self.batch, self.keep, self.nb = p, batch, keep, p.num_beams
        self.hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        self.worst = [1e9] * batch
        self.done = [False] * batch

    def _add(self, b: int, tokens: list[int], sum_logprobs: float, gen_len: int) -> None:
        score = sum_logprobs / (gen_len ** self.p.length_penalty)
        hyps = self.hyps[b]
        if len(hyps) < self.nb or score > self.worst[b]:
            hyps.append((score, tokens))
            if len(hyps) > self.nb:
                ranked = sorted((s, i) for i, (s, _) in enumerate(hyps))
                del hyps[ranked[0][1]]
                self.worst[b] = ranked[1][0]
            else:
                self.worst[b] = min(score, self.worst[b])

    def _is_done(self, b: int, best_sum: float, cur_len: int) -> bool:
        if len(self.hyps[b]) < self.nb:
            return False
        stopping, lp = self.p.early_stopping, self.p.length_penalty
        if stopping is True:
            return True
        length = self.p.max_new_tokens if (stopping == "never" and lp > 0.0) else cur_len
        return self.worst[b] >= best_sum / length ** lp

    def step(
        self, top_s: torch.Tensor, top_t: torch.Tensor, src: torch.Tensor, seqs: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        nb, eos, dev = self.nb, set(self.p.eos_token_ids), top_s.device
        cand_s, cand_t, cand_src = top_s.tolist(), top_t.tolist(), src.tolist()  # python floats/ints
        prev = seqs.tolist()
        scores = [[0.0] * nb for _ in range(self.batch)]
        tokens = [[self.p.pad_token_id] * nb for _ in range(self.batch)]
        rows = [[b * nb] * nb for b in range(self.batch)]
        for b in range(self.batch):
            if self.done[b]:
                continue
            filled = 0
            for rank in range(self.keep):
                tok, row = cand_t[b][rank], b * nb + cand_src[b][rank]
                if tok in eos:
                    if rank < nb:
                        self._add(b, list(prev[row]), cand_s[b][rank], step + 1)
                else:
                    scores[b][filled], tokens[b][filled], rows[b][filled] = cand_s[b][rank], tok, row
                    filled += 1
                if filled == nb:
                    break
            self.done[b] = self.done[b] or self._is_done(b, max(cand_s[b]), step + 1)
        return (
            torch.tensor(scores, dtype=top_s.dtype, device=dev).view(-1),
            torch.tensor(tokens, dtype=torch.long, device=dev).view(-1),
            torch.tensor(rows, dtype=torch.long, device=dev).view(-1),
            all(self.done),
        )

    def finalize(self, seqs: torch.Tensor, beam_scores: torch.Tensor) -> list[list[int]]:
        for b in range(self.batch):
            if not self.done[b]:
                for i in range(self.nb):
                    row = b * self.nb + i
                    self._add(b, seqs[row].tolist(), float(beam_scores[row]), seqs.shape[1])
        best = []
        for hyps in self.hyps:
            top = hyps[0]
            for h in hyps[1:]:
                top = h if h[0] >= top[0] else top  # sorted()+pop(): the later one wins ties
            best.append(top[1])
        longest = max(len(h) for h in best)
        width = min(longest + 1, self.p.max_new_tokens)
        eos0 = self.p.eos_token_ids[0] if self.p.eos_token_ids else self.p.pad_token_id
        out = []
        for h in best:
            row = h + ([eos0] if len(h) < width else [])
            out.append(row + [self.p.pad_token_id] * (width - len(row)))
        return out


class _VectorBeams:
    """transformers >= 4.50 (4.55): vectorised beam search over static-shaped float32 tensors."""

    def __init__(self, p: GenerationParams, batch: int, keep: int) -> None:
        self.p, self.batch, self.keep, self.nb = p, batch, keep, p.num_beams
        eos = p.eos_token_ids
        # HF computes `pad or eos[0]`, so a pad id of 0 falls through to the first eos id.
        self.fill = (p.pad_token_id or eos[0]) if eos else -1
        self.fin_scores = torch.full((batch, self.nb), _NEG, dtype=torch.float32)
        self.fin_flag = torch.zeros(batch, self.nb, dtype=torch.bool)
        self.fin_seqs = torch.full((batch, self.nb, p.max_new_tokens), self.fill, dtype=torch.long)
        self.fin_len = torch.zeros(batch, self.nb, dtype=torch.long)
        self.unsatisfied = torch.ones(batch, 1, dtype=torch.bool)
        self.top_mask = torch.arange(keep) < self.nb  # [keep]

    def step(
        self, top_s: torch.Tensor, top_t: torch.Tensor, src: torch.Tensor, seqs: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        nb, dev = self.nb, top_s.device
        top_s, top_t, src = top_s.cpu(), top_t.cpu(), src.cpu()
        eos = torch.tensor(self.p.eos_token_ids, dtype=torch.long)
        hits = torch.isin(top_t, eos) | (step + 1 >= self.p.max_new_tokens)  # [B, keep]
        run_lp = top_s + hits.to(torch.float32) * _NEG
        nxt = torch.topk(run_lp, k=nb)[1]  # [B, nb]
        run_scores = torch.gather(run_lp, 1, nxt)
        src_rows = torch.gather(src, 1, nxt) + torch.arange(self.batch)[:, None] * nb  # [B, nb]
        tokens = torch.gather(top_t, 1, nxt)
        self._update_finished(top_s, top_t, src, seqs.cpu(), hits, step)
        length = step + 1
        if self.p.early_stopping == "never" and self.p.length_penalty > 0.0:
            length = self.p.max_new_tokens
        best = run_scores[:, :1] / (length ** self.p.length_penalty)  # [B, 1]
        worst = torch.where(self.fin_flag, torch.min(self.fin_scores, dim=1, keepdim=True)[0], _NEG)
        self.unsatisfied = self.unsatisfied & torch.any(best > worst, dim=-1, keepdim=True)
        full_stop = bool(self.fin_flag.all()) and self.p.early_stopping is True
        go_on = bool(self.unsatisfied.any()) and not full_stop and not bool(hits.all())
        return (run_scores.view(-1).to(dev), tokens.view(-1).to(dev), src_rows.view(-1).to(dev), not go_on)

    def _update_finished(
        self, top_s: torch.Tensor, top_t: torch.Tensor, src: torch.Tensor, seqs: torch.Tensor,
        hits: torch.Tensor, step: int,
    ) -> None:
        nb, n = self.nb, self.p.max_new_tokens
        just_done = hits & self.top_mask[None, :]  # [B, keep]
        scores = top_s / ((step + 1) ** self.p.length_penalty)
        full = torch.all(self.fin_flag, dim=-1, keepdim=True) & (self.p.early_stopping is True)
        scores = scores + full.to(torch.float32) * _NEG
        scores = scores + (~self.unsatisfied).to(torch.float32) * _NEG
        scores = scores + (~just_done) * _NEG
        cand = seqs.view(self.batch, nb, -1)[torch.arange(self.batch)[:, None], src]  # [B, keep, step]
        cand_full = torch.full((self.batch, self.keep, n), self.fill, dtype=torch.long)
        cand_full[:, :, :step] = cand
        cand_full[:, :, step] = top_t
        merged_scores = torch.cat([self.fin_scores, scores], dim=1)  # [B, nb+keep]
        pick = torch.topk(merged_scores, k=nb)[1]  # [B, nb]
        self.fin_scores = torch.gather(merged_scores, 1, pick)
        self.fin_flag = torch.gather(torch.cat([self.fin_flag, just_done], dim=1), 1, pick)
        cand_len = torch.full((self.batch, self.keep), step + 1, dtype=torch.long)
        self.fin_len = torch.gather(torch.cat([self.fin_len, cand_len], dim=1), 1, pick)
        merged_seqs = torch.cat([self.fin_seqs, cand_full], dim=1)  # [B, nb+keep, n]
        self.fin_seqs = merged_seqs[torch.arange(self.batch)[:, None], pick]

    def finalize(self, seqs: torch.Tensor, beam_scores: torch.Tensor) -> list[list[int]]:
        width = int(self.fin_len[:, 0].max())
        return self.fin_seqs[:, 0, :width].tolist()
