"""From token ids to text events: incremental detokenisation, stop strings, answer rules and
the reasoning / answer split. Every streaming consumer (``chat(stream=True)``, ``ChatSession``,
the server and the web UI) reads the same ``TextStream``.

* ``StreamDecoder`` turns ids fed one or a few at a time into text deltas whose concatenation
  equals decoding all ids at once; it never emits half of a multi-byte UTF-8 character (a
  decoded tail ending in U+FFFD is held back until more ids arrive or ``flush``), and works for
  context-dependent decoders (SentencePiece's leading space) by decoding a small window.
  ``chunking="word"`` reproduces transformers' ``TextStreamer`` chunks instead (flush at "\n"
  and CJK characters, else up to the last space), as the reference ``chat(stream=True)`` does.
* ``StopMatcher`` finds client stop strings, holding back any tail that could still become one.
* ``AnswerRules`` say which ids produce no text (terminators, the official id-0 drop), which are
  dropped only as the first token (bos), which strings are removed, and whether the answer is
  whitespace-stripped (done incrementally: leading whitespace is dropped, trailing whitespace
  held until more text follows). ``compat.py`` builds them per release.
* ``ReasoningSplitter``: thinking mode (4.5; the prompt ends in ``<think>\n``) routes text
  before ``</think>`` to the reasoning, the rest to the answer (newlines next to the tag are
  dropped on both sides); an answer cut off before ``</think>`` is reasoning only.
* ``TextStream`` chains them and emits ``TextEvent`` records (text, reasoning, content deltas,
  the ids, the finish reason).

Nothing here knows about models or tokenizer files: decoding is a callable passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import InputError

DecodeFn = Callable[[list[int]], str]
_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Feed token ids, get text deltas; see the module docstring."""

    def __init__(self, decode_fn: DecodeFn, *, chunking: Literal["token", "word"] = "token") -> None:
        if chunking not in ("token", "word"):
            raise InputError(f"chunking must be 'token' or 'word', got {chunking!r}")
        self._decode = decode_fn
        self._chunking = chunking
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window ("token") / of the token cache ("word")
        self._read = 0  # ids before this index have been emitted ("token")
        self._printed = 0  # characters emitted past the committed text of the window
        self._emitted: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """Every id fed so far."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Add ids; return the text that became safe to emit ("" if none)."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        self._ids.extend(ids)
        delta = self._feed_word() if self._chunking == "word" else self._feed_token()
        self._emitted.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is still held back (end of generation); the decoder stays usable."""
        if self._chunking == "word":
            text = self._decode(self._ids[self._prefix :])
            delta = text[self._printed :]
            self._prefix, self._printed = len(self._ids), 0
        else:
            before = self._decode(self._ids[self._prefix : self._read])
            delta = self._decode(self._ids[self._prefix :])[len(before) + self._printed :]
            self._prefix = self._read = len(self._ids)
            self._printed = 0
        self._emitted.append(delta)
        return delta

    def _feed_token(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) <= len(before):
            return ""  # nothing new yet
        start = len(before) + self._printed
        if now.endswith(_REPLACEMENT):  # incomplete multi-byte tail: emit only what precedes it
            delta = now.rstrip(_REPLACEMENT)[start:]
            self._printed += len(delta)
            return delta
        self._prefix, self._read, self._printed = self._read, len(self._ids), 0
        return now[start:]

    def _feed_word(self) -> str:
        text = self._decode(self._ids[self._prefix :])
        if text.endswith("\n"):
            delta = text[self._printed :]
            self._prefix, self._printed = len(self._ids), 0
            return delta
        if text and _is_cjk(ord(text[-1])):
            delta = text[self._printed :]
        else:
            delta = text[self._printed : text.rfind(" ") + 1]
        self._printed += len(delta)
        return delta


def _partial_suffix(buf: str, needles: Sequence[str]) -> int:
    """Length of the longest tail of ``buf`` that is a proper prefix of one of ``needles``."""
    best = 0
    for needle in needles:
        for n in range(min(len(needle) - 1, len(buf)), best, -1):
            if buf.endswith(needle[:n]):
                best = n
                break
    return best


def _is_cjk(cp: int) -> bool:
    """The CJK ranges transformers' TextStreamer flushes on."""
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


class StopMatcher:
    """Find stop strings in streamed text without emitting text that might start one.

    ``push(text)`` returns ``(safe_text, matched)``: ``matched`` is the stop string found (the
    text before it is returned, the stop and anything after are dropped) or None. After a
    match the matcher is finished and ignores further input. ``flush()`` releases held text.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise InputError(f"stop strings must be non-empty strings, got {list(stops)!r}")
        self.stops = tuple(stops)
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", None
        buf = self._held + text
        hit = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (hit is None or i < hit[0] or (i == hit[0] and len(s) > len(hit[1]))):
                hit = (i, s)
        if hit is not None:
            self._held, self.matched = "", hit[1]
            return buf[: hit[0]], hit[1]
        hold = _partial_suffix(buf, self.stops)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class _Remover:
    """Remove every occurrence of some strings from streamed text (held back while a tail could
    still become one), so the result equals ``.replace`` on the whole text."""

    def __init__(self, needles: Sequence[str]) -> None:
        self.needles = tuple(n for n in needles if n)
        self._held = ""

    def push(self, text: str) -> str:
        if not self.needles:
            return text
        buf = self._held + text
        for needle in self.needles:
            buf = buf.replace(needle, "")
        hold = _partial_suffix(buf, self.needles)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


THINK_END = "</think>"


class ReasoningSplitter:
    """Route streamed text to reasoning until ``</think>``, then to content (module docstring)."""

    def __init__(self, thinking: bool) -> None:
        self.in_reasoning = thinking
        self._held = ""
        self._content_started = False

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning, content) released by ``text``."""
        if not self.in_reasoning:
            return "", self._content(text)
        buf = self._held + text
        i = buf.find(THINK_END)
        if i >= 0:
            self.in_reasoning, self._held = False, ""
            return buf[:i].rstrip("\n"), self._content(buf[i + len(THINK_END):])
        hold = _partial_suffix(buf, (THINK_END,))
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




@dataclass(frozen=True)
class AnswerRules:
    """How generated ids become answer text (see the module docstring; built by ``compat.py``)."""

    hidden_ids: frozenset[int] = frozenset()
    leading_ids: frozenset[int] = frozenset()
    strip_texts: tuple[str, ...] = ()
    strip: bool = False


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class TextEvent:
    """What one step of a stream released: ``text`` is the answer's new text (thinking mode:
    reasoning, ``</think>`` and answer as the model wrote them); ``reasoning`` / ``content`` are
    the same text split (without the tag); ``finish_reason`` is set on the last event."""

    text: str = ""
    reasoning: str = ""
    content: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None


class TextStream:
    """Token ids in, ``TextEvent``s out, for one answer (one choice of a request).

    ``feed(id)`` per generated id, ``finish(reason)`` at the end. ``stops`` are client stop
    strings (the match and what follows are dropped; ``stopped`` turns true); ``thinking``
    splits reasoning from the answer; ``chunking`` is ``StreamDecoder``'s.
    """

    def __init__(
        self, decode: DecodeFn, rules: AnswerRules = AnswerRules(), *, thinking: bool = False,
        stops: Sequence[str] = (), chunking: Literal["token", "word"] = "token",
    ) -> None:
        self.rules = rules
        self._decoder = StreamDecoder(decode, chunking=chunking)
        self._stops = StopMatcher(stops) if stops else None
        self._remover = _Remover(rules.strip_texts)
        self._split = ReasoningSplitter(thinking)
        self._started = False  # a visible character was emitted (leading whitespace is dropped before)
        self._held_space = ""  # trailing whitespace, emitted only if more text follows
        self._first = True
        self.token_ids: list[int] = []
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @property
    def stopped(self) -> bool:
        """A client stop string was found: nothing more will be emitted."""
        return self._stops is not None and self._stops.matched is not None

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def feed(self, token_id: int) -> TextEvent:
        token_id = int(token_id)
        self.token_ids.append(token_id)
        first = self._first
        hidden = token_id in self.rules.hidden_ids or (first and token_id in self.rules.leading_ids)
        # a hidden id (the dropped id 0) before it does not make a leading bos visible: postprocess
        # removes those ids before it looks for the bos
        self._first = first and token_id in self.rules.hidden_ids
        if hidden or self.stopped:
            return TextEvent(token_ids=(token_id,))
        return self._emit(self._decoder.feed([token_id]), (token_id,), None, final=False)

    def finish(self, reason: FinishReason) -> TextEvent:
        text = "" if self.stopped else self._decoder.flush()
        return self._emit(text, (), reason, final=True)

    def _emit(self, text: str, ids: tuple[int, ...], reason: FinishReason | None, *, final: bool) -> TextEvent:
        if self._stops is not None:
            text, _ = self._stops.push(text)
            if final:
                text += self._stops.flush()  # held text that did not become a stop string
        text = self._remover.push(text) + (self._remover.flush() if final else "")
        text = self._strip(text, final)
        reasoning, content = self._split.push(text) if text else ("", "")
        if final:
            r2, c2 = self._split.flush()
            reasoning, content = reasoning + r2, content + c2
        self._text.append(text)
        self._reasoning.append(reasoning)
        self._content.append(content)
        return TextEvent(text, reasoning, content, ids, reason)

    def _strip(self, text: str, final: bool) -> str:
        """Whitespace of the answer's two ends removed, incrementally (``rules.strip``)."""
        if not self.rules.strip:
            return text
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        if not text:
            return ""
        body = text.rstrip()
        out = self._held_space + body if body else ""
        self._held_space = (self._held_space if not body else "") + text[len(body):]
        if final:
            self._held_space = ""
        return out


def merge_events(first: TextEvent, second: TextEvent) -> TextEvent:
    """One event holding both (the last token's text and the stream's final flush)."""
    return TextEvent(first.text + second.text, first.reasoning + second.reasoning, first.content + second.content,
                     first.token_ids + second.token_ids, second.finish_reason or first.finish_reason)
