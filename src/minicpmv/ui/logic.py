"""Browser-independent logic of the web UI: uploads, decoding options, voices and one chat per tab.

``read_uploads`` turns uploaded files into message items (images decoded with ``load_image``,
videos as ``Video`` items when this installation has the video pipeline, audio files and
microphone recordings as 16 kHz clips with ``read_audio``) and raises a typed error naming the
file otherwise. ``page_options`` turns the page's controls into the engine's ``SamplingParams``
(the official presets, as ``chat()`` merges them) plus the slice and thinking settings.
``voice_choice`` turns the speech controls (MiniCPM-o) into a ``VoiceChoice``: whether answers
are spoken, and with which voice (the model's default voice, or a reference clip cloned as an
assistant or as a role-play character, through the official voice prompts).
``SharedModel`` holds the one loaded model and a lock (one generation at a time, whichever tab
asks); ``TabChat`` is the state of one browser tab: its own ``ChatSession`` and the user turns
it has answered (with their spoken answers), so tabs never share a history. Answers stream as
the engine's ``TextEvent``s, whose reasoning / answer split is the one the library and the
server use.

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

from ..engine.sampling import SamplingParams
from ..engine.stream import TextEvent
from ..errors import AudioError, FeatureNotAvailableError, ImageError, InputError, MiniCPMVError
from ..processing.audio import read_audio
from ..processing.image import load_image
from ..processing.voice_prompts import get_sys_prompt
from ..versions import VersionSpec

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg", ".wmv", ".flv"})
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".ogg", ".oga", ".flac", ".m4a", ".webm", ".opus", ".aac"})
DECODING_MODES = ("sampling", "beam")
VOICE_MODES = {"default": "audio_assistant", "clone": "audio_assistant", "roleplay": "audio_roleplay"}


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
    if p.suffix.lower() in AUDIO_SUFFIXES:
        try:
            return read_audio(p, what=p.name)
        except AudioError as e:
            raise AudioError(_short(e, p)) from e
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
class PageOptions:
    """What the page's controls ask for: decoding settings, slices per image, thinking mode."""

    params: SamplingParams
    max_slice_nums: int | None = None
    thinking: bool = False


def page_options(
    version: VersionSpec, *, mode: str = "sampling", temperature: float = 0.7, top_p: float = 0.8,
    max_new_tokens: int = 1024, max_slice_nums: int | None = None, thinking: bool = False,
) -> PageOptions:
    """The controls as ``chat()`` would take them: ``mode`` "sampling" is the official sampling
    preset with the page's temperature and top-p, "beam" the official beam preset."""
    if mode not in DECODING_MODES:
        raise InputError(f"decoding mode must be one of {DECODING_MODES}, got {mode!r}")
    if max_slice_nums is not None and max_slice_nums < 1:
        raise InputError(f"max slices must be >= 1, got {max_slice_nums}")
    thinking = thinking and version.supports_thinking
    overrides: dict[str, Any] = {}
    if mode == "sampling":
        overrides["temperature"] = temperature
        if not thinking:
            overrides["top_p"] = top_p  # the thinking preset sets only temperature
    params = SamplingParams.from_official(version, sampling=mode == "sampling", enable_thinking=thinking,
                                          max_new_tokens=max_new_tokens, overrides=overrides)
    return PageOptions(params, max_slice_nums, thinking)


@dataclass(frozen=True)
class VoiceChoice:
    """The speech controls: ``speak`` the answers; ``mode`` "default" (the model's own voice),
    "clone" (an assistant in the voice of ``reference``) or "roleplay" (also acting the clip's
    character); ``reference`` the 16 kHz clip."""

    speak: bool = False
    mode: str = "default"
    reference: Any = None
    language: str = "en"

    def message(self) -> dict[str, Any]:
        """The official voice message that goes first in the conversation."""
        return get_sys_prompt(self.reference if self.mode != "default" else None, VOICE_MODES[self.mode],
                              self.language)

    @property
    def key(self) -> tuple[str, int | None]:
        return self.mode, None if self.reference is None else hash(self.reference.tobytes())


def voice_choice(speak: bool, mode: str = "default", reference: str | Path | None = None,
                 language: str = "en") -> VoiceChoice:
    """The page's speech controls as a ``VoiceChoice`` (the reference file read now)."""
    if mode not in VOICE_MODES:
        raise InputError(f"voice must be one of {sorted(VOICE_MODES)}, got {mode!r}")
    if mode != "default" and not reference:
        raise InputError("add a reference clip to clone its voice (or choose the default voice)")
    clip = read_upload(reference) if reference and mode != "default" else None
    if clip is not None and not hasattr(clip, "dtype"):
        raise AudioError(f"{Path(str(reference)).name} is not an audio file")
    return VoiceChoice(bool(speak), mode, clip, language)


class SharedModel:
    """The model every tab uses, with a lock so that one generation runs at a time."""

    def __init__(self, model: Any, *, max_audio_seconds: float | None = None) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.max_audio_seconds = max_audio_seconds  # spoken answers are cut at this length

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "bfloat16", device: str = "cpu",
             max_audio_seconds: float | None = None) -> SharedModel:
        import minicpmv

        return cls(minicpmv.load(path, dtype=dtype, device=device), max_audio_seconds=max_audio_seconds)

    @property
    def version_name(self) -> str:
        return str(self.model.version.name)

    @property
    def supports_thinking(self) -> bool:
        return bool(self.model.version.supports_thinking)

    @property
    def default_max_slices(self) -> int:
        return int(self.model.processor.cfg.slice.max_slice_nums)

    @property
    def takes_audio(self) -> bool:
        return bool(self.model.version.audio_input)

    @property
    def speaks(self) -> bool:
        return getattr(self.model.model, "tts", None) is not None

    def locked(self, events: Iterator[TextEvent]) -> Generator[TextEvent, None, None]:
        """Run a lazy event stream while holding the model lock."""
        with self.lock:
            yield from events

    def few_shot(
        self, examples: Sequence[tuple[str, str, str]], image: str | Path, question: str, options: PageOptions
    ) -> Generator[TextEvent, None, None]:
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
        session = minicpmv.ChatSession(self.model, enable_thinking=options.thinking,
                                       max_slice_nums=options.max_slice_nums)
        session.history = history
        return self.locked(session.respond(content, stream=True, params=options.params))  # type: ignore[arg-type]


@dataclass
class Turn:
    """One answered exchange of a tab: what the user sent and the model's final answer
    (``answer`` as chat() returns it; ``reasoning`` / ``content`` split for display)."""

    text: str
    files: list[str]
    items: list[Any]  # the message content given to the model (images decoded)
    answer: str = ""
    reasoning: str | None = None
    content: str = ""
    finish_reason: str | None = None
    audio: tuple[int, Any] | None = None  # the spoken answer: (sampling rate, float32 samples)


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
        self._voice: dict[str, Any] | None = None  # the voice message at the start of the history
        self._voice_key: Any = None

    def _session(self) -> Any:
        if self.session is None:
            import minicpmv

            self.session = minicpmv.ChatSession(self.shared.model, max_audio_seconds=self.shared.max_audio_seconds)
        return self.session

    def ask(self, text: str, files: Sequence[str | Path], options: PageOptions,
            voice: VoiceChoice | None = None) -> Generator[TextEvent, None, None]:
        """Validate the turn now (bad files raise here), then return the lazy answer stream."""
        items = read_uploads(files)
        if text.strip():
            items.append(text)
        if not items:
            raise InputError("type a question or attach an image")
        self._check_voice(voice)
        turn = Turn(text=text, files=[str(f) for f in files], items=items)
        return self.shared.locked(self._answer(turn, options, replace=False, voice=voice))

    def regenerate(self, options: PageOptions, voice: VoiceChoice | None = None) -> Generator[TextEvent, None, None]:
        """Answer the last user turn again; the new answer replaces the old one when it completes."""
        if not self.turns:
            raise InputError("there is no answer to regenerate yet")
        self._check_voice(voice)
        last = self.turns[-1]
        turn = Turn(text=last.text, files=list(last.files), items=list(last.items))
        return self.shared.locked(self._answer(turn, options, replace=True, voice=voice))

    def _check_voice(self, voice: VoiceChoice | None) -> None:
        if voice is not None and voice.speak and not self.shared.speaks:
            raise FeatureNotAvailableError(f"MiniCPM-V {self.shared.version_name} has no speech head: it cannot "
                                           "speak its answers (MiniCPM-o 2.6 can)")

    def _use_voice(self, session: Any, voice: VoiceChoice | None) -> None:
        """Put the chosen voice message first in the history (replacing an earlier choice)."""
        if voice is None or not voice.speak or voice.key == self._voice_key:
            return
        history = list(session.history)
        if history and self._voice is not None and history[0] is self._voice:
            history = history[1:]
        self._voice, self._voice_key = voice.message(), voice.key
        session.history = [self._voice, *history]

    def clear(self) -> None:
        """Start a new conversation (a streaming answer of the old one is not touched)."""
        self.epoch += 1
        self.session = None
        self.turns = []
        self._voice = self._voice_key = None

    def _answer(self, turn: Turn, options: PageOptions, *, replace: bool,
                voice: VoiceChoice | None = None) -> Iterator[TextEvent]:
        epoch, session = self.epoch, self._session()
        self._use_voice(session, voice)
        speak = voice is not None and voice.speak
        saved = session.history
        if replace:
            session.history = saved[:-2]  # drop the last user turn and its answer
        # The slider is for images; a conversation with a video keeps its recipe's slice count.
        has_video = any(_is_video(i) for t in [*self.turns, turn] for i in t.items)
        session.max_slice_nums = None if has_video else options.max_slice_nums
        session.enable_thinking = options.thinking
        finished = False
        try:
            yield from session.respond(turn.items, stream=True, params=options.params, generate_audio=speak)
            finished = True
        finally:
            if not finished:
                session.history = saved
        last = session.last_response
        assert last is not None
        turn.answer, turn.content, turn.finish_reason = last.text, last.content, last.finish_reason
        turn.reasoning = last.reasoning
        if last.audio_wav is not None and last.sampling_rate:
            turn.audio = (last.sampling_rate, last.audio_wav)
        if self.epoch != epoch:
            return  # the tab was cleared meanwhile
        if replace:
            self.turns[-1] = turn
        else:
            self.turns.append(turn)
