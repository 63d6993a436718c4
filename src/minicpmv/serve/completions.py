"""The chat-completions pipeline behind the route: prepare, run, answer (JSON or SSE).

``prepare`` validates and converts the request (``convert.py``), fetches and decodes its media
(``media.py``; decoding and the processor run in worker threads, never on the event loop; audio
parts become 16 kHz clips within ``max_input_audio_seconds``) and builds the engine's inputs and
sampling options (a spoken answer: the speech template, after the voice messages the caller
gives; ``speech.py`` answers those requests). ``complete`` collects a whole answer;
``stream`` yields server-sent events (one ``chat.completion.chunk`` per text delta, a final
chunk per choice with its ``finish_reason``, an optional usage chunk, then ``data: [DONE]``).
Errors after a stream has started are sent as an ``{"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.batch import BatchEvent
from ..engine.compat import thinking_flag
from ..engine.sampling import SamplingParams
from ..engine.stream import TextStream
from ..errors import MiniCPMVError
from ..processing.audio import read_audio
from ..processing.image import load_image
from ..processing.processor import ModelInputs
from ..processing.video import recipe_of
from .convert import RequestPlan, plan_request, resolved_conversation, sampling_params
from .errors import APIError, from_library_error, internal_error
from .media import fetch_media
from .runtime import Disconnected, Handle, ServerState
from .schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)

log = logging.getLogger(__name__)

_NO_TRUNCATION = 2**31  # the processor must never cut a prompt: too long is an error here


@dataclass
class Prepared:
    plan: RequestPlan
    inputs: ModelInputs
    params: SamplingParams


async def _load_media(state: ServerState, plan: RequestPlan) -> None:
    payloads = await asyncio.gather(*(fetch_media(ref.url, state.media) for ref in plan.media))
    for ref, data in zip(plan.media, payloads, strict=True):
        if ref.kind == "image":
            ref.value = await asyncio.to_thread(load_image, data, max_pixels=state.config.max_pixels)
        elif ref.kind == "audio":
            ref.value = await asyncio.to_thread(audio_clip, state, data)
        else:
            ref.value = video_item(state, data)


def audio_clip(state: ServerState, data: bytes) -> np.ndarray:
    """The 16 kHz clip of an ``input_audio`` part, within the server's input audio limit."""
    if not state.model.version.audio_input:
        raise APIError(400, f"{state.model.version.title} does not take audio input (a MiniCPM-o model does)",
                       code="unsupported", param="messages")
    clip = read_audio(data, what="an input_audio part")
    seconds = len(clip) / 16000
    if seconds > state.config.max_input_audio_seconds:
        raise APIError(400, f"an input_audio part is {seconds:.1f} s long, over this server's limit of "
                       f"{state.config.max_input_audio_seconds:g} s", code="audio_too_long", param="messages")
    return clip


def video_item(state: ServerState, data: bytes) -> dict[str, Any]:
    """The processor's video content item for the bytes of a ``video_url``: the model card's
    recipe, with at most ``max_video_frames`` frames (4.5: frame groups x packing)."""
    policy = state.model.version.video
    if policy is None:
        raise APIError(400, f"MiniCPM-V {state.model.version.name} has no video support", code="unsupported",
                       param="messages")
    per_entry = recipe_of(policy).frames_per_entry(policy)
    max_frames = max(1, min(policy.max_frames, state.config.max_video_frames // per_entry))
    return {"type": "video", "video": data, "max_frames": max_frames}


VoiceMessages = Callable[[RequestPlan], list[dict[str, Any]]]


async def prepare(state: ServerState, body: ChatCompletionRequest, voice: VoiceMessages | None = None) -> Prepared:
    """Request -> processor output and sampling options (raises APIError / library errors).
    ``voice``: the messages that set a spoken answer's voice (required when it asks for one)."""
    version = state.model.version
    plan = plan_request(body, state.defaults, supports_thinking=version.supports_thinking,
                        vocab_size=state.model.config.text.vocab_size, max_images=state.config.max_images)
    if plan.speak and voice is None:
        raise APIError(400, "spoken answers are not served here", code="unsupported", param="modalities")
    await _load_media(state, plan)
    conversation = resolved_conversation(plan)
    if plan.speak and voice is not None:
        conversation = voice(plan) + conversation
    inputs = await asyncio.to_thread(
        state.model.processor, [conversation], system_prompt=plan.system_prompt,
        enable_thinking=thinking_flag(version, plan.enable_thinking),
        max_length=_NO_TRUNCATION, use_tts_template=plan.speak,
    )
    _check_frames(state, inputs)
    params = sampling_params(plan, len(inputs.input_ids[0]), state.engine.max_model_len)
    return Prepared(plan, inputs, params)


def _check_frames(state: ServerState, inputs: ModelInputs) -> None:
    images = len(inputs.image_hashes[0]) if inputs.image_hashes else 0
    limit = state.config.max_images + state.config.max_video_frames
    if images > limit:
        raise APIError(400, f"the request holds {images} images and video frames, over this server's "
                       f"limit of {limit}", code="too_many_images", param="messages")


def _event_error(event: BatchEvent, request_id: str) -> APIError:
    err = event.error
    if isinstance(err, MiniCPMVError):
        return from_library_error(err)
    return internal_error(request_id)


class _Answer:
    """Per-request accumulation of choices, finish reasons and token counts."""

    def __init__(self, state: ServerState, prep: Prepared, handle: Handle) -> None:
        self.handle = handle
        self.thinking = prep.plan.enable_thinking
        self.texts: list[TextStream] = [
            state.model.runner.text_stream(id0_quirk=state.config.id0_quirk, thinking=self.thinking,
                                           stops=prep.plan.stops)
            for _ in range(prep.plan.n)
        ]
        self.finish: list[str | None] = [None] * prep.plan.n
        self.prompt_tokens = len(prep.inputs.input_ids[0])

    def apply(self, event: BatchEvent) -> tuple[str, str]:
        """Feed one event; return the (reasoning, content) text it released."""
        if event.error is not None or event.finish_reason == "error":
            raise _event_error(event, self.handle.request_id)
        text = self.texts[event.index]
        r = c = ""
        if event.token_id is not None and not text.stopped:
            out = text.feed(event.token_id)
            r, c = out.reasoning, out.content
            if text.stopped and event.finish_reason is None:
                self.handle.cancel_choice(event.index)
        if event.finish_reason is not None:
            self.finish[event.index] = self._reason(event, text)
            out = text.finish(self.finish[event.index])  # type: ignore[arg-type]
            r, c = r + out.reasoning, c + out.content
        return r, c

    @staticmethod
    def _reason(event: BatchEvent, text: TextStream) -> str:
        if text.stopped:
            return "stop"
        if event.finish_reason == "cancelled":
            raise APIError(503, "the request was cancelled (the server is shutting down)", code="unavailable",
                           retry_after=5)
        return str(event.finish_reason)

    def usage(self) -> Usage:
        done = sum(t.completion_tokens for t in self.texts)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done)


async def complete(
    state: ServerState, prep: Prepared, handle: Handle, response_id: str, disconnected: Disconnected
) -> ChatCompletion | None:
    """The whole answer, or None when the client went away."""
    answer = _Answer(state, prep, handle)
    async for event in handle.events(disconnected):
        answer.apply(event)
    if not handle.done:
        return None
    choices = []
    for i, text in enumerate(answer.texts):
        reasoning = text.reasoning if answer.thinking else None
        choices.append(Choice(index=i, message=AssistantMessage(content=text.content, reasoning_content=reasoning),
                              finish_reason=answer.finish[i]))
    return ChatCompletion(id=response_id, model=state.name, choices=choices, usage=answer.usage())


def _sse(payload: dict[str, Any] | ChatCompletionChunk) -> str:
    if isinstance(payload, ChatCompletionChunk):
        data = payload.model_dump_json(exclude_none=True)
    else:
        data = json.dumps(payload)
    return f"data: {data}\n\n"


async def stream(
    state: ServerState, prep: Prepared, handle: Handle, response_id: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of one request (see the module docstring)."""
    created = int(time.time())

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return _sse(ChatCompletionChunk(id=response_id, created=created, model=state.name, choices=choices,
                                        usage=usage))

    answer = _Answer(state, prep, handle)
    for i in range(prep.plan.n):
        yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
    try:
        async for event in handle.events():
            r, c = answer.apply(event)
            if r or c:
                delta = Delta(reasoning_content=r or None, content=c or None)
                yield chunk([ChunkChoice(index=event.index, delta=delta)])
            if event.finish_reason is not None:
                yield chunk([ChunkChoice(index=event.index, delta=Delta(), finish_reason=answer.finish[event.index])])
        if include_usage:
            yield chunk([], usage=answer.usage())
    except APIError as e:
        log.info("stream %s ended with an error: %s", response_id, e.message)
        yield _sse(e.body())
    yield "data: [DONE]\n\n"
