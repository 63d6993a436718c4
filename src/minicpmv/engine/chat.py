"""``ChatModel``: the official ``chat()`` contract, as a thin facade over ``ModelRunner``.

``chat()`` takes the reference's keyword arguments and returns what it returns (a string, a
list for a batch, an iterator of text chunks with ``stream=True``), reproducing its observable
behaviour through the quirk seam (``compat.py``) and the official presets
(``SamplingParams.from_official``). ``respond()`` answers the same calls with more: a
``ChatResponse`` per conversation (the official text, the reasoning and the answer of thinking
mode split apart, the finish reason and token counts), or with ``stream=True`` the
``TextEvent``s of the answer. The work itself (inputs -> embeddings -> tokens -> text) is the
runner's; this file owns no per-conversation state (``ChatSession`` does) and parses no CLI
arguments or HTTP requests.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import FeatureNotAvailableError, InputError
from ..processing.processor import Processor
from ..versions import VersionSpec
from . import compat
from .generate import DecodeMode
from .runner import ModelRunner, PreparedBatch
from .sampling import SamplingParams
from .stream import FinishReason, TextEvent, TextStream, merge_events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatResponse:
    """One conversation's answer. ``text`` is what the official ``chat()`` returns; in thinking
    mode ``reasoning`` holds the thought and ``content`` the answer after ``</think>`` (without
    thinking ``reasoning`` is None and ``content`` is the answer)."""

    text: str
    content: str
    reasoning: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ChatCall:
    """One call's conversations and settings after the official keyword handling."""

    conversations: list[list[dict[str, Any]]]
    batched: bool
    params: SamplingParams
    proc_kwargs: dict[str, Any]
    thinking: bool
    id0_quirk: bool


class ChatModel:
    """A loaded checkpoint with the official chat(); ``runner`` does the work."""

    def __init__(
        self, model: torch.nn.Module, processor: Processor, version: VersionSpec, config: ModelConfig, *,
        path: str = "", decode_mode: DecodeMode | None = None,
    ) -> None:
        self.runner = ModelRunner(model, processor, version, config, decode_mode)
        self.path = path

    model = property(lambda self: self.runner.model, doc="the MiniCPMV network")
    processor = property(lambda self: self.runner.processor)
    version = property(lambda self: self.runner.version)
    config = property(lambda self: self.runner.config)
    tokenizer = property(lambda self: self.runner.tokenizer)
    device = property(lambda self: self.runner.device)

    @property
    def encoded_entries(self) -> int:
        return self.runner.encoded_entries

    def terminator_ids(self) -> tuple[int, ...]:
        return self.runner.eos_ids

    # ------------------------------------------------------------------ official
    def chat(
        self, msgs: Any, image: Any = None, *, stream: bool = False, **kwargs: Any
    ) -> str | list[str] | Iterator[str]:
        """Answer one conversation (a list of messages) or a batch (a list of conversations).

        Keyword arguments are the official ``MiniCPMV.chat``'s (``max_new_tokens``,
        ``min_new_tokens``, ``sampling``, ``max_inp_length``, ``system_prompt``,
        ``max_slice_nums``, ``use_image_id``, ``temporal_ids``, ``enable_thinking``, and
        generation keys merged by the official rule, see ``SamplingParams.from_official``), plus
        ``seed`` (reproducible sampling), ``id0_quirk=False`` (turn off the reference's id-0
        handling, spec §16.1), ``params=`` (a ``SamplingParams`` that replaces the presets).
        MiniCPM-o: ``msgs`` may hold audio clips, ``use_tts_template`` picks the speech template;
        ``generate_audio=True`` raises ``FeatureNotAvailableError`` (speech output is not here).
        """
        call = self._call(msgs, image, kwargs)
        if stream:
            if call.batched:
                raise InputError("stream=True supports a single conversation, not a batch")
            return self._official_stream(call)
        with torch.inference_mode():
            rows = self.runner.generate_ids(self._prepare(call), call.params)
        prefix = compat.thinking_prefix(self.version, call.thinking)
        answers = [prefix + self.runner.postprocess(r, id0_quirk=call.id0_quirk) for r in rows]
        return answers if call.batched else answers[0]

    def _official_stream(self, call: ChatCall) -> Iterator[str]:
        """The reference's streamer: word chunks, terminator strings removed, no attention mask
        (so no id-0 handling), the thinking prefix yielded a character at a time."""
        rules = compat.official_stream_rules(self.version, self.tokenizer)

        plain = dataclasses.replace(call, id0_quirk=False)

        def run() -> Iterator[str]:
            yield from compat.thinking_prefix(self.version, call.thinking)
            for event in self._events(plain, TextStream(self.runner.decode, rules, chunking="word")):
                if event.text:
                    yield event.text

        return run()

    # ------------------------------------------------------------------ richer answers
    def respond(
        self, msgs: Any, image: Any = None, *, stream: bool = False, stops: list[str] | None = None, **kwargs: Any
    ) -> ChatResponse | list[ChatResponse] | Iterator[TextEvent]:
        """``chat()``'s call, answered with ``ChatResponse`` objects (or, with ``stream=True``, the
        ``TextEvent``s of one conversation's answer). ``stops``: strings that end the answer."""
        call = self._call(msgs, image, kwargs)
        if stream:
            if call.batched:
                raise InputError("stream=True supports a single conversation, not a batch")
            text = self.runner.text_stream(id0_quirk=call.id0_quirk, thinking=call.thinking, stops=stops or ())
            return self._events(call, text)
        with torch.inference_mode():
            batch = self._prepare(call)
            rows = self.runner.generate_ids(batch, call.params)
        prompt_lens = [len(ids) for ids in batch.inputs.input_ids]
        out = [self._response(r, n, call, stops or ()) for r, n in zip(rows, prompt_lens, strict=True)]
        return out if call.batched else out[0]

    def _events(self, call: ChatCall, text: TextStream) -> Iterator[TextEvent]:
        with torch.inference_mode():
            for step in self.runner.steps(self._prepare(call), call.params):
                event = text.feed(int(step.tokens[0]))
                reason = step.reasons[0] or ("stop" if text.stopped else None)
                if reason is not None:
                    yield merge_events(event, text.finish(reason))
                    return
                if event.text:
                    yield event

    def _response(self, ids: list[int], prompt_tokens: int, call: ChatCall, stops: list[str] | tuple) -> ChatResponse:
        """The response of one row of ``generate_ids`` (rows run on with padding after their end)."""
        stop_ids = {*self.runner.eos_ids, *call.params.stop_token_ids}
        end = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
        text = self.runner.text_stream(id0_quirk=call.id0_quirk, thinking=call.thinking, stops=stops)
        for t in ids[:end]:
            if text.stopped:
                break
            text.feed(t)
        reason: FinishReason = "stop" if end < len(ids) or ids[end - 1] in stop_ids or text.stopped else "length"
        text.finish(reason)
        official = compat.thinking_prefix(self.version, call.thinking) + self.runner.postprocess(
            ids, id0_quirk=call.id0_quirk)
        return ChatResponse(text=official, content=text.content, reasoning=text.reasoning if call.thinking else None,
                            finish_reason=reason, prompt_tokens=prompt_tokens,
                            completion_tokens=text.completion_tokens, token_ids=list(text.token_ids))

    # ------------------------------------------------------------------ keyword handling
    def _call(self, msgs: Any, image: Any, kwargs: dict[str, Any]) -> ChatCall:
        kw = dict(kwargs)
        conversations, batched = normalise_msgs(msgs, image)
        if kw.pop("generate_audio", False):
            raise FeatureNotAvailableError(
                f"speech output (generate_audio=True) is not available yet for {self.version.title}: the TTS "
                "weights load but are not run; call chat() without generate_audio to get the text answer")
        thinking = bool(kw.pop("enable_thinking", False))
        compat.check_thinking(self.version, thinking)
        proc_kwargs = {
            "system_prompt": kw.pop("system_prompt", ""), "max_slice_nums": kw.pop("max_slice_nums", None),
            "use_image_id": kw.pop("use_image_id", None), "temporal_ids": kw.pop("temporal_ids", None),
            "enable_thinking": compat.thinking_flag(self.version, thinking),
            "max_length": kw.pop("max_inp_length", None),
        }
        if kw.pop("use_tts_template", False):
            proc_kwargs["use_tts_template"] = True
        id0_quirk = bool(kw.pop("id0_quirk", True))
        params = official_params(self.version, kw)
        return ChatCall(conversations, batched, params, proc_kwargs, thinking, id0_quirk)

    def _prepare(self, call: ChatCall) -> PreparedBatch:
        inputs = self.processor(call.conversations, **call.proc_kwargs)
        return self.runner.prepare(inputs, id0_quirk=call.id0_quirk)


def official_params(version: VersionSpec, kwargs: dict[str, Any]) -> SamplingParams:
    """The ``SamplingParams`` of chat()-style keywords (``params=`` wins; it excludes the others).

    Consumes ``params``, ``sampling``, ``max_new_tokens``, ``min_new_tokens`` and the generation
    keys from ``kwargs``; ``enable_thinking`` is read, not consumed."""
    params = kwargs.pop("params", None)
    if params is not None:
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        if kwargs.keys() - {"enable_thinking"}:
            raise InputError(f"give generation settings either as params= or as keywords, not both "
                             f"(got {sorted(kwargs.keys() - {'enable_thinking'})})")
        return params
    thinking = bool(kwargs.pop("enable_thinking", False))
    return SamplingParams.from_official(
        version, sampling=kwargs.pop("sampling", True), enable_thinking=thinking,
        max_new_tokens=kwargs.pop("max_new_tokens", 2048), min_new_tokens=kwargs.pop("min_new_tokens", 0),
        overrides=kwargs,
    )


def normalise_msgs(msgs: Any, image: Any) -> tuple[list[list[dict[str, Any]]], bool]:
    """Official chat() input forms → a list of conversations (deep-copied) and a batched flag."""
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise InputError(f"msgs is a string but not valid JSON: {e}") from e
    if not isinstance(msgs, list) or not msgs:
        raise InputError("msgs must be a non-empty list of messages (or a list of such lists)")
    batched = isinstance(msgs[0], list)
    if batched and image is not None:
        raise InputError("image=... cannot be combined with a batch of conversations; put images in msgs")
    conversations = copy.deepcopy(msgs) if batched else [copy.deepcopy(msgs)]
    for conv in conversations:
        if not isinstance(conv, list) or not conv:
            raise InputError("every conversation must be a non-empty list of messages")
        for m in conv:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"a message must be a dict with 'role' and 'content', got {m!r:.80}")
    if image is not None and isinstance(conversations[0][0]["content"], str):
        conversations[0][0]["content"] = [image, conversations[0][0]["content"]]
    return conversations, batched
