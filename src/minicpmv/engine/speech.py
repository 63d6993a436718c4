"""MiniCPM-o 2.6 speech output: text + speaker state -> 24 kHz waveform, whole or streamed.

* ``SpeechSynthesizer`` bundles the model's speech head (``tts``), the Vocos vocoder and the
  ChatTTS tokenizer (weights only: every utterance keeps its own state, so any number of
  utterances and streams run at once). ``synthesize`` is the official chat path
  (``chat(generate_audio=True)``: the whole answer text, chunked text prefill, 25-frame calls,
  then codes -> GFSQ -> DVAE -> mel -> Vocos); ``stream`` opens a ``SpeechStream``, the official
  streaming path (``streaming_generate``): LLM text arrives in 3-token pieces, audio is vocoded
  per 25 frames and cross-faded over 2048 samples.
* ``speaker_hidden`` / ``speaker_hidden_from_states`` / ``speaker_position``: the LLM's
  final-norm hidden state at the prompt's ``<|spk|>`` position, which conditions the voice.
  ``speak_answer`` is ``chat(generate_audio=True)`` after the text is generated;
  ``LLMTextPieces`` groups generated ids into the official pieces for a stream.
* ``OmniOutput``: text + waveform + sampling rate (+ speaker state), like the official type.

The frame loop, sampler and KV cache are in ``speech_codes.py``; text handling in
``processing/tts_text.py``. Not implemented: ``enable_regenerate`` (off by default in the
official code) and DVAE encoding. No text generation happens here.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import CheckpointError, FeatureNotAvailableError, InputError
from ..loading.speech import load_vocos, tokenizer_dir, vocos_file
from ..modeling.tts import ConditionalChatTTS
from ..modeling.vocos import Vocos
from ..processing.audio import save_wav
from ..processing.tts_text import (
    AUDIO_BOS,
    SPEAKER,
    START,
    TEXT_END,
    TTS_EOS,
    ChatTTSTokenizer,
    TTSText,
    detect_language,
    normalize_stream_piece,
    prepare_tts_text,
    sentence_end,
    speech_text,
    text_mask,
)
from ..quant.linear import prepack_linears
from .generate import prefill_positions
from .speech_codes import CodeGenerator, SpeechOptions, SpeechTrace

SAMPLING_RATE = 24000
FRAME_SAMPLES = 512  # waveform samples per code frame (2 mel frames x hop 256)
CROSSFADE = 2048  # samples shared by consecutive streamed chunks (4 mel frames x hop 256 x 2)
_SEGMENT_SHIFT = 180  # a stream starts a new segment at a sentence end past reserved - 180 tokens
_SEGMENT_TEXT_IDS = 5  # text ids and ...
_SEGMENT_FRAMES = 50  # ... code frames a new segment is primed with
_OVERLAP_FRAMES = 4  # code frames re-vocoded before each streamed chunk


@dataclass
class OmniOutput:
    """Text with its speech: ``audio_wav`` float32 [N] at ``sampling_rate`` (24 kHz); ``spk_embeds``
    is the LLM speaker state [1, llm_dim] when asked for (official ``OmniOutput``); streamed
    chunks carry their part of the text and the last one the ``finish_reason``."""

    text: str = ""
    spk_embeds: torch.Tensor | None = None
    audio_wav: np.ndarray | None = None
    sampling_rate: int | None = None
    finish_reason: str | None = None  # set on the last chunk of a streamed answer


def crossfade(prev: torch.Tensor, new: torch.Tensor, overlap: int = CROSSFADE) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two consecutive chunks that share ``overlap`` samples (official ``_linear_overlap_add2_wav``).

    Triangular weights ``0.5 - |t - 0.5|`` on the interior of a uniform grid of
    ``max(len) + overlap + 2`` points; ``prev`` takes the last len(prev) weights, ``new`` the first
    len(new), ``overlap`` samples apart; the weighted sum over the summed weights is split into
    the part covering ``prev`` (emitted) and the rest (kept for the next merge).
    """
    n0, n1 = prev.shape[-1], new.shape[-1]
    total = n0 + n1 - overlap
    t = torch.linspace(0, 1, max(n0, n1) + overlap + 2, dtype=prev.dtype, device=prev.device)[1:-1]
    weight = 0.5 - (t - 0.5).abs()
    out = torch.zeros(total, dtype=prev.dtype, device=prev.device)
    norm = torch.zeros(total, dtype=prev.dtype, device=prev.device)
    out[:n0] += weight[-n0:] * prev
    norm[:n0] += weight[-n0:]
    off = n0 - overlap
    out[off : off + n1] += weight[:n1] * new
    norm[off : off + n1] += weight[:n1]
    out = out / norm
    return out[:n0], out[n0:]


class SpeechSynthesizer:
    """Speech head + vocoder + ChatTTS tokenizer of one loaded MiniCPM-o checkpoint."""

    def __init__(self, tts: ConditionalChatTTS, vocos: Vocos, tokenizer: ChatTTSTokenizer) -> None:
        self.tts, self.vocos, self.tokenizer = tts, vocos, tokenizer
        cfg = tts.config
        want = {START: None, SPEAKER: cfg.spk_emb_token_id, AUDIO_BOS: cfg.audio_bos_token_id,
                TEXT_END: cfg.text_eos_token_id}
        for tok, wanted in want.items():
            got = tokenizer.token_to_id(tok)
            if got is None or (wanted is not None and got != wanted):
                raise CheckpointError(
                    f"the ChatTTS tokenizer maps {tok} to {got}, but tts_config expects {wanted}: "
                    "tokenizer and checkpoint do not belong together")

    @classmethod
    def from_chat_model(cls, chat_model: Any, *, dtype: torch.dtype = torch.float32) -> SpeechSynthesizer:
        """From a loaded ``ChatModel``: its ``tts`` module (converted to ``dtype`` in place, float32
        as the official ``model.tts.float()``) and the vocoder and tokenizer under its ``assets/``.

        ``dtype=torch.bfloat16`` halves the bytes each frame reads (the decoder's linear layers
        are prepacked for oneDNN on a CPU): faster, but its codes are not the official float32 ones.
        """
        tts = getattr(chat_model.model, "tts", None)
        if tts is None:
            raise FeatureNotAvailableError(
                "this checkpoint has no speech head: its config.json needs init_tts=true and a tts_config")
        if tts.dtype != dtype:
            tts.to(dtype)
        prepack_linears(tts.model)  # bf16 on a CPU only; a no-op otherwise
        root = Path(chat_model.path)
        vocos = load_vocos(vocos_file(root), device=tts.device)
        return cls(tts, vocos, ChatTTSTokenizer.from_dir(tokenizer_dir(root)))

    # ------------------------------------------------------------------ parts
    @property
    def config(self) -> Any:
        return self.tts.config

    def default_options(self, **overrides: Any) -> SpeechOptions:
        """The official sampling settings (top-p / top-k / penalty from tts_config) with overrides."""
        cfg = self.config
        base = {"top_p": cfg.top_p, "top_k": cfg.top_k, "repetition_penalty": cfg.repetition_penalty}
        return SpeechOptions(**{**base, **overrides})

    def tts_text(self, text: str) -> TTSText:
        cfg = self.config
        return prepare_tts_text(self.tokenizer, text, reserved_len=cfg.streaming_text_reserved_len,
                                num_spk_embs=cfg.num_spk_embs)

    def speaker_embedding(self, speaker_hidden: torch.Tensor) -> torch.Tensor:
        """LLM speaker state [llm_dim] or [1, llm_dim] -> the decoder's speaker row [1, H]."""
        h = torch.as_tensor(speaker_hidden)
        if h.dim() == 1:
            h = h[None]
        if h.dim() != 2 or h.shape != (1, self.config.llm_dim):
            raise InputError(f"speaker state must be [{self.config.llm_dim}] (the LLM hidden at <|spk|>), "
                             f"got {tuple(h.shape)}")
        return self.tts.speaker_embedding(h)

    def chunk_range(self, k: int) -> tuple[int, int]:
        """Condition positions prefilled as text chunk ``k``: [0, 12), then [2 + 10k, 12 + 10k) up to 302."""
        cfg = self.config
        c, s = cfg.streaming_text_chunk_size, 1 + cfg.num_spk_embs
        if k == 0:
            return 0, c + s
        return k * c + s, min((k + 1) * c + s, cfg.condition_length - 1)

    def _new_generator(self, options: SpeechOptions | None, trace: SpeechTrace | None) -> CodeGenerator:
        return CodeGenerator(self.tts, options or self.default_options(), trace=trace)

    # ------------------------------------------------------------------ chat path
    @torch.inference_mode()
    def codes(self, text: str, speaker_hidden: torch.Tensor, options: SpeechOptions | None = None, *,
              trace: SpeechTrace | None = None, forced: torch.Tensor | None = None) -> torch.Tensor:
        """Code frames [T, num_vq] for ``text`` (official ``_generate_mel_spec``): text chunk k is
        prefilled before the k-th call of ``chunk_frames`` frames; after the last chunk, calls go on
        until the end id; any call that leaves more than ``max_frames`` frames is the last.
        ``forced`` teacher-forces frames."""
        options = options or self.default_options()
        speaker = self.speaker_embedding(speaker_hidden)
        cond = self.tts_text(text)
        gen = self._new_generator(options, trace)
        gen.set_text_mask(text_mask(cond.n_tokens, reserved_len=self.config.streaming_text_reserved_len,
                                    num_spk_embs=self.config.num_spk_embs))
        if forced is not None:
            gen.force(forced)
        for k in range(math.ceil(self.config.condition_length / self.config.streaming_text_chunk_size)):
            begin, end = self.chunk_range(k)
            if end > begin:
                gen.prefill_text(cond.ids, begin, end, speaker)
            if gen.generate(options.chunk_frames) or gen.codes.shape[0] > options.max_frames:
                return gen.codes  # (the official limit, 2048, is never reached in this loop: 31 x 25 frames)
        while not gen.generate(options.chunk_frames):
            if gen.codes.shape[0] > options.max_frames:
                break
        return gen.codes

    @torch.inference_mode()
    def mel(self, codes: torch.Tensor) -> torch.Tensor:
        """Code frames [T, num_vq] -> mel [100, 2T] (GFSQ -> DVAE decoder -> out_conv x coef)."""
        codes = torch.as_tensor(codes).to(device=self.tts.device, dtype=torch.long)
        return self.tts.dvae.decode(codes[None])[0]

    @torch.inference_mode()
    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel [100, F] -> float32 waveform [256 F] at 24 kHz (Vocos)."""
        return self.vocos.decode(mel[None].float())[0]

    def waveform(self, codes: torch.Tensor) -> torch.Tensor:
        """Code frames [T, num_vq] -> float32 waveform [512 T] at 24 kHz."""
        if codes.shape[0] == 0:
            return torch.zeros(0)
        return self.vocode(self.mel(codes))

    def synthesize(self, text: str, speaker_hidden: torch.Tensor, options: SpeechOptions | None = None, *,
                   output_audio_path: str | Path | None = None, trace: SpeechTrace | None = None) -> OmniOutput:
        """Speak ``text`` in the voice of ``speaker_hidden`` (the chat path); writes a 16-bit WAV
        when ``output_audio_path`` is given."""
        wav = self.waveform(self.codes(text, speaker_hidden, options, trace=trace)).cpu().numpy()
        if output_audio_path:
            save_wav(output_audio_path, wav, SAMPLING_RATE)
        return OmniOutput(text=text, audio_wav=wav, sampling_rate=SAMPLING_RATE)

    # ------------------------------------------------------------------ streaming path
    def stream(self, speaker_hidden: torch.Tensor, options: SpeechOptions | None = None, *,
               first_chunk: Literal["hold", "early"] = "hold", trace: SpeechTrace | None = None) -> SpeechStream:
        """A new independent streaming utterance (see ``SpeechStream``)."""
        return SpeechStream(self, speaker_hidden, options or self.default_options(), first_chunk=first_chunk,
                            trace=trace)


class SpeechStream:
    """One streamed answer (official ``_generate_mel_spec_audio_streaming``): ``feed`` each LLM
    text piece as it is generated, ``finish`` when the LLM is done; both return the audio chunks
    ready so far (``OmniOutput`` with the raw answer text they cover).

    The first piece is taken as is; later pieces get digits spelled and ``*`` removed (language
    fixed after the 2nd and 3rd piece). Text chunk k is prefilled and 25 frames generated once
    the text holds 10(k+1) ChatTTS tokens; each chunk's new frames plus the 4 before them are
    vocoded and cross-faded with the previous chunk. ``first_chunk="hold"`` (the reference)
    emits the first chunk only with the second; ``"early"`` (an official variant) emits it at
    once minus its last 2048 samples. Past ``reserved - 180`` tokens a piece with a sentence end
    closes the segment and the next one starts from its last 5 text ids and 50 frames. When the
    speech ends (end id) the stream is ``done`` and ignores further text, as the reference does.
    """

    def __init__(self, synth: SpeechSynthesizer, speaker_hidden: torch.Tensor, options: SpeechOptions, *,
                 first_chunk: Literal["hold", "early"] = "hold", trace: SpeechTrace | None = None) -> None:
        if first_chunk not in ("hold", "early"):
            raise InputError(f"first_chunk must be 'hold' or 'early', got {first_chunk!r}")
        self.synth, self.options, self.first_chunk, self.trace = synth, options, first_chunk, trace
        with torch.inference_mode():
            self.speaker = synth.speaker_embedding(speaker_hidden)
        self.done = False
        self._awaiting_first = True
        self._stopped = False
        self._start_segment()

    def _start_segment(self) -> None:
        self.gen = self.synth._new_generator(self.options, self.trace)
        self.gen_text = self.gen_text_raw = ""
        self.lang: str | None = None
        self.chunk_idx = self.new_ids_len = self.prev_text_len = self.pieces = 0
        self.prev_wav: torch.Tensor | None = None
        self.cond: TTSText | None = None
        self.continued = False

    # ------------------------------------------------------------------ public
    def feed(self, piece: str) -> list[OmniOutput]:
        """Take the next LLM text piece; returns the audio chunks it completed (often none)."""
        if not isinstance(piece, str):
            raise InputError(f"a stream takes text pieces (str), got {type(piece).__name__}")
        if self.done:
            return []
        with torch.inference_mode():
            return self._feed(piece.split(TTS_EOS)[0])

    def finish(self) -> list[OmniOutput]:
        """The LLM is done: prefill the rest of the text up to [Etts], generate to the end."""
        if self.done:
            return []
        self.done = True
        with torch.inference_mode():
            return self._drain()

    # ------------------------------------------------------------------ steps
    def _feed(self, txt: str) -> list[OmniOutput]:
        if self._awaiting_first:  # the reference reads the first piece before its loop: no checks
            self._awaiting_first = False
            self.gen_text += txt
            self.gen_text_raw = self.gen_text
            self._prepare()
            return []
        self.pieces += 1
        if self.pieces == 1 and txt == "" and self.continued:
            self.done = True
            return []
        self.gen_text_raw += txt
        if self.pieces <= 2:
            self.lang = detect_language(self.gen_text_raw)
        self.gen_text += normalize_stream_piece(txt, self.lang)
        cond = self._prepare()
        cfg = self.synth.config
        if cond.n_tokens >= cfg.streaming_text_reserved_len - _SEGMENT_SHIFT and (mark := sentence_end(txt)):
            return self._split_segment(mark)
        if cond.n_tokens < (self.chunk_idx + 1) * cfg.streaming_text_chunk_size:
            return []
        begin, end = self.synth.chunk_range(self.chunk_idx)
        self._prefill(cond, begin, end)
        self.gen.generate(self.options.chunk_frames)
        self.chunk_idx += 1
        out = self._vocode_new()
        if self.gen.finished:
            out += self._tail()
            self.done = True
        return out

    def _prepare(self) -> TTSText:
        self.cond = self.synth.tts_text(self.gen_text)
        if self.trace is not None:
            self.trace.text_calls.append({"text_in": self.gen_text, "tts_token_len": self.cond.n_tokens})
        return self.cond

    def _prefill(self, cond: TTSText, begin: int, end: int) -> None:
        cfg = self.synth.config
        self.gen.set_text_mask(text_mask(cond.n_tokens, reserved_len=cfg.streaming_text_reserved_len,
                                         num_spk_embs=cfg.num_spk_embs))
        self.gen.prefill_text(cond.ids, begin, end, self.speaker)

    def _drain(self) -> list[OmniOutput]:
        """The rest of the segment: its text up to [Etts], then 25-frame calls to the end."""
        cond = self.cond
        if cond is None:
            return []
        cfg = self.synth.config
        begin = 0 if self.chunk_idx == 0 else self.synth.chunk_range(self.chunk_idx)[0]
        end = cond.n_tokens + 1 + cfg.num_spk_embs + 1  # through [Etts]
        if end > begin:
            self._prefill(cond, begin, end)
        out: list[OmniOutput] = []
        while True:
            self.gen.generate(self.options.chunk_frames)
            self.chunk_idx += 1
            out += self._vocode_new()
            if self.gen.finished:
                break
            if self.gen.codes.shape[0] > self.options.max_frames:
                self._stopped = True
                break
        return out + self._tail()

    def _split_segment(self, mark: str) -> list[OmniOutput]:
        cut = self.gen_text.rfind(mark)
        left = self.gen_text[cut + 1 :]
        self.gen_text = self.gen_text[: cut + 1]
        cond = self._prepare()
        out = self._drain()
        if self._stopped:
            self.done = True
            return out
        n, lead = cond.n_tokens, 1 + self.synth.config.num_spk_embs
        text_ids = cond.ids[lead + n - _SEGMENT_TEXT_IDS : lead + n]  # the last text ids before [Etts]
        frames = self.gen.codes[-_SEGMENT_FRAMES:]
        self._start_segment()
        self.continued = True
        cfg = self.synth.config
        start = self.synth.tokenizer.encode(START + SPEAKER * cfg.num_spk_embs)
        self.gen.set_text_mask(text_mask(len(text_ids), reserved_len=cfg.streaming_text_reserved_len,
                                         num_spk_embs=cfg.num_spk_embs))
        self.gen.prefill_text(start + text_ids, 0, len(start) + len(text_ids), self.speaker)
        self.gen.prefill_audio(frames)
        self.chunk_idx = len(text_ids) // cfg.streaming_text_chunk_size
        self.new_ids_len = frames.shape[0]
        self.gen_text = self.synth.tokenizer.decode(text_ids) + left
        self.gen_text_raw = self.gen_text
        self.prev_text_len = len(self.gen_text)  # self.cond stays None: no speech until a new piece arrives
        return out

    def _vocode_new(self) -> list[OmniOutput]:
        codes = self.gen.codes
        wav = self.synth.waveform(codes[max(self.new_ids_len - _OVERLAP_FRAMES, 0) :])
        self.new_ids_len = codes.shape[0]
        if wav.numel() == 0:
            return []
        if self.prev_wav is not None:
            ready, self.prev_wav = crossfade(self.prev_wav, wav, CROSSFADE)
            return [self._emit(ready)]
        if self.first_chunk == "early":
            self.prev_wav = wav[-CROSSFADE:]
            return [self._emit(wav[:-CROSSFADE])]
        self.prev_wav = wav
        return []

    def _tail(self) -> list[OmniOutput]:
        if self.prev_wav is None:
            return []
        wav, self.prev_wav = self.prev_wav, None
        return [self._emit(wav)]

    def _emit(self, wav: torch.Tensor) -> OmniOutput:
        text = self.gen_text_raw[self.prev_text_len :]
        self.prev_text_len = len(self.gen_text_raw)
        return OmniOutput(text=text, audio_wav=wav.cpu().numpy(), sampling_rate=SAMPLING_RATE)


def stream_speech(synth: SpeechSynthesizer, speaker_hidden: torch.Tensor, pieces: Iterable[str],
                  options: SpeechOptions | None = None, *, first_chunk: Literal["hold", "early"] = "hold",
                  trace: SpeechTrace | None = None) -> Iterator[OmniOutput]:
    """Pull form of ``SpeechStream``: audio chunks for an iterable of LLM text pieces."""
    stream = synth.stream(speaker_hidden, options, first_chunk=first_chunk, trace=trace)
    for piece in pieces:
        yield from stream.feed(piece)
        if stream.done:
            return
    yield from stream.finish()


# ---------------------------------------------------------------------------------- LLM side


class LLMTextPieces:
    """Generated LLM ids -> the official stream's text pieces (``llm_generate_chunk``): one piece
    per ``size`` ids (fewer when a terminator ends the answer); ids that end inside a multi-byte
    character wait for the next piece; id 0, a leading bos and a final terminator are dropped."""

    def __init__(self, tokenizer: Any, terminators: Collection[int], *, size: int = 3) -> None:
        self.tokenizer, self.terminators, self.size = tokenizer, set(terminators), size
        self._round: list[int] = []
        self._left: list[int] = []

    def push(self, token_id: int) -> str | None:
        """Add one generated id; returns a piece when this id completes one."""
        self._round.append(int(token_id))
        if len(self._round) < self.size and int(token_id) not in self.terminators:
            return None
        return self.flush()

    def flush(self) -> str | None:
        """The pending ids as a piece (None if there are none). The official loop never needs it:
        it generates whole rounds of ``size`` ids and stops at a terminator (dropping ids of an
        unfinished character); use it when generation stops mid-round."""
        ids = self._left + self._round
        self._round = []
        if not ids:
            return None
        end = self._complete_prefix(ids)
        self._left = ids[end:]
        return self._decode(ids[:end]) if end > 0 else ""

    def _complete_prefix(self, ids: list[int]) -> int:
        end = len(ids)
        text = self.tokenizer.decode(ids)
        while text and text[-1] == "\ufffd":
            end -= 1
            if end == 0:
                break
            text = self.tokenizer.decode(ids[:end])
        return end

    def _decode(self, ids: list[int]) -> str:
        return official_answer_text(self.tokenizer, ids, self.terminators)


def official_answer_text(tokenizer: Any, ids: Sequence[int], terminators: Collection[int]) -> str:
    """The official ``_decode_text``: id 0 dropped, a leading bos and a final terminator
    removed, decoded with special tokens kept (``<|tts_eos|>`` included)."""
    ids = [int(i) for i in ids if int(i) != 0]
    bos = getattr(tokenizer, "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    if ids and ids[-1] in terminators:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def speaker_position(input_ids: Sequence[int], tokenizer: Any) -> int:
    """Index of the ``<|spk|>`` slot of the last ``<|spk_bos|>...<|spk_eos|>`` pair of a prompt."""
    bos, eos = tokenizer.token_to_id("<|spk_bos|>"), tokenizer.token_to_id("<|spk_eos|>")
    ids = [int(i) for i in input_ids]
    starts = [i + 1 for i, t in enumerate(ids) if t == bos]
    ends = [i for i, t in enumerate(ids) if t == eos]
    if bos is None or not starts or len(starts) != len(ends):
        raise InputError("the prompt has no <|spk_bos|><|spk|><|spk_eos|> speaker slot: build it with the "
                         "speech template (use_tts_template=True)")
    if ends[-1] - starts[-1] != 1:
        raise InputError(f"the speaker slot must hold exactly one token, got {ends[-1] - starts[-1]}")
    return starts[-1]


def speaker_hidden_from_states(hidden: torch.Tensor, input_ids: Sequence[int], tokenizer: Any) -> torch.Tensor:
    """The speaker state [H] (float32) from final-norm hidden states [T, H] of ``input_ids`` [T]
    (e.g. a streaming session's prefill of the generation prompt ``<|im_end|>\n<|im_start|>
    assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>``)."""
    if hidden.dim() != 2 or hidden.shape[0] != len(input_ids):
        raise InputError(f"hidden states must be [{len(input_ids)}, H] for {len(input_ids)} ids, got "
                         f"{tuple(hidden.shape)}")
    return hidden[speaker_position(input_ids, tokenizer)].float()


@torch.inference_mode()
def speaker_hidden(chat_model: Any, batch: Any, row: int = 0) -> torch.Tensor:
    """The LLM's final-norm hidden state [llm_dim] (float32) at the ``<|spk|>`` slot of a prepared
    prompt (``ChatModel.prepare(..., use_tts_template=True)``), as the official
    ``_get_last_spk_embeds``. Runs the LLM over the prompt up to that slot."""
    pos = speaker_position(batch.input_ids[row].tolist(), chat_model.tokenizer)
    mask = batch.attention_mask[row : row + 1]  # [1, T]
    positions = prefill_positions(mask)[:, : pos + 1]  # [1, pos+1]
    hidden = chat_model.model.forward_hidden(batch.inputs_embeds[row : row + 1, : pos + 1], positions,
                                             mask[:, : pos + 1])  # [1, pos+1, H]
    return hidden[0, pos].float()


def speak_answer(chat_model: Any, batch: Any, generated_ids: Sequence[int], *, row: int = 0,
                 options: SpeechOptions | None = None, output_audio_path: str | Path | None = None,
                 synthesizer: SpeechSynthesizer | None = None, trace: SpeechTrace | None = None) -> OmniOutput:
    """``chat(generate_audio=True)`` once the answer ids are generated: the spoken text is the
    decoded answer between ``<|tts_bos|>`` and ``<|tts_eos|>`` (no normalisation, as the
    reference), the voice the LLM state at ``<|spk|>``. Returns the answer as ``chat()`` gives it
    plus the 24 kHz waveform and the speaker state."""
    synth = synthesizer or get_synthesizer(chat_model)
    raw = official_answer_text(chat_model.tokenizer, generated_ids, chat_model.terminator_ids())
    spk = speaker_hidden(chat_model, batch, row)
    spoken = synth.synthesize(speech_text(raw), spk, options, output_audio_path=output_audio_path, trace=trace)
    return OmniOutput(text=chat_model.runner.postprocess(generated_ids), spk_embeds=spk[None],
                      audio_wav=spoken.audio_wav, sampling_rate=spoken.sampling_rate)


_SYNTHESIZERS: weakref.WeakKeyDictionary[Any, SpeechSynthesizer] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def get_synthesizer(chat_model: Any) -> SpeechSynthesizer:
    """The ``SpeechSynthesizer`` of a loaded ``ChatModel``, built once (vocoder read from disk)
    and shared by every caller; it holds weights only."""
    with _LOCK:
        synth = _SYNTHESIZERS.get(chat_model)
        if synth is None:
            synth = SpeechSynthesizer.from_chat_model(chat_model)
            _SYNTHESIZERS[chat_model] = synth
        return synth
