"""Voice set-up messages of MiniCPM-o 2.6 (official ``get_sys_prompt`` and the model card's recipes).

The voice of a spoken answer follows the conversation: a reference clip placed in the first
message makes the model speak with that voice (voice cloning), a role-play prompt makes it also
act the character, and with no clip the default voice is asked for by the token
``<reserved_53>``. The message returned has role ``"user"`` (as the official helper returns),
content = instruction strings around the 16 kHz mono reference waveform, and goes first in
``msgs``. Instruction-to-speech needs no helper message: a user message describing the voice
("A gentle old man says: ...") with speech output on. Strings are the official ones; nothing
here runs a model or checks the waveform beyond its type (the audio input path does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError

MODES = ("default", "omni", "audio_assistant", "audio_roleplay", "voice_cloning")
DEFAULT_VOICE = "Use the <reserved_53> voice."
READ_ALOUD = "Please read the text below."

_CLONE = {"zh": "模仿输入音频中的声音特征。", "en": "Clone the voice in the provided audio prompt."}
_AS_ASSISTANT = {"zh": "作为助手，你将使用这种声音风格说话。",
                 "en": "As an assistant, you will speak using this voice style."}
_ROLEPLAY = {"zh": "假装你是上述音频中的人物，与我进行对话。",
             "en": "Try to role-play the character based on the audio prompt above."}
_OMNI = {"zh": "你是一个AI助手。你能接受视频，音频和文本输入并输出语音和文本。",
         "en": "You are a helpful assistant. You can accept video, audio and text input and output voice and text. "}
_DEFAULT = "You are a helpful assistant. You can accept audio and text input and output voice and text."


def get_sys_prompt(ref_audio: np.ndarray | None = None, mode: str = "default", language: str = "zh") -> dict[str, Any]:
    """The official voice prompt message for ``mode`` (one of ``MODES``) in ``language``
    (``"zh"``; anything else gives the English strings, as the official helper does).

    * ``"voice_cloning"``: clone ``ref_audio`` (required); the model then reads text aloud.
    * ``"audio_assistant"`` / ``"audio_roleplay"``: answer as an assistant / as the character, in
      the voice of ``ref_audio`` (the default voice without one).
    * ``"omni"``: the video + audio assistant prompt (with the voice of ``ref_audio`` if given).
    * ``"default"``: the plain speech assistant prompt (``ref_audio`` is not used).
    """
    if mode not in MODES:
        raise InputError(f"unknown voice prompt mode {mode!r}; use one of {', '.join(MODES)}")
    if ref_audio is not None and not isinstance(ref_audio, np.ndarray):
        raise InputError(f"ref_audio must be a 16 kHz mono numpy waveform, got {type(ref_audio).__name__}")
    lang = "zh" if language == "zh" else "en"
    if mode == "omni":
        if ref_audio is None:
            return _user([_OMNI[lang]])
        return _user([_OMNI[lang] + _CLONE[lang], ref_audio, _AS_ASSISTANT[lang]])
    if mode in ("audio_assistant", "audio_roleplay"):
        suffix = (_AS_ASSISTANT if mode == "audio_assistant" else _ROLEPLAY)[lang]
        if ref_audio is None:
            return _user([DEFAULT_VOICE, suffix])
        return _user([_CLONE[lang], ref_audio, suffix])
    if mode == "voice_cloning":
        if ref_audio is None:
            raise InputError("voice_cloning needs ref_audio: the voice to clone (16 kHz mono waveform)")
        return _user([_CLONE[lang], ref_audio])
    return _user([_DEFAULT])


def voice_cloning_messages(ref_audio: np.ndarray, text: str, language: str = "en") -> list[dict[str, Any]]:
    """Messages that make the model read ``text`` aloud in the voice of ``ref_audio`` (the model
    card's voice-cloning recipe; use with speech output on)."""
    if not isinstance(text, str) or not text:
        raise InputError("voice_cloning_messages needs the text to read (a non-empty string)")
    return [get_sys_prompt(ref_audio, "voice_cloning", language), _user([READ_ALOUD, text])]


def with_voice(msgs: list[dict[str, Any]], voice: np.ndarray | None = None, *, mode: str = "audio_assistant",
               language: str = "en") -> list[dict[str, Any]]:
    """``msgs`` with the official voice message first (a new list; ``msgs`` is not changed):
    ``voice`` is a 16 kHz mono reference clip to speak with (voice cloning), None for the
    model's default voice; ``mode`` and ``language`` as ``get_sys_prompt``. A leading system
    message stays first, the voice message follows it."""
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise InputError("with_voice takes a conversation: a list of {'role', 'content'} messages")
    head = msgs[:1] if msgs and msgs[0].get("role") == "system" else []
    return [*head, get_sys_prompt(voice, mode, language), *msgs[len(head):]]


def _user(content: list[Any]) -> dict[str, Any]:
    return {"role": "user", "content": content}
