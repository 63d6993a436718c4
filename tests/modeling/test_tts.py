"""The speech head's modules: checkpoint key layout, weight norm as torch computes it, speaker and
text embeddings, the GFSQ lookup written out digit by digit, and the Vocos output length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from minicpmv.config import TTSConfig
from minicpmv.modeling.dvae import DVAE, ConvNeXtBlock
from minicpmv.modeling.layers import SimpleKVCache, build_attn_mask
from minicpmv.modeling.tts import ConditionalChatTTS, WeightNormHead
from minicpmv.modeling.vocos import Vocos

ARCHIVE = Path(__file__).resolve().parents[1] / "data" / "conformance" / "o2.6-tts" / "_checkpoint"
TINY = TTSConfig(llm_dim=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                 num_text_tokens=242, spk_emb_token_id=207, audio_bos_token_id=196, text_eos_token_id=197)


def test_module_keys_equal_the_official_checkpoint_keys():
    keys = json.loads((ARCHIVE / "keys.json").read_text())
    with torch.device("meta"):
        tts = ConditionalChatTTS(TINY)
        vocos = Vocos()
    assert {f"tts.{k}": tuple(v.shape) for k, v in tts.state_dict().items()} == \
        {k: tuple(v["shape"]) for k, v in keys["tts_safetensors"].items()}
    assert {k: tuple(v.shape) for k, v in vocos.state_dict().items()} == \
        {k: tuple(v["shape"]) for k, v in keys["vocos"].items()}


def test_weight_norm_head_equals_torch_parametrization():
    torch.manual_seed(0)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(16, 30, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.mul_(7.0)
    head = WeightNormHead(16, 30)
    head.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 16)
    assert torch.equal(head.weight(), ref.weight) and torch.equal(head(x), ref(x))


def test_speaker_row_replaces_the_spk_slot():
    torch.manual_seed(1)
    tts = ConditionalChatTTS(TINY)
    h = torch.randn(1, 256)
    spk = tts.speaker_embedding(h)
    assert spk.shape == (1, 64) and torch.allclose(spk.norm(dim=-1), torch.ones(1))
    ids = torch.tensor([195, 207, 10, 11])
    rows = tts.text_embeddings(ids, spk)
    assert torch.equal(rows[1], spk[0]) and torch.equal(rows[[0, 2, 3]], tts.emb_text(ids[[0, 2, 3]]))
    with pytest.raises(ValueError, match="no speaker embedding"):
        tts.text_embeddings(ids)
    assert torch.equal(tts.text_embeddings(ids[2:]), tts.emb_text(ids[2:]))  # no slot, no speaker needed
    codes = torch.tensor([[1, 2, 3, 4]])
    want = sum(tts.emb_code[i](codes[:, i]) for i in range(4))
    assert torch.allclose(tts.code_embeddings(codes), want)
    assert tts.logits(torch.randn(2, 64)).shape == (2, 4, 626)


def test_decoder_run_with_the_causal_mask_equals_forward():
    torch.manual_seed(2)
    tts = ConditionalChatTTS(TINY)
    x = torch.randn(1, 5, 64)
    pos = torch.arange(5)[None]
    a = tts.model(x, pos, None, SimpleKVCache())
    b = tts.hidden(x, pos, build_attn_mask(None, 5, 0, x.dtype, x.device), SimpleKVCache())
    assert torch.equal(a, b)


def test_gfsq_lookup_spells_each_id_in_base_five():
    torch.manual_seed(3)
    dvae = DVAE()
    codes = torch.randint(0, 625, (1, 6, 4))
    feats = dvae.vq_layer.embed(codes)  # [1, 1024, 6]
    assert feats.shape == (1, 1024, 6)
    for g, rvq in enumerate(dvae.vq_layer.quantizer.rvqs):
        summed = torch.zeros(6, 4)
        for r in range(2):
            ids = codes[0, :, 2 * g + r]
            digits = torch.stack([(ids // 5**j) % 5 for j in range(4)], -1).float()  # [6, 4]
            summed += (digits - 2) / 2 * (0.25 if r else 1.0)
        want = rvq.project_out(summed).T  # [512, 6]
        assert torch.allclose(feats[0, 512 * g : 512 * (g + 1)], want, atol=1e-6)
    mel = dvae.decode(codes)
    assert mel.shape == (1, 100, 12)  # one code frame -> two mel frames


def test_convnext_scale_name_and_vocos_length():
    block = ConvNeXtBlock(8, 16, dilation=2, scale_name="gamma")
    assert "gamma" in dict(block.named_parameters()) and block.dwconv.dilation == (2,)
    vocos = Vocos()
    with torch.no_grad():
        vocos.head.istft.window.copy_(torch.hann_window(1024))
        for p in vocos.parameters():
            p.normal_(0, 0.01)
    wav = vocos.decode(torch.randn(1, 100, 7))
    assert wav.shape == (1, 7 * 256) and torch.isfinite(wav).all()
