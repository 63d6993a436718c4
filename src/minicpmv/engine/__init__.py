"""Generation engine: KV caches, HF-exact logits processing, greedy/sampling/beam decoding and
incremental detokenisation. Drives any model with the ``embed_tokens`` / ``forward`` protocol of
``modeling/vlm.py``; loads nothing and knows nothing about images or chat templates.
"""

from __future__ import annotations

from .generate import GenerationParams, StepOutput, beam_search, generate_steps, generate_tokens
from .kv_cache import KVCache, StaticKVCache
from .stream import StopMatcher, StreamDecoder, TextEvent

__all__ = [
    "GenerationParams", "StepOutput", "beam_search", "generate_steps", "generate_tokens",
    "KVCache", "StaticKVCache", "StopMatcher", "StreamDecoder", "TextEvent",
]
