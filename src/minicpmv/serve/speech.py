"""Spoken answers over the OpenAI API (MiniCPM-o 2.6 with its speech head).

* Chat completions with ``"modalities": ["text", "audio"]`` and ``"audio": {"voice", "format"}``:
  ``prepare_spoken`` builds the request like a text one, in the speech template, after the voice
  messages (``Voices``), reads the voice at ``<|spk|>`` (one prompt pass, ``speaker_hidden``)
  and hands the prepared prompt to the batch engine, so the LLM part is batched with every other
  request. ``complete_spoken`` then speaks the whole answer (the chat path of
  ``chat(generate_audio=True)``) into ``message.audio`` (``id``, base64 ``data``, ``expires_at``,
  ``transcript``; ``content`` is null, as OpenAI answers); ``stream_spoken`` feeds the tokens as
  they come to a ``SpokenAnswer`` (the streaming path) and sends ``delta.audio`` chunks
  (``transcript`` text and base64 ``data``; the first carries ``id``, the last ``expires_at``).
  Formats: ``wav`` (streamed: the first chunk starts with a WAV header whose sizes are unknown,
  0xFFFFFFFF, as streaming WAV producers write it) and ``pcm16`` (raw 24 kHz 16-bit mono).
* ``POST /v1/audio/speech``: ``input`` spoken exactly, in ``voice``; ``instructions`` describe the
  voice (instruction-to-speech): the prompt asks the model to read the text in that manner and
  only the voice comes from the LLM (the text is not re-generated), then the text goes through
  the streaming path (long texts continue in new segments at sentence ends). ``response_format``
  ``wav`` (the default here; OpenAI's is mp3) or ``pcm``.
* Voices: ``default`` (the model's own voice, the official ``<reserved_53>`` prompt) and the
  server's ``--voice NAME=REF`` clips (voice cloning); a request may also bring its own voice
  prompt: a system message holding ``input_audio``.
* Limits: ``max_audio_seconds`` (audio out), ``max_input_audio_seconds`` (each input clip, in
  ``completions.py``), ``max_speech_input_chars``; a model without a speech head gets a 400.

Audio is produced in worker threads (never on the event loop), one utterance per request with
its own caches, so concurrent requests give the same audio as one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import struct
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..engine.speech import SAMPLING_RATE, get_synthesizer, official_answer_text, speaker_hidden
from ..engine.spoken import SpeechRequest, SpokenAnswer, cut_audio, limited_options
from ..errors import MiniCPMVError
from ..processing.audio import pcm16, read_audio, wav_bytes
from ..processing.tts_text import speech_text
from ..processing.voice_prompts import READ_ALOUD, get_sys_prompt
from .completions import Prepared, _Answer, _sse, prepare
from .convert import RequestPlan
from .errors import APIError, from_library_error
from .runtime import Handle, ServerState, by_deadline, slot_by_deadline
from .schemas import (
    AssistantMessage,
    AudioOut,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    SpeechRequestBody,
)

log = logging.getLogger(__name__)

AUDIO_TTL_S = 3600  # expires_at: this server keeps no audio, the field is informational
_WORDS_PER_PIECE = 3


# ---------------------------------------------------------------------------------- voices


class Voices:
    """The server's named voices: ``default`` and the ``--voice NAME=REF`` reference clips."""

    def __init__(self, clips: dict[str, np.ndarray], language: str) -> None:
        self.clips, self.language = clips, language

    @classmethod
    def from_state(cls, state: ServerState) -> Voices:
        clips = {name: read_audio(path, what=f"voice {name!r}") for name, path in state.config.voices}
        return cls(clips, state.config.voice_language)

    @property
    def names(self) -> list[str]:
        return ["default", *self.clips]

    def clip(self, name: str, param: str) -> np.ndarray | None:
        if name != "default" and name not in self.clips:
            raise APIError(400, f"unknown voice {name!r}; this server has: {', '.join(self.names)} (start it with "
                           "--voice NAME=REF_AUDIO to add one)", code="invalid_voice", param=param)
        return self.clips.get(name)

    def chat_messages(self, plan: RequestPlan) -> list[dict[str, Any]]:
        """The official voice message before a spoken chat (none when the request brings one)."""
        if plan.own_voice_prompt:
            if plan.voice != "default":
                raise APIError(400, "the request's system message holds a voice clip: set audio.voice to 'default' "
                               "or leave the clip out", code="invalid_voice", param="audio")
            return []
        clip = self.clip(plan.voice or "default", "audio")
        return [get_sys_prompt(clip, "audio_assistant", self.language)]

    def reading_messages(self, name: str, text: str, instructions: str | None) -> list[dict[str, Any]]:
        """Messages asking the model to read ``text`` (in the manner of ``instructions``)."""
        clip = self.clip(name, "voice")
        first = get_sys_prompt(clip, "voice_cloning" if clip is not None else "audio_assistant", self.language)
        request = [instructions, READ_ALOUD, text] if instructions else [READ_ALOUD, text]
        return [first, {"role": "user", "content": request}]


_VOICES: weakref.WeakKeyDictionary[ServerState, Voices] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def voices_of(state: ServerState) -> Voices:
    """The server's voices, read once."""
    with _LOCK:
        voices = _VOICES.get(state)
        if voices is None:
            voices = _VOICES[state] = Voices.from_state(state)
        return voices


def check_speech(state: ServerState, param: str) -> None:
    if getattr(state.model.model, "tts", None) is None:
        raise APIError(400, f"the model {state.name!r} has no speech head: spoken answers need MiniCPM-o 2.6 with "
                       "its TTS weights (init_tts); ask for text only", code="unsupported", param=param)


# ---------------------------------------------------------------------------------- chat completions


@dataclass
class SpokenPrepared(Prepared):
    """A spoken request: ``inputs`` is the prepared prompt, ``voice`` the state at ``<|spk|>``."""

    voice: torch.Tensor | None = None


async def prepare_spoken(state: ServerState, body: ChatCompletionRequest) -> SpokenPrepared:
    check_speech(state, "modalities")
    if body.audio is None:
        raise APIError(400, 'modalities with "audio" need the audio parameter: {"voice": ..., "format": "wav"}',
                       code="invalid_request", param="audio")
    fmt = body.audio.format
    if fmt not in ("wav", "pcm16"):
        raise APIError(400, f"audio.format {fmt!r} is not produced by this server: use 'wav' or 'pcm16'",
                       code="unsupported", param="audio.format")
    voices = await asyncio.to_thread(voices_of, state)
    prep = await prepare(state, body, voices.chat_messages)
    batch = await asyncio.to_thread(state.model.runner.prepare, prep.inputs, id0_quirk=state.config.id0_quirk)
    voice = await asyncio.to_thread(speaker_hidden, state.model, batch)
    return SpokenPrepared(prep.plan, batch, prep.params, voice)  # type: ignore[arg-type]


def _audio_data(samples: np.ndarray, fmt: str, *, first: bool = False, whole: bool = True) -> str:
    """Base64 of ``samples`` in ``fmt``: a whole WAV, or PCM (a streamed WAV's first chunk
    starts with a header of unknown sizes)."""
    if fmt == "wav" and whole:
        data = wav_bytes(samples, SAMPLING_RATE)
    else:
        data = (_streaming_wav_header() if fmt == "wav" and first else b"") + pcm16(samples)
    return base64.b64encode(data).decode("ascii")


def _streaming_wav_header() -> bytes:
    rate, width = SAMPLING_RATE, 2
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
            rate * width, width, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))


def _spoken_text(state: ServerState, answer: _Answer) -> str:
    """What the speech head reads: the official answer text (between ``<|tts_bos|>`` and
    ``<|tts_eos|>``), or the transcript when a stop string cut the answer."""
    text = answer.texts[0]
    if text.stopped:
        return text.content
    runner = state.model.runner
    return speech_text(official_answer_text(runner.tokenizer, text.token_ids, runner.eos_ids))


async def complete_spoken(state: ServerState, prep: SpokenPrepared, handle: Handle, response_id: str,
                          disconnected: Any) -> ChatCompletion | None:
    """The whole answer, then its speech (``message.audio``); None when the client went away."""
    answer = _Answer(state, prep, handle)
    async for event in handle.events(disconnected):
        answer.apply(event)
    if not handle.done:
        return None
    synth = get_synthesizer(state.model)
    options = limited_options(synth, None, state.config.max_audio_seconds)
    spoken = await by_deadline(asyncio.to_thread(synth.synthesize, _spoken_text(state, answer), prep.voice, options),
                               handle.deadline)
    wav = cut_audio(spoken, state.config.max_audio_seconds).audio_wav
    assert wav is not None and prep.plan.audio_format is not None
    audio = AudioOut(id=f"audio_{uuid.uuid4().hex}", data=_audio_data(wav, prep.plan.audio_format),
                     expires_at=int(time.time()) + AUDIO_TTL_S, transcript=answer.texts[0].content)
    choice = Choice(index=0, message=AssistantMessage(content=None, audio=audio), finish_reason=answer.finish[0])
    return ChatCompletion(id=response_id, model=state.name, choices=[choice], usage=answer.usage())


async def stream_spoken(state: ServerState, prep: SpokenPrepared, handle: Handle, response_id: str,
                        include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a spoken answer: ``delta.audio`` chunks as the speech is made."""
    created, audio_id = int(time.time()), f"audio_{uuid.uuid4().hex}"
    fmt = prep.plan.audio_format or "pcm16"
    runner = state.model.runner
    request = SpeechRequest(generate_audio=True, max_seconds=state.config.max_audio_seconds)
    spoken = SpokenAnswer(runner.tokenizer, runner.eos_ids, synth=get_synthesizer(state.model), speaker=prep.voice,
                          request=request)
    answer = _Answer(state, prep, handle)
    sent = 0

    def chunk(delta: Delta, finish: str | None = None, usage: Any = None) -> str:
        choices = [] if usage is not None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return _sse(ChatCompletionChunk(id=response_id, created=created, model=state.name, choices=choices,
                                        usage=usage))

    def audio_delta(outputs: list[Any]) -> list[str]:
        nonlocal sent
        out = []
        for o in outputs:
            first = sent == 0
            sent += 1
            data = _audio_data(o.audio_wav, fmt, first=first, whole=False)
            out.append(chunk(Delta(audio=AudioOut(id=audio_id if first else None, data=data,
                                                  transcript=o.text))))
        return out

    yield chunk(Delta(role="assistant"))
    try:
        async for event in handle.events():
            answer.apply(event)
            if event.token_id is not None and not spoken.done:
                for line in audio_delta(await by_deadline(asyncio.to_thread(spoken.push, event.token_id),
                                                          handle.deadline)):
                    yield line
            if spoken.done and not handle.done:
                handle.close()  # the speech ended (or hit the audio limit): stop the LLM
                break
        for line in audio_delta(await by_deadline(asyncio.to_thread(spoken.finish), handle.deadline)):
            yield line
        finish = answer.finish[0] or "stop"
        yield chunk(Delta(audio=AudioOut(expires_at=int(time.time()) + AUDIO_TTL_S)), finish)
        if include_usage:
            yield chunk(Delta(), usage=answer.usage())
    except (APIError, MiniCPMVError) as e:
        err = e if isinstance(e, APIError) else from_library_error(e)
        log.info("stream %s ended with an error: %s", response_id, err.message)
        yield _sse(err.body())
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------- /v1/audio/speech


def _pieces(text: str) -> list[str]:
    """Text in pieces of a few words (the size of the official LLM pieces), spaces kept."""
    words = re.findall(r"\s*\S+", text)
    return ["".join(words[i : i + _WORDS_PER_PIECE]) for i in range(0, len(words), _WORDS_PER_PIECE)]


def _read_aloud(state: ServerState, body: SpeechRequestBody, voices: Voices) -> np.ndarray:
    """The voice from a prompt pass over the reading request, then the text through the speech head."""
    msgs = voices.reading_messages(body.voice_name, body.input, body.instructions)
    model = state.model
    inputs = model.processor([msgs], use_tts_template=True, max_length=2**31)
    with torch.inference_mode():
        batch = model.runner.prepare(inputs, id0_quirk=state.config.id0_quirk)
        voice = speaker_hidden(model, batch)
    request = SpeechRequest(generate_audio=True, max_seconds=state.config.max_audio_seconds)
    spoken = SpokenAnswer(model.tokenizer, model.terminator_ids(), synth=get_synthesizer(model), speaker=voice,
                          request=request)
    chunks = []
    for piece in _pieces(body.input):
        chunks += spoken.push_text(piece)
        if spoken.done:
            break
    chunks += spoken.finish()
    waves = [c.audio_wav for c in chunks if c.audio_wav is not None]
    return np.concatenate(waves) if waves else np.zeros(0, np.float32)


def _check_speech_body(state: ServerState, body: SpeechRequestBody) -> None:
    if body.model != state.name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {state.name!r}",
                       code="model_not_found", param="model")
    check_speech(state, "model")
    if body.response_format not in ("wav", "pcm"):
        raise APIError(400, f"response_format {body.response_format!r} is not produced by this server: use 'wav' "
                       "or 'pcm' (24 kHz 16-bit mono)", code="unsupported", param="response_format")
    if body.speed != 1.0:
        raise APIError(400, "speed other than 1.0 is not supported: describe the pace in instructions",
                       code="unsupported", param="speed")
    if body.stream_format != "audio":
        raise APIError(400, "stream_format 'sse' is not supported: the audio comes as the response body",
                       code="unsupported", param="stream_format")
    limit = state.config.max_speech_input_chars
    if len(body.input) > limit:
        raise APIError(400, f"input is {len(body.input)} characters, over this server's limit of {limit}",
                       code="input_too_long", param="input")
    if not body.input.strip():
        raise APIError(400, "input holds no text to speak", code="invalid_request", param="input")


async def audio_speech(body: SpeechRequestBody, request: Request) -> Response:
    """POST /v1/audio/speech: within the request timeout from arrival, holding a decoding slot
    (the voice's prompt pass and the synthesis are the work)."""
    arrived = asyncio.get_running_loop().time()
    state = getattr(request.app.state, "server", None)
    if state is None:
        raise APIError(503, "the model is still loading", code="unavailable", retry_after=5)
    deadline = arrived + state.config.request_timeout_s
    _check_speech_body(state, body)
    voices = await asyncio.to_thread(voices_of, state)
    voices.clip(body.voice_name, "voice")
    release = state.acquire()
    try:
        async with slot_by_deadline(request.app.state.decoding, deadline):
            wav = await by_deadline(asyncio.to_thread(_read_aloud, state, body, voices), deadline)
    finally:
        release()
    if body.response_format == "wav":
        return Response(wav_bytes(wav, SAMPLING_RATE), media_type="audio/wav")
    return Response(pcm16(wav), media_type="audio/pcm", headers={"X-Sample-Rate": str(SAMPLING_RATE)})


def install_speech_routes(app: FastAPI) -> None:
    """``POST /v1/audio/speech`` (chat completions with audio go through the chat route)."""
    app.post("/v1/audio/speech", response_model=None)(audio_speech)
