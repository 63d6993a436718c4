"""Pydantic models of the OpenAI chat-completions API as this server accepts and returns it.

Requests are validated here (types, ranges, content-part kinds); anything invalid becomes a 400
through ``errors.py``. Unknown top-level fields are ignored (clients send many optional ones),
but unknown content-part types are refused. Extensions beyond OpenAI, as vLLM names them:
``top_k``, ``repetition_penalty``, ``min_tokens``, ``chat_template_kwargs`` (``enable_thinking``)
and, on responses, ``reasoning_content``. Audio as OpenAI has it: ``input_audio`` content parts,
``modalities`` + ``audio`` ({voice, format}) on requests, ``message.audio`` / ``delta.audio`` on
answers, and the body of ``POST /v1/audio/speech``. Conversion to the model's message format
lives in ``convert.py``; nothing here touches the model.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


class InputAudio(_Strict):
    data: str  # base64
    format: Literal["wav", "mp3"]


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | VideoPart | InputAudioPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class VoiceRef(BaseModel):
    id: str


AudioFormat = Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]


class AudioParam(BaseModel):
    """``audio`` of a chat request: the voice (a name or ``{"id": name}``) and the format."""

    voice: str | VoiceRef
    format: AudioFormat

    @property
    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions body (OpenAI fields plus the vLLM-style extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    user: str | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioParam | None = None

    @property
    def wants_audio(self) -> bool:
        return bool(self.modalities) and "audio" in self.modalities  # type: ignore[operator]


class SpeechRequestBody(BaseModel):
    """POST /v1/audio/speech body (OpenAI's speech endpoint)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str = Field(min_length=1)
    voice: str | VoiceRef
    instructions: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "wav"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["sse", "audio"] = "audio"

    @property
    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


# ---------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AudioOut(BaseModel):
    """``message.audio`` (and, in parts, ``delta.audio``): OpenAI's ``ChatCompletionAudio``."""

    id: str | None = None
    data: str | None = None  # base64 audio in the requested format
    expires_at: int | None = None
    transcript: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    audio: AudioOut | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    audio: AudioOut | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minicpmv"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
