"""The ``minicpmv`` command line: chat, inspect, conformance, quantize, serve, ui, batch, finetune, export, ...

Thin: it parses arguments, calls the public API and prints. All behaviour lives in the library.
Errors of the library (``MiniCPMVError``) become a one-line message and exit status 2; so do
unknown or unavailable devices (checked before anything loads) and, for ``serve``, a model that
cannot be loaded (it is loaded before the server starts). ``-v`` works before or after the
command; ``--version``; ``python -m minicpmv`` runs this too.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .errors import MiniCPMVError

log = logging.getLogger("minicpmv")

INTERACTIVE_HELP = ("':image PATH' attaches an image, ':video PATH' a video, ':audio PATH' an audio clip, "
                    "':reset' clears, ':quit' exits "
                    "(start a line with '::' to send text that begins with ':')")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint directory or Hugging Face repo id (default: the bundled demo model, "
                        "also named minicpmv:demo)")
    p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16 (default bfloat16)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpmv", description="Run MiniCPM-V checkpoints natively.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--version", action="version", version=f"minicpmv {__version__}")
    verbose = argparse.ArgumentParser(add_help=False)  # -v after the command too (not resetting the one before)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[verbose])

    chat = add("chat", help="ask a question about images (streams the answer)")
    _add_model_args(chat)
    chat.add_argument("--mmproj", default=None, help="GGUF vision file (mmproj) of a GGUF --model file")
    chat.add_argument("question", nargs="?", help="the question (omit with -i)")
    chat.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--audio", action="append", default=[],
                      help="16 kHz mono PCM WAV clip (repeatable; MiniCPM-o checkpoints)")
    chat.add_argument("--video", action="append", default=[],
                      help="video file (repeatable; needs the [video] extra); sampled as the model card does")
    chat.add_argument("--fps", type=float, default=None,
                      help="video: frames sampled per second of video (default: the model card's, 2.6: 1, 4.5: 5)")
    chat.add_argument("--max-frames", type=int, default=None,
                      help="video: at most this many frames (2.6, default 64) / frame groups (4.5, default 180)")
    chat.add_argument("--packing", type=int, default=None,
                      help="video (4.5): force this many frames per 3D-resampler group (1..6)")
    chat.add_argument("--max-inp-length", type=int, default=None,
                      help="prompt token limit (default: the official one; with --video: the model's context)")
    chat.add_argument("--system", default="", help="system prompt")
    chat.add_argument("--think", action="store_true", help="enable thinking mode (4.5)")
    chat.add_argument("-i", "--interactive", action="store_true", help="multi-turn session on the terminal")
    chat.add_argument("--no-stream", action="store_true", help="print each answer once it is complete")
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of the official sampling")
    chat.add_argument("--beam", action="store_true", help="the official non-sampling mode (beam search, 3 beams)")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--max-slice-nums", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--top-k", type=int, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--compile", nargs="?", const="auto", default=None, metavar="MODE",
                      help="static-shape decode steps through torch.compile (CUDA graphs on CUDA); MODE: a "
                           "torch.compile mode, or 'static' (static shapes, not compiled)")
    chat.add_argument("--id0-quirk", action=argparse.BooleanOptionalAction, default=True,
                      help="the reference's id-0 handling: hide prompt tokens with id 0, drop id 0 from answers "
                           "(default on, as the official chat())")
    from .cli_speech import add_speech_arguments  # no torch: just the flags

    add_speech_arguments(chat)

    ins = add("inspect", help="print version, parameter counts and memory estimate")
    ins.add_argument("path", help="checkpoint directory, Hugging Face repo id (only its config is downloaded), "
                                  "GGUF file / directory, or minicpmv:demo (weights are not needed)")
    ins.add_argument("--mmproj", default=None, help="GGUF vision file (mmproj) of a GGUF model file")
    ins.add_argument("--json", action="store_true", help="machine-readable output")

    conf = add("conformance", help="run golden-vector cases against the reference outputs")
    conf.add_argument("cases", nargs="+", type=Path, help="case directories (or directories of cases)")
    conf.add_argument("--checkpoint", type=Path, default=None, help="default: CASE_DIR/../_checkpoint")

    qz = add("quantize", help="write a weight-only int8 / int4 copy of a checkpoint")
    qz.add_argument("--model", "-m", required=True, help="float checkpoint directory or Hugging Face repo id")
    qz.add_argument("--to", required=True, choices=["int8", "int4"], help="weight format of the LLM linear layers")
    qz.add_argument("--output", "-o", required=True, type=Path, help="new checkpoint directory (must not exist)")
    qz.add_argument("--group-size", type=int, default=None, help="int4: input columns per scale (32/64/128/256; 128)")
    qz.add_argument("--no-lm-head", action="store_true", help="keep lm_head in the checkpoint's float dtype")

    ui = add("ui", help="local web UI: chat with images in the browser (needs the [ui] extra)")
    _add_model_args(ui)
    ui.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    ui.add_argument("--max-new-tokens", type=int, default=1024, help="initial value of the page's slider")
    ui.add_argument("--max-audio-seconds", type=float, default=None,
                    help="MiniCPM-o: cut spoken answers at this length (default: the model's limit)")

    from .serve.config import add_serve_arguments  # no FastAPI import: just the flags

    srv = add("serve", help="OpenAI-compatible HTTP server (needs the [serve] extra)")
    _add_model_args(srv)
    add_serve_arguments(srv)

    from .batch.cli_args import add_batch_arguments, add_ray_serve_arguments  # no torch, no Ray

    add_ray_serve_arguments(srv)
    bat = add("batch", help="answer a prompt about every image/video of a folder, glob or table")
    _add_model_args(bat)
    add_batch_arguments(bat)

    from .train.cli_args import (  # no torch
        add_demo_arguments,
        add_eval_demo_arguments,
        add_export_arguments,
        add_finetune_arguments,
    )

    add_finetune_arguments(add("finetune", help="LoRA / full fine-tuning on official-format data"))
    add_export_arguments(add("export", help="merge a LoRA adapter into a checkpoint; write GGUF (llama.cpp / Ollama)"))
    add_demo_arguments(add("train-demo", help="train the small demo model from scratch on synthetic data"))
    add_eval_demo_arguments(add("eval-demo", help="the demo model's scores on its independent evaluation"))
    return parser


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.greedy:
        kw.update(sampling=False, num_beams=1, repetition_penalty=1.0)
    elif args.beam:
        kw.update(sampling=False)
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def cmd_chat(args: argparse.Namespace) -> int:
    from .api import load
    from .cli_speech import SpeechPlan
    from .engine.session import ChatSession
    from .processing.image import load_image

    if not args.interactive and not args.question:
        raise MiniCPMVError("give a question, or -i for an interactive session")
    speech = SpeechPlan.from_args(args)  # --audio-out / --voice, checked before the model loads
    images = [load_image(p) for p in args.image]
    audios = _audios(args.audio)
    videos = _videos(args)
    model = load(args.model, dtype=args.dtype, device=args.device, mmproj=args.mmproj, compile=args.compile or False)
    session = ChatSession(
        model, system_prompt=args.system, enable_thinking=args.think, id0_quirk=args.id0_quirk,
        max_slice_nums=args.max_slice_nums, max_inp_length=_max_inp_length(args, model, bool(videos)),
        **_generation_kwargs(args),
    )
    if speech is not None:
        speech.start(session)
    media: list[Any] = [*images, *audios, *videos]
    first: list[Any] = [*media, args.question] if args.question else media
    stream = not args.no_stream
    if args.question:
        _print_answer(session, speech.question(first) if speech else first, stream)
        if speech is not None:
            speech.write(session, numbered=args.interactive)
        first = []
    if args.interactive:
        after = (lambda s: speech.write(s, numbered=True)) if speech is not None else None
        _interactive(session, first, _video_options(args), stream=stream, after=after)
    return 0


def _video_options(args: argparse.Namespace) -> dict[str, Any]:
    names = {"fps": "fps", "max_frames": "max_frames", "packing": "packing"}
    return {key: getattr(args, attr) for key, attr in names.items() if getattr(args, attr) is not None}


def _videos(args: argparse.Namespace) -> list[Any]:
    """--video files as Video items (probed now, so a bad file fails before the model loads)."""
    from .processing.video import Video

    options = _video_options(args)
    if options and not args.video and not args.interactive:
        raise MiniCPMVError("--fps, --max-frames and --packing apply to --video")
    videos = [Video(p, **options) for p in args.video]
    for v in videos:
        v.info()
    return videos


def _max_inp_length(args: argparse.Namespace, model: Any, has_video: bool) -> int | None:
    """With a video, the prompt may use the model's whole context (less the answer's tokens)."""
    if args.max_inp_length is not None or not has_video:
        return args.max_inp_length
    return max(model.config.text.max_position_embeddings - args.max_new_tokens, 1)


def _attach_video(session: Any, path: str, options: dict[str, Any]) -> Any:
    from .processing.video import Video

    video = Video(path, **options)
    video.info()
    if session.max_inp_length is None:
        context = session.model.config.text.max_position_embeddings
        session.max_inp_length = max(context - session.generation.get("max_new_tokens", 2048), 1)
    return video


def _audios(paths: list[str]) -> list[Any]:
    """--audio WAV files as checked waveforms (a bad file fails before the model loads)."""
    from .processing.audio import AudioFeatureConfig, check_waveform, load_wav

    out = []
    for p in paths:
        data, rate = load_wav(p)
        out.append(check_waveform(data, rate, AudioFeatureConfig(), p))
    return out


def _print_answer(session: Any, content: list[Any], stream: bool) -> None:
    if not stream:
        sys.stdout.write(session.ask(content) + "\n")
        sys.stdout.flush()
        return
    for chunk in session.ask(content, stream=True):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _interactive(session: Any, pending: list[Any], video_options: dict[str, Any] | None = None, *,
                 stream: bool = True, after: Callable[[Any], None] | None = None) -> None:
    """Read lines until ':quit' or end of input; ``after(session)`` runs after each answer."""
    sys.stderr.write(f"Interactive chat. {INTERACTIVE_HELP[0].upper()}{INTERACTIVE_HELP[1:]}.\n")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("::"):
            line = line[1:]  # escaped: text that begins with ':'
        elif line.startswith(":"):
            if _command(session, line, pending, video_options or {}):
                break
            continue
        _print_answer(session, [*pending, line], stream)
        pending = []
        if after is not None:
            after(session)


def _command(session: Any, line: str, pending: list[Any], video_options: dict[str, Any]) -> bool:
    """Run one ':command' of the interactive mode; True when the session should end."""
    from .processing.image import load_image

    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "q", "exit"):
        return True
    if name == "reset":
        session.reset()
    elif name in ("image", "video", "audio") and arg:
        try:
            if name == "audio":
                pending.extend(_audios([arg]))
            else:
                pending.append(load_image(arg) if name == "image" else _attach_video(session, arg, video_options))
        except MiniCPMVError as e:
            sys.stderr.write(f"error: {e}\n")
    elif name in ("image", "video", "audio"):
        sys.stderr.write(f"':{name}' needs a path: ':{name} PATH'\n")
    elif name == "help":
        sys.stderr.write(INTERACTIVE_HELP + "\n")
    else:
        sys.stderr.write(f"unknown command ':{name}' (nothing was sent); {INTERACTIVE_HELP}\n")
    return False


def cmd_inspect(args: argparse.Namespace) -> int:
    from .formats.inspect import inspect_any
    from .loading.checkpoint import DEMO_NAME, resolve_checkpoint

    given = Path(args.path).expanduser()
    local = args.path == DEMO_NAME or given.exists()
    path = given if given.is_file() or args.mmproj else resolve_checkpoint(args.path, config_only=True)
    info = inspect_any(path, Path(args.mmproj) if args.mmproj else None)
    info["source"] = "local" if local else "hub"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint   {info['path']}")
    unverified = "  [unverified: no reference vectors]" if info.get("unverified") else ""
    title = info.get("title") or f"MiniCPM-V {info['version']}"
    print(f"version      {title} ({info['llm_family']} backbone){unverified}")
    print(f"format       {info['format']} ({info['stored_gib']:.3f} GiB of weight files)")
    print(f"dtype        {info['dtype']}")
    for name, n in info["parameters"].items():
        print(f"params       {name:<10} {n:>15,d}")
    for dtype, gib in info["memory_gib"].items():
        print(f"memory       {dtype:<10} {gib:>12.2f} GiB (weights only)")
    if quant := info.get("quantization"):
        print(f"quantized    {quant['format']}: {quant['quantized_parameters']:,d} parameters; "
              f"{quant['stored_gib']:.2f} GiB as stored")
    absent = "absent (config only)" if info["source"] == "local" else "not downloaded (repo id: config only)"
    print(f"weights      {'present' if info['has_weights'] else absent}")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from .api import load
    from .conformance import expand_case_dirs, run_cases

    cases = expand_case_dirs(args.cases)
    results = run_cases(
        cases,
        checkpoint=args.checkpoint,
        loader=lambda p: load(p, dtype="float32"),
        report=lambda r: print(r.line(), flush=True),
    )
    failed = [r for r in results if not r.ok]
    n_cases = len({r.case for r in results})
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed ({n_cases} cases)")
    return 0 if not failed and results else 1


def cmd_quantize(args: argparse.Namespace) -> int:
    from .formats.quantized import quantize_checkpoint

    info = quantize_checkpoint(args.model, args.output, args.to, group_size=args.group_size,
                               lm_head=not args.no_lm_head)
    print(f"wrote {args.output}: {info['layers']} layers quantized ({info['spec']}), "
          f"{info['bytes'] / 2**20:.1f} MiB in {info['shards']} file(s)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui import launch

    launch(args.model, port=args.port, host=args.host, dtype=args.dtype, device=args.device,
           max_new_tokens=args.max_new_tokens, max_audio_seconds=args.max_audio_seconds)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import check_extra, serve
    from .serve.config import config_from_args

    if args.ray is not None:
        from .batch.cli_args import cmd_serve_ray

        return cmd_serve_ray(args, config_from_args(args))
    if args.replicas is not None or args.min_replicas is not None or args.max_replicas is not None:
        raise MiniCPMVError("--replicas, --min-replicas and --max-replicas need --ray")
    check_extra()
    from .api import load

    config = config_from_args(args)
    model = load(config.model, dtype=config.dtype, device=config.device,  # before the server: one-line errors
                 compile=config.compile or False)
    name = config.model_name(Path(model.path).name if model.path else "minicpmv")
    print(f"minicpmv serve: {name} (MiniCPM-V {model.version.name}) loaded; the OpenAI API will be at "
          f"http://{args.host}:{args.port}/v1 (requests are logged below; Ctrl-C stops)", file=sys.stderr, flush=True)
    serve(config, model=model, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch.cli_args import cmd_batch as run

    return run(args)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .train.cli_args import cmd_finetune as run

    return run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from .train.cli_args import cmd_export as run

    return run(args)


def cmd_train_demo(args: argparse.Namespace) -> int:
    from .train.cli_args import cmd_train_demo as run

    return run(args)


def cmd_eval_demo(args: argparse.Namespace) -> int:
    from .train.cli_args import cmd_eval_demo as run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "model", "") is None and args.command in ("chat", "ui", "serve", "batch", "eval-demo"):
        from . import demo_model

        try:
            args.model = str(demo_model.path())
        except MiniCPMVError as e:
            print(f"minicpmv: error: {e}", file=sys.stderr)
            return 2
        logging.getLogger(__name__).info("no --model given: using the bundled demo model %s", args.model)
    handlers = {"chat": cmd_chat, "inspect": cmd_inspect, "conformance": cmd_conformance, "ui": cmd_ui,
                "serve": cmd_serve, "finetune": cmd_finetune, "export": cmd_export, "quantize": cmd_quantize,
                "train-demo": cmd_train_demo, "batch": cmd_batch, "eval-demo": cmd_eval_demo}
    try:
        if getattr(args, "device", None) not in (None, "auto"):
            from .loading.devices import resolve_device

            resolve_device(args.device)  # a typo or a missing GPU: one line, before anything loads
        return handlers[args.command](args)
    except MiniCPMVError as e:
        print(f"minicpmv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
