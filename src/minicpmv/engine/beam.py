"""Beam search with transformers' semantics (no sampling), in the layout the reference returns.

transformers 4.44 (used for the 2.6 reference) and >= 4.50 (4.55 for 4.5) implement beam search
differently: they can stop at different steps (the early-stop heuristic compares with the best
candidate, eos included, in 4.44 but with the best *running* beam in 4.55) and lay the output
out differently. ``SamplingParams.beam_compat`` picks which one is reproduced. Hypotheses are
normalised by the generated length (the reference passes embeddings, so ``input_ids`` start
empty). Decoding goes through ``generate.DenseDecoder`` and the processors of ``sampling.py``.
This module decodes no text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError
from .generate import PAD_ID, DenseDecoder
from .kv_cache import KVCache
from .sampling import SamplingParams, process_logits

_NEG = -1.0e9  # HF's "impossible" beam score


def beam_search(
    model: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: SamplingParams,
    *,
    eos_ids: Sequence[int] = (),
    cache: KVCache | None = None,
) -> list[list[int]]:
    """HF beam search; returns one row of generated ids per batch row.

    Rows are laid out as the chosen transformers version returns them (``beam_compat``), all of
    the same length. The cache is expanded to ``B * num_beams`` rows and reordered in place, so
    it is not reusable for the next turn afterwards.
    """
    nb, eos = params.num_beams, tuple(int(i) for i in eos_ids)
    decoder, logits = DenseDecoder.start(model, inputs_embeds, attention_mask, cache)
    b, vocab = logits.shape
    keep = max(2, 1 + len(eos)) * nb
    if keep > nb * vocab:
        raise InputError(f"beam search needs {keep} candidates but only {nb * vocab} exist")
    rows = torch.arange(b, device=logits.device).repeat_interleave(nb)  # [B*nb]
    decoder.select_rows(rows)
    logits = logits[rows]
    state: _LegacyBeams | _VectorBeams = (_LegacyBeams if params.beam_compat == "4.44" else _VectorBeams)(
        params, eos, b, keep
    )
    seqs = torch.zeros(b * nb, 0, dtype=torch.long, device=logits.device)  # [B*nb, 0]
    beam_scores = torch.zeros(b, nb, dtype=torch.float32, device=logits.device)
    beam_scores[:, 1:] = _NEG
    beam_scores = beam_scores.view(-1)  # [B*nb]
    for step in range(params.max_new_tokens):
        logp = torch.log_softmax(logits, dim=-1)  # [B*nb, V]
        total = process_logits(logp, seqs, params, eos, sample=False) + beam_scores[:, None]
        top_s, top_i = torch.topk(total.view(b, nb * vocab), keep, dim=1, largest=True, sorted=True)
        src_beam = torch.div(top_i, vocab, rounding_mode="floor")  # [B, keep]
        beam_scores, tokens, src_rows, stop = state.step(top_s, top_i % vocab, src_beam, seqs, step)
        seqs = torch.cat([seqs[src_rows], tokens[:, None]], dim=1)  # [B*nb, step+1]
        if stop or step + 1 == params.max_new_tokens:
            break
        decoder.cache.reorder(src_rows)
        logits = decoder.advance(tokens)
    return state.finalize(seqs, beam_scores)


class _LegacyBeams:
    """transformers 4.44: BeamSearchScorer with per-row BeamHypotheses (python floats)."""

    def __init__(self, p: SamplingParams, eos_ids: tuple[int, ...], batch: int, keep: int) -> None:
        self.p, self.eos_ids, self.batch, self.keep, self.nb = p, eos_ids, batch, keep, p.num_beams
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
        nb, eos, dev = self.nb, set(self.eos_ids), top_s.device
        cand_s, cand_t, cand_src = top_s.tolist(), top_t.tolist(), src.tolist()  # python floats/ints
        prev = seqs.tolist()
        scores = [[0.0] * nb for _ in range(self.batch)]
        tokens = [[PAD_ID] * nb for _ in range(self.batch)]
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
        eos0 = self.eos_ids[0] if self.eos_ids else PAD_ID
        out = []
        for h in best:
            row = h + ([eos0] if len(h) < width else [])
            out.append(row + [PAD_ID] * (width - len(row)))
        return out


class _VectorBeams:
    """transformers >= 4.50 (4.55): vectorised beam search over static-shaped float32 tensors."""

    def __init__(self, p: SamplingParams, eos_ids: tuple[int, ...], batch: int, keep: int) -> None:
        self.p, self.eos_ids, self.batch, self.keep, self.nb = p, eos_ids, batch, keep, p.num_beams
        eos = eos_ids
        # HF computes `pad or eos[0]`, so a pad id of 0 falls through to the first eos id.
        self.fill = (PAD_ID or eos[0]) if eos else -1
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
        eos = torch.tensor(self.eos_ids, dtype=torch.long)
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
