"""The demo-model recipe: train a small MiniCPM-V-2.6-format model from scratch on synthetic data.

``minicpmv train-demo --output DIR`` runs, in one process:

1. data: synthetic train / held-out splits in the official fine-tuning format (``synthetic.py``);
2. tokenizer: a byte-level BPE (Qwen2 pipeline) trained on the data's text, plus the official
   2.6 special tokens, written as vocab.json / merges.txt / tokenizer_config.json;
3. model: a 2.6 checkpoint layout (SigLIP-NaViT tower, 2D resampler, Qwen2 backbone) at small
   sizes, randomly initialised;
4. stage 1: the vision tower and resampler are pretrained on dense labels from the generator
   (per-cell colour and shape, count, letters and word id) through linear heads on the resampler
   output, on freshly drawn images each step; the heads are then dropped;
5. stage 2: the whole model minus the vision tower is trained on the questions with the
   fine-tuning code (``trainer.train``, full fine-tuning), exactly as a user fine-tunes;
6. evaluation: held-out exact-match accuracy per question family, asked one question per fresh
   chat with greedy decoding through ``minicpmv.load`` (the inference path users run).

``DIR/final`` is the checkpoint; ``DIR/report.json`` holds accuracies, timings, seed and the
weights' sha256. ``bundle`` copies a finished run into the package's ``demo_model`` folder with
its card; choosing that folder as the CLI's default happens in ``cli.py``, not here.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..loading.checkpoint import file_sha256 as sha256
from ..loading.checkpoint import model_config
from ..modeling.vlm import MiniCPMV
from ..processing.image import to_patches
from . import synthetic as syn

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<ref>", "</ref>", "<box>",
                  "</box>", "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>", "<image_id>",
                  "</image_id>", "<unit>", "</unit>", "<unk>")
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
STAGE2_MIX = {"single": 0.35, "many": 0.25, "word": 0.2, "bigword": 0.2}
STAGE1_MIX = {"single": 0.2, "many": 0.25, "word": 0.3, "bigword": 0.25}


@dataclass
class DemoConfig:
    output: str
    seed: int = 0
    vocab_size: int = 640
    vision_width: int = 192
    vision_layers: int = 4
    llm_width: int = 256
    llm_layers: int = 4
    query_num: int = 32
    stage1_steps: int = 3000
    stage1_batch: int = 32
    stage1_lr: float = 1e-3
    train_images: int = 4000
    eval_images: int = 600
    stage2_epochs: int = 6
    stage2_batch: int = 16
    stage2_lr: float = 1e-3
    stage2_tune_resampler: bool = False
    threads: int | None = None
    device: str = "auto"


# -- tokenizer ---------------------------------------------------------------------------------------


def corpus_lines() -> list[str]:
    """Every text the model reads or writes: questions, answers, template words."""
    lines = [q for qs in syn.QUESTIONS.values() for q in qs]
    lines += list(syn.COLOURS) + list(syn.SHAPES) + list(syn.POSITIONS) + list(syn.WORDS) + [str(i) for i in range(10)]
    lines += ["system", "user", "assistant", "You are a helpful assistant.", "\n"]
    return lines


def write_tokenizer(out: Path, vocab_size: int) -> int:
    """Train the BPE and write the tokenizer files; returns the full vocabulary size."""
    from tokenizers import models, pre_tokenizers, trainers

    from ..processing.tokenizer import qwen2_pipeline

    tok = qwen2_pipeline(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = corpus_lines()
    tok.train_from_iterator(text * 20 + [" " + w for w in text] * 20, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))
    base = tok.get_vocab_size()
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
        "drop_vision_last_layer": False, "image_size": syn.CANVAS, "patch_size": 14, "query_num": cfg.query_num,
        "slice_config": {"max_slice_nums": 4, "patch_size": 14, "model_type": "minicpmv"}, "slice_mode": True,
        "vision_config": {"hidden_size": vw, "image_size": syn.CANVAS, "intermediate_size": 4 * vw,
                          "model_type": "siglip", "num_attention_heads": vw // 64,
                          "num_hidden_layers": cfg.vision_layers, "patch_size": 14},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    pre = {
        "image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
        "max_slice_nums": 4, "scale_resolution": syn.CANVAS, "patch_size": 14, "use_image_id": True,
        "image_feature_size": cfg.query_num, "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>",
        "slice_end": "</slice>", "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>",
        "slice_mode": True, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    gen = {"bos_token_id": eot, "eos_token_id": [eos, eot], "pad_token_id": eot}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def build_model(ckpt: Path, seed: int) -> MiniCPMV:
    """A randomly initialised model for the config in ``ckpt`` (normal(0, 0.02) weights)."""
    mcfg = model_config(ckpt)
    torch.manual_seed(seed)
    model = MiniCPMV(mcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "pos_embed" not in name:
                nn.init.normal_(p, std=0.02)
    return model


def save_weights(model: nn.Module, ckpt: Path, dtype: torch.dtype = torch.float32) -> None:
    from safetensors.torch import save_file

    state = {n: t.detach().to(dtype).contiguous() for n, t in model.state_dict().items()}
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


# -- stage 1: dense pretraining of the vision side ---------------------------------------------------

HEADS = {"colour": (9, 1 + len(syn.COLOURS)), "shape": (9, 1 + len(syn.SHAPES)), "cell": (9, 10),
         "count": (1, 7), "letters": (syn.MAX_LETTERS, 27), "word": (1, 1 + len(syn.WORDS))}
PATCH_HEADS = {"p_colour": 1 + len(syn.COLOURS), "p_shape": 1 + len(syn.SHAPES), "p_letter": 27}


# First resampler query of each head. "cell" makes cell j's token say which cell it is (j+1) when
# a shape is there: RoPE puts positions in attention scores only, so the LLM can tell *where* a
# shape is only from what the token it attends to carries.
SLOTS = {"colour": 0, "shape": 0, "cell": 0, "letters": 9, "count": 17, "word": 18}


class DenseHeads(nn.Module):
    """Stage-1 read-outs: per-patch classes on the vision tower's output, and per-query classes on
    the resampler output. Query ``SLOTS[head] + i`` must hold slot ``i`` of a head (cell ``i``'s
    colour and shape, letter ``i``, the count, the word) in a code shared by the slots of that
    head, so the LLM later finds each fact at a fixed image-token position in one common code."""

    def __init__(self, vision_width: int, width: int) -> None:
        super().__init__()
        self.patch = nn.Linear(vision_width, sum(PATCH_HEADS.values()))
        self.norm = nn.LayerNorm(width)
        self.cls = nn.ModuleDict({k: nn.Linear(width, c) for k, (_, c) in HEADS.items()})

    def forward(self, patches: torch.Tensor, feats: torch.Tensor, labels: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        logits = self.patch(patches.float())  # [B, L, sum(C)]
        pos = 0
        for name, c in PATCH_HEADS.items():
            target = labels[name].reshape(-1)  # [B*L]; background patches (0) are not scored
            part = logits[..., pos : pos + c].reshape(-1, c)  # [B*L, c]
            out[name] = F.cross_entropy(part, target, ignore_index=0) if (target != 0).any() else part.sum() * 0
            out[name + "_acc"] = (part.detach().argmax(-1) == target)[target != 0].float().mean()
            pos += c
        tokens = self.norm(feats.float())  # [B, Q, H]
        for name, (n, c) in HEADS.items():
            part = self.cls[name](tokens[:, SLOTS[name] : SLOTS[name] + n])  # [B, n, c]
            target = labels[name].reshape(-1, n)  # [B, n]
            out[name] = F.cross_entropy(part.reshape(-1, c), target.reshape(-1))
            hit = part.detach().argmax(-1) == target
            keep = target != 0 if name != "count" else torch.ones_like(hit)
            out[name + "_acc"] = hit[keep].float().mean() if keep.any() else hit.float().mean()
        return out


def patch_labels(masks: list[Any], patch: int = 14) -> dict[str, np.ndarray]:
    """The mask value at each patch centre, row-major: [L] per patch head."""
    out = {}
    for name, m in zip(PATCH_HEADS, masks, strict=True):
        a = np.asarray(m)
        out[name] = a[patch // 2 :: patch, patch // 2 :: patch].reshape(-1).astype(np.int64)
    return out


def stage1_image(rng: random.Random) -> tuple[Any, dict[str, Any]]:
    """A 224x224 training image and its labels; big-word images are cut to the slice holding the word."""
    scene = syn.make_scene(rng, syn.sample_kind(rng, STAGE1_MIX))
    img, masks = syn.render(scene, rng, masks=True)
    if scene.kind == "bigword":
        box = scene.crop_box()
        img, masks = img.crop(box), [m.crop(box) for m in masks]
    return img, {**syn.dense_labels(scene), **patch_labels(masks)}


def stage1_batch(rng: random.Random, n: int, device: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
    imgs, labs = zip(*(stage1_image(rng) for _ in range(n)), strict=True)
    pixels = [torch.from_numpy(to_patches(im)).to(device) for im in imgs]  # each [3, 14, 256*14]
    labels = {k: torch.tensor(np.array([lab[k] for lab in labs]), device=device) for k in (*HEADS, *PATCH_HEADS)}
    return pixels, labels


def pretrain_vision(model: MiniCPMV, cfg: DemoConfig, device: torch.device) -> dict[str, float]:
    """Stage 1; returns the final running accuracies of the heads."""
    side = syn.CANVAS // 14
    heads = DenseHeads(cfg.vision_width, model.config.text.hidden_size).to(device)
    params = list(model.vpm.parameters()) + list(model.resampler.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=0.05)
    warm = max(1, cfg.stage1_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, s / cfg.stage1_steps))))
    rng = random.Random(cfg.seed + 101)
    tgt = torch.tensor([[side, side]] * cfg.stage1_batch)
    running: dict[str, float] = {}
    from tqdm import tqdm

    bar = tqdm(range(cfg.stage1_steps), desc="stage 1 (vision)", unit="step")
    for step in bar:
        pixels, labels = stage1_batch(rng, cfg.stage1_batch, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            patches = model.vpm.encode_slices(pixels, tgt, batch_size=len(pixels))  # [B, L, D]
            feats = model.resampler(patches, tgt, None)  # [B, Q, H]
            parts = heads(patches, feats, labels)
        loss = sum(v for k, v in parts.items() if not k.endswith("_acc"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for k, v in parts.items():
            if not torch.isnan(v):  # a batch without foreground patches has no patch accuracy
                running[k] = 0.95 * running.get(k, v.item()) + 0.05 * v.item()
        if step % 10 == 0:
            bar.set_postfix({k: f"{v:.2f}" for k, v in running.items() if k.endswith("_acc")})
        if step % 100 == 0:
            log.info("stage 1 step %d: %s", step, {k: round(v, 3) for k, v in running.items()})
    return running


# -- evaluation --------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def evaluate(ckpt: Path, data: Path, device: str = "cpu") -> dict[str, Any]:
    """Held-out exact match per family: each question asked alone on its image, greedy."""
    from PIL import Image

    from ..api import load

    chat = load(str(ckpt), dtype="float32", device=device)
    records = json.loads(data.read_text())
    rng = random.Random(7)
    hits: dict[str, list[int]] = {f: [] for f in syn.FAMILIES}
    for rec in records:
        img = Image.open(data.parent / rec["image"]).convert("RGB")
        for fam, answer in rec["answers"].items():
            q = rng.choice(syn.QUESTIONS[fam])
            got = chat.chat([{"role": "user", "content": [img, q]}], sampling=False, max_new_tokens=8)
            hits[fam].append(int(normalise(got) == answer))
    return {f: {"accuracy": float(np.mean(h)) if h else None, "n": len(h)} for f, h in hits.items()}


# -- the recipe ----------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: DemoConfig) -> dict[str, Any]:
    """The whole recipe; returns (and writes) the report."""
    from .model import TuneSpec
    from .trainer import TrainConfig, train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    if (out / "final" / "model.safetensors").exists():
        raise InputError(f"{out} already holds a finished run; choose another --output")
    device = _device(cfg.device)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    train_json = syn.write_split(data, "train", cfg.train_images, cfg.seed, STAGE2_MIX)
    test_json = syn.write_split(data, "heldout", cfg.eval_images, cfg.seed + 1, STAGE2_MIX)
    times["data_s"] = time.perf_counter() - t0
    init = out / "init"
    vocab = write_tokenizer(init, cfg.vocab_size)
    write_configs(init, cfg, vocab)
    model = build_model(init, cfg.seed).to(device)
    t1 = time.perf_counter()
    accs = pretrain_vision(model, cfg, device)
    times["stage1_s"] = time.perf_counter() - t1
    save_weights(model.cpu(), init)
    del model
    t2 = time.perf_counter()
    tune = TuneSpec(lora=False, tune_vision=False, tune_resampler=cfg.stage2_tune_resampler, tune_llm=True)
    result = train(TrainConfig(model=str(init), data=str(train_json), output=str(out / "final"), tune=tune,
                               epochs=cfg.stage2_epochs, batch_size=cfg.stage2_batch, lr=cfg.stage2_lr,
                               warmup_steps=50, weight_decay=0.01, precision="bf16", seed=cfg.seed,
                               device=str(device), export_dtype="bfloat16", max_length=1024))
    times["stage2_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    acc = evaluate(out / "final", test_json)
    times["eval_s"] = time.perf_counter() - t3
    times["total_s"] = time.perf_counter() - t0
    report = {"config": asdict(cfg), "heldout": acc, "stage1_running": accs, "times": times,
              "stage2_final_loss": result.losses.get(max(result.losses, default=0)),
              "weights_sha256": sha256(out / "final" / "model.safetensors"), "torch": torch.__version__}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


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
    card = {"command": command, "seed": report["config"]["seed"], "weights_sha256": report["weights_sha256"],
            "heldout_exact_match": {k: v["accuracy"] for k, v in report["heldout"].items()},
            "heldout_questions": {k: v["n"] for k, v in report["heldout"].items()},
            "times_s": {k: round(v, 1) for k, v in report["times"].items()}, "torch": report["torch"],
            "config": report["config"]}
    (dest / "DEMO_CARD.json").write_text(json.dumps(card, indent=2))
    return card
