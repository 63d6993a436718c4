"""Audio-code generation of MiniCPM-o 2.6's speech head: one utterance's KV cache and frame loop.

``CodeGenerator`` is the state of one utterance (nothing is kept on the model, so any number
run at once). It reproduces the official ``ConditionalChatTTS.prefill_text`` / ``generate`` /
``prefill_audio_ids`` (conformance README o2.6-tts, "Chat path" steps 6-8):

* the KV cache starts as ``condition_length - 1`` (302) zero positions; text chunks are
  prefilled in place at their absolute positions (causal attention over everything before);
* each generated frame is one decoder step at position = cache length; its input is
  ``emb_text([Ptts])`` for the very first frame, else the sum of the previous frame's code
  embeddings; the visibility rule hides the text columns not yet released (10 more every 50
  frames), the ``[Ptts]`` column and the padding of the text mask;
* scores: raw logits / per-codebook temperature -> (repetition penalty) -> top-p -> top-k (each
  keeping >= 3 ids; not at the first frame) -> the end id 625 banned during the first 10 steps
  of every call -> softmax -> one multinomial draw per codebook (or the arg-max with
  ``greedy``); a frame with any 625 ends the utterance and is dropped.

``SpeechTrace`` records the schedule (and, on request, per-step logits / visibility / hidden
states / probabilities) for conformance checks. The schedule of prefills and 25-frame calls is
driven by ``engine/speech.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..modeling.layers import AttnMask, build_attn_mask
from ..modeling.tts import ConditionalChatTTS
from .sampling import top_k_filter, top_p_filter

# The official mask helper is called without these arguments, so its defaults apply whatever
# the config says: text released per 50 frames, one speaker slot.
_RELEASE_FRAMES = 50
_MASK_SPK_SLOTS = 1
_PENALTY_WINDOW = 16  # frames the repetition penalty looks back (official CustomRepetitionPenalty...)
_MIN_KEEP = 3  # top-p / top-k keep at least this many ids (official gen_logits)


@dataclass(frozen=True)
class SpeechOptions:
    """Sampling and schedule of speech generation; defaults are the official values.

    ``top_p`` / ``top_k`` / ``repetition_penalty`` come from ``tts_config`` in
    ``SpeechSynthesizer.default_options``. ``greedy`` takes the arg-max of the processed scores
    instead of drawing (the official code always draws); ``seed`` seeds this utterance's own
    random generator.
    """

    temperature: tuple[float, ...] = (0.1, 0.3, 0.1, 0.3)
    top_p: float | None = 0.7
    top_k: int | None = 20
    repetition_penalty: float = 1.0
    chunk_frames: int = 25  # frames per generate call (output_chunk_size)
    min_frames_per_call: int = 10  # the end id is banned for this many steps of every call
    max_frames: int = 2048  # stop once more frames than this exist (checked after a call)
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature or any(not t > 0 for t in self.temperature):
            raise InputError(f"speech temperature must be positive per codebook, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InputError(f"speech top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"speech top_k must be >= 1, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise InputError(f"speech repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.chunk_frames < 1 or self.max_frames < 1 or self.min_frames_per_call < 0:
            raise InputError("speech chunk_frames and max_frames must be >= 1, min_frames_per_call >= 0")


@dataclass
class SpeechTrace:
    """What one utterance did: prefill and generate calls, and per-step values if ``keep_steps``."""

    keep_steps: bool = False
    prefill_calls: list[dict[str, Any]] = field(default_factory=list)
    generate_calls: list[dict[str, Any]] = field(default_factory=list)
    text_calls: list[dict[str, Any]] = field(default_factory=list)  # streamed text prepared for speech
    codes: torch.Tensor | None = None  # the utterance's frames [n, num_vq] after the latest call
    step_logits: list[torch.Tensor] = field(default_factory=list)  # raw [num_vq, V]
    step_probs: list[torch.Tensor] = field(default_factory=list)  # processed probabilities [num_vq, V]
    step_visible: list[torch.Tensor] = field(default_factory=list)  # condition columns seen, bool [C]
    step_hidden: list[torch.Tensor] = field(default_factory=list)  # final-norm decoder output [H]


class SpeechCache:
    """KV cache of the speech decoder with writes at any position (``KVCacheProtocol``).

    ``at(pos)`` sets where the next forward writes (its keys then see positions ``[0, pos + T)``);
    ``commit(T)`` ends the forward. Buffers grow in steps of ``capacity`` positions (a real-size
    float32 utterance holds 63 MB per 512 positions); positions never written hold zeros.
    """

    def __init__(self, layers: int, heads: int, head_dim: int, length: int, *,
                 dtype: torch.dtype, device: torch.device, capacity: int = 512) -> None:
        cap = max(capacity, length + 1)
        self.step = capacity
        self.keys = [torch.zeros(1, heads, cap, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.length = length
        self._pos = length

    def at(self, pos: int) -> SpeechCache:
        self._pos = pos
        return self

    def get_seq_length(self) -> int:
        return self._pos

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._pos + k.shape[2]
        if end > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, end)
        self.keys[layer_idx][:, :, self._pos : end] = k  # [1, nh, T, hd]
        self.values[layer_idx][:, :, self._pos : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]  # [1, nh, pos+T, hd]

    def _grow(self, layer_idx: int, need: int) -> None:
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        cap = max(need, old_k.shape[2] + self.step)
        new_k = old_k.new_zeros(*old_k.shape[:2], cap, old_k.shape[3])
        new_v = torch.zeros_like(new_k)
        new_k[:, :, : old_k.shape[2]] = old_k
        new_v[:, :, : old_v.shape[2]] = old_v
        self.keys[layer_idx], self.values[layer_idx] = new_k, new_v

    def commit(self, t: int) -> None:
        self.length = max(self.length, self._pos + t)
        self._pos = self.length


def visible_columns(past: int, total: int, text_mask: torch.Tensor, *, reserved: int, text_chunk: int) -> torch.Tensor:
    """Keys a generation step may attend to, bool [total], when ``past`` positions are cached.

    Text columns from ``2 + min(ceil((past - reserved) / 50) * text_chunk, reserved)`` through the
    ``[Ptts]`` column are hidden, as are condition columns whose text mask is 0; audio is visible.
    """
    vis = torch.ones(total, dtype=torch.bool, device=text_mask.device)
    start = min(math.ceil((past - reserved) / _RELEASE_FRAMES) * text_chunk, reserved) + 1 + _MASK_SPK_SLOTS
    end = reserved + 1 + _MASK_SPK_SLOTS + 1
    vis[start:end] = False
    n = text_mask.shape[0]
    vis[:n] &= text_mask.bool()
    return vis


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> AttnMask:
    """One key row shared by every query: 0 where visible, the dtype's minimum elsewhere."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask = mask.masked_fill(~visible, torch.finfo(dtype).min)
    return AttnMask(mask[None, None, None, :], False)  # [1, 1, 1, S]


def repetition_penalty_window(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """ChatTTS penalty: per codebook row, ids seen c times in the last 16 frames get
    ``score * penalty**c`` if negative, else ``score / penalty**c``. scores [Q, V], history [Q, n]."""
    if history.shape[1] > _PENALTY_WINDOW:
        history = history[:, -_PENALTY_WINDOW:]
    freq = F.one_hot(history.long(), scores.shape[1]).sum(1)  # [Q, V]
    alpha = torch.pow(penalty, freq)
    return torch.where(scores < 0, scores * alpha, scores / alpha)


def process_code_scores(logits: torch.Tensor, history: torch.Tensor, *, first_frame: bool, ban_end: bool,
                        options: SpeechOptions, end_id: int) -> torch.Tensor:
    """Raw logits [Q, V] -> processed scores [Q, V] (official order; see the module docstring)."""
    temp = torch.tensor(options.temperature, dtype=torch.float32, device=logits.device)
    if temp.shape[0] != logits.shape[0]:
        raise InputError(f"speech temperature has {temp.shape[0]} values for {logits.shape[0]} codebooks")
    scores = logits / temp[:, None]
    if not first_frame:
        if options.repetition_penalty != 1.0:
            scores = repetition_penalty_window(scores, history, options.repetition_penalty)
        if options.top_p is not None:
            scores = top_p_filter(scores, options.top_p, min_tokens_to_keep=_MIN_KEEP)
        if options.top_k is not None:
            scores = top_k_filter(scores, options.top_k, min_tokens_to_keep=_MIN_KEEP)
    if ban_end:
        scores = scores.clone()
        scores[:, end_id] = float("-inf")
    return scores


class CodeGenerator:
    """One utterance of the speech decoder: prefill text / audio, generate frames."""

    def __init__(self, tts: ConditionalChatTTS, options: SpeechOptions, *, trace: SpeechTrace | None = None) -> None:
        cfg = tts.config
        self.tts, self.options, self.trace = tts, options, trace
        self.cfg = cfg
        self.cond_len = cfg.condition_length
        heads = cfg.num_attention_heads
        self.cache = SpeechCache(cfg.num_hidden_layers, heads, cfg.hidden_size // heads, self.cond_len - 1,
                                 dtype=tts.dtype, device=tts.device)
        self.frames: list[torch.Tensor] = []  # every code frame after the condition, an end frame included
        self.finished = False
        self.text_mask = torch.zeros(self.cond_len, dtype=torch.int8, device=tts.device)
        self.generator = torch.Generator(device=tts.device)
        if options.seed is not None:
            self.generator.manual_seed(int(options.seed))
        else:
            self.generator.seed()
        self._forced: list[torch.Tensor] | None = None
        self._heads = tts.head_weights()  # weight norm applied once, not per step

    # ------------------------------------------------------------------ state
    @property
    def codes(self) -> torch.Tensor:
        """Generated frames [n, num_vq] (int64), without a final end frame."""
        frames = self.frames[:-1] if self.finished and self.frames else self.frames
        if not frames:
            return torch.zeros(0, self.cfg.num_vq, dtype=torch.long, device=self.tts.device)
        return torch.stack(frames)

    def set_text_mask(self, mask: Sequence[int]) -> None:
        self.text_mask = torch.tensor(list(mask), dtype=torch.int8, device=self.tts.device)

    def force(self, frames: torch.Tensor) -> None:
        """Teacher forcing: the next steps take these frames [n, num_vq] instead of drawing (their
        scores are still computed and traced); generation ends when they run out."""
        self._forced = [f.to(device=self.tts.device, dtype=torch.long) for f in frames]

    # ------------------------------------------------------------------ prefills
    def prefill_text(self, ids: Sequence[int], begin: int, end: int, speaker: torch.Tensor | None) -> None:
        """Write the condition positions [begin, end) of ``ids`` (the full condition) into the cache."""
        chunk = torch.tensor(list(ids[begin:end]), dtype=torch.long, device=self.tts.device)  # [T]
        emb = self.tts.text_embeddings(chunk, speaker)[None]  # [1, T, H]
        t = emb.shape[1]
        pos = torch.arange(begin, end, device=self.tts.device)[None]  # [1, T]
        mask = build_attn_mask(None, t, begin, emb.dtype, emb.device)
        self.tts.hidden(emb, pos, mask, self.cache.at(begin))
        self.cache.commit(t)
        if self.trace is not None:
            self.trace.prefill_calls.append(
                {"begin": begin, "end": end, "ids": chunk.tolist(), "with_spk": speaker is not None
                 and self.cfg.spk_emb_token_id in chunk.tolist()})

    def prefill_audio(self, frames: torch.Tensor) -> None:
        """Continue from earlier frames [n, num_vq]: ``[Ptts]`` + all but the last frame are run in
        one forward under one shared key row (the official ``prefill_audio_ids``: not causal among
        the new rows); the last frame becomes the input of the next step."""
        tts = self.tts
        bos = tts.emb_text(torch.tensor([self.cfg.audio_bos_token_id], device=tts.device))  # [1, H]
        emb = torch.cat([bos, tts.code_embeddings(frames[:-1])])[None]  # [1, n, H]
        past, t = self.cache.length, emb.shape[1]
        vis = visible_columns(past, past + t, self.text_mask, reserved=self.cfg.streaming_text_reserved_len,
                              text_chunk=self.cfg.streaming_text_chunk_size)
        pos = torch.arange(past, past + t, device=tts.device)[None]  # [1, n]
        tts.hidden(emb, pos, _additive(vis, emb.dtype), self.cache.at(past))
        self.cache.commit(t)
        self.frames.extend(frames.to(device=tts.device, dtype=torch.long))

    # ------------------------------------------------------------------ generation
    def generate(self, max_new: int) -> bool:
        """Up to ``max_new`` frames (one official ``generate`` call); True once the utterance ended."""
        if self.finished:
            return True
        input_len, past_before = self.cond_len + len(self.frames), self.cache.length
        for i in range(max_new):
            if self._step(ban_end=i < self.options.min_frames_per_call):
                break
        if self.trace is not None:
            self.trace.codes = self.codes
            self.trace.generate_calls.append({
                "input_len": input_len, "past_len_before": past_before, "max_new_token": max_new,
                "new_ids_total": int(self.codes.shape[0]), "finished": self.finished})
        return self.finished

    def _step(self, *, ban_end: bool) -> bool:
        tts, cfg = self.tts, self.cfg
        first = not self.frames
        if first:
            emb = tts.emb_text(torch.tensor([cfg.audio_bos_token_id], device=tts.device))  # [1, H]
        else:
            emb = tts.code_embeddings(self.frames[-1][None])  # [1, H]
        past = self.cache.length
        vis = visible_columns(past, past + 1, self.text_mask, reserved=cfg.streaming_text_reserved_len,
                              text_chunk=cfg.streaming_text_chunk_size)
        pos = torch.tensor([[past]], device=tts.device)
        hidden = tts.hidden(emb[None], pos, _additive(vis, emb.dtype), self.cache.at(past))  # [1, 1, H]
        self.cache.commit(1)
        logits = tts.logits(hidden[0, -1], self._heads)  # [Q, V]
        recent = self.frames[-_PENALTY_WINDOW:]
        history = torch.stack(recent).T if recent else logits.new_zeros(cfg.num_vq, 0, dtype=torch.long)  # [Q, n]
        scores = process_code_scores(logits, history, first_frame=first, ban_end=ban_end,
                                     options=self.options, end_id=cfg.eos_code)
        frame = self._choose(scores)
        if self.trace is not None and self.trace.keep_steps:
            self.trace.step_logits.append(logits)
            self.trace.step_probs.append(torch.softmax(scores, dim=-1))
            self.trace.step_visible.append(vis[: self.cond_len].clone())
            self.trace.step_hidden.append(hidden[0, -1].clone())
        if frame is None:  # forced frames ran out
            self.finished = True
            self.frames.append(torch.full((cfg.num_vq,), cfg.eos_code, dtype=torch.long, device=tts.device))
            return True
        self.frames.append(frame)
        if bool((frame == cfg.eos_code).any()):
            self.finished = True
        return self.finished

    def _choose(self, scores: torch.Tensor) -> torch.Tensor | None:
        if self._forced is not None:
            return self._forced.pop(0) if self._forced else None
        if self.options.greedy:
            return torch.argmax(scores, dim=-1)  # [Q]
        probs = torch.softmax(scores, dim=-1)  # [Q, V]
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)  # [Q]
