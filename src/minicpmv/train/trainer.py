"""The fine-tuning loop: data order, gradient accumulation, DDP, checkpoints, resume, export.

One command for 1 process and for ``torchrun`` (DDP; gloo on CPU, NCCL on GPU). The data order
is a seeded permutation per epoch; optimizer step ``k`` consumes micro-batches ``k*A ..
k*A+A-1`` (A = grad accumulation) of ``batch_size`` samples per rank, so the samples of a step do
not depend on the number of processes. The loss of a step is the summed token cross-entropy
divided by the step's supervised-token count over all ranks, hence 2 processes x batch 1 equal
1 process x batch 2. Checkpoints (``checkpoints/step-N``) are written to a temporary directory
and renamed; they hold the trainable weights, optimizer, scheduler, per-rank RNG state and the
step (which fixes the data position), as safetensors + JSON (``state.py``: nothing is ever
unpickled on resume). ``log.jsonl`` records the loss of every step.

An output folder holds one run: a new run needs a new or empty folder (a finished or unrelated
one is refused, nothing is overwritten), ``resume`` continues the unfinished run in it. The
folder is created only once the model and data have loaded, so a run that fails early leaves
nothing behind.

This module does not parse arguments (``cli.py``) or build samples (``data.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..api import load, parse_dtype
from ..errors import CheckpointError, InputError, MiniCPMVError, OutputError
from ..loading.checkpoint import save_safetensors
from ..loading.devices import resolve_device
from .data import DatasetStats, Sample, build_dataset, format_sample
from .model import (
    LossModule,
    TuneSpec,
    collate,
    load_trainable_state,
    merged_model,
    prepare_model,
    save_adapter,
    save_checkpoint_dir,
    trainable_state,
)
from .state import load_tree, rng_state, save_tree, set_rng_state

log = logging.getLogger(__name__)


class TrainingError(MiniCPMVError):
    """A fine-tuning run cannot go on (e.g. a batch without supervised tokens)."""


@dataclass
class TrainConfig:
    model: str
    data: str
    output: str
    eval_data: str | None = None
    tune: TuneSpec = field(default_factory=TuneSpec)
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_length: int = 2048
    max_skip_ratio: float = 0.05
    max_slice_nums: int | None = None
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    save_every: int = 0  # 0: no intermediate checkpoints
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    export_dtype: str = "bfloat16"
    progress: bool = True


@dataclass
class RunResult:
    losses: dict[int, float]
    stats: DatasetStats
    eval_loss: float | None = None


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_dist(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device != "auto":
        return resolve_device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def steps_per_epoch(n: int, cfg: TrainConfig, world: int) -> int:
    """Optimizer steps in one epoch of ``n`` samples (a last partial step is dropped)."""
    return n // (cfg.batch_size * world * cfg.grad_accum)


def step_batches(n: int, cfg: TrainConfig, epoch: int, rank: int, world: int) -> list[list[list[int]]]:
    """Per optimizer step of ``epoch``: this rank's micro-batches (sample indices)."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_micro = cfg.batch_size * world
    per_step = per_micro * cfg.grad_accum
    steps = []
    for s in range(steps_per_epoch(n, cfg, world)):
        micro = []
        for a in range(cfg.grad_accum):
            base = s * per_step + a * per_micro + rank * cfg.batch_size
            micro.append(order[base : base + cfg.batch_size])
        steps.append(micro)
    return steps


def _schedule(cfg: TrainConfig, total: int) -> Any:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return factor


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training_state(out: Path, step: int, core: torch.nn.Module, opt: Any, sched: Any) -> Path:
    """checkpoints/step-N, written to step-N.tmp and renamed once complete (all ranks call this)."""
    rank, _ = _dist()
    final = out / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if final.exists():
            raise CheckpointError(f"{final} already exists; a run never writes a checkpoint twice "
                                  "(is another run using this output folder?)")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
        tmp.mkdir(parents=True)
    _barrier()
    save_tree(rng_state(), tmp, f"rng-{rank}")
    _barrier()
    if rank == 0:
        save_safetensors(trainable_state(core), tmp / "trainable.safetensors")
        save_tree({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step}, tmp, "state")
        tmp.rename(final)
    _barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return found[-1] if found else None


def _restore(ckpt: Path, core: torch.nn.Module, opt: Any, sched: Any) -> int:
    rank, _ = _dist()
    if not (ckpt / "state.json").is_file() and (ckpt / "state.pt").exists():
        raise CheckpointError(f"{ckpt} holds its state in state.pt, a pickle file (older minicpmv); it is not "
                              "loaded because unpickling can run code. Start the run again in a new folder")
    load_trainable_state(core, ckpt / "trainable.safetensors")
    state = load_tree(ckpt, "state")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if not (ckpt / f"rng-{rank}.json").is_file():
        raise CheckpointError(f"{ckpt} has no RNG state for rank {rank}; resume with the same number of processes")
    set_rng_state(load_tree(ckpt, f"rng-{rank}"))
    log.info("resumed from %s (step %d)", ckpt, state["step"])
    return int(state["step"])


def check_output_folder(out: Path, resume: bool) -> None:
    """A new run needs a new or empty folder; ``resume`` needs an unfinished run (or nothing)."""
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise InputError(f"the output {out} is a file; give a folder")
    if not entries:
        return
    if not resume:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise InputError(f"the output folder {out} is not empty ({shown}); nothing is overwritten: choose a new "
                         "folder, or pass --resume to continue the run in it")
    if (out / "metrics.json").is_file():
        raise InputError(f"the run in {out} has finished (metrics.json); nothing to resume: choose a new folder")
    if not (out / "train_config.json").is_file():
        raise InputError(f"{out} does not hold a fine-tuning run (no train_config.json); nothing to resume")


def _autocast(cfg: TrainConfig, device: torch.device) -> Any:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _run_step(module: Any, micro: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> float:
    """Forward/backward of one optimizer step's micro-batches; returns the step's mean token loss."""
    local = sum(b["n_tokens"] for b in micro)
    total = torch.tensor([float(local)], device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    _, world = _dist()
    ce_sum = torch.zeros(1, device=device)
    for i, batch in enumerate(micro):
        if batch["n_tokens"] == 0:
            raise TrainingError(f"a batch has no supervised token (samples {[s.id for s in batch['samples']]})")
        sync = i == len(micro) - 1 or not hasattr(module, "no_sync")
        ctx = module.no_sync() if not sync else contextlib.nullcontext()
        with ctx, _autocast(cfg, device):
            ce, _ = module(batch)
            (ce / total * world).backward()
        ce_sum += ce.detach()
    if dist.is_initialized():
        dist.all_reduce(ce_sum)
    return float(ce_sum / total)


def _iter_steps(samples: list[Sample], cfg: TrainConfig, start: int, total: int) -> Iterator[tuple[int, list]]:
    rank, world = _dist()
    per_epoch = steps_per_epoch(len(samples), cfg, world)
    if per_epoch == 0:
        raise InputError(f"{len(samples)} samples are fewer than one optimizer step "
                         f"(batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {world} process(es))")
    step = start
    while step < total:
        epoch, pos = divmod(step, per_epoch)
        plan = step_batches(len(samples), cfg, epoch, rank, world)
        for micro in plan[pos:]:
            if step >= total:
                return
            yield step, [collate([samples[i] for i in idx]) for idx in micro]
            step += 1


def _total_steps(n: int, cfg: TrainConfig) -> int:
    _, world = _dist()
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch(n, cfg, world)


def evaluate(module: LossModule, samples: list[Sample], cfg: TrainConfig, device: torch.device) -> float:
    """Mean token loss over ``samples`` (this process; no gradient)."""
    ce, n = 0.0, 0
    with torch.no_grad(), _autocast(cfg, device):
        for i in range(0, len(samples), cfg.batch_size):
            batch = collate(samples[i : i + cfg.batch_size])
            loss, k = module(batch)
            ce, n = ce + float(loss), n + k
    return ce / max(1, n)


def _log_line(out: Path, record: dict[str, Any]) -> None:
    with (out / "log.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, show_sample: Any = None) -> RunResult:
    """Run a fine-tuning job (see module docstring); returns the per-step losses."""
    device = _device(cfg)
    _init_dist(device)
    rank, world = _dist()
    out = Path(cfg.output)
    check_output_folder(out, cfg.resume)
    _barrier()  # every rank has looked before rank 0 writes anything
    torch.manual_seed(cfg.seed)
    chat = load(cfg.model, dtype="float32", device=device)
    core = chat.model
    samples, stats = build_dataset(chat.processor, cfg.data, cfg.max_length, max_skip_ratio=cfg.max_skip_ratio,
                                   max_slice_nums=cfg.max_slice_nums)
    if show_sample is not None and rank == 0 and samples:
        show_sample(format_sample(chat.processor, samples[0]))
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves nothing
    peft_model = prepare_model(core, cfg.tune)
    core.train()
    loss_module = LossModule(core)
    module: Any = loss_module
    if world > 1:
        tuned_vision = cfg.tune.tune_vision or cfg.tune.tune_resampler
        module = torch.nn.parallel.DistributedDataParallel(loss_module, find_unused_parameters=tuned_vision)
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = _total_steps(len(samples), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        start = _restore(ckpt, core, opt, sched)
    elif rank == 0:
        (out / "log.jsonl").unlink(missing_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str), encoding="utf-8")
    losses = _loop(module, samples, cfg, device, opt, sched, start, total, core)
    result = RunResult(losses=losses, stats=stats)
    if cfg.eval_data:
        eval_samples, _ = build_dataset(chat.processor, cfg.eval_data, cfg.max_length, max_skip_ratio=1.0,
                                        max_slice_nums=cfg.max_slice_nums)
        core.eval()
        result.eval_loss = evaluate(loss_module, eval_samples, cfg, device)
    if rank == 0:
        _finish(cfg, chat.path, core, peft_model, result)
    _barrier()
    return result


def _loop(module: Any, samples: list[Sample], cfg: TrainConfig, device: torch.device, opt: Any, sched: Any,
          start: int, total: int, core: torch.nn.Module) -> dict[int, float]:
    from tqdm import tqdm

    rank, _ = _dist()
    out = Path(cfg.output)
    losses: dict[int, float] = {}
    bar = tqdm(total=total, initial=start, disable=rank != 0 or not cfg.progress, unit="step")
    t0, tokens = time.perf_counter(), 0
    for step, micro in _iter_steps(samples, cfg, start, total):
        loss = _run_step(module, micro, cfg, device)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(s.input_ids) for b in micro for s in b["samples"])
        losses[step + 1] = loss
        if rank == 0:
            _log_line(out, {"step": step + 1, "loss": loss, "lr": sched.get_last_lr()[0]})
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(1e-9, time.perf_counter() - t0):.0f}")
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_training_state(out, step + 1, core, opt, sched)
    bar.close()
    return losses


def _finish(cfg: TrainConfig, base: str, core: Any, peft_model: Any, result: RunResult) -> None:
    out = Path(cfg.output)
    try:
        if peft_model is not None:
            save_adapter(peft_model, core, out / "adapter")
            core = merged_model(peft_model)
        save_checkpoint_dir(core, Path(base), out, parse_dtype(cfg.export_dtype))
    except OSError as e:
        raise OutputError(f"writing the trained model into {out} failed: {e.strerror or e}; the checkpoints in "
                          f"{out / 'checkpoints'} are intact: free the space and run again with --resume") from e
    metrics = {"steps": max(result.losses, default=0), "final_loss": result.losses.get(max(result.losses, default=0)),
               "eval_loss": result.eval_loss, "samples_skipped": result.stats.skipped,
               "samples_total": result.stats.total}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def export_merged(base: str, adapter: str, output: str, *, dtype: str = "bfloat16") -> Path:
    """``minicpmv export --merge-lora``: base checkpoint + PEFT adapter -> merged official checkpoint."""
    from ..loading.checkpoint import new_output_folder
    from .model import apply_adapter

    out, adapter_dir = Path(output), Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():  # before the base model loads
        raise CheckpointError(f"no LoRA adapter at {adapter_dir} (expected adapter_config.json, as "
                              "`minicpmv finetune` writes in OUTPUT/adapter)")
    torch_dtype = parse_dtype(dtype)
    with new_output_folder(out) as tmp:  # checked now; written in full or not at all
        chat = load(base, dtype="float32")
        peft_model = apply_adapter(chat.model, adapter_dir)
        save_checkpoint_dir(merged_model(peft_model), Path(chat.path), tmp, torch_dtype)
    return out
