"""``ChatSession``: a multi-turn conversation that reuses encoded images and the KV cache.

Each turn renders the whole history (so the prompt is exactly what a fresh ``chat()`` over the
same messages would see), then compares its token ids with the ids whose keys/values are already
in the session's cache: the common prefix is kept, only the new tokens are prefilled, and image
features come from the session's ``FeatureCache`` unless the image is new. The session owns its
cache and history; the model stays stateless. Beam search (``sampling=False`` with beams) runs
without KV reuse (its cache has one row per beam) but still reuses image features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import InputError
from ..processing.video import resolve_video_items
from .chat import ChatModel, PreparedBatch, normalise_msgs
from .compat import official_generation_params
from .features import FeatureCache
from .generate import GenerationParams, generate_tokens
from .kv_cache import KVCache
from .stream import StreamDecoder

log = logging.getLogger(__name__)


class ChatSession:
    """Keeps history, image features and the KV prefix of one conversation."""

    def __init__(
        self,
        model: ChatModel,
        *,
        system_prompt: str = "",
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        enable_thinking: bool = False,
        mask_bang_token: bool = True,
        feature_cache: FeatureCache | None = None,
        max_inp_length: int | None = None,
        **generation: Any,
    ) -> None:
        if enable_thinking and not model.version.supports_thinking:
            raise InputError(f"MiniCPM-V {model.version.name} has no thinking mode")
        self.model = model
        self.history: list[dict[str, Any]] = []
        self.system_prompt = system_prompt
        self.max_slice_nums = max_slice_nums
        self.use_image_id = use_image_id
        self.enable_thinking = enable_thinking
        self.mask_bang_token = mask_bang_token
        self.max_inp_length = max_inp_length  # None: the version's default (chat()'s max_inp_length)
        self.generation = generation
        self.features = feature_cache if feature_cache is not None else FeatureCache()
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []
        self._cached_mask: list[int] = []
        self.last_prefill_tokens = 0  # tokens prefilled by the last turn (the rest was reused)

    def reset(self) -> None:
        """Forget the conversation (the image feature cache is kept)."""
        self.history.clear()
        self._cache = None
        self._cached_ids = []
        self._cached_mask = []

    # ------------------------------------------------------------------ turns
    def ask(self, content: Any, *, stream: bool = False, **overrides: Any) -> str | Iterator[str]:
        """Add a user turn (text, image, or a list of them) and answer it."""
        conversation = self._with_user_turn(content)
        params = self._params(overrides)
        if stream:
            return self._ask_stream(conversation, params)
        ids = list(self._steps(conversation, params))
        return self._finish(conversation, ids)

    def ask_tokens(self, content: Any, **overrides: Any) -> Iterator[int]:
        """Like ``ask`` but yields the generated token ids; history is updated at the end."""
        conversation = self._with_user_turn(content)
        ids: list[int] = []
        for t in self._steps(conversation, self._params(overrides)):
            ids.append(t)
            yield t
        self._finish(conversation, ids)

    def _with_user_turn(self, content: Any) -> list[dict[str, Any]]:
        items = content if isinstance(content, list) else [content]
        items = resolve_video_items(items)  # Video objects keep their sampling (and small clips) across turns
        conversation = self.history + [{"role": "user", "content": items}]
        normalise_msgs(conversation, None)  # validates the message shapes
        return conversation

    def _params(self, overrides: dict[str, Any]) -> GenerationParams:
        kw = {**self.generation, **overrides}
        return official_generation_params(
            self.model.version,
            sampling=kw.pop("sampling", True),
            enable_thinking=self.enable_thinking,
            max_new_tokens=kw.pop("max_new_tokens", 2048),
            min_new_tokens=kw.pop("min_new_tokens", 0),
            eos_token_ids=self.model.terminator_ids(),
            overrides=kw,
        )

    def _prepare(self, conversation: list[dict[str, Any]]) -> PreparedBatch:
        inputs = self.model.processor(
            [conversation],
            system_prompt=self.system_prompt,
            max_slice_nums=self.max_slice_nums,
            use_image_id=self.use_image_id,
            enable_thinking=self.enable_thinking if self.model.version.supports_thinking else None,
            max_length=self.max_inp_length,
        )
        features = self.model.encode_features(inputs, self.features)
        return self.model.prepare_from(inputs, features, mask_bang_token=self.mask_bang_token)

    def _reuse(self, ids: list[int], mask: list[int]) -> int:
        """Crop the cache to the longest prefix shared with ``ids`` (at least one token left new).

        Ids and attention-mask values must both agree: a token's cached keys depend on which
        earlier tokens were visible to it.
        """
        if self._cache is None:
            return 0
        n = 0
        limit = min(len(self._cached_ids), len(ids) - 1)
        while n < limit and self._cached_ids[n] == ids[n] and self._cached_mask[n] == mask[n]:
            n += 1
        self._cache.crop(n)
        self._cached_ids = self._cached_ids[:n]
        self._cached_mask = self._cached_mask[:n]
        return n

    def _steps(self, conversation: list[dict[str, Any]], params: GenerationParams) -> Iterator[int]:
        """Token ids of the answer, one at a time, maintaining the KV cache."""
        with torch.inference_mode():
            batch = self._prepare(conversation)
            ids = batch.input_ids[0].tolist()
            if params.num_beams > 1:
                self._cache, self._cached_ids, self._cached_mask = None, [], []
                rows = self.model.generate_ids(batch, params)
                self.last_prefill_tokens = len(ids)
                yield from rows[0]
                return
            mask = batch.attention_mask[0].tolist()
            reused = self._reuse(ids, mask)
            if self._cache is None:
                self._cache = KVCache.for_model(self.model.model, 1)
            self.last_prefill_tokens = len(ids) - reused
            embeds = batch.inputs_embeds[:, reused:]  # [1, T_new, H]
            generated: list[int] = []
            for step in generate_tokens(
                self.model.model, embeds, batch.attention_mask, params, cache=self._cache
            ):
                tok = int(step[0])
                generated.append(tok)
                yield tok
            kept = self._cache.get_seq_length()
            self._cached_ids = (ids + generated)[:kept]
            self._cached_mask = (mask + [1] * len(generated))[:kept]

    def _finish(self, conversation: list[dict[str, Any]], ids: list[int]) -> str:
        prefix = self.model.version.thinking_prefix if self.enable_thinking else ""
        answer = prefix + self.model.postprocess(ids, mask_bang_token=self.mask_bang_token)
        self.history = conversation + [{"role": "assistant", "content": [answer]}]
        return answer

    def _ask_stream(self, conversation: list[dict[str, Any]], params: GenerationParams) -> Iterator[str]:
        terminators = set(self.model.terminator_ids())
        tok = self.model.tokenizer
        if self.enable_thinking:
            yield from self.model.version.thinking_prefix
        decoder = StreamDecoder(lambda ids: tok.decode(ids, skip_special_tokens=False))
        ids: list[int] = []
        for t in self._steps(conversation, params):
            ids.append(t)
            if t in terminators or (self.mask_bang_token and t == 0):
                continue
            delta = decoder.feed([t])
            if delta:
                yield delta
        tail = decoder.flush()
        if tail:
            yield tail
        self._finish(conversation, ids)
