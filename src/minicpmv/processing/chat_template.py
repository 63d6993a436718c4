"""Chat templates and the message assembly of the official ``chat()`` (spec §8).

``ChatTemplate`` renders a checkpoint's Jinja chat template the way transformers'
``apply_chat_template(tokenize=False)`` does: a sandboxed immutable Jinja environment with
``trim_blocks``/``lstrip_blocks``, the loop-control extension, a ``raise_exception`` global and
a ``tojson`` filter that keeps non-ASCII characters.

``flatten_messages`` turns official-format messages (content = string or a list of strings and
PIL images, plus ``{"type": "text"|"image", ...}`` dicts) into plain ``{role, content: str}``
messages with ``(<image>./</image>)`` tags, and the list of images in order. Unlike the
reference, content items of unknown types are refused (InputError) instead of silently dropped.
A video item (``Video`` or ``{"type": "video", "video": ...}``) becomes its sampled frames, one
tag per frame joined with "\n" exactly like frames passed as images (the official recipes);
``flatten_conversation`` also reports where each video's frames sit (``VideoSpan``).

This module does not expand placeholders or tokenize (see ``processor.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from ..errors import InputError, TemplateError
from ..versions import VideoPolicy
from .image import load_image
from .video import ImageChain, Video, VideoFrames, as_video

IMAGE_TAG = "(<image>./</image>)"
ALLOWED_ROLES = ("user", "assistant")


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template. ``source`` is the Jinja text (e.g. tokenizer_config's)."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source:
            raise TemplateError("chat template source must be a non-empty string")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e
        self.source = source

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """The prompt text for ``messages``; extra ``kwargs`` become template variables."""
        kwargs.setdefault("tools", None)
        kwargs.setdefault("documents", None)
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs
            )
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError, LookupError, ArithmeticError,
                RecursionError) as e:  # what template code itself can raise (it is data, not ours)
            raise TemplateError(f"chat template cannot render these messages: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------- flattening


def _parse_messages(msgs: Any) -> list[Any]:
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise InputError(f"msgs is a string but not valid JSON: {e}") from e
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise InputError("msgs must be a non-empty list of {'role', 'content'} messages")
    return list(msgs)


def _check_message(i: int, msg: Any) -> tuple[str, Any]:
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise InputError(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.100}")
    role = msg["role"]
    if role not in ALLOWED_ROLES:
        raise InputError(
            f"message {i} has role {role!r}; only 'user' and 'assistant' are allowed "
            "(pass a system prompt with system_prompt=...)"
        )
    if i == 0 and role != "user":
        raise InputError(f"the first message must be from the user, got role {role!r}")
    return role, msg["content"]


@dataclass
class VideoSpan:
    """Where one video's sampled frames sit in the conversation's image list."""

    start: int  # index of its first frame among all images of the conversation
    video: VideoFrames

    @property
    def stop(self) -> int:
        return self.start + len(self.video.frames)


@dataclass
class FlatConversation:
    """``flatten_conversation`` output: template messages, all images in tag order, video spans."""

    messages: list[dict[str, str]]
    images: ImageChain = field(default_factory=ImageChain)  # video frames decoded when iterated
    videos: list[VideoSpan] = field(default_factory=list)


def _dict_item(item: dict[str, Any], where: str) -> str | Image.Image | Video:
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), str):
        return item["text"]
    if kind == "image" and item.get("image") is not None:
        return load_image(item["image"])
    if kind == "video":
        video = as_video(item)
        assert video is not None
        return video
    raise InputError(
        f"{where}: unsupported content item {item!r:.100}; use a string, a PIL image, "
        "{'type': 'text', 'text': str}, {'type': 'image', 'image': PIL image | path | bytes} or "
        "{'type': 'video', 'video': path | file | frames}"
    )


def _add_video(video: Video, where: str, out: FlatConversation, policy: VideoPolicy | None) -> list[str]:
    if policy is None:
        raise InputError(f"{where}: this model has no video recipe, so video items are not supported; "
                         "pass the frames as images instead")
    frames = video.expand(policy)
    out.videos.append(VideoSpan(len(out.images), frames))
    out.images.extend(frames.frames)
    return [IMAGE_TAG] * len(frames.frames)


def _flatten_content(content: Any, where: str, out: FlatConversation, policy: VideoPolicy | None) -> str:
    items = [content] if isinstance(content, str) else content
    if not isinstance(items, (list, tuple)):
        raise InputError(f"{where}: content must be a string or a list, got {type(content).__name__}")
    parts: list[str] = []
    for item in items:
        if isinstance(item, dict):
            value = _dict_item(item, where)  # images come back loaded (RGB)
        elif isinstance(item, Image.Image):
            value = load_image(item)
        else:
            value = item
        if isinstance(value, Video):
            parts.extend(_add_video(value, where, out, policy))
        elif isinstance(value, Image.Image):
            out.images.append(value)
            parts.append(IMAGE_TAG)
        elif isinstance(value, str):
            parts.append(value)
        else:
            raise InputError(
                f"{where}: unsupported content item of type {type(value).__name__}; "
                "use strings, PIL images, minicpmv.Video or {'type': 'text'|'image'|'video', ...} dicts"
            )
    return "\n".join(parts)


def flatten_conversation(
    msgs: Any, *, image: Image.Image | None = None, system_prompt: str = "",
    video_policy: VideoPolicy | None = None,
) -> FlatConversation:
    """chat()'s message assembly (spec §8.2 steps 2-4), videos expanded under ``video_policy``.

    ``msgs`` (a list or its JSON text) is not modified: new message dicts are built. ``image``
    is put before the text of the first message, which must then be a string. Returns the
    ``{role, content}`` messages for the template, the conversation's images (RGB) in the
    order of their ``(<image>./</image>)`` tags (video frames included) and the video spans.
    """
    messages = _parse_messages(msgs)
    if image is not None:
        first = messages[0]
        if not isinstance(first, dict) or not isinstance(first.get("content"), str):
            raise InputError(
                "image= is only combined with a first message whose content is a string; "
                "put the image inside the message content instead"
            )
        messages[0] = {**first, "content": [image, first["content"]]}
    out = FlatConversation(messages=[])
    for i, msg in enumerate(messages):
        role, content = _check_message(i, msg)
        text = _flatten_content(content, f"message {i}", out, video_policy)
        out.messages.append({"role": role, "content": text})
    if system_prompt:
        if not isinstance(system_prompt, str):
            raise InputError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
        out.messages.insert(0, {"role": "system", "content": system_prompt})
    return out


def flatten_messages(
    msgs: Any, *, image: Image.Image | None = None, system_prompt: str = "",
    video_policy: VideoPolicy | None = None,
) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """``flatten_conversation`` as (template messages, images)."""
    flat = flatten_conversation(msgs, image=image, system_prompt=system_prompt, video_policy=video_policy)
    return flat.messages, list(flat.images)
