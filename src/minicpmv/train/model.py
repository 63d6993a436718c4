"""The trainable model: which parameters learn (LoRA via PEFT or full), the loss forward, export.

``prepare_model`` freezes/unfreezes the vision tower, resampler and LLM and, for LoRA, injects
PEFT adapters into the LLM projections (``llm.*.{q,k,v,o,gate,up,down}_proj`` by default).
``LossModule`` wraps ``MiniCPMV`` in one ``nn.Module`` whose ``forward`` computes the summed
cross-entropy of a collated batch (so DDP sees one forward per micro-batch).
``save_checkpoint_dir`` writes a complete checkpoint in the official layout (config,
safetensors, tokenizer, preprocessor and generation config copied from the base checkpoint).
This module does not read data or run the optimisation loop (see ``data.py``, ``trainer.py``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError, FeatureNotAvailableError
from ..loading.checkpoint import copy_side_files, new_file_mode, save_safetensors
from ..modeling.vlm import MiniCPMV
from .data import IGNORE, Sample

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXTRA_FILE = "non_lora_trainables.safetensors"  # tuned vision/resampler weights next to a LoRA adapter


@dataclass
class TuneSpec:
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    tune_vision: bool = False
    tune_resampler: bool = False
    tune_llm: bool = True
    grad_checkpointing: bool = False


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise FeatureNotAvailableError("LoRA needs the 'peft' package: pip install 'minicpmv[train]'") from e
    return peft


def lora_config(spec: TuneSpec) -> Any:
    """PEFT LoraConfig targeting the given projection names inside ``llm`` only."""
    names = "|".join(spec.targets)
    return _peft().LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                              target_modules=rf"llm\..*\.({names})", bias="none")


def prepare_model(core: MiniCPMV, spec: TuneSpec) -> Any:
    """Set requires_grad per part; returns the PeftModel for LoRA (else None). ``core`` is modified."""
    core.requires_grad_(False)
    peft_model = None
    if spec.lora and spec.tune_llm:
        peft_model = _peft().get_peft_model(core, lora_config(spec))  # adapters injected into core
    elif spec.tune_llm:
        core.llm.requires_grad_(True)
    core.vpm.requires_grad_(spec.tune_vision)
    core.resampler.requires_grad_(spec.tune_resampler)
    if spec.grad_checkpointing:
        enable_grad_checkpointing(core)
    if not any(p.requires_grad for p in core.parameters()):
        raise CheckpointError("nothing to train: enable --tune-llm, --tune-vision or --tune-resampler")
    return peft_model


def enable_grad_checkpointing(core: MiniCPMV) -> None:
    """Recompute each LLM decoder layer in backward instead of keeping its activations."""
    for layer in core.llm.model.layers:
        orig = layer.forward

        def run(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any, cache: Any,
                _orig: Any = orig) -> torch.Tensor:
            if cache is not None or not torch.is_grad_enabled():
                return _orig(x, cos, sin, mask, cache)
            return checkpoint(_orig, x, cos, sin, mask, None, use_reentrant=False)

        layer.forward = run


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Right-pad ids (0) and labels (IGNORE); keep slices and bounds as lists."""
    longest = max(len(s.input_ids) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)  # [B, T]
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(samples), longest, dtype=torch.long)  # [B, T]
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        mask[b, :n] = 1
    return {"ids": ids, "labels": labels, "mask": mask, "samples": samples,
            "n_tokens": int((labels[:, 1:] != IGNORE).sum())}


class LossModule(nn.Module):
    """forward(batch) -> (summed token cross-entropy, number of supervised tokens)."""

    def __init__(self, core: MiniCPMV) -> None:
        super().__init__()
        self.core = core

    def features(self, samples: list[Sample]) -> list[torch.Tensor | None]:
        core = self.core
        pv = [torch.from_numpy(p) for s in samples for p in s.pixel_values]
        if not pv:
            return [None] * len(samples)
        sizes = torch.tensor([t for s in samples for t in s.tgt_sizes], dtype=torch.long)  # [S, 2]
        tids = [t for s in samples for t in s.temporal] if core.config.resampler.temporal else None
        feats = core.encode_images([p.to(core.device) for p in pv], sizes, tids)  # [N, Q, H]
        out, pos = [], 0
        for s in samples:
            n = len(s.entries)
            out.append(feats[pos : pos + n] if n else None)  # [n, Q, H]
            pos += n
        return out

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        core = self.core
        ids = batch["ids"].to(core.device)  # [B, T]
        labels = batch["labels"].to(core.device)  # [B, T]
        emb = core.embed(ids, self.features(batch["samples"]), [s.bounds for s in batch["samples"]])  # [B, T, H]
        hidden = core.forward_hidden(emb, None, batch["mask"].to(core.device))  # [B, T, H]
        logits = core.llm.logits(hidden[:, :-1])  # [B, T-1, V] float32
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE, reduction="sum")
        return ce, batch["n_tokens"]


def trainable_state(core: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in core.named_parameters() if p.requires_grad}


def load_trainable_state(core: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    params = dict(core.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_adapter(peft_model: Any, core: MiniCPMV, out: Path) -> None:
    """PEFT-format adapter (+ tuned vision/resampler weights in ``EXTRA_FILE``)."""
    peft_model.save_pretrained(str(out))
    extra = {n: t for n, t in trainable_state(core).items() if "lora_" not in n}
    if extra:
        save_safetensors(extra, out / EXTRA_FILE)
    for f in out.iterdir():  # PEFT writes its safetensors 0600; give them their neighbours' mode
        if f.is_file():
            os.chmod(f, new_file_mode())


_PEFT_PREFIX = "base_model.model."


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or corrupted?)") from e


def check_adapter(core: MiniCPMV, adapter: Path) -> None:
    """CheckpointError, in one line, unless ``adapter`` is a saved adapter that fits ``core``:
    every LoRA weight names a layer of the model with matching in/out features, and every extra
    weight names a parameter of the same shape (an adapter of another base model fails here)."""
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"no LoRA adapter at {adapter} (expected adapter_config.json, as `minicpmv finetune` "
                              "writes in OUTPUT/adapter)")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{adapter} has no adapter_model.safetensors")
    params = dict(core.named_parameters())
    bad = []
    for key, t in _read_weights(weights).items():
        layer, _, part = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
        module = dict(core.named_modules()).get(layer) if part else None
        if not isinstance(module, nn.Linear):
            bad.append(f"{key} names no linear layer of this model")
            continue
        need = (t.shape[0], module.in_features) if part.startswith("A") else (module.out_features, t.shape[1])
        if tuple(t.shape) != need:
            bad.append(f"{layer}: the adapter's lora_{part.split('.')[0]} is {list(t.shape)}, this model's layer "
                       f"needs {list(need)}")
    extra = adapter / EXTRA_FILE
    for n, t in (_read_weights(extra) if extra.is_file() else {}).items():
        if n not in params or params[n].shape != t.shape:
            got = list(params[n].shape) if n in params else "no such parameter"
            bad.append(f"{EXTRA_FILE}: {n} is {list(t.shape)}, the model has {got}")
    if bad:
        raise CheckpointError(f"the adapter at {adapter} does not fit this base model ({len(bad)} weight(s); "
                              f"e.g. {bad[0]}); was it trained on another checkpoint?")


def apply_adapter(core: MiniCPMV, adapter: Path) -> Any:
    """Load a saved adapter (and its extra weights) onto ``core``; returns the PeftModel."""
    check_adapter(core, adapter)
    try:
        peft_model = _peft().PeftModel.from_pretrained(core, str(adapter))
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise CheckpointError(f"cannot load the adapter at {adapter}: {str(e).splitlines()[0]}") from e
    extra = adapter / EXTRA_FILE
    if extra.is_file():
        params = dict(core.named_parameters())
        with torch.no_grad():
            for n, t in _read_weights(extra).items():
                params[n].copy_(t)
    return peft_model


def merged_model(peft_model: Any) -> MiniCPMV:
    """Fold the LoRA weights into the base layers; returns the plain MiniCPMV."""
    return peft_model.merge_and_unload()


def save_checkpoint_dir(core: MiniCPMV, base_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """Official layout: model.safetensors + every non-weight file of the base checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    copy_side_files(base_dir, out)
    state = {n: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
             for n, t in core.state_dict().items()}
    if core.config.text.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    tmp = out / "model.safetensors.tmp"
    try:
        save_safetensors(state, tmp, metadata={"format": "pt"})
        tmp.replace(out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    log.info("wrote checkpoint %s (%d tensors, %s)", out, len(state), dtype)
