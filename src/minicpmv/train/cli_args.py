"""Command-line flags of ``minicpmv finetune`` / ``minicpmv export`` and their handlers.

Importing this module is cheap (no torch, no peft): ``cli.py`` adds the flags at start-up, and
the handlers import the trainer only when a command runs.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="base checkpoint directory or Hugging Face repo id")
    p.add_argument("--data", required=True, help="training data: JSON list in the official fine-tuning format")
    p.add_argument("--eval-data", default=None, help="held-out data in the same format (loss reported at the end)")
    p.add_argument("--output", "-o", required=True, help="output directory (checkpoint, adapter/, checkpoints/)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default=DEFAULT_TARGETS, help="comma-separated module names inside the LLM")
    for part, default in (("vision", False), ("resampler", False), ("llm", True)):
        p.add_argument(f"--tune-{part}", action=argparse.BooleanOptionalAction, default=default,
                       help=f"train the {part} weights (default {'on' if default else 'off'})")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM layers in backward")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch and process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-length", type=int, default=2048, help="token limit; longer samples are cut in text "
                   "only, or skipped if the cut would fall in an image")
    p.add_argument("--max-skip-ratio", type=float, default=0.05, help="fail if a larger share is skipped")
    p.add_argument("--max-slice-nums", type=int, default=None)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--export-dtype", default="bfloat16", help="dtype of the exported checkpoint")
    p.add_argument("--show-sample", action="store_true", help="print the first sample with its label mask")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="base checkpoint directory")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (OUTPUT/adapter of finetune)")
    p.add_argument("--output", "-o", default=None, help="directory of the merged checkpoint")
    p.add_argument("--merge-lora", action="store_true", help="fold the LoRA weights in (with --adapter)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the exported checkpoint")
    p.add_argument("--gguf", default=None, help="write OUT_DIR/model.gguf + mmproj.gguf + Modelfile (llama.cpp, "
                   "Ollama); with --adapter the merged model is written")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"],
                   help="GGUF type of the language model's matrices (default f16)")


def cmd_finetune(args: argparse.Namespace) -> int:
    from .model import TuneSpec
    from .trainer import TrainConfig, train

    tune = TuneSpec(lora=not args.full, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                    lora_dropout=args.lora_dropout,
                    targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                    tune_vision=args.tune_vision, tune_resampler=args.tune_resampler, tune_llm=args.tune_llm,
                    grad_checkpointing=args.grad_checkpointing)
    cfg = TrainConfig(model=args.model, data=args.data, output=args.output, eval_data=args.eval_data, tune=tune,
                      epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, max_length=args.max_length,
                      max_skip_ratio=args.max_skip_ratio, max_slice_nums=args.max_slice_nums,
                      precision=args.precision, save_every=args.save_every, resume=args.resume, seed=args.seed,
                      device=args.device, export_dtype=args.export_dtype, progress=not args.no_progress)
    result = train(cfg, show_sample=print if args.show_sample else None)
    last = max(result.losses, default=None)
    if last is not None:
        sys.stderr.write(f"step {last}: loss {result.losses[last]:.4f}; skipped {result.stats.skipped} of "
                         f"{result.stats.total} samples\n")
    if result.eval_loss is not None:
        sys.stderr.write(f"eval loss {result.eval_loss:.4f}\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from ..errors import InputError

    if args.adapter is None and args.gguf is None:
        raise InputError("export needs --adapter/--merge-lora/--output (merge a LoRA adapter) or --gguf OUT_DIR")
    if args.adapter is not None and not args.merge_lora:
        raise InputError("--adapter is merged with --merge-lora")
    if args.adapter is not None and args.output is None and args.gguf is None:
        raise InputError("--merge-lora needs --output DIR (or --gguf OUT_DIR)")
    with tempfile.TemporaryDirectory(prefix="minicpmv-merge-") as tmp:
        source = args.model
        if args.adapter is not None:
            from .trainer import export_merged

            source = export_merged(args.model, args.adapter, args.output or f"{tmp}/merged", dtype=args.dtype)
            print(source)
        if args.gguf is not None:
            from ..formats.gguf_write import export_gguf

            info = export_gguf(source, args.gguf, args.type)
            sizes = ", ".join(f"{name} {n / 2**20:.1f} MiB" for name, n in sorted(info["files"].items()))
            print(f"wrote {args.gguf} ({info['type']}): {sizes}")
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, help="run directory (data/, init/, final/, report.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--stage1-steps", type=int, default=None, help="vision pretraining steps")
    p.add_argument("--train-images", type=int, default=None, help="images in the question-training split")
    p.add_argument("--eval-items", type=int, default=None, help="items per family of the independent evaluation")
    p.add_argument("--stage2-epochs", type=int, default=None,
                   help="epochs over the whole question-training split (after stage2_first_steps)")
    p.add_argument("--stage1-from", default=None, metavar="RUN",
                   help="start at stage 2 from the finished stage 1 of the run directory RUN (same stage-1 settings)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any other recipe setting (see minicpmv.train.demo.DemoConfig)")


def apply_settings(cfg: object, items: list[str]) -> None:
    """``--set FIELD=VALUE`` overrides onto a recipe config, each value parsed as the field's type
    (true/false/1/0 for booleans); a malformed item or unknown field raises ``InputError``, which the
    CLI prints as one line with exit status 2."""
    from ..errors import InputError

    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise InputError(f"--set takes FIELD=VALUE, got {item!r}")
        if not hasattr(cfg, key) or key == "output":
            raise InputError(f"unknown setting {key!r} in --set (see minicpmv.train.demo.DemoConfig)")
        current = getattr(cfg, key)
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise InputError(f"--set {key} takes true or false, not {value!r}")
            setattr(cfg, key, value.lower() in ("true", "1"))
            continue
        kind = type(current) if current is not None else int
        try:
            setattr(cfg, key, kind(value))
        except ValueError:
            article = "an" if kind is int else "a"
            raise InputError(f"--set {key} takes {article} {kind.__name__}, not {value!r}") from None


def cmd_train_demo(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .demo import DemoConfig, run

    cfg = DemoConfig(output=args.output, seed=args.seed, device=args.device, threads=args.threads)
    for name in ("stage1_steps", "train_images", "eval_items", "stage2_epochs"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    apply_settings(cfg, args.set)
    from .demo_eval import format_table

    report = run(cfg, stage1_from=None if args.stage1_from is None else Path(args.stage1_from))
    if report["evaluation"]:
        print(format_table(report["evaluation"]))
    print(json.dumps({"times": report["times"], "weights_sha256": report["weights_sha256"]}, indent=2))
    return 0


def add_eval_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--items", type=int, default=50, help="items per family")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation pictures and of sampling")
    p.add_argument("--misses", default=None, help="write the greedy misses to this JSON file")
    p.add_argument("--json", default=None, help="write the table as JSON to this file")


def cmd_eval_demo(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import InputError
    from .demo_eval import evaluate, format_table

    if args.items < 1:
        raise InputError(f"--items takes the number of items per family, at least 1, not {args.items}")
    misses: list[dict[str, str]] = []
    table = evaluate(args.model, n_per_family=args.items, seed=args.seed, misses=misses)
    print(format_table(table))
    if args.misses:
        Path(args.misses).write_text(json.dumps(misses, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0
