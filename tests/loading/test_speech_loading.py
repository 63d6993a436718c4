"""Vocoder and ChatTTS tokenizer files of a MiniCPM-o checkpoint: read without running code,
strictly, from ``Vocos.pt`` or its safetensors copy; clear errors for anything else."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from minicpmv.errors import CheckpointError, MissingWeightsError, ShapeMismatchError, UnexpectedWeightsError
from minicpmv.loading.checkpoint import ALLOW_PATTERNS
from minicpmv.loading.speech import load_vocos, read_vocos_state, tokenizer_dir, vocos_file


def test_pt_and_safetensors_copies_load_the_same_vocoder(tmp_path, tts_checkpoint):
    pt = vocos_file(tts_checkpoint)
    assert pt.name == "Vocos.pt"
    state = read_vocos_state(pt)
    (tmp_path / "assets").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "assets" / "vocos.safetensors"))
    assert vocos_file(tmp_path).name == "vocos.safetensors"  # the safetensors copy is preferred
    a, b = load_vocos(pt), load_vocos(vocos_file(tmp_path))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb) and va.dtype == torch.float32
    mel = torch.randn(1, 100, 5)
    assert torch.equal(a.decode(mel), b.decode(mel))


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-minicpmv-test-dir",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    bad = tmp_path / "Vocos.pt"
    torch.save({"backbone.embed.weight": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="only a plain tensor state dict"):
        read_vocos_state(bad)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_vocos_state(tmp_path / "list.pt")


def test_strict_keys_and_shapes(tmp_path, tts_checkpoint):
    state = dict(read_vocos_state(vocos_file(tts_checkpoint)))

    def save(s: dict) -> str:
        path = tmp_path / f"v{len(list(tmp_path.iterdir()))}.safetensors"
        save_file({k: v.contiguous() for k, v in s.items()}, str(path))
        return str(path)

    with pytest.raises(MissingWeightsError, match="head.out.bias"):
        load_vocos(save({k: v for k, v in state.items() if k != "head.out.bias"}))
    with pytest.raises(UnexpectedWeightsError, match="extra.weight"):
        load_vocos(save({**state, "extra.weight": torch.zeros(2)}))
    with pytest.raises(ShapeMismatchError, match="backbone.norm.weight"):
        load_vocos(save({**state, "backbone.norm.weight": torch.zeros(3)}))


def test_missing_assets_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no vocoder"):
        vocos_file(tmp_path)
    with pytest.raises(CheckpointError, match="ChatTTS tokenizer"):
        tokenizer_dir(tmp_path)
    assert "assets/Vocos.pt" in ALLOW_PATTERNS  # hub downloads bring the vocoder along
