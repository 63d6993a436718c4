"""Backbones and towers of the older releases, and MiniCPM-V 4.0 built from the spec delta.

MiniCPM's three scalars are checked one by one against the plain Llama decoder; Llama against
Qwen2 with zero biases; the 2.5 tower's batch quirk is pinned; 4.0 (no reference vectors) is a
tiny checkpoint derived from the 2.6 one and must answer exactly like 2.6 with its q/k/v biases
removed. MiniCPM-o checkpoints with TTS weights load strictly (speech itself: tests/engine/test_speech.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minicpmv
from minicpmv.config import TextConfig
from minicpmv.errors import FeatureNotAvailableError, MissingWeightsError
from minicpmv.modeling.layers import AttnMask
from minicpmv.modeling.llm import LlamaForCausalLM, MiniCPMForCausalLM, Qwen2ForCausalLM

from .conftest import CONF, case_image

TEXT = TextConfig(family="minicpm", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=50, rms_norm_eps=1e-5,
                  scale_emb=12.0, scale_depth=1.4, dim_model_base=16)


def _pair(**change) -> tuple[MiniCPMForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TEXT, **change)
    mini = MiniCPMForCausalLM(cfg).eval()
    for p in mini.parameters():
        p.data.normal_(0, 0.1)
    llama = LlamaForCausalLM(dataclasses.replace(cfg, family="llama")).eval()
    llama.load_state_dict(mini.state_dict(), strict=True)
    return mini, llama


def test_minicpm_scalars_one_by_one():
    ids = torch.tensor([[3, 7, 1, 9, 4]])
    # scale_depth = sqrt(L) and dim_model_base = hidden make residual and logit scales 1: Llama exactly
    mini, llama = _pair(scale_depth=math.sqrt(3), dim_model_base=64)
    emb = mini.embed_input_ids(ids)  # [1, T, H]
    assert torch.equal(emb, llama.embed_input_ids(ids) * 12.0)
    assert torch.equal(mini(emb, None), llama(emb, None))
    # logit scale: divide the final hidden state by hidden / dim_model_base (= 4 here)
    mini, llama = _pair(scale_depth=math.sqrt(3))
    h = llama.forward_hidden(emb, None)
    assert torch.allclose(mini(emb, None), llama.lm_head(h / 4.0), atol=1e-6)
    # residual scale: each branch times 1.4 / sqrt(3)
    mini, llama = _pair()
    x = emb
    s = 1.4 / math.sqrt(3)
    cos, sin = llama.model.rotary_emb(torch.arange(5)[None], x.dtype)
    for layer in llama.model.layers:
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, AttnMask(None, True), None) * s
        x = x + layer.mlp(layer.post_attention_layernorm(x)) * s
    want = llama.lm_head(llama.model.norm(x) / 4.0)
    assert torch.allclose(mini(emb, None), want, atol=1e-5)


def test_llama_is_qwen2_without_biases():
    cfg = dataclasses.replace(TEXT, family="llama", scale_emb=None, scale_depth=None, dim_model_base=None)
    torch.manual_seed(1)
    llama = LlamaForCausalLM(cfg).eval()
    qwen = Qwen2ForCausalLM(dataclasses.replace(cfg, family="qwen2", attention_bias=True)).eval()
    state = {**llama.state_dict(), **{k: torch.zeros_like(v) for k, v in qwen.state_dict().items()
                                      if k.endswith("_proj.bias")}}
    qwen.load_state_dict(state, strict=True)
    x = torch.randn(1, 6, 64)
    assert torch.allclose(llama(x, None), qwen(x, None), atol=1e-6)
    assert not any(k.endswith("bias") for k in llama.state_dict())


def test_image_rows_stay_unscaled_in_minicpm(legacy_models):
    cm = legacy_models("2.0")
    ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    feats = torch.randn(2, 256)
    emb = cm.model.embed(ids, [feats], [[(2, 4)]])  # [1, 6, H]
    plain = cm.model.llm.model.embed_tokens(ids)
    assert torch.equal(emb[0, 2:4], feats)
    assert torch.equal(emb[0, [0, 1, 4, 5]], plain[0, [0, 1, 4, 5]] * 12)
    assert torch.equal(cm.model.embed_tokens(ids), plain * 12)  # decoding steps are scaled too


def test_idefics2_tower_depends_on_the_longest_slice_like_the_reference(legacy_models):
    vpm = legacy_models("2.5").model.vpm
    torch.manual_seed(2)
    small, big = torch.randn(3, 14, 6 * 14), torch.randn(3, 14, 12 * 14)
    alone = vpm.encode_slices([small], torch.tensor([[2, 3]]))[0, :6]
    paired = vpm.encode_slices([small, big], torch.tensor([[2, 3], [3, 4]]))[0, :6]
    assert not torch.allclose(alone, paired, atol=1e-3)  # padded patches are seen, positions span Lmax
    navit = legacy_models("o2.6").model.vpm  # the fixed tower (2.6, o2.6) does not have that quirk
    assert torch.allclose(navit.encode_slices([small], torch.tensor([[2, 3]]))[0, :6],
                          navit.encode_slices([small, big], torch.tensor([[2, 3], [3, 4]]))[0, :6], atol=1e-5)


def test_resampler_query_table_of_2_0(legacy_models):
    res = legacy_models("2.0").model.resampler
    assert tuple(res.pos_embed.shape) == (64, 256) and "pos_embed" in res.state_dict()
    assert torch.equal(res.queries(), res.ln_q(res.query) + res.pos_embed)
    assert "pos_embed" not in legacy_models("2.5").model.resampler.state_dict()


# ---------------------------------------------------------------------------- MiniCPM-V 4.0


def _make_v40(tmp_path, **config_change):
    """A 4.0 checkpoint from the tiny 2.6 one: Llama backbone (no q/k/v biases), version 4.0."""
    src = CONF / "2.6" / "_checkpoint"
    dst = tmp_path / "v40"
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update({"version": 4.0, "_name_or_path": "openbmb/MiniCPM-V-4", **config_change})
    cfg.pop("max_window_layers", None)
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.endswith("_proj.bias") or not k.startswith("llm.")},
              str(dst / "model.safetensors"))
    return dst


def test_v40_builds_from_the_spec_delta_and_matches_bias_free_2_6(tmp_path):
    path = _make_v40(tmp_path)
    cm40 = minicpmv.load(path, dtype="float32")
    assert cm40.version.name == "4.0" and isinstance(cm40.model.llm, LlamaForCausalLM)
    assert cm40.terminator_ids() == (cm40.tokenizer.token_to_id("<|im_end|>"),)  # no </s> in this vocabulary
    cm26 = minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32")
    with torch.no_grad():
        for name, p in cm26.model.llm.named_parameters():
            if name.endswith("_proj.bias"):
                p.zero_()
    msgs = [{"role": "user", "content": [case_image("2.6", "single_448"), "What is this?"]}]
    kw = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=8)
    assert cm40.chat(msgs, **kw) == cm26.chat(msgs, **kw)
    batch40, batch26 = cm40.runner.prepare(cm40.processor([msgs])), cm26.runner.prepare(cm26.processor([msgs]))
    assert torch.equal(batch40.input_ids, batch26.input_ids)
    assert torch.allclose(batch40.inputs_embeds, batch26.inputs_embeds)
    from minicpmv.cli import main

    assert main(["inspect", str(path)]) == 0


def test_v40_scale_emb_scales_prompt_text_only(tmp_path):
    cm = minicpmv.load(_make_v40(tmp_path, scale_emb=2.0), dtype="float32")
    ids = torch.tensor([[5, 6, 7]])
    plain = cm.model.llm.model.embed_tokens(ids)
    assert torch.equal(cm.model.embed(ids, [None], [[]]), plain * 2.0)  # wrapper scales the prompt
    assert torch.equal(cm.model.embed_tokens(ids), plain)  # generated tokens go through plain Llama
    answer = cm.chat([{"role": "user", "content": "hi"}], sampling=False, max_new_tokens=4)
    assert isinstance(answer, str)


# ---------------------------------------------------------------------------- MiniCPM-o TTS weights


def _with_tts(tmp_path, tensors: dict[str, torch.Tensor]):
    src = CONF / "o2.6" / "_checkpoint"
    dst = tmp_path / "o26_tts"
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg["init_tts"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "model.safetensors"))
    state.update(tensors)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_partial_tts_weights_are_refused_by_name(tmp_path):
    torch.manual_seed(3)
    path = _with_tts(tmp_path, {
        "tts.projector.linear1.weight": torch.randn(64, 256).bfloat16(),
        "tts.dvae.vq_layer.quantizer.rvqs.0._levels": torch.tensor([5, 5, 5, 5], dtype=torch.int32),
    })
    with pytest.raises(MissingWeightsError, match=r"276 parameter\(s\) .*tts\.dvae\.coef") as err:
        minicpmv.load(path, dtype="float32")
    assert "1 unused" in str(err.value) and "_levels" in str(err.value)  # FSQ tables are not checkpoint tensors


def test_init_tts_without_tts_weights_is_a_clear_error(tmp_path):
    path = _with_tts(tmp_path, {})
    with pytest.raises(MissingWeightsError, match="init_tts"):
        minicpmv.load(path, dtype="float32")


def test_tts_checkpoint_loads_strictly_into_real_modules(tts_model, tts_checkpoint):
    from safetensors import safe_open

    from minicpmv.modeling.tts import ConditionalChatTTS

    stored = set()
    for f in tts_checkpoint.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            stored |= set(h.keys())
    assert isinstance(tts_model.model.tts, ConditionalChatTTS)
    assert set(tts_model.model.state_dict()) == stored


def test_speech_output_without_a_speech_head_is_a_clear_error(legacy_models):
    msgs = [{"role": "user", "content": "Say hello."}]
    with pytest.raises(FeatureNotAvailableError, match="no speech head"):
        legacy_models("o2.6").chat(msgs, generate_audio=True)
