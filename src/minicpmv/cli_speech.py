"""Spoken answers on the command line (MiniCPM-o 2.6): ``minicpmv chat --audio-out OUT.wav``.

``add_speech_arguments`` adds the flags of ``minicpmv chat``: ``--audio-out`` (write the spoken
answer; in interactive mode one file per answer, ``OUT-1.wav``, ``OUT-2.wav``, ...), ``--voice``
(a reference clip to speak with, any format and rate that ``read_audio`` reads), ``--voice-mode``
(``assistant``: answer in that voice; ``roleplay``: also act the character of the clip;
``clone``: read the question's text aloud in that voice), ``--voice-language`` (language of
the official voice prompts) and ``--max-audio-seconds`` (cut each spoken answer).
``SpeechPlan`` reads and checks all of that before the model is loaded, puts the official
voice message at the start of the session's history and writes each answer's audio. The
speaking itself is the library's (``ChatSession(generate_audio=True)``).
"""

from __future__ import annotations

import argparse
import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FeatureNotAvailableError, InputError

MODES = {"assistant": "audio_assistant", "roleplay": "audio_roleplay", "clone": "voice_cloning"}


def add_speech_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audio-out", type=Path, default=None,
                   help="MiniCPM-o: speak the answer and write it as a 24 kHz WAV (interactive: OUT-1.wav, ...)")
    p.add_argument("--voice", type=Path, default=None,
                   help="reference clip whose voice the spoken answer uses (voice cloning; any rate, mono or stereo)")
    p.add_argument("--voice-mode", choices=sorted(MODES), default="assistant",
                   help="assistant: answer in the voice; roleplay: also act its character; clone: read the "
                        "question's text aloud in the voice (default assistant)")
    p.add_argument("--voice-language", choices=["en", "zh"], default="en",
                   help="language of the official voice prompt (default en)")
    p.add_argument("--max-audio-seconds", type=float, default=None,
                   help="cut each spoken answer at this length (default: the model's limit, 2048 frames = 43.7 s)")


@dataclass
class SpeechPlan:
    """What the speech flags ask for, checked before the model loads."""

    out: Path | None
    voice: np.ndarray | None
    mode: str
    language: str
    max_seconds: float | None = None
    answers: int = 0
    written: list[Path] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SpeechPlan | None:
        if args.audio_out is None:
            if args.voice is not None or args.voice_mode != "assistant" or args.max_audio_seconds is not None:
                raise InputError("--voice, --voice-mode and --max-audio-seconds shape the spoken answer: add "
                                 "--audio-out OUT.wav")
            return None
        if args.max_audio_seconds is not None and not args.max_audio_seconds > 0:
            raise InputError(f"--max-audio-seconds must be positive, got {args.max_audio_seconds}")
        if args.audio_out.suffix.lower() != ".wav":
            raise InputError(f"--audio-out writes a WAV file: give a .wav path, got {args.audio_out}")
        if not args.audio_out.parent.is_dir():
            raise InputError(f"--audio-out: the folder {args.audio_out.parent} does not exist")
        _check_nothing_overwritten(args.audio_out, numbered=args.interactive)
        if args.voice_mode == "clone" and (args.voice is None or args.interactive):
            raise InputError("--voice-mode clone reads the question aloud in the voice of --voice (not with -i)")
        voice = None
        if args.voice is not None:
            from .processing.audio import read_audio

            voice = read_audio(args.voice, what="--voice")
        return cls(args.audio_out, voice, MODES[args.voice_mode], args.voice_language, args.max_audio_seconds)

    def start(self, session: Any) -> None:
        """The official voice message as the first turn of ``session`` (which speaks its answers)."""
        from .processing.voice_prompts import get_sys_prompt

        if getattr(session.model.model, "tts", None) is None:
            raise FeatureNotAvailableError(f"--audio-out needs a MiniCPM-o checkpoint with a speech head; "
                                           f"{session.model.version.title} at {session.model.path} has none")
        session.generate_audio = True
        session.max_audio_seconds = self.max_seconds
        session.history = [get_sys_prompt(self.voice, self.mode, self.language)]

    def question(self, content: list[Any]) -> list[Any]:
        """The first user turn (clone mode: the official "read the text below" request)."""
        from .processing.voice_prompts import READ_ALOUD

        return [READ_ALOUD, *content] if self.mode == "voice_cloning" else content

    def write(self, session: Any, *, numbered: bool) -> None:
        """Write the last answer's audio (``numbered``: one file per answer of a session)."""
        from .processing.audio import save_wav

        r = session.last_response
        if r is None or r.audio_wav is None:
            return
        self.answers += 1
        out = self.out
        assert out is not None
        path = out.with_name(f"{out.stem}-{self.answers}{out.suffix}") if numbered else out
        save_wav(path, r.audio_wav, r.sampling_rate)
        self.written.append(path)
        sys.stderr.write(f"wrote {path} ({len(r.audio_wav) / r.sampling_rate:.1f} s of speech)\n")


def _check_nothing_overwritten(out: Path, *, numbered: bool) -> None:
    """Refuse an ``--audio-out`` that would replace files: the path itself, or with ``-i`` the
    numbered answers (``OUT-1.wav``, ``OUT-2.wav``, ...) of an earlier session."""
    taken = sorted(out.parent.glob(f"{glob.escape(out.stem)}-[0-9]*{glob.escape(out.suffix)}")) if numbered else []
    if not numbered and out.exists():
        taken = [out]
    if taken:
        raise InputError(f"--audio-out: {taken[0]} exists and nothing is overwritten: choose another name")
