"""Incremental detokenisation and stop-string matching for streamed generation.

``StreamDecoder`` turns token ids, fed one or a few at a time, into text deltas whose
concatenation equals decoding all ids at once; it never emits half of a multi-byte UTF-8
character (a decoded tail ending in U+FFFD is held back until more ids arrive or ``flush``).
It works for context-dependent decoders too (e.g. SentencePiece's leading-space handling) by
decoding a small window that starts before the new ids. ``chunking="word"`` reproduces the
chunk boundaries of transformers' ``TextStreamer`` instead (flush at "\\n" and CJK characters,
else up to the last space), which the reference ``chat(stream=True)`` uses.

``StopMatcher`` scans streamed text for stop strings, holding back any tail that could still
become one. ``TextEvent`` is the record streaming callers hand on.

Nothing here knows about models or tokenizer files: decoding is a callable passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import InputError

DecodeFn = Callable[[list[int]], str]
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class TextEvent:
    """A piece of streamed output: new text, the ids that produced it, why the stream ended."""

    delta: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None


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

    def event(
        self, token_ids: int | Iterable[int], finish_reason: Literal["stop", "length"] | None = None
    ) -> TextEvent:
        """``feed`` the ids (and ``flush`` when ``finish_reason`` is given) as one ``TextEvent``."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        delta = self.feed(ids)
        if finish_reason is not None:
            delta += self.flush()
        return TextEvent(delta=delta, token_ids=ids, finish_reason=finish_reason)

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
        hold = self._partial_len(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_len(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
