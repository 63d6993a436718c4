"""Browser-independent logic of the web UI: uploads, decoding options and one chat per tab.

``read_uploads`` turns uploaded files into message items (images decoded with ``load_image``,
videos as ``Video`` items when this installation has the video pipeline) and raises a typed
error naming the file otherwise. ``DecodingOptions`` maps the page's controls onto the
official ``chat()`` keyword arguments. ``SharedModel`` holds the one loaded model and a lock
(one generation at a time, whichever tab asks); ``TabChat`` is the state of one browser tab: its
own ``ChatSession`` and the user turns it has answered, so tabs never share a history.
``split_reasoning`` separates a thinking-mode answer into reasoning and answer for display.

Nothing here imports gradio (``app.py`` builds the page) and nothing loads a model at import.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FeatureNotAvailableError, ImageError, InputError, MiniCPMVError
from ..processing.image import load_image

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg", ".wmv", ".flv"})
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DECODING_MODES = ("sampling", "beam")


def _video_class() -> Any:
    """``minicpmv.processing.video.Video`` when this installation has the video pipeline, else None."""
    if importlib.util.find_spec("minicpmv.processing.video") is None:
        return None
    return getattr(importlib.import_module("minicpmv.processing.video"), "Video", None)


def video_supported() -> bool:
    """True when this installation can take video items (``minicpmv.processing.video.Video``)."""
    return _video_class() is not None


def _short(e: MiniCPMVError, p: Path) -> str:
    """The error's message with the server-side path of an upload replaced by its file name."""
    return str(e).replace(f"'{p}'", f"'{p.name}'").replace(str(p), p.name)


def read_upload(path: str | Path) -> Any:
    """One uploaded file → a message item (RGB image or ``Video``); typed error naming the file.

    A video is probed now (container and frame index, no decoding) so that a broken file is
    reported at upload time; its frames are decoded when the model first needs them.
    """
    p = Path(path)
    if p.suffix.lower() in VIDEO_SUFFIXES:
        video_cls = _video_class()
        if video_cls is None:
            raise FeatureNotAvailableError(
                f"{p.name}: video input is not supported yet by this version of minicpmv; "
                "upload images (for example a few frames) instead"
            )
        video = video_cls(str(p))
        try:
            video.info()
        except MiniCPMVError as e:
            raise type(e)(_short(e, p)) from e
        return video
    try:
        return load_image(p)
    except ImageError as e:
        raise ImageError(_short(e, p)) from e


def _is_video(item: Any) -> bool:
    video_cls = _video_class()
    return video_cls is not None and isinstance(item, video_cls)


def read_uploads(paths: Sequence[str | Path]) -> list[Any]:
    """Every uploaded file as a message item, in upload order."""
    return [read_upload(p) for p in paths]


@dataclass(frozen=True)
class DecodingOptions:
    """The page's decoding controls. ``mode`` is "sampling" (official sampling preset) or "beam"."""

    mode: str = "sampling"
    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: int = 1024
    max_slice_nums: int | None = None
    thinking: bool = False

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise InputError(f"decoding mode must be one of {DECODING_MODES}, got {self.mode!r}")
        if self.mode == "sampling" and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise InputError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_slice_nums is not None and self.max_slice_nums < 1:
            raise InputError(f"max slices must be >= 1, got {self.max_slice_nums}")

    def generation_kwargs(self, *, supports_thinking: bool) -> dict[str, Any]:
        """Keyword arguments for ``chat()`` / ``ChatSession.ask``: only keys the preset applies."""
        kw: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens)}
        if self.mode == "beam":
            kw["sampling"] = False  # the official beam preset (3 beams); it takes no sampling keys
            return kw
        kw.update(sampling=True, temperature=float(self.temperature))
        if not (self.thinking and supports_thinking):
            kw["top_p"] = float(self.top_p)  # the thinking preset sets only temperature
        return kw


@dataclass(frozen=True)
class Reasoning:
    """A thinking-mode answer split for display."""

    reasoning: str | None  # None: the answer has no reasoning block
    answer: str
    reasoning_done: bool


def split_reasoning(text: str) -> Reasoning:
    """``"<think>\\nR</think>\\n\\nA"`` → reasoning R and answer A (also while still streaming)."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return Reasoning(None, text, True)
    body = stripped[len(THINK_OPEN):]
    if THINK_CLOSE not in body:
        return Reasoning(body.strip(), "", False)
    reasoning, answer = body.split(THINK_CLOSE, 1)
    return Reasoning(reasoning.strip(), answer.strip(), True)


class SharedModel:
    """The model every tab uses, with a lock so that one generation runs at a time."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "bfloat16", device: str = "cpu") -> SharedModel:
        import minicpmv

        return cls(minicpmv.load(path, dtype=dtype, device=device))

    @property
    def version_name(self) -> str:
        return str(self.model.version.name)

    @property
    def supports_thinking(self) -> bool:
        return bool(self.model.version.supports_thinking)

    @property
    def default_max_slices(self) -> int:
        return int(self.model.processor.cfg.slice.max_slice_nums)

    def locked(self, chunks: Iterator[str]) -> Generator[str, None, None]:
        """Run a lazy stream of text chunks while holding the model lock."""
        with self.lock:
            yield from chunks

    def few_shot(
        self, examples: Sequence[tuple[str, str, str]], image: str | Path, question: str, options: DecodingOptions
    ) -> Generator[str, None, None]:
        """Stream the answer to ``question`` about ``image`` after (image, question, answer) examples.

        The examples become earlier turns of a fresh ``ChatSession`` (files are read now, so a bad
        one raises before anything runs); the session is dropped afterwards.
        """
        import minicpmv

        if not question.strip():
            raise InputError("type a question for the test image")
        history: list[dict[str, Any]] = []
        for ex_image, ex_question, ex_answer in examples:
            history.append({"role": "user", "content": [read_upload(ex_image), ex_question]})
            history.append({"role": "assistant", "content": [ex_answer]})
        content = [read_upload(image), question]
        session = minicpmv.ChatSession(
            self.model, enable_thinking=options.thinking and self.supports_thinking,
            max_slice_nums=options.max_slice_nums,
        )
        session.history = history
        kw = options.generation_kwargs(supports_thinking=self.supports_thinking)
        return self.locked(session.ask(content, stream=True, **kw))


@dataclass
class Turn:
    """One answered exchange of a tab: what the user sent and the model's final answer."""

    text: str
    files: list[str]
    items: list[Any]  # the message content given to the model (images decoded)
    answer: str = ""


class TabChat:
    """One browser tab's conversation: its own ``ChatSession`` and its answered turns.

    ``turns`` and the session's history always describe the same conversation: a turn is added
    (or replaced, for regenerate) only when its answer has streamed to the end; an answer that
    fails or is abandoned half-way leaves both as they were. ``clear()`` may be called while an
    answer streams: it starts a new conversation (``epoch`` + 1) and the running answer, when it
    ends, is dropped instead of being added to the new one.
    """

    def __init__(self, shared: SharedModel) -> None:
        self.shared = shared
        self.session: Any = None  # a ChatSession, created on the first question
        self.turns: list[Turn] = []
        self.epoch = 0  # incremented by clear()

    def _session(self) -> Any:
        if self.session is None:
            import minicpmv

            self.session = minicpmv.ChatSession(self.shared.model)
        return self.session

    def ask(self, text: str, files: Sequence[str | Path], options: DecodingOptions) -> Generator[str, None, None]:
        """Validate the turn now (bad files raise here), then return the lazy answer stream."""
        items = read_uploads(files)
        if text.strip():
            items.append(text)
        if not items:
            raise InputError("type a question or attach an image")
        turn = Turn(text=text, files=[str(f) for f in files], items=items)
        return self.shared.locked(self._answer(turn, options, replace=False))

    def regenerate(self, options: DecodingOptions) -> Generator[str, None, None]:
        """Answer the last user turn again; the new answer replaces the old one when it completes."""
        if not self.turns:
            raise InputError("there is no answer to regenerate yet")
        last = self.turns[-1]
        turn = Turn(text=last.text, files=list(last.files), items=list(last.items))
        return self.shared.locked(self._answer(turn, options, replace=True))

    def clear(self) -> None:
        """Start a new conversation (a streaming answer of the old one is not touched)."""
        self.epoch += 1
        self.session = None
        self.turns = []

    def _answer(self, turn: Turn, options: DecodingOptions, *, replace: bool) -> Iterator[str]:
        epoch, session = self.epoch, self._session()
        saved = session.history
        if replace:
            session.history = saved[:-2]  # drop the last user turn and its answer
        # The slider is for images; a conversation with a video keeps its recipe's slice count.
        has_video = any(_is_video(i) for t in [*self.turns, turn] for i in t.items)
        session.max_slice_nums = None if has_video else options.max_slice_nums
        session.enable_thinking = options.thinking and self.shared.supports_thinking
        kw = options.generation_kwargs(supports_thinking=self.shared.supports_thinking)
        finished = False
        try:
            yield from session.ask(turn.items, stream=True, **kw)
            finished = True
        finally:
            if not finished:
                session.history = saved
        turn.answer = session.history[-1]["content"][0]
        if self.epoch != epoch:
            return  # the tab was cleared meanwhile
        if replace:
            self.turns[-1] = turn
        else:
            self.turns.append(turn)
