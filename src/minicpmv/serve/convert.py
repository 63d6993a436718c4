"""OpenAI chat request -> the model's conversation format and the engine's sampling options.

``plan_request`` checks what this server cannot honour (tools, logprobs, structured output,
thinking on a model without it), turns the messages into the official message format (leading
system/developer messages become the system prompt; text parts are joined with newlines by the
processor like ``chat()`` does; image, video and ``input_audio`` parts become ``MediaRef``
placeholders that the app replaces with decoded media; a system message holding audio (MiniCPM-o's
voice prompt: a reference clip in the system message) stays a message of the conversation), and
collects the sampling fields with their defaults and what a spoken answer asks for.
``sampling_params`` builds the engine's ``SamplingParams`` (``from_openai``) once the prompt
length is known.
No model, network or disk access here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling import SamplingParams
from .config import GenerationDefaults
from .errors import APIError
from .schemas import ChatCompletionRequest, ChatMessage, ImagePart, InputAudioPart, TextPart, VideoPart

log = logging.getLogger(__name__)

MAX_STOPS = 16


@dataclass
class MediaRef:
    """An image or video part waiting to be fetched and decoded."""

    kind: str  # "image" | "video" | "audio" (input_audio: a data: URL of its base64 data)
    url: str
    value: Any = None  # the decoded PIL image / video item, filled in by the app


@dataclass
class RequestPlan:
    """What a chat request asks for, in the model's terms."""

    conversation: list[dict[str, Any]]
    system_prompt: str
    enable_thinking: bool
    media: list[MediaRef]
    stops: list[str]
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    n: int = 1
    speak: bool = False  # modalities include "audio": answer with speech (MiniCPM-o)
    voice: str | None = None  # audio.voice
    audio_format: str | None = None  # audio.format
    own_voice_prompt: bool = False  # a system message holds audio: the request brings its voice prompt


def _bad(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, code=code, param=param)


def _text_only(msg: ChatMessage, where: str) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    parts = []
    for part in msg.content:
        if not isinstance(part, TextPart):
            raise _bad(f"{where}: {msg.role} messages may only hold text parts, got {part.type!r}", "messages")
        parts.append(part.text)
    return "\n".join(parts)


def _user_content(msg: ChatMessage, media: list[MediaRef]) -> list[Any]:
    if msg.content is None:
        return [""]
    if isinstance(msg.content, str):
        return [msg.content]
    items: list[Any] = []
    for part in msg.content:
        if isinstance(part, TextPart):
            items.append(part.text)
        elif isinstance(part, ImagePart):
            ref = MediaRef("image", part.image_url.url)
            media.append(ref)
            items.append(ref)
        elif isinstance(part, VideoPart):
            ref = MediaRef("video", part.video_url.url)
            media.append(ref)
            items.append(ref)
        elif isinstance(part, InputAudioPart):
            audio = part.input_audio
            ref = MediaRef("audio", f"data:audio/{audio.format};base64,{audio.data}")
            media.append(ref)
            items.append(ref)
    return items


def _has_audio(msg: ChatMessage) -> bool:
    return isinstance(msg.content, list) and any(isinstance(p, InputAudioPart) for p in msg.content)


def _system_with_audio(messages: list[ChatMessage], media: list[MediaRef]) -> dict[str, Any] | None:
    """The leading system messages as one conversation message when one of them holds audio."""
    head = []
    for msg in messages:
        if msg.role not in ("system", "developer"):
            break
        head.append(msg)
    if not any(_has_audio(m) for m in head):
        return None
    items: list[Any] = []
    for i, msg in enumerate(head):
        parts = _user_content(msg, media)
        if any(isinstance(p, MediaRef) and p.kind != "audio" for p in parts):
            raise _bad(f"messages[{i}]: system messages may hold text and audio only", "messages")
        items += parts
    return {"role": "system", "content": items}


def convert_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], str, list[MediaRef]]:
    """(conversation in the official format, system prompt, media to fetch)."""
    system: list[str] = []
    conversation: list[dict[str, Any]] = []
    media: list[MediaRef] = []
    voice_prompt = _system_with_audio(messages, media)
    if voice_prompt is not None:
        conversation.append(voice_prompt)
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if msg.role in ("system", "developer"):
            if len(conversation) > (voice_prompt is not None):
                raise _bad(f"{where}: system messages must come before the conversation", "messages")
            if voice_prompt is None:
                system.append(_text_only(msg, where))
        elif msg.role == "assistant":
            if len(conversation) == (voice_prompt is not None):
                raise _bad(f"{where}: the conversation must start with a user message", "messages")
            conversation.append({"role": "assistant", "content": [_text_only(msg, where)]})
        else:
            conversation.append({"role": "user", "content": _user_content(msg, media)})
    if len(conversation) == (voice_prompt is not None):
        raise _bad("the request holds no user message", "messages")
    return conversation, "\n\n".join(system), media


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise _bad(f"stop must be at most {MAX_STOPS} non-empty strings", "stop")
    return stops


def _reject_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise _bad("tools / function calling are not supported by this server", "tools", "unsupported")
    if req.logprobs or req.top_logprobs:
        raise _bad("logprobs are not supported by this server", "logprobs", "unsupported")
    if req.response_format is not None and req.response_format.type != "text":
        raise _bad(f"response_format {req.response_format.type!r} is not supported (only 'text')",
                   "response_format", "unsupported")


def _thinking(req: ChatCompletionRequest, defaults: GenerationDefaults, supported: bool) -> bool:
    kwargs = dict(req.chat_template_kwargs or {})
    value = kwargs.pop("enable_thinking", None)
    if kwargs:
        log.warning("ignoring unknown chat_template_kwargs %s", sorted(kwargs))
    if value is None:
        return defaults.enable_thinking and supported
    if not isinstance(value, bool):
        raise _bad("chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
    if value and not supported:
        raise _bad("this model has no thinking mode (chat_template_kwargs.enable_thinking)",
                   "chat_template_kwargs", "unsupported")
    return value


def _sampling(req: ChatCompletionRequest, defaults: GenerationDefaults, vocab_size: int) -> dict[str, Any]:
    bias = []
    for key, value in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise _bad(f"logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1})", "logit_bias")
        if not -100 <= value <= 100:
            raise _bad("logit_bias values must be in [-100, 100]", "logit_bias")
        bias.append((int(key), float(value)))
    top_k = defaults.top_k if req.top_k is None else max(req.top_k, 0)
    return dict(
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=top_k,
        repetition_penalty=defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        min_tokens=req.min_tokens,
        seed=None if req.seed is None else req.seed % 2**63,
        logit_bias=tuple(bias),
    )


def plan_request(
    req: ChatCompletionRequest, defaults: GenerationDefaults, *, supports_thinking: bool, vocab_size: int,
    max_images: int,
) -> RequestPlan:
    """Validate and convert a request (no media is fetched yet)."""
    _reject_unsupported(req)
    speak = req.wants_audio
    if speak and req.audio is None:
        raise _bad("modalities with 'audio' need the audio parameter: {\"voice\": ..., \"format\": \"wav\"}", "audio")
    if speak and req.n != 1:
        raise _bad("a spoken answer is one choice: n must be 1", "n")
    conversation, system, media = convert_messages(req.messages)
    own_voice = bool(conversation) and conversation[0]["role"] == "system"
    if own_voice and not speak:
        raise _bad("audio in a system message is a voice prompt: ask for a spoken answer (modalities "
                   "[\"text\", \"audio\"]) or move the audio to a user message", "messages")
    images = sum(1 for m in media if m.kind == "image")
    if images > max_images:
        raise _bad(f"the request holds {images} images, over this server's limit of {max_images}",
                   "messages", "too_many_images")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return RequestPlan(
        conversation=conversation, system_prompt=system,
        enable_thinking=_thinking(req, defaults, supports_thinking), media=media,
        stops=_stops(req.stop), sampling=_sampling(req, defaults, vocab_size), max_tokens=max_tokens, n=req.n,
        speak=speak, voice=req.audio.voice_name if speak and req.audio else None,
        audio_format=req.audio.format if speak and req.audio else None, own_voice_prompt=own_voice,
    )


def sampling_params(plan: RequestPlan, prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """The request's settings; without max_tokens the answer may fill the rest of the context."""
    max_new = plan.max_tokens if plan.max_tokens is not None else max(max_model_len - prompt_tokens, 1)
    return SamplingParams.from_openai(max_tokens=max_new, **plan.sampling)


def resolved_conversation(plan: RequestPlan) -> list[dict[str, Any]]:
    """The conversation with every ``MediaRef`` replaced by its decoded value."""
    out = []
    for msg in plan.conversation:
        content = [item.value if isinstance(item, MediaRef) else item for item in msg["content"]]
        out.append({"role": msg["role"], "content": content})
    return out
