"""Generation engine: from processor output to tokens and text, for every front end.

One of each idea: ``SamplingParams`` (settings; official presets and OpenAI fields are two
constructors), one token loop (``generate.py``: ``choose_tokens`` + a decoder over a KV cache;
``beam.py`` for beams; ``batch.py`` schedules the same loop continuously), every KV cache kind
in ``kv_cache.py``, one text-event stream (``stream.TextStream``), one seam for the official
quirks (``compat.py``), and one component from model inputs to merged embeddings and answers
(``runner.ModelRunner``). ``ChatModel`` (the official ``chat()``), ``ChatSession`` and
``BatchEngine`` are built on them. Loads nothing and parses no CLI or HTTP input.
"""

from __future__ import annotations

from .beam import beam_search
from .generate import DecodeRow, StepOutput, choose_tokens, generate_steps, generate_tokens
from .kv_cache import KVCache, SlotKVCache, StaticKVCache
from .sampling import SamplingParams
from .stream import AnswerRules, StopMatcher, StreamDecoder, TextEvent, TextStream

__all__ = [
    "AnswerRules", "DecodeRow", "KVCache", "SamplingParams", "SlotKVCache", "StaticKVCache", "StepOutput",
    "StopMatcher", "StreamDecoder", "TextEvent", "TextStream", "beam_search", "choose_tokens", "generate_steps",
    "generate_tokens",
]
