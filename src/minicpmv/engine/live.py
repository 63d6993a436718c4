"""Live sessions of MiniCPM-o 2.6: a user turn fed as it arrives, the answer streamed back as
text and speech (the official ``streaming_prefill`` / ``streaming_generate``, spec o2.6
§4.7-§4.8).

``LiveSession`` is one conversation; any number run at once on one loaded model (the official
code keeps one session per model). Each session owns its LLM KV cache, its audio encoder cache
and its image feature cache; the model holds weights only.

* ``prefill(content, role="user")``: video frames (PIL images), 1-s audio chunks (16 kHz mono
  waveforms) and text of the turn, as they arrive. Each call is framed as the official code
  frames it and goes straight into the LLM cache: the first call of a session is a whole
  message of the speech template (``<|im_start|>ROLE\\n...<|im_end|>\\n``); the first user
  call after that opens a user message (after an answer: ``<|im_end|>\\n`` first, or
  ``<|tts_eos|><|im_end|>\\n`` when the answer was cut short); later calls add their content
  only. Items are joined with "" (``omni_input=True``, the official default) or "\\n". Images
  get one slice and no image id (``max_slice_nums`` overrides), audio chunks go through the
  Whisper encoder with a cache over the turn's earlier chunks (positions continue; reset at a
  system / assistant message, after the first call, at each answer, and when the 1500
  encoder positions would be exceeded).
* ``generate()``: appends ``<|im_end|>\\n<|im_start|>assistant\\n<|spk_bos|><|spk|><|spk_eos|>
  <|tts_bos|>`` and runs the token loop over the session's cache (the engine's
  ``generate_steps``); the voice is the hidden state at ``<|spk|>`` of that prefill; ids become
  the official 3-token pieces and stream through the speech head (``spoken.SpokenAnswer``).
  Yields ``OmniOutput`` chunks (text + 24 kHz audio; text only with ``generate_audio=False``),
  the last with the finish reason. Closing the iterator early stops the answer; the next
  ``prefill`` then closes it with ``<|tts_eos|>`` (the official interruption).
* ``say(pieces, voice=None)``: speak text pieces from elsewhere in the session's voice (the
  last answer's, or ``voice``: a speaker state such as ``LiveSession.voice`` saved earlier).

Decoding settings are the official ``streaming_generate``'s (sampling preset, 512 new tokens,
rounded up to whole 3-token rounds as the official loop stops). Differences from the reference:
decoding is one continuous loop, so the repetition penalty sees the whole answer (the
reference's rounds see only their own ids and the one before; equal whenever the penalty is
1.0); beam search (the reference's ``sampling=False``) is refused; ``enable_regenerate`` is
not implemented. Not thread-safe per session (one caller at a time); nothing here is shared
between sessions but the model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..errors import ContextLengthError, FeatureNotAvailableError, InputError
from ..processing.audio import extract_audio
from ..processing.chat_template import IMAGE_TAG
from ..processing.processor import ModelInputs
from .chat import ChatModel, official_params
from .features import FeatureCache
from .generate import StepOutput, generate_steps, prefill_positions
from .kv_cache import KVCache
from .runner import PreparedBatch
from .sampling import SamplingParams
from .speech import OmniOutput, get_synthesizer, speaker_position
from .speech_codes import SpeechOptions, SpeechTrace
from .spoken import SpeakerTap, SpeechRequest, SpokenAnswer, speak_steps

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
GENERATE_PROMPT = "<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
_OPEN_USER = "<|im_start|>user\n"
_CLOSE_ANSWER = "<|im_end|>\n"
_CLOSE_CUT_ANSWER = "<|tts_eos|><|im_end|>\n"
_ROUND = 3  # ids per official generate round
_DEFAULT_MAX_NEW = 512  # streaming_generate's default
_NO_TRUNCATION = 2**31


class LiveSession:
    """One live conversation with a MiniCPM-o model (see the module docstring)."""

    def __init__(
        self, model: ChatModel, *, generate_audio: bool = True, omni_input: bool = True,
        max_slice_nums: int | None = None, first_chunk: Literal["hold", "early"] = "hold",
        speech_options: SpeechOptions | None = None, speech_trace: SpeechTrace | None = None,
        max_audio_seconds: float | None = None, feature_cache: FeatureCache | None = None, **generation: Any,
    ) -> None:
        if not model.version.audio_input:
            raise FeatureNotAvailableError(f"live sessions need MiniCPM-o (audio in and out); {model.version.title} "
                                           "has no audio encoder: use ChatSession")
        if generate_audio and getattr(model.model, "tts", None) is None:
            raise FeatureNotAvailableError("this checkpoint has no speech head (init_tts / tts_config): use "
                                           "LiveSession(..., generate_audio=False) for text answers")
        self.model, self.runner = model, model.runner
        self.generate_audio, self.omni_input, self.max_slice_nums = generate_audio, omni_input, max_slice_nums
        self.speech = SpeechRequest(generate_audio=generate_audio, options=speech_options, trace=speech_trace,
                                    first_chunk=first_chunk, max_seconds=max_audio_seconds)
        self.generation = dict(generation)
        self._params(self.generation)  # bad settings fail now, not at the first answer
        self.features = feature_cache if feature_cache is not None else FeatureCache()
        self.voice: torch.Tensor | None = None  # the speaker state of the last answer (a reusable preset)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Start a new conversation (the official new ``session_id``); ``voice`` is kept."""
        self.cache: KVCache = self.runner.new_cache(1)
        self._audio_cache: KVCache | None = None
        self._first = True
        self._new_user_msg = True
        self._answered = False  # an answer was generated since the last user message opened
        self._completed = False  # ... and it ended with a terminator
        self.last_text = ""
        self.prompt = ""  # every framed piece fed so far (media as their tags), for inspection

    @property
    def cached_tokens(self) -> int:
        """Positions in the session's LLM cache."""
        return self.cache.get_seq_length()

    # ------------------------------------------------------------------ input
    def prefill(self, content: Any, *, role: str = "user") -> int:
        """Feed one piece of a turn (see the module docstring); returns the tokens it added."""
        if role not in ROLES:
            raise InputError(f"role must be one of {ROLES}, got {role!r}")
        text, images, clips = self._parts(content)
        framed, opens_user = self._frame(text, role)
        if role in ("system", "assistant"):
            self._audio_cache = None
        inputs = self.runner.processor.prompt_inputs(
            framed, images, clips, max_slice_nums=1 if self.max_slice_nums is None else self.max_slice_nums,
            use_image_id=False, chunk_input=True, max_length=_NO_TRUNCATION)
        self._check_room(len(inputs.input_ids[0]))
        with torch.inference_mode():
            batch = self.runner.prepare(inputs, features=[self._features(inputs)], id0_quirk=False)
            self._forward(batch)
        self.prompt += framed
        if opens_user:
            self._new_user_msg = False
        if role in ("system", "assistant"):
            self._new_user_msg = True
        if self._first:
            self._first = False
            self._audio_cache = None
        return len(inputs.input_ids[0])

    def _parts(self, content: Any) -> tuple[str, list[Image.Image], list[np.ndarray]]:
        items = list(content) if isinstance(content, (list, tuple)) else [content]
        [msg], clips = extract_audio([{"role": "user", "content": items}], self.runner.processor.audio_cfg)
        parts: list[str] = []
        images: list[Image.Image] = []
        for item in msg["content"]:
            if isinstance(item, Image.Image):
                images.append(item)
                parts.append(IMAGE_TAG)
            elif isinstance(item, str):
                parts.append(item)
            else:
                raise InputError(f"a live session takes PIL images, 16 kHz audio waveforms and text, got "
                                 f"{type(item).__name__}")
        if not parts:
            raise InputError("prefill needs content: images, audio chunks or text")
        return ("" if self.omni_input else "\n").join(parts), images, clips

    def _frame(self, text: str, role: str) -> tuple[str, bool]:
        """The official framing of one piece, and whether it opens a user message."""
        if self._first:
            return self.runner.processor.render([{"role": role, "content": text}], audio=True,
                                                add_generation_prompt=False), False
        if self._new_user_msg and role == "user":
            head = (_CLOSE_ANSWER if self._completed else _CLOSE_CUT_ANSWER) if self._answered else ""
            return head + _OPEN_USER + text, True
        return text, False

    def _features(self, inputs: ModelInputs) -> torch.Tensor | None:
        """Image rows (feature cache) then the streamed audio rows, as ``prepare`` places them."""
        no_audio = dataclasses.replace(inputs, audio_features=[[]])
        feats = self.runner.encode_features(no_audio, self.features)[0]
        rows = [feats.reshape(-1, feats.shape[-1])] if feats is not None else []
        model = self.runner.model
        for seg in inputs.audio_features[0] if inputs.audio_features else []:
            positions = (seg.shape[1] - 1) // 2 + 1
            held = self._audio_cache.get_seq_length() if self._audio_cache is not None else 0
            if held and held + positions >= model.audio_positions:
                log.info("live session: the audio encoder cache is full (%d positions); starting it again",
                         self._audio_cache.get_seq_length())
                self._audio_cache = None
            if self._audio_cache is None:
                self._audio_cache = KVCache(len(model.apm.layers))
            rows.append(model.encode_audio_streaming(torch.from_numpy(seg), self._audio_cache))
        # image and audio parts may sit on different devices (device_map): join them as prepare does
        return torch.cat([r.to(device=rows[0].device, dtype=model.dtype) for r in rows]) if rows else None

    def _forward(self, batch: PreparedBatch) -> None:
        """Append a piece's positions to the LLM cache (every position visible, as the reference)."""
        past = self.cached_tokens
        mask = torch.ones(1, past + batch.inputs_embeds.shape[1], dtype=torch.long, device=batch.inputs_embeds.device)
        positions = prefill_positions(mask)[:, past:]  # [1, T]
        self.runner.model.forward_hidden(batch.inputs_embeds, positions, mask, self.cache)

    def _check_room(self, new: int, answer: int = 0) -> None:
        context = self.runner.context_length
        if self.cached_tokens + new + answer >= context:
            raise ContextLengthError(
                f"the live session holds {self.cached_tokens} tokens; {new} more (+{answer} for the answer) exceed "
                f"the model's context of {context}: reset() the session or start a new one")

    # ------------------------------------------------------------------ output
    def _params(self, kw: dict[str, Any]) -> SamplingParams:
        kw = {"max_new_tokens": _DEFAULT_MAX_NEW, **kw}
        params = official_params(self.runner.version, kw)
        if params.num_beams != 1:
            raise InputError("live sessions decode with sampling (default) or greedy: pass sampling=False with "
                             "num_beams=1 (the official per-round beam search is not reproduced)")
        return params.replace(max_new_tokens=_ROUND * math.ceil(params.max_new_tokens / _ROUND))

    def generate(self, *, generate_audio: bool | None = None, **overrides: Any) -> Iterator[OmniOutput]:
        """Answer what was prefilled: ``OmniOutput`` chunks, the last with the finish reason.
        ``overrides``: generation settings for this answer (official keywords)."""
        if self._first:
            raise InputError("nothing to answer yet: prefill() the user's turn first")
        audio = self.generate_audio if generate_audio is None else generate_audio
        if audio and not self.generate_audio and getattr(self.runner.model, "tts", None) is None:
            raise FeatureNotAvailableError("this checkpoint has no speech head: generate(generate_audio=False)")
        params = self._params({**self.generation, **overrides})
        inputs = self.runner.processor.prompt_inputs(GENERATE_PROMPT, max_length=_NO_TRUNCATION)
        prompt_len = len(inputs.input_ids[0])
        room = self.runner.context_length - self.cached_tokens - prompt_len - 1
        if room < 1:
            self._check_room(prompt_len, 1)
        params = params.replace(max_new_tokens=min(params.max_new_tokens, room))
        self._new_user_msg, self._answered, self._completed = True, True, False
        self._audio_cache = None
        self.prompt += GENERATE_PROMPT
        synth = get_synthesizer(self.model) if audio else None
        request = dataclasses.replace(self.speech, generate_audio=audio)
        return self._answer(inputs, params, synth, request)

    def _answer(self, inputs: ModelInputs, params: SamplingParams, synth: Any,
                request: SpeechRequest) -> Iterator[OmniOutput]:
        tap = SpeakerTap(self.runner.model, speaker_position(inputs.input_ids[0], self.runner.tokenizer))
        answer = SpokenAnswer(self.runner.tokenizer, self.runner.eos_ids, synth=synth,
                              speaker=lambda: self._voice_of(tap), request=request)
        with torch.inference_mode():
            batch = self.runner.prepare(inputs, features=[None], id0_quirk=False)
            past = self.cached_tokens
            mask = torch.ones(1, past + batch.inputs_embeds.shape[1], dtype=torch.long)
            steps = generate_steps(tap, batch.inputs_embeds, mask, params, eos_ids=self.runner.eos_ids,
                                   cache=self.cache, mode=self.runner.decode_mode)
            try:
                yield from speak_steps(answer, self._watch(steps))
            finally:
                self.last_text = answer.text
                if tap.hidden is not None:
                    self.voice = tap.hidden

    def _watch(self, steps: Iterator[StepOutput]) -> Iterator[StepOutput]:
        for step in steps:
            if step.reasons and step.reasons[0] == "stop":
                self._completed = True  # a terminator: the next user message only closes the turn
            yield step

    @staticmethod
    def _voice_of(tap: SpeakerTap) -> torch.Tensor:
        if tap.hidden is None:
            raise InputError("the speaker state is read during the prefill, before the first piece")
        return tap.hidden

    def say(self, pieces: Iterable[str], *, voice: torch.Tensor | None = None) -> Iterator[OmniOutput]:
        """Speak text pieces (e.g. from another text source, as they arrive) in the session's voice:
        ``voice``, else the last answer's. Chunks as ``generate()`` gives them."""
        speaker = voice if voice is not None else self.voice
        if speaker is None:
            raise InputError("this session has no voice yet: generate() an answer first or pass voice=")
        answer = SpokenAnswer(self.runner.tokenizer, self.runner.eos_ids, synth=get_synthesizer(self.model),
                              speaker=speaker, request=dataclasses.replace(self.speech, generate_audio=True))
        for piece in pieces:
            yield from answer.push_text(piece)
            if answer.done:
                break
        yield from answer.finish()
