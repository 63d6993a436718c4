"""The demo-model recipe: train a small MiniCPM-V-2.6-format model from scratch on synthetic data.

``minicpmv train-demo --output DIR`` runs, in one process, seeded end to end:

1. tokenizer: byte-level (every letter and digit is its own token, so any string can be spelled)
   plus whole-word tokens for the question words, which exist only with a leading space (merges
   ``Ġw`` + ``o`` ...), so no answer is ever cut into multi-letter pieces; the official 2.6
   special tokens are appended. Written as vocab.json / merges.txt / tokenizer_config.json;
2. model: the 2.6 checkpoint layout (SigLIP-NaViT tower, 2D resampler, Qwen2 backbone) at small
   sizes, seen through one ~224x224 view per picture (``max_slice_nums`` 1: no slices, so the
   layout of a 1024-pixel picture is seen whole), randomly initialised;
3. stage 1 (``demo_vision.py``): the patch embedding starts as PCA whitening of training
   patches, the tower learns the shape under each patch alone first, then the tower and
   resampler are pretrained on every dense target of the training generator (per patch and per
   resampler slot), on freshly drawn pictures;
4. stage 2 (``demo_llm.py``): the LLM is trained on multi-turn questions (official fine-tuning
   records, processed by the inference ``Processor``) over the frozen vision features;
5. evaluation (``demo_eval.py``): the independent evaluation set, greedy and sampled, through
   ``minicpmv.load`` (the inference path users run).

``DIR/final`` is the checkpoint; ``DIR/report.json`` holds the evaluation table, timings (wall and
CPU), seed, font hashes and the weights' sha256. Stage 1 leaves its weights and a record of its
settings in ``DIR/init`` (``stage1.json``); a later run into the same ``DIR``, or into a new one
with ``stage1_from=DIR``, with the same stage-1 settings starts at stage 2 (so stage-2 settings
can be tried without the hour of stage 1).
``bundle`` copies a finished run into the package's ``demo_model`` folder with its card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..loading.checkpoint import file_sha256 as sha256
from ..loading.checkpoint import model_config
from ..modeling.resampler import sincos_2d_table
from ..modeling.vlm import MiniCPMV
from . import synthetic as syn
from . import synthetic_qa as qa
from .demo_world import COLOURS, NO_IMAGE, NO_SHAPES, NO_TEXT, POSITIONS, REFUSAL, SHAPES

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<ref>", "</ref>", "<box>",
                  "</box>", "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>", "<image_id>",
                  "</image_id>", "<unit>", "</unit>", "<unk>")
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass
class DemoConfig:
    output: str
    seed: int = 0
    vision_width: int = 192
    vision_layers: int = 4
    llm_width: int = 256
    llm_layers: int = 4
    shape_warmup_steps: int = 1200
    shape_warmup_lr: float = 3e-4
    char_warmup_steps: int = 0  # character curriculum (demo_vision.char_warmup); off in the bundled recipe
    text_warmup_steps: int = 0  # characters of text pictures alone (demo_vision.text_warmup); off in the bundled recipe
    slot_text_steps: int = 0  # the resampler alone on text pictures' character slots (demo_vision.slot_text_phase); off
    stage1_steps: int = 5000
    stage1_batch: int = 14
    stage1_lr: float = 4e-4
    train_images: int = 60000
    stage2_epochs: int = 1
    stage2_batch: int = 16
    stage2_lr: float = 1e-3
    stage2_first_steps: int = 6000  # shape questions alone first (demo_llm.train_llm); 0: the whole mix only
    stage2_mix_lr: float = 3e-4  # peak rate over the whole mix after those steps
    stage2_open_world: bool = True  # composed off-world questions, more pictures to refuse (synthetic_qa.write_split)
    stage2_real_photos: bool = True  # crops of scikit-image's photos among those to refuse (needs scikit-image)
    eval_items: int = 40  # per family of the independent evaluation set (0: no evaluation)
    threads: int | None = None
    device: str = "auto"


# -- tokenizer ---------------------------------------------------------------------------------------


def corpus_words() -> list[str]:
    """Every word of the training questions and answers (they get whole-word tokens)."""
    text = " ".join(q for qs in qa.T.values() for q in qs)
    text += " ".join([*qa.PREFIXES, *qa.SUFFIXES, *(w for pair in qa.SYNONYMS for w in pair), *SHAPES, *COLOURS,
                      *POSITIONS, REFUSAL, NO_TEXT, NO_SHAPES, NO_IMAGE, "You are a helpful assistant",
                      "first second image text the shapes"])
    words = set(re.findall(r"[A-Za-z]+", text))
    words |= {w.lower() for w in words} | {w + "s" for w in SHAPES}
    return sorted(words)


def byte_alphabet() -> list[str]:
    """The byte-level alphabet in byte order (GPT-2's printable mapping): token id = byte value."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that build "Ġword" left to right, shorter prefixes first."""
    merges: dict[tuple[str, str], int] = {}
    for w in words:
        prefix = "Ġ"
        for i, ch in enumerate(w):
            merges.setdefault((prefix, ch), i)
            prefix += ch
    return sorted(merges, key=lambda m: (merges[m], m))


def write_tokenizer(out: Path) -> int:
    """Write the tokenizer files; returns the full vocabulary size (with special tokens)."""
    from tokenizers import models

    alphabet = byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = word_merges(corpus_words())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    out.mkdir(parents=True, exist_ok=True)
    models.BPE(vocab=vocab, merges=merges).save(str(out))
    base = len(vocab)
    added = {t: base + i for i, t in enumerate(SPECIAL_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    extra = ["<unk>", *SPECIAL_TOKENS[3:-1]]  # the official order: <unk> first, then <image> ... </unit>
    tcfg = {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, **flags} for t, i in added.items()},
        "additional_special_tokens": extra, "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 4096, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "MiniCPMVTokenizerFast", "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    smap = {"additional_special_tokens": extra, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2))
    return base + len(SPECIAL_TOKENS)


# -- checkpoint layout -------------------------------------------------------------------------------


def write_configs(out: Path, cfg: DemoConfig, vocab: int) -> None:
    """config.json, preprocessor_config.json and generation_config.json of a 2.6 checkpoint."""
    eot, eos = vocab - len(SPECIAL_TOKENS), vocab - len(SPECIAL_TOKENS) + 2
    vw, lw = cfg.vision_width, cfg.llm_width
    config = {
        "_name_or_path": "minicpmv-demo", "version": 2.6, "architectures": ["MiniCPMV"], "model_type": "minicpmv",
        "attention_dropout": 0.0, "bos_token_id": eot, "eos_token_id": eos, "hidden_act": "silu",
        "hidden_size": lw, "initializer_range": 0.02, "intermediate_size": 3 * lw,
        "max_position_embeddings": 4096, "max_window_layers": cfg.llm_layers, "num_attention_heads": lw // 64,
        "num_hidden_layers": cfg.llm_layers, "num_key_value_heads": max(1, lw // 128), "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "use_sliding_window": False, "vocab_size": vocab, "batch_vision_input": True,
        "drop_vision_last_layer": False, "image_size": syn.VIEW, "patch_size": syn.PATCH,
        "query_num": len(syn.SLOT_NAMES),
        "slice_config": {"max_slice_nums": 1, "patch_size": syn.PATCH, "model_type": "minicpmv"}, "slice_mode": True,
        "vision_config": {"hidden_size": vw, "image_size": syn.VIEW, "intermediate_size": 4 * vw,
                          "model_type": "siglip", "num_attention_heads": vw // 64,
                          "num_hidden_layers": cfg.vision_layers, "patch_size": syn.PATCH},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    pre = {
        "image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
        "max_slice_nums": 1, "scale_resolution": syn.VIEW, "patch_size": syn.PATCH, "use_image_id": True,
        "image_feature_size": len(syn.SLOT_NAMES), "im_start": "<image>", "im_end": "</image>",
        "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>", "im_id_start": "<image_id>",
        "im_id_end": "</image_id>", "slice_mode": True, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5],
        "version": 2.6,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    gen = {"bos_token_id": eot, "eos_token_id": [eos, eot], "pad_token_id": eot}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def build_model(ckpt: Path, seed: int) -> MiniCPMV:
    """A randomly initialised model for the config in ``ckpt``: normal(0, 0.02) weights, except the
    tower's patch-position table, which starts as a 2D sin-cos table (half amplitude). With a
    random table as small as the other weights, the tower stayed blind to where patches are (shape,
    position and character accuracy at chance after 650 steps of stage 1, colour at 80%)."""
    mcfg = model_config(ckpt)
    torch.manual_seed(seed)
    model = MiniCPMV(mcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "pos_embed" not in name:
                nn.init.normal_(p, std=0.02)
        table = model.vpm.embeddings.position_embedding.weight  # [side*side, Dv]
        side = model.vpm.embeddings.num_patches_per_side
        sincos = sincos_2d_table(table.shape[1], side, side).reshape(side * side, -1)  # row-major ids
        table.copy_(torch.from_numpy(sincos) * 0.5)
    return model


# -- the recipe ----------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Clock:
    """Wall and CPU (this process) seconds per named phase."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t0 = (time.perf_counter(), time.process_time())

    def lap(self, name: str, start: tuple[float, float]) -> None:
        self.times[name + "_wall_s"] = round(time.perf_counter() - start[0], 1)
        self.times[name + "_cpu_s"] = round(time.process_time() - start[1], 1)

    @staticmethod
    def now() -> tuple[float, float]:
        return (time.perf_counter(), time.process_time())

    def total(self) -> None:
        self.lap("total", self._t0)


# What stage 1's weights depend on: a run directory's stage-1 weights are reused only when these match.
STAGE1_SETTINGS = ("seed", "vision_width", "vision_layers", "llm_width", "llm_layers", "shape_warmup_steps",
                   "shape_warmup_lr", "char_warmup_steps", "text_warmup_steps", "slot_text_steps", "stage1_steps",
                   "stage1_batch", "stage1_lr", "threads", "device")
# Stage-1 phases that a negative count would skip without a word.
STEP_COUNTS = ("shape_warmup_steps", "char_warmup_steps", "text_warmup_steps", "slot_text_steps", "stage1_steps")
# Stage-1 settings added after runs were recorded, with the value a record without them was trained at.
STAGE1_ADDED = {"slot_text_steps": 0}


def _stage1_key(cfg: DemoConfig) -> dict[str, Any]:
    return {**{k: getattr(cfg, k) for k in STAGE1_SETTINGS}, "torch": torch.__version__, "fonts_sha256": fonts_digest()}


def finished_stage1(init: Path, cfg: DemoConfig, fix: str | None = None) -> dict[str, Any] | None:
    """The record of the stage-1 weights in ``init`` if an earlier run with these stage-1 settings
    finished them (its ``stage1.json``), else None; raises ``InputError`` (ending with ``fix``, by
    default: delete ``init``) for weights of other settings or weights that changed since."""
    path = init / "stage1.json"
    if not path.exists():
        return None
    fix = fix or f"choose another --output, or delete {init} to train stage 1 again"
    record = json.loads(path.read_text())
    want = _stage1_key(cfg)
    had = {**STAGE1_ADDED, **record["key"]}
    diff = [f"{k} {had.get(k)!r} there, {v!r} now" for k, v in want.items() if had.get(k) != v]
    if diff:
        raise InputError(f"{init} holds stage-1 weights of other settings ({'; '.join(diff)}): {fix}")
    if sha256(init / "model.safetensors") != record["weights_sha256"]:
        raise InputError(f"{init}/model.safetensors changed since stage 1 wrote it: {fix}")
    return record


def _stage1(cfg: DemoConfig, init: Path, device: torch.device) -> dict[str, Any]:
    """Train stage 1 and save its weights and record in ``init`` (the record last, so an interrupted
    save is never taken for a finished one)."""
    from .demo_llm import save_weights
    from .demo_vision import pretrain_vision

    vocab = write_tokenizer(init)
    write_configs(init, cfg, vocab)
    model = build_model(init, cfg.seed).to(device)
    clock = _Clock()
    t = clock.now()
    final = pretrain_vision(model, cfg, device)
    clock.lap("stage1", t)
    save_weights(model.cpu(), init)
    record = {"key": _stage1_key(cfg), "stage1_final": final, "times": clock.times,
              "weights_sha256": sha256(init / "model.safetensors")}
    tmp = init / "stage1.json.partial"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(init / "stage1.json")
    return record


def copy_stage1(run_dir: Path, init: Path, cfg: DemoConfig) -> None:
    """Copy the finished stage 1 of the run in ``run_dir`` into ``init`` (which must not exist yet),
    once it is known to match ``cfg``'s stage-1 settings (a refused one leaves nothing behind)."""
    import shutil

    src = Path(run_dir) / "init"
    fix = "give --stage1-from a run made with this recipe's stage-1 settings"
    if finished_stage1(src, cfg, fix) is None:
        raise InputError(f"{run_dir} holds no finished stage 1 (no init/stage1.json)")
    if init.exists():
        raise InputError(f"{init} already exists; choose another --output to start from {run_dir}'s stage 1")
    shutil.copytree(src, init)


def run(cfg: DemoConfig, *, stage1_from: Path | None = None) -> dict[str, Any]:
    """The whole recipe; returns (and writes) the report. Stage-1 weights an earlier run with the
    same stage-1 settings left in ``OUTPUT/init``, or in ``stage1_from/init`` (copied), are reused
    (their stage-1 times are reported)."""
    from .demo_eval import evaluate
    from .demo_llm import train_llm

    # checked before the hour of stage 1 (a negative evaluation size gave an empty table at the end)
    for name in (*STEP_COUNTS, "stage2_first_steps", "stage2_epochs", "eval_items"):
        if getattr(cfg, name) < 0:
            raise InputError(f"{name} must be 0 or more, not {getattr(cfg, name)}")
    syn.check_fonts()
    if cfg.stage2_real_photos:
        from .synthetic_other import photo_dir

        photo_dir()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    if (out / "final" / "model.safetensors").exists():
        raise InputError(f"{out} already holds a finished run; choose another --output")
    device = _device(cfg.device)
    clock = _Clock()
    init = out / "init"
    if stage1_from is not None:
        copy_stage1(stage1_from, init, cfg)
    record = finished_stage1(init, cfg)
    reused = record is not None
    if reused:
        log.info("stage 1: reusing the weights in %s (trained in %.0f s)", init, record["times"]["stage1_wall_s"])
    else:
        record = _stage1(cfg, init, device)
    clock.times.update(record["times"])
    t = clock.now()
    train_json = qa.write_split(out / "data", "train", cfg.train_images, cfg.seed, open_world=cfg.stage2_open_world,
                                 real_photos=cfg.stage2_real_photos)
    clock.lap("data", t)
    t = clock.now()
    stage2 = train_llm(init, train_json, out / "final", cfg, device)
    clock.lap("stage2", t)
    t = clock.now()
    table = evaluate(out / "final", n_per_family=cfg.eval_items, seed=cfg.seed + 1000) if cfg.eval_items else None
    clock.lap("eval", t)
    clock.total()
    report = {"config": asdict(cfg), "evaluation": table, "stage1_final": record["stage1_final"],
              "stage2_final_loss": stage2,
              "stage1_reused": reused, "stage1_from": None if stage1_from is None else str(stage1_from),
              "times": clock.times,
              "weights_sha256": sha256(out / "final" / "model.safetensors"), "fonts_sha256": fonts_digest(),
              "torch": torch.__version__}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def fonts_digest() -> str:
    """One sha256 over the training fonts (the pictures, hence the weights, depend on them)."""
    h = hashlib.sha256()
    for path in syn.TRAIN_FONTS:
        h.update(path.encode())
        h.update(sha256(syn.FONT_ROOT / path).encode())
    return h.hexdigest()


CHECKPOINT_FILES = ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                    "merges.txt")


def bundle(run_dir: Path, dest: Path, *, command: str) -> dict[str, Any]:
    """Copy a finished run's checkpoint into ``dest`` (the package's ``demo_model``) with its card."""
    import shutil

    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    final = run_dir / "final"
    if sha256(final / "model.safetensors") != report["weights_sha256"]:
        raise InputError(f"{final}/model.safetensors does not match the hash in {run_dir}/report.json")
    dest.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        shutil.copy2(final / name, dest / name)
    times = dict(report["times"])
    if report.get("stage1_reused"):  # the run's own totals leave out the reused stage 1: add it back
        for kind in ("wall", "cpu"):
            times[f"total_with_stage1_{kind}_s"] = round(times[f"total_{kind}_s"] + times[f"stage1_{kind}_s"], 1)
    card = {"command": command, "seed": report["config"]["seed"], "weights_sha256": report["weights_sha256"],
            "fonts_sha256": report["fonts_sha256"], "evaluation": report["evaluation"],
            "times_s": times, "torch": report["torch"], "config": report["config"],
            "stage1_reused": report.get("stage1_reused", False), "stage1_from": report.get("stage1_from")}
    (dest / "DEMO_CARD.json").write_text(json.dumps(card, indent=2))
    return card
