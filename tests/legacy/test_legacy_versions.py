"""Version table entries of 2.0 / 2.5 / o2.6 / 4.0: detection, config parsing, the generated docs table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minicpmv.config import ModelConfig
from minicpmv.errors import ConfigError, UnknownVersionError
from minicpmv.versions import VERSIONS, detect_version, get_version, versions_markdown

from .conftest import CONF

DOCS = Path(__file__).resolve().parents[2] / "docs" / "versions.md"


def _raw(version: str) -> dict:
    return json.loads((CONF / version / "_checkpoint" / "config.json").read_text())


@pytest.mark.parametrize("version", ["2.0", "2.5", "o2.6", "2.6", "4.5"])
def test_detect_from_config(version):
    assert detect_version(_raw(version)).name == version


def test_detection_rules():
    assert "version" not in _raw("2.0")  # official 2.0 configs have none: the timm encoder marks it
    assert detect_version({"version": 2.6, "model_type": "minicpmo"}).name == "o2.6"
    assert detect_version({"version": "2.6", "model_type": "minicpmv"}).name == "2.6"
    assert detect_version({"version": 4.0}).name == "4.0"
    assert get_version("o2.6").title == "MiniCPM-o 2.6" and get_version(2).name == "2.0"
    with pytest.raises(UnknownVersionError, match="model_type 'minicpmx'"):
        detect_version({"version": 2.6, "model_type": "minicpmx"})
    with pytest.raises(UnknownVersionError, match="no 'version' field"):
        detect_version({"model_type": "minicpmv", "hidden_size": 8})


def _cfg(version: str, **change) -> ModelConfig:
    raw = {**_raw(version), **change}
    return ModelConfig.from_hf_dict(raw, **detect_version(raw).config_kwargs())


def test_parsed_configs_carry_each_difference_as_data():
    c20, c25, co26 = _cfg("2.0"), _cfg("2.5"), _cfg("o2.6")
    assert (c20.text.family, c20.vision_tower, c20.resampler.query_pos_embed) == ("minicpm", "timm_siglip", True)
    assert (c20.text.scale_emb, c20.text.scale_depth, c20.text.dim_model_base) == (12.0, 1.4, 32)
    assert c20.vision.hidden_act == "gelu" and c20.vision.intermediate_size == int(64 * 3.7362)
    assert c20.vision_layers_used == 2 and c20.slice.max_slice_nums == 9  # last block dropped; top-level slicing
    assert (c25.text.family, c25.vision_tower, c25.query_num) == ("llama", "idefics2", 96)
    assert not c25.text.attention_bias
    assert c25.text.scale_emb is None and c25.audio is None
    assert (co26.text.family, co26.vision_tower, co26.text.attention_bias, co26.tts) == ("qwen2", "navit", True, None)
    assert co26.audio is not None and (co26.audio.d_model, co26.audio.encoder_layers) == (64, 2)
    assert co26.audio.projector_in_dim == 64 and co26.audio.chunk_input
    assert _cfg("o2.6", init_tts=True).tts and _cfg("o2.6", init_audio=False).audio is None


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="vision_encoder"):
        _cfg("2.0", vision_encoder="vit_giant_patch16")
    with pytest.raises(ConfigError, match="tiny_vision_overrides"):
        _cfg("2.0", tiny_vision_overrides={"embed_dim": 64, "mlp_ratio": 2})
    with pytest.raises(ConfigError, match="activation_function"):
        _cfg("o2.6", audio_config={**_raw("o2.6")["audio_config"], "activation_function": "relu"})
    with pytest.raises(ConfigError, match="scale_depth"):
        from minicpmv.modeling.llm import build_backbone

        build_backbone(_cfg("2.0", scale_depth=None).text)


def test_every_version_has_a_consistent_entry():
    for spec in VERSIONS.values():
        assert spec.llm_family in {"qwen2", "qwen3", "llama", "minicpm"}
        assert spec.vision_tower in {"navit", "idefics2", "timm_siglip"}
        assert spec.placeholder_scheme in {"per_slice", "wrapped"}
        assert spec.terminators and spec.title
    assert VERSIONS["4.0"].unverified and not VERSIONS["o2.6"].unverified


def test_docs_table_is_generated_from_the_version_table():
    text = versions_markdown()
    assert DOCS.read_text(encoding="utf-8") == text, "regenerate: python -m minicpmv.versions > docs/versions.md"
    for spec in VERSIONS.values():
        assert f"| {spec.title} |" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {cells[0]: dict(zip(head, cells, strict=True))
             for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    assert table["MiniCPM-o 2.6"]["audio in"] == "yes" and table["MiniCPM-V 2.6"]["audio in"] == "no"
    assert table["MiniCPM-V 2.0"]["multi-image"] == "no" and table["MiniCPM-V 2.0"]["system prompt"] == "no"
    assert table["MiniCPM-V 4.5"]["thinking"] == "yes" and table["MiniCPM-V 4.0"]["verified"] == "no"
    assert table["MiniCPM-Llama3-V 2.5"]["video"] == "no" and table["MiniCPM-V 2.6"]["video"] == "yes"
