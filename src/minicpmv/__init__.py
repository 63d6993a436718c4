"""minicpmv: run MiniCPM-V checkpoints natively (no trust_remote_code).

Public API: ``load(path_or_repo_id, dtype=..., device=...)`` returns a ``ChatModel`` with the
official ``chat(msgs, ...)``; ``ChatSession`` keeps a conversation's history, encoded images and
KV cache; ``LiveSession`` (MiniCPM-o) takes a turn as it arrives and streams text and speech.
Importing this package is cheap: torch and the model code load on first use.
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any

# Large CPU tensors (weights, KV caches) in 2 MB pages: PyTorch's THP_MEM_ALLOC_ENABLE, read at its
# first large allocation. Decoding streams every weight once per token, and with 4 KB pages that
# costs TLB misses and prefetcher restarts (+5-12% decode, bench/RESULTS.md). A value the user set
# (THP_MEM_ALLOC_ENABLE=0 restores PyTorch's default) is kept.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .errors import (
    AudioError,
    CheckpointError,
    ContextLengthError,
    FeatureNotAvailableError,
    ImageError,
    InputError,
    MiniCPMVError,
    PlaceholderMismatchError,
    UnknownVersionError,
    VideoError,
)

__version__ = "0.1.0"

__all__ = [
    "load", "ChatModel", "ChatSession", "ChatResponse", "SamplingParams", "TextEvent",
    "MiniCPMVError", "InputError", "ImageError",
    "CheckpointError", "ContextLengthError", "PlaceholderMismatchError", "UnknownVersionError",
    "Video", "load_video", "VideoError",
    "AudioError", "FeatureNotAvailableError", "load_wav", "read_audio", "save_wav",
    "LiveSession", "OmniOutput", "SpeechOptions", "get_sys_prompt", "with_voice", "voice_cloning_messages",
    "__version__",
]

if TYPE_CHECKING:
    from .api import load
    from .engine.chat import ChatModel, ChatResponse
    from .engine.live import LiveSession
    from .engine.sampling import SamplingParams
    from .engine.session import ChatSession
    from .engine.speech import OmniOutput
    from .engine.speech_codes import SpeechOptions
    from .engine.stream import TextEvent
    from .processing.audio import load_wav, read_audio, save_wav
    from .processing.video import Video, load_video
    from .processing.voice_prompts import get_sys_prompt, voice_cloning_messages, with_voice

_LAZY = {
    "load": ("minicpmv.api", "load"),
    "ChatModel": ("minicpmv.engine.chat", "ChatModel"),
    "ChatResponse": ("minicpmv.engine.chat", "ChatResponse"),
    "SamplingParams": ("minicpmv.engine.sampling", "SamplingParams"),
    "TextEvent": ("minicpmv.engine.stream", "TextEvent"),
    "ChatSession": ("minicpmv.engine.session", "ChatSession"),
    "Video": ("minicpmv.processing.video", "Video"),
    "load_video": ("minicpmv.processing.video", "load_video"),
    "load_wav": ("minicpmv.processing.audio", "load_wav"),
    "read_audio": ("minicpmv.processing.audio", "read_audio"),
    "save_wav": ("minicpmv.processing.audio", "save_wav"),
    "LiveSession": ("minicpmv.engine.live", "LiveSession"),
    "OmniOutput": ("minicpmv.engine.speech", "OmniOutput"),
    "SpeechOptions": ("minicpmv.engine.speech_codes", "SpeechOptions"),
    "get_sys_prompt": ("minicpmv.processing.voice_prompts", "get_sys_prompt"),
    "with_voice": ("minicpmv.processing.voice_prompts", "with_voice"),
    "voice_cloning_messages": ("minicpmv.processing.voice_prompts", "voice_cloning_messages"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'minicpmv' has no attribute {name!r}")
