"""LoRA training, adapter save/load, merge and export to a loadable official-layout checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import minicpmv
from minicpmv.cli import main
from minicpmv.train.data import IGNORE, build_dataset
from minicpmv.train.model import LossModule, TuneSpec, apply_adapter, collate, merged_model, prepare_model
from minicpmv.train.trainer import TrainConfig, TrainingError, _run_step, train

from .conftest import CKPT, qa_records, write_data
from .helpers import logits_of


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = write_data(root / "data", qa_records(4))
    cfg = TrainConfig(model=str(CKPT["2.6"]), data=str(data), output=str(root / "out"), max_steps=3, lr=5e-3,
                      export_dtype="float32", progress=False,
                      tune=TuneSpec(lora_r=4, tune_resampler=True, grad_checkpointing=True))
    result = train(cfg)
    return cfg, result, data


def test_lora_run_learns_and_writes_official_layout(lora_run):
    cfg, result, _ = lora_run
    out = Path(cfg.output)
    assert sorted(result.losses) == [1, 2, 3] and result.losses[3] < result.losses[1]
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", "generation_config.json", "added_tokens.json"):
        assert (out / name).is_file(), name
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "non_lora_trainables.safetensors").is_file()  # the tuned resampler
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_adapter_round_trip_merge_and_export(lora_run, tmp_path):
    cfg, _, data = lora_run
    out = Path(cfg.output)
    base = minicpmv.load(CKPT["2.6"], dtype="float32")
    samples, _ = build_dataset(base.processor, data, 4096)
    before = logits_of(base.model, samples[:2])
    peft_model = apply_adapter(base.model, out / "adapter")
    unmerged = logits_of(base.model, samples[:2])
    assert (unmerged - before).abs().max() > 1e-3  # the adapter changes the model
    exported = minicpmv.load(out, dtype="float32")  # the finetune output itself
    assert (logits_of(exported.model, samples[:2]) - unmerged).abs().max() < 1e-4
    merged = merged_model(peft_model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (logits_of(merged, samples[:2]) - unmerged).abs().max() < 1e-4
    # the CLI export path gives the same checkpoint
    rc = main(["export", "--model", str(CKPT["2.6"]), "--adapter", str(out / "adapter"),
               "--output", str(tmp_path / "merged"), "--merge-lora", "--dtype", "float32"])
    assert rc == 0
    again = minicpmv.load(tmp_path / "merged", dtype="float32")
    assert (logits_of(again.model, samples[:2]) - unmerged).abs().max() < 1e-4


def test_full_finetune_45_trains_only_chosen_parts(tmp_path):
    data = write_data(tmp_path / "data", qa_records(2))
    cfg = TrainConfig(model=str(CKPT["4.5"]), data=str(data), output=str(tmp_path / "out"), max_steps=2, lr=1e-3,
                      export_dtype="float32", progress=False, tune=TuneSpec(lora=False, tune_vision=True))
    train(cfg)
    base = minicpmv.load(CKPT["4.5"], dtype="float32").model.state_dict()
    tuned = minicpmv.load(tmp_path / "out", dtype="float32").model.state_dict()
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"llm", "vpm"}  # resampler frozen


def test_batch_without_supervised_token_fails(chat26, tmp_path):
    data = write_data(tmp_path / "data", qa_records(1))
    samples, _ = build_dataset(chat26.processor, data, 4096)
    s = samples[0]
    s.labels = [IGNORE] * len(s.labels)
    cfg = TrainConfig(model="", data="", output="")
    with pytest.raises(TrainingError, match="no supervised token"):
        _run_step(LossModule(chat26.model), [collate([s])], cfg, torch.device("cpu"))


def test_grad_checkpointing_gives_the_same_gradients(tmp_path):
    data = write_data(tmp_path / "data", qa_records(2))
    grads = []
    for ckpt in (False, True):
        chat = minicpmv.load(CKPT["2.6"], dtype="float32")
        samples, _ = build_dataset(chat.processor, data, 4096)
        prepare_model(chat.model, TuneSpec(lora=False, tune_resampler=True, grad_checkpointing=ckpt))
        chat.model.train()
        ce, _ = LossModule(chat.model)(collate(samples))
        ce.backward()
        grads.append({n: p.grad.clone() for n, p in chat.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("resampler") for k in grads[0])
    for k, g in grads[0].items():
        assert torch.allclose(g, grads[1][k], atol=1e-5, rtol=1e-4), k
