"""Spoken answers of MiniCPM-o 2.6: the LLM's token loop feeding the speech head.

What ``chat(generate_audio=True)``, ``respond(generate_audio=True)``, live sessions and the
server share:

* ``SpeechRequest``: the speech part of a call (output path, speech sampling options, trace,
  whether the speaker state is returned, which first-chunk variant a stream uses).
* ``SpeakerTap``: the model as the token loop sees it, keeping the final-norm hidden state at
  one position of its first forward (the prefill). With the ``<|spk|>`` slot as that position,
  one prompt pass gives both the first logits and the voice (the official streaming code reads
  the same state from the first round's ``hidden_states``).
* ``SpokenAnswer``: push form of the official streaming path (``streaming_generate``):
  generated ids in, ``OmniOutput`` chunks (text + 24 kHz audio) out. Ids are grouped into the
  official 3-token pieces (``LLMTextPieces``) and fed to a ``SpeechStream``; without a
  synthesizer every piece comes out as text only (``generate_audio=False``). ``done`` tells the
  caller to stop the LLM (the speech ended, or the audio limit was reached).
* ``speak_steps``: pull form over the token loop's steps; the last chunk carries the finish
  reason.
* ``answer_with_speech`` / ``stream_with_speech``: the two shapes of a one-conversation call.

The speech head itself is ``speech.py``; nothing here parses keywords or builds prompts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import InputError
from ..processing.audio import save_wav
from .generate import StepOutput, generate_steps
from .sampling import SamplingParams
from .speech import (
    FRAME_SAMPLES,
    SAMPLING_RATE,
    LLMTextPieces,
    OmniOutput,
    SpeechStream,
    SpeechSynthesizer,
    get_synthesizer,
    speak_answer,
    speaker_hidden,
    speaker_position,
)
from .speech_codes import SpeechOptions, SpeechTrace

FirstChunk = Literal["hold", "early"]


@dataclass(frozen=True)
class SpeechRequest:
    """The speech part of a ``chat()`` / ``respond()`` call (official keywords where they exist).

    ``options``: speech sampling (``SpeechOptions``; None = the checkpoint's official values);
    ``trace``: records the speech schedule and codes (conformance); ``first_chunk``: the
    streaming variant (see ``SpeechStream``); ``max_seconds``: cut streamed audio at this length.
    """

    generate_audio: bool = False
    output_audio_path: str | Path | None = None
    options: SpeechOptions | None = None
    trace: SpeechTrace | None = None
    return_spk_embed: bool = False
    first_chunk: FirstChunk = "hold"
    max_seconds: float | None = None


def limited_options(synth: SpeechSynthesizer, options: SpeechOptions | None,
                    max_seconds: float | None) -> SpeechOptions:
    """``options`` (default: the checkpoint's official ones) with at most ``max_seconds`` of frames."""
    base = options if options is not None else synth.default_options()
    if max_seconds is None:
        return base
    if not max_seconds > 0:
        raise InputError(f"the audio length limit must be positive, got {max_seconds}")
    frames = max(1, math.ceil(max_seconds * SAMPLING_RATE / FRAME_SAMPLES))
    return dataclasses.replace(base, max_frames=min(base.max_frames, frames))


def cut_audio(out: OmniOutput, max_seconds: float | None) -> OmniOutput:
    """``out`` with its waveform cut to ``max_seconds`` (the frame loop stops at a call boundary)."""
    if max_seconds is not None and out.audio_wav is not None:
        out.audio_wav = out.audio_wav[: int(round(max_seconds * SAMPLING_RATE))]
    return out


class SpeakerTap:
    """A model view for ``generate_steps`` that keeps ``hidden`` [H] (float32), the final-norm
    hidden state at ``position`` of the first forward, and otherwise forwards as the model."""

    def __init__(self, model: Any, position: int) -> None:
        self.model, self.position = model, int(position)
        self.hidden: torch.Tensor | None = None

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any = None,
                last_only: bool = True) -> torch.Tensor:
        if self.hidden is not None:
            return self.model.forward(embeds, positions, mask, cache=cache, last_only=last_only)
        if not 0 <= self.position < embeds.shape[1]:
            raise InputError(f"the speaker slot {self.position} is outside the {embeds.shape[1]} new positions")
        h = self.model.forward_hidden(embeds, positions, mask, cache)  # [B, T, H]
        self.hidden = h[0, self.position].float()  # [H]
        return self.model.llm.logits(h[:, -1:] if last_only else h)  # [B, 1 or T, V], as forward()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class SpokenAnswer:
    """Generated ids in, ``OmniOutput`` chunks out (see the module docstring).

    ``speaker`` is the voice (the LLM state at ``<|spk|>``, [llm_dim]) or a function giving it
    once the first piece is ready (a ``SpeakerTap`` fills it during the prefill)."""

    def __init__(self, tokenizer: Any, terminators: Collection[int], *, synth: SpeechSynthesizer | None,
                 speaker: torch.Tensor | Callable[[], torch.Tensor] | None = None,
                 request: SpeechRequest | None = None) -> None:
        self.request = request or SpeechRequest(generate_audio=synth is not None)
        self.pieces = LLMTextPieces(tokenizer, terminators)
        self.synth, self._speaker = synth, speaker
        self.stream: SpeechStream | None = None
        self.samples = 0
        self.done = False
        self.text = ""  # the raw text of the pieces taken so far

    def push(self, token_id: int) -> list[OmniOutput]:
        """Take one generated id; returns the chunks it completed (often none)."""
        if self.done:
            return []
        piece = self.pieces.push(token_id)
        return [] if piece is None else self._piece(piece)

    def finish(self) -> list[OmniOutput]:
        """The LLM stopped: the last piece (if a round was cut short) and the rest of the speech."""
        out: list[OmniOutput] = []
        rest = None if self.done else self.pieces.flush()
        if rest:
            out += self._piece(rest)
        if self.synth is not None and not self.done:
            out += self._limit(self._open().finish())
        self.done = True
        return out

    def _open(self) -> SpeechStream:
        if self.stream is None:
            assert self.synth is not None
            speaker = self._speaker() if callable(self._speaker) else self._speaker
            if speaker is None:
                raise InputError("a spoken answer needs the speaker state (the LLM hidden state at <|spk|>)")
            r = self.request
            options = limited_options(self.synth, r.options, r.max_seconds)
            self.stream = self.synth.stream(speaker, options, first_chunk=r.first_chunk, trace=r.trace)
        return self.stream

    def push_text(self, piece: str) -> list[OmniOutput]:
        """Take one text piece directly (text from elsewhere, spoken in this answer's voice)."""
        if not isinstance(piece, str):
            raise InputError(f"a spoken answer takes text pieces (str), got {type(piece).__name__}")
        return [] if self.done else self._piece(piece)

    def _piece(self, piece: str) -> list[OmniOutput]:
        self.text += piece
        if self.synth is None:
            return [OmniOutput(text=piece)]
        stream = self._open()
        out = self._limit(stream.feed(piece))
        if stream.done:
            self.done = True
        return out

    def _limit(self, chunks: list[OmniOutput]) -> list[OmniOutput]:
        """Chunks up to ``max_seconds`` of audio in all; the chunk that crosses it is cut."""
        limit = self.request.max_seconds
        if limit is None:
            return chunks
        cap = int(round(limit * SAMPLING_RATE))
        out = []
        for c in chunks:
            if self.samples >= cap:
                self.done = True
                break
            wav = c.audio_wav if c.audio_wav is not None else np.zeros(0, np.float32)
            keep = wav[: cap - self.samples]
            self.samples += len(keep)
            out.append(OmniOutput(text=c.text, audio_wav=keep, sampling_rate=c.sampling_rate))
        if self.samples >= cap:
            self.done = True
        return out


def speak_steps(answer: SpokenAnswer, steps: Iterator[StepOutput]) -> Iterator[OmniOutput]:
    """Drive ``answer`` with the token loop's ``steps`` (one row) until the LLM finishes or the
    speech ends (then the loop is closed: the LLM stops, as the official stream does). The last
    chunk carries ``finish_reason``: the LLM's, or "stop" when the speech ended first."""
    reason = "length"
    try:
        for step in steps:
            yield from answer.push(int(step.tokens[0]))
            if step.reasons and step.reasons[0] is not None:
                reason = step.reasons[0]
                break
            if answer.done:
                reason = "stop"
                break
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    tail = answer.finish()
    if tail:
        last = tail[-1]
        tail[-1] = OmniOutput(text=last.text, spk_embeds=last.spk_embeds, audio_wav=last.audio_wav,
                              sampling_rate=last.sampling_rate, finish_reason=reason)
    else:
        tail = [OmniOutput(text="", audio_wav=np.zeros(0, np.float32) if answer.synth is not None else None,
                           sampling_rate=SAMPLING_RATE if answer.synth is not None else None,
                           finish_reason=reason)]
    yield from tail


# ---------------------------------------------------------------------------------- one call


def answer_with_speech(chat_model: Any, batch: Any, ids: list[int], request: SpeechRequest) -> OmniOutput:
    """The official ``chat(generate_audio=True)`` result for generated ``ids`` of row 0: the
    chat path (whole answer, then speech), ``spk_embeds`` when asked for, the WAV written to
    ``output_audio_path``. Without ``generate_audio`` only the text (and speaker state)."""
    if request.generate_audio:
        options = limited_options(get_synthesizer(chat_model), request.options, request.max_seconds)
        out = cut_audio(speak_answer(chat_model, batch, ids, options=options, trace=request.trace),
                        request.max_seconds)
        if request.output_audio_path:
            save_wav(request.output_audio_path, out.audio_wav, SAMPLING_RATE)
        if not request.return_spk_embed:
            out.spk_embeds = None
        return out
    spk = speaker_hidden(chat_model, batch)[None] if request.return_spk_embed else None
    return OmniOutput(text=chat_model.runner.postprocess(ids), spk_embeds=spk)


def stream_with_speech(chat_model: Any, batch: Any, params: SamplingParams,
                       request: SpeechRequest) -> Iterator[OmniOutput]:
    """Text + audio chunks of one prepared conversation (the official streaming path): one
    prompt pass gives the first logits and the voice, then ids -> pieces -> speech."""
    if params.num_beams != 1:
        raise InputError("a streamed spoken answer decodes with num_beams=1 (sampling or greedy), not beam search")
    runner = chat_model.runner
    synth = get_synthesizer(chat_model) if request.generate_audio else None
    tap = SpeakerTap(runner.model, speaker_position(batch.input_ids[0].tolist(), runner.tokenizer))

    def voice() -> torch.Tensor:
        if tap.hidden is None:
            raise InputError("the speaker state is read during the prefill, before the first piece")
        return tap.hidden

    answer = SpokenAnswer(runner.tokenizer, runner.eos_ids, synth=synth, speaker=voice, request=request)

    def run() -> Iterator[OmniOutput]:
        with torch.inference_mode():
            steps = generate_steps(tap, batch.inputs_embeds, batch.attention_mask, params, eos_ids=runner.eos_ids,
                                   cache=runner.new_cache(1), mode=runner.decode_mode)
            yield from speak_steps(answer, steps)

    return run()
