"""Turning one choice's generated token ids into OpenAI text fields, incrementally.

``ChoiceText.feed(token_id)`` returns the new ``(reasoning, content)`` text; the pipeline is:
terminator ids are dropped -> ``StreamDecoder`` (never splits a UTF-8 character) ->
``StopMatcher`` (client ``stop`` strings; the stop string and what follows are dropped) ->
``ReasoningSplitter`` (thinking mode only). Streaming and non-streaming responses are both
built from these deltas, so their texts are identical.

Thinking (4.5 with ``enable_thinking``): the prompt already ends in ``<think>\\n``, so the
answer is ``reasoning </think> content``. Text before ``</think>`` goes to
``reasoning_content`` (newlines next to the tag are dropped on both sides), the rest to
``content``. An answer cut off before ``</think>`` is reasoning only. Without thinking all text
is content. This module does not know about HTTP or the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..engine.stream import StopMatcher, StreamDecoder

THINK_END = "</think>"


class ReasoningSplitter:
    """Route streamed text to reasoning until ``</think>``, then to content."""

    def __init__(self, thinking: bool) -> None:
        self.in_reasoning = thinking
        self._held = ""
        self._content_started = False

    def push(self, text: str) -> tuple[str, str]:
        if not self.in_reasoning:
            return "", self._content(text)
        buf = self._held + text
        i = buf.find(THINK_END)
        if i >= 0:
            self.in_reasoning, self._held = False, ""
            return buf[:i].rstrip("\n"), self._content(buf[i + len(THINK_END):])
        hold = _partial_suffix(buf, THINK_END)
        keep = len(buf) - hold
        while keep > 0 and buf[keep - 1] == "\n":
            keep -= 1  # newlines right before a possible </think> are dropped if it comes
        self._held = buf[keep:]
        return buf[:keep], ""

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.in_reasoning else ("", self._content(held))

    def _content(self, text: str) -> str:
        if not self._content_started:
            text = text.lstrip("\n")
            self._content_started = bool(text)
        return text


def _partial_suffix(buf: str, needle: str) -> int:
    """Length of the longest tail of ``buf`` that is a proper prefix of ``needle``."""
    for n in range(min(len(needle) - 1, len(buf)), 0, -1):
        if buf.endswith(needle[:n]):
            return n
    return 0


class ChoiceText:
    """Incremental text of one choice; see the module docstring."""

    def __init__(
        self, decode: Callable[[list[int]], str], *, skip_ids: Iterable[int], stops: list[str], thinking: bool
    ) -> None:
        self._decoder = StreamDecoder(decode)
        self._skip = frozenset(skip_ids)
        self._stops = StopMatcher(stops) if stops else None
        self._split = ReasoningSplitter(thinking)
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.completion_tokens = 0

    @property
    def stopped(self) -> bool:
        """A client stop string was found: nothing more will be emitted."""
        return self._stops is not None and self._stops.matched is not None

    def feed(self, token_id: int) -> tuple[str, str]:
        self.completion_tokens += 1
        if token_id in self._skip or self.stopped:
            return "", ""
        return self._route(self._decoder.feed([token_id]))

    def finish(self) -> tuple[str, str]:
        text = "" if self.stopped else self._decoder.flush()
        if self._stops is not None:
            text, _ = self._stops.push(text)
            text += self._stops.flush()  # held text that did not become a stop string
        r1, c1 = self._split.push(text) if text else ("", "")
        r2, c2 = self._split.flush()
        return self._keep(r1 + r2, c1 + c2)

    def _route(self, text: str) -> tuple[str, str]:
        if not text:
            return "", ""
        if self._stops is not None:
            text, _ = self._stops.push(text)
        return self._keep(*self._split.push(text))

    def _keep(self, reasoning: str, content: str) -> tuple[str, str]:
        if reasoning:
            self.reasoning.append(reasoning)
        if content:
            self.content.append(content)
        return reasoning, content

    def texts(self, thinking: bool) -> tuple[str | None, str]:
        """(reasoning_content, content) of the whole answer so far."""
        reasoning = "".join(self.reasoning)
        return (reasoning if thinking else None), "".join(self.content)
