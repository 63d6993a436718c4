"""Server settings and the generation defaults read from a checkpoint.

``ServerConfig`` holds every knob of ``minicpmv serve`` (the CLI maps its flags onto it one to
one). ``GenerationDefaults`` are the sampling values a request gets for the fields it leaves
out: like vLLM, the checkpoint's ``generation_config.json`` (``temperature``, ``top_p``,
``top_k``, ``repetition_penalty``, and ``chat_template_kwargs.enable_thinking``) when it has
them, else OpenAI's defaults (temperature 1, top_p 1, no top-k, no penalty, thinking off). The
official ``chat()`` presets are deliberately not used here: API clients expect their own
parameters to rule. Nothing here loads a model.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import read_json_object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server process (see ``minicpmv serve --help``)."""

    model: str = ""
    served_model_name: str | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_batch_size: int = 8
    max_model_len: int | None = None
    max_queue: int = 64
    batch_invariant: bool = True
    request_timeout_s: float = 600.0  # from arrival: media fetching and decoding, queueing and generation
    max_decoding: int = 2  # requests whose media are fetched and decoded at the same time
    max_body_bytes: int = 50 * 2**20
    max_header_bytes: int = 32 * 2**10  # all request headers together (431 beyond)
    max_images: int = 16
    max_video_frames: int = 64
    max_pixels: int = 40_000_000
    max_media_bytes: int = 20 * 2**20
    allow_remote_media: bool = False
    media_dir: str | None = None
    remote_timeout_s: float = 10.0
    remote_max_redirects: int = 3
    id0_quirk: bool = False  # the reference's id-0 handling (engine/compat.py); off for API clients
    # MiniCPM-o speech (serve/speech.py): named reference clips (name, path), the language of the
    # official voice prompts, and limits on audio in and out
    voices: tuple[tuple[str, str], ...] = ()
    voice_language: str = "en"
    max_audio_seconds: float = 120.0
    max_input_audio_seconds: float = 120.0
    max_speech_input_chars: int = 4096
    compile: str | None = None  # load(compile=...): None = eager decode steps

    def model_name(self, fallback: str = "minicpmv") -> str:
        if self.served_model_name:
            return self.served_model_name
        name = Path(self.model.rstrip("/")).name if self.model else ""
        return name or fallback


@dataclass(frozen=True)
class GenerationDefaults:
    """Values used for sampling fields a request does not set."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    enable_thinking: bool = False

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> GenerationDefaults:
        """Read ``generation_config.json`` of a checkpoint directory (defaults if absent)."""
        data = read_json_object(Path(path) / "generation_config.json")
        return cls() if data is None else cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationDefaults:
        base = cls()
        sampling = bool(data.get("do_sample", True))
        kwargs = data.get("chat_template_kwargs") or {}
        return cls(
            temperature=float(data.get("temperature", base.temperature)) if sampling else 0.0,
            top_p=float(data.get("top_p", base.top_p)),
            top_k=int(data.get("top_k", base.top_k) or 0),
            repetition_penalty=float(data.get("repetition_penalty", base.repetition_penalty)),
            enable_thinking=bool(kwargs.get("enable_thinking", base.enable_thinking))
            if isinstance(kwargs, dict) else base.enable_thinking,
        )


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``minicpmv serve`` flags (besides --model/--dtype/--device)."""
    d = ServerConfig()
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: directory name)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help=f"sequences decoded together (KV cache rows; default {d.max_batch_size})")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per sequence, prompt + answer (default min(model context, 4096))")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting beyond the batch before 429 (default {d.max_queue})")
    p.add_argument("--no-batch-invariance", action="store_true",
                   help="faster decoding whose last bits may depend on the other requests in the batch")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help="seconds per request, from its arrival (media decoding and waiting count)")
    p.add_argument("--max-decoding", type=int, default=d.max_decoding,
                   help=f"requests whose images/videos are decoded at the same time (default {d.max_decoding})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help=f"largest request header block (default {d.max_header_bytes})")
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    p.add_argument("--max-video-frames", type=int, default=d.max_video_frames, help="video frames per request")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="pixels per image (decompression bombs)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="let image_url/video_url fetch http(s) URLs (public addresses only, size/time limits)")
    p.add_argument("--media-dir", default=None, help="allow file:// media, confined to this directory")
    p.add_argument("--compile", nargs="?", const="auto", default=None, metavar="MODE",
                   help="static-shape decode steps through torch.compile (CUDA graphs on CUDA); MODE: a "
                        "torch.compile mode, or 'static' for static shapes without compiling (default: off)")
    p.add_argument("--id0-quirk", action=argparse.BooleanOptionalAction, default=d.id0_quirk,
                   help="the reference chat()'s id-0 handling (hide prompt tokens with id 0, drop id 0 from "
                        "answers); off by default for API clients")
    p.add_argument("--voice", action="append", default=[], metavar="NAME=REF_AUDIO",
                   help="MiniCPM-o: a named voice for spoken answers, cloned from a reference clip (repeatable); "
                        "'default' (the model's own voice) always exists")
    p.add_argument("--voice-language", choices=["en", "zh"], default=d.voice_language,
                   help="language of the official voice prompts (default en)")
    p.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                   help=f"longest spoken answer or /v1/audio/speech output (default {d.max_audio_seconds:g} s)")
    p.add_argument("--max-input-audio-seconds", type=float, default=d.max_input_audio_seconds,
                   help=f"longest input_audio part (default {d.max_input_audio_seconds:g} s)")
    p.add_argument("--max-speech-input-chars", type=int, default=d.max_speech_input_chars,
                   help=f"longest /v1/audio/speech input text (default {d.max_speech_input_chars})")


def parse_voices(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """``--voice NAME=PATH`` values -> ((name, path), ...); the files must exist."""
    from ..errors import InputError

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise InputError(f"--voice takes NAME=REF_AUDIO, got {spec!r}")
        if name == "default" or name in out:
            raise InputError(f"--voice {name!r} is given twice or is the built-in 'default'")
        if not Path(path).is_file():
            raise InputError(f"--voice {name}: the reference clip {path} does not exist")
        out[name] = str(Path(path).resolve())
    return tuple(out.items())


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    from ..errors import InputError

    for flag in ("max_audio_seconds", "max_input_audio_seconds", "max_speech_input_chars"):
        if not getattr(args, flag) > 0:
            raise InputError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return ServerConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        max_batch_size=args.max_batch_size, max_model_len=args.max_model_len, max_queue=args.max_queue,
        batch_invariant=not args.no_batch_invariance, request_timeout_s=args.request_timeout,
        max_decoding=args.max_decoding, max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
        max_images=args.max_images, max_video_frames=args.max_video_frames,
        max_pixels=args.max_pixels, allow_remote_media=args.allow_remote_media, media_dir=args.media_dir,
        id0_quirk=args.id0_quirk, voices=parse_voices(args.voice), voice_language=args.voice_language,
        max_audio_seconds=args.max_audio_seconds, max_input_audio_seconds=args.max_input_audio_seconds,
        max_speech_input_chars=args.max_speech_input_chars, compile=args.compile,
    )
