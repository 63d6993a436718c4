"""config.json parsing and the version table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minicpmv.config import ModelConfig, ProcessorConfig
from minicpmv.errors import ConfigError, UnknownVersionError
from minicpmv.versions import VERSIONS, detect_version, get_version

DATA = Path(__file__).resolve().parent / "data"
REAL45 = json.loads((DATA / "real-4.5" / "release" / "config.json").read_text())


def _cfg(**changes):
    d = dict(REAL45, **changes)
    return ModelConfig.from_hf_dict(d, family="qwen3", temporal=True)


def test_real_45_config():
    cfg = _cfg()
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.head_dim) == (4096, 36, 128)
    assert cfg.text.qk_norm and not cfg.text.attention_bias
    assert cfg.resampler.num_heads == 32 and cfg.resampler.kv_dim == 1152 and cfg.resampler.temporal
    assert cfg.slice.max_slice_nums == 9 and cfg.vision_layers_used == 27
    assert cfg.with_text_layers(4).text.num_hidden_layers == 4


def test_qwen2_defaults_to_qkv_bias():
    d = json.loads((DATA / "conformance" / "2.6" / "_checkpoint" / "config.json").read_text())
    cfg = ModelConfig.from_hf_dict(d, family="qwen2", temporal=False)
    assert cfg.text.attention_bias and not cfg.text.qk_norm and cfg.text.head_dim == 64


def test_drop_vision_last_layer_defaults_like_the_reference():
    d = {k: v for k, v in REAL45.items() if k != "drop_vision_last_layer"}
    assert ModelConfig.from_hf_dict(d, family="qwen3", temporal=True).vision_layers_used == 26


@pytest.mark.parametrize(
    "change,match",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_scaling"),
        ({"use_sliding_window": True}, "sliding"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"hidden_size": None}, "hidden_size"),
        ({"vision_config": {"hidden_act": "relu"}}, "vision hidden_act"),
    ],
)
def test_rejects_what_it_cannot_honour(change, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**change)


def test_processor_config():
    d = json.loads((DATA / "real-4.5" / "release" / "preprocessor_config.json").read_text())
    p = ProcessorConfig.from_hf_dict(d)
    assert p.image_feature_size == 64 and p.use_image_id and p.slice.max_slice_nums == 9
    with pytest.raises(ConfigError):
        ProcessorConfig.from_hf_dict({"norm_mean": [0.5, 0.5]})


@pytest.mark.parametrize("value,name", [(2.6, "2.6"), ("2.6", "2.6"), (4.5, "4.5"), ("4.50", "4.5")])
def test_version_lookup(value, name):
    assert detect_version({"version": value}).name == name
    assert get_version(value).name == name


@pytest.mark.parametrize("value", [1.0, "4.1", "banana", 3])
def test_unknown_versions_list_known_ones(value):
    with pytest.raises(UnknownVersionError, match="known versions: 2.0, 2.5, 2.6, o2.6, 4.0, 4.5"):
        get_version(value)


def test_missing_version_field():
    with pytest.raises(UnknownVersionError, match="no 'version' field"):
        detect_version({"hidden_size": 3})


def test_table_is_data():
    assert {v.llm_family for v in VERSIONS.values()} == {"qwen2", "qwen3", "llama", "minicpm"}
    assert VERSIONS["4.5"].supports_thinking and not VERSIONS["2.6"].supports_thinking
    assert VERSIONS["2.6"].sampling_preset["repetition_penalty"] == 1.05
    assert VERSIONS["4.5"].sampling_preset["repetition_penalty"] == 1.03
    assert dict(VERSIONS["4.5"].beam_preset) == {"num_beams": 3, "repetition_penalty": 1.2}
